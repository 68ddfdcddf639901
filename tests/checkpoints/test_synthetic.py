"""Deterministic synthetic state dicts (tests/synthetic_weights.py)."""

from __future__ import annotations

import math
import os
import zlib

import numpy as np
import pytest

from tests import synthetic_weights as synthetic

KEYS_DIR = os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'checkpoint_keys')

KEYS = [
    ('backbone.conv1.weight', (64, 3, 7, 7), 'float32'),
    ('backbone.bn1.weight', (64,), 'float32'),
    ('backbone.bn1.bias', (64,), 'float32'),
    ('backbone.bn1.running_mean', (64,), 'float32'),
    ('backbone.bn1.running_var', (64,), 'float32'),
    ('backbone.bn1.num_batches_tracked', (), 'int64'),
    ('roi_head.bbox_head.shared_fcs.0.weight', (1024, 12544), 'float32'),
    ('roi_head.bbox_head.fc_cls.bias', (81,), 'float32'),
    ('head.half', (8, 4), 'float16'),
]


def test_rule_is_seed_and_crc32_of_the_name():
  sd = synthetic.seeded_state_dict(KEYS, seed=7)
  name, shape = 'backbone.conv1.weight', (64, 3, 7, 7)
  z = np.random.default_rng([7, zlib.crc32(name.encode())]).standard_normal(shape)
  np.testing.assert_array_equal(sd[name], (z * math.sqrt(2.0 / (3 * 7 * 7))).astype(np.float32))
  assert sd[name].dtype == np.float32
  fc = sd['roi_head.bbox_head.shared_fcs.0.weight']
  assert abs(fc.std() - math.sqrt(2.0 / 12544)) < 1e-3 * math.sqrt(2.0 / 12544) * 10


def test_deterministic_and_independent_of_other_keys():
  a = synthetic.seeded_state_dict(KEYS, seed=1)
  b = synthetic.seeded_state_dict(KEYS[:1], seed=1)
  c = synthetic.seeded_state_dict(KEYS, seed=2)
  np.testing.assert_array_equal(a['backbone.conv1.weight'], b['backbone.conv1.weight'])
  assert not np.array_equal(a['backbone.conv1.weight'], c['backbone.conv1.weight'])
  assert list(a) == [k for k, _, _ in KEYS]


def test_one_d_and_scalar_defaults():
  sd = synthetic.seeded_state_dict(KEYS, seed=0)
  np.testing.assert_array_equal(sd['backbone.bn1.weight'], np.ones(64, np.float32))
  np.testing.assert_array_equal(sd['backbone.bn1.bias'], np.zeros(64, np.float32))
  np.testing.assert_array_equal(sd['backbone.bn1.running_mean'], np.zeros(64, np.float32))
  np.testing.assert_array_equal(sd['backbone.bn1.running_var'], np.ones(64, np.float32))
  np.testing.assert_array_equal(sd['roi_head.bbox_head.fc_cls.bias'], np.zeros(81, np.float32))
  t = sd['backbone.bn1.num_batches_tracked']
  assert t.shape == () and t.dtype == np.int64 and t == 0
  assert sd['head.half'].dtype == np.float16


def test_scales_and_overrides():
  scales = {'backbone.conv1.weight': 0.5, 'backbone.bn1.running_var': 0.1,
            'backbone.bn1.weight': 0.2}
  override = np.full((81,), 3.0, np.float32)
  sd = synthetic.seeded_state_dict(KEYS, seed=4, scales=scales,
                                   overrides={'roi_head.bbox_head.fc_cls.bias': override})
  rng = np.random.default_rng([4, zlib.crc32(b'backbone.conv1.weight')])
  z = rng.standard_normal((64, 3, 7, 7))
  np.testing.assert_array_equal(sd['backbone.conv1.weight'], (z * 0.5).astype(np.float32))
  assert (sd['backbone.bn1.running_var'] > 0).all() and sd['backbone.bn1.running_var'].std() > 0
  zw = np.random.default_rng([4, zlib.crc32(b'backbone.bn1.weight')]).standard_normal(64)
  np.testing.assert_array_equal(sd['backbone.bn1.weight'], (1.0 + 0.2 * zw).astype(np.float32))
  np.testing.assert_array_equal(sd['roi_head.bbox_head.fc_cls.bias'], override)
  with pytest.raises(KeyError, match='not in the key list'):
    synthetic.seeded_state_dict(KEYS, seed=0, scales={'typo.weight': 1.0})


def test_read_key_tsv(tmp_path):
  keys = synthetic.read_key_tsv(os.path.join(KEYS_DIR, 'mmdet_mask_rcnn_r50_fpn_1x_coco.tsv'))
  assert len(keys) == 360
  assert keys[0] == ('backbone.conv1.weight', (64, 3, 7, 7), 'float32')
  assert ('backbone.bn1.num_batches_tracked', (), 'int64') in keys
  legacy = synthetic.read_key_tsv(
      os.path.join(KEYS_DIR, 'torchvision_maskrcnn_resnet50_fpn_v1_legacy_names.tsv'))
  assert ('backbone.fpn.inner_blocks.0.weight', (256, 256, 1, 1), 'float32') in legacy
  bad = tmp_path / 'bad.tsv'
  bad.write_text('name\t(1, 2)\n')
  with pytest.raises(ValueError, match='bad.tsv:1: expected 3 tab-separated fields'):
    synthetic.read_key_tsv(str(bad))
