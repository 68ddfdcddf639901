"""Name maps, diagnosis and the strict conversion: every checkpoint key lands at the model's path
with the right layout, and a checkpoint of another model is explained.

The expected trees are the Flax model's own (`modeling.build.variable_shapes` of the recipe's model
with the spec's depth, widths, classes and heads): the one statement of what the model holds. Key
lists are tests/fixtures/checkpoint_keys/*.tsv (the real zoo files' keys and shapes).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from maskrcnn_jax import config_lib
from maskrcnn_jax.checkpoints import conversion, diagnose
from maskrcnn_jax.checkpoints import name_maps as nm
from maskrcnn_jax.modeling.build import build_model, variable_shapes
from tests import synthetic_weights as synthetic

KEYS_DIR = os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'checkpoint_keys')


@dataclasses.dataclass(frozen=True)
class Model:
  framework: str
  depth: int
  widths: tuple[int, int, int, int]  # bottleneck width per stage (parity_spec 2.2, 2.4, 2.6)
  groups: int
  classes: tuple[int, int, int]  # (K_cls, K_reg, K_mask), internals.md
  maskiou: bool = False
  tv_v2: bool = False

  @property
  def blocks(self):
    return {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[self.depth]

  def spec(self) -> nm.ModelSpec:
    return nm.ModelSpec(depth=self.depth, has_maskiou=self.maskiou, torchvision_v2=self.tv_v2,
                        groups=self.groups, width_per_group=self.widths[0] // self.groups,
                        num_classes=self.classes[0] - 1)


R50 = (64, 128, 256, 512)
MM = (81, 80, 80)
TV = (91, 91, 91)
MODELS = {
    'mmdet_mask_rcnn_r50_fpn_1x_coco': Model('mmdet', 50, R50, 1, MM),
    'mmdet_mask_rcnn_r50_caffe_fpn_1x_coco': Model('mmdet', 50, R50, 1, MM),
    # parity_spec 2.4: 32x4d widths 128..1024, 64x4d 256..2048.
    'mmdet_mask_rcnn_x101_32x4d_fpn_1x_coco': Model('mmdet', 101, (128, 256, 512, 1024), 32, MM),
    'mmdet_mask_rcnn_x101_64x4d_fpn_1x_coco': Model('mmdet', 101, (256, 512, 1024, 2048), 64, MM),
    'mmdet_ms_rcnn_r50_caffe_fpn_1x_coco': Model('mmdet', 50, R50, 1, MM, maskiou=True),
    'detectron2_mask_rcnn_R_50_FPN_3x': Model('detectron2', 50, R50, 1, MM),
    # d2 X101-32x8d: NUM_GROUPS 32, WIDTH_PER_GROUP 8 -> 256..2048.
    'detectron2_mask_rcnn_X_101_32x8d_FPN_3x':
        Model('detectron2', 101, (256, 512, 1024, 2048), 32, MM),
    'torchvision_maskrcnn_resnet50_fpn_v1': Model('torchvision', 50, R50, 1, TV),
    'torchvision_maskrcnn_resnet50_fpn_v1_legacy_names': Model('torchvision', 50, R50, 1, TV),
    'torchvision_maskrcnn_resnet50_fpn_v2': Model('torchvision', 50, R50, 1, TV, tv_v2=True),
}


ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE_RECIPES = {'mmdet': 'mmdet/mask_rcnn_r50_fpn_1x_coco',
                'detectron2': 'detectron2/mask_rcnn_R_50_FPN_1x',
                'torchvision': 'torchvision/maskrcnn_resnet50_fpn',
                'torchvision_v2': 'torchvision/maskrcnn_resnet50_fpn_v2'}


@functools.lru_cache(maxsize=None)
def model_shapes(framework: str, spec: nm.ModelSpec) -> dict[tuple[str, ...], tuple[int, ...]]:
  """The variables (path -> shape) of the Flax model a config with `spec` builds: the framework's
  R-50-FPN recipe with the spec's depth, widths, classes and heads (None: ResNet, COCO)."""
  key = 'torchvision_v2' if spec.torchvision_v2 else framework
  config = config_lib.load_config_file(str(ROOT / 'configs' / f'{BASE_RECIPES[key]}.py'))
  m = config.model
  m.depth = spec.depth
  m.groups = spec.groups or 1
  m.width_per_group = spec.width_per_group or 64
  if spec.num_classes is not None:
    m.num_classes = spec.num_classes
  m.mask_scoring = spec.has_maskiou
  return variable_shapes(build_model(config))


def to_variables(state, *, framework, spec, **kw):
  """The strict conversion against the model `spec` describes; returns the variables."""
  return conversion.to_variables(state, framework=framework, spec=spec,
                                 expected=model_shapes(framework, spec), **kw).variables


_KEY_CACHE: dict[str, list] = {}


def keys_of(name: str) -> list:
  if name not in _KEY_CACHE:
    _KEY_CACHE[name] = synthetic.read_key_tsv(os.path.join(KEYS_DIR, name + '.tsv'))
  return _KEY_CACHE[name]


def zeros_state(name: str, overrides: dict | None = None) -> dict[str, np.ndarray]:
  state = {k: np.zeros(s, dtype=d) for k, s, d in keys_of(name)}
  state.update(overrides or {})
  return state


def distinct(shape, offset=0.0) -> np.ndarray:
  """float32 array whose elements are all different (exact while size < 2**24)."""
  values = np.arange(int(np.prod(shape)), dtype=np.float64) + offset
  return values.astype(np.float32).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Structure: every key consumed, exactly the model's paths and shapes.


@pytest.mark.parametrize('name', sorted(MODELS))
def test_every_key_consumed_and_tree_matches_the_model(name):
  m = MODELS[name]
  state = zeros_state(name)
  result = nm.map_state_dict(state, framework=m.framework, spec=m.spec())
  assert result.unmatched == []
  assert result.problems == []
  # Only num_batches_tracked is dropped (no cell_anchors in these key lists).
  assert all(k.endswith('.num_batches_tracked') for k in result.dropped)
  assert len(result.dropped) == sum(k.endswith('num_batches_tracked') for k in state)
  assert set(result.sources.values()) | set(result.dropped) == set(state)
  assert len(result.sources) == len(state) - len(result.dropped)  # 1:1, nothing consumed twice
  got = {p: tuple(v.shape) for p, v in nm.flatten_variables(result.variables).items()}
  want = model_shapes(m.framework, m.spec())
  assert sorted(set(got) - set(want)) == []
  assert sorted(set(want) - set(got)) == []
  bad = {p: (got[p], want[p]) for p in want if got[p] != want[p]}
  assert bad == {}
  assert set(result.variables) == {'params', 'batch_stats'}
  for leaf in nm.flatten_variables(result.variables).values():
    assert leaf.dtype == np.float32 and leaf.flags['C_CONTIGUOUS']
  # The strict entry point accepts it.
  to_variables(state, framework=m.framework, spec=m.spec())


@pytest.mark.parametrize('name', sorted(MODELS))
def test_infer_spec(name):
  m = MODELS[name]
  assert nm.infer_spec(zeros_state(name), framework=m.framework) == m.spec()


def test_spec_blocks_and_widths():
  assert nm.ModelSpec(depth=50).blocks == (3, 4, 6, 3)
  assert nm.ModelSpec(depth=101).blocks == (3, 4, 23, 3)
  assert nm.ModelSpec(depth=101, groups=32, width_per_group=4).stage_widths == (128, 256, 512, 1024)
  wide = (256, 512, 1024, 2048)
  assert nm.ModelSpec(depth=101, groups=64, width_per_group=4).stage_widths == wide
  assert nm.ModelSpec(depth=101, groups=32, width_per_group=8).stage_widths == wide
  with pytest.raises(ValueError, match='depth'):
    nm.ModelSpec(depth=34)


def test_unspecified_widths_come_from_the_checkpoint():
  """A spec without groups/width_per_group (as a config gives it) maps a ResNeXt file."""
  name = 'mmdet_mask_rcnn_x101_32x4d_fpn_1x_coco'
  variables = conversion.to_variables(zeros_state(name), framework='mmdet',
                                    spec=nm.ModelSpec(depth=101)).variables  # keys checked
  assert variables['params']['backbone']['res2_0']['conv2']['kernel'].shape == (3, 3, 4, 128)


# ---------------------------------------------------------------------------------------------
# Layout hooks.


def _conv_nchw_torch(x, w, groups):
  """torch Conv2d semantics (cross-correlation, valid, stride 1): x (N,C,H,W), w (O,C/g,kh,kw)."""
  n, c, h, wd = x.shape
  o, cg, kh, kw = w.shape
  og = o // groups
  out = np.zeros((n, o, h - kh + 1, wd - kw + 1))
  for oc in range(o):
    g = oc // og
    for ci in range(cg):
      for a in range(kh):
        for b in range(kw):
          out[:, oc] += w[oc, ci, a, b] * x[:, g * cg + ci, a:a + h - kh + 1, b:b + wd - kw + 1]
  return out


def _conv_nhwc_flax(x, k, groups):
  """flax.linen.Conv (valid, stride 1, feature_group_count): x (N,H,W,C), k (kh,kw,C/g,O)."""
  n, h, wd, c = x.shape
  kh, kw, cg, o = k.shape
  og = o // groups
  out = np.zeros((n, h - kh + 1, wd - kw + 1, o))
  for oc in range(o):
    g = oc // og
    for a in range(kh):
      for b in range(kw):
        patch = x[:, a:a + h - kh + 1, b:b + wd - kw + 1, g * cg:(g + 1) * cg]
        out[..., oc] += patch @ k[a, b, :, oc]
  return out


@pytest.mark.parametrize('groups', [1, 2])
def test_conv_kernel_semantics(groups):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 6, 5))
  w = rng.standard_normal((6, 4 // groups, 3, 2))
  k = nm.conv_kernel(w)
  assert k.shape == (3, 2, 4 // groups, 6)
  np.testing.assert_allclose(_conv_nhwc_flax(x.transpose(0, 2, 3, 1), k, groups),
                             _conv_nchw_torch(x, w, groups).transpose(0, 2, 3, 1),
                             rtol=1e-12, atol=1e-12)


def test_conv_weight_lands_transposed_in_the_tree():
  name = 'detectron2_mask_rcnn_X_101_32x8d_FPN_3x'
  w = distinct((256, 8, 3, 3))
  stem = distinct((64, 3, 7, 7), offset=0.5)
  state = zeros_state(name, {'backbone.bottom_up.res2.1.conv2.weight': w,
                             'backbone.bottom_up.stem.conv1.weight': stem})
  v = to_variables(state, framework='detectron2', spec=MODELS[name].spec())
  k = v['params']['backbone']['res2_1']['conv2']['kernel']
  kk = v['params']['backbone']['stem_conv']['kernel']
  for (a, b, i, o) in [(0, 0, 0, 0), (2, 1, 7, 255), (1, 2, 3, 100)]:
    assert k[a, b, i, o] == w[o, i, a, b]
  for (a, b, i, o) in [(6, 0, 2, 63), (3, 5, 1, 17)]:
    assert kk[a, b, i, o] == stem[o, i, a, b]
  np.testing.assert_array_equal(k, np.einsum('oihw->hwio', w))


ROI_FC_KEYS = [
    ('mmdet_mask_rcnn_r50_fpn_1x_coco', 'roi_head.bbox_head.shared_fcs.0.weight',
     ('box_head', 'fc1')),
    ('mmdet_ms_rcnn_r50_caffe_fpn_1x_coco', 'roi_head.mask_iou_head.fcs.0.weight',
     ('maskiou_head', 'fc1')),
    ('detectron2_mask_rcnn_R_50_FPN_3x', 'roi_heads.box_head.fc1.weight', ('box_head', 'fc1')),
    ('torchvision_maskrcnn_resnet50_fpn_v1', 'roi_heads.box_head.fc6.weight', ('box_head', 'fc1')),
    ('torchvision_maskrcnn_resnet50_fpn_v2', 'roi_heads.box_head.5.weight', ('box_head', 'fc1')),
]


@pytest.mark.parametrize('name,key,path', ROI_FC_KEYS)
def test_roi_fc_column_permutation(name, key, path):
  """torch column c*49 + h*7 + w lands at kernel row h*7*256 + w*256 + c (internals.md)."""
  m = MODELS[name]
  w = distinct((1024, 12544))  # w[o, col] = o * 12544 + col, exact in float32
  v = to_variables(zeros_state(name, {key: w}), framework=m.framework, spec=m.spec())
  kernel = v['params'][path[0]][path[1]]['kernel']
  assert kernel.shape == (12544, 1024)
  c, h, x = np.meshgrid(np.arange(256), np.arange(7), np.arange(7), indexing='ij')
  torch_col = (c * 49 + h * 7 + x).ravel()
  row = (h * 7 * 256 + x * 256 + c).ravel()
  for o in (0, 1, 517, 1023):
    np.testing.assert_array_equal(kernel[row, o], w[o, torch_col])


def test_roi_fc_semantics():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((5, 256 * 49))
  x = rng.standard_normal((256, 7, 7))  # one RoI feature, CHW
  torch_out = w @ x.reshape(-1)  # torch: flatten NCHW, x @ W.T
  flax_out = x.transpose(1, 2, 0).reshape(-1) @ nm.roi_fc_kernel(w)  # NHWC flatten, x @ kernel
  np.testing.assert_allclose(flax_out, torch_out, rtol=1e-10)


def _conv_transpose2d_loop(x, w, bias, stride):
  """torch ConvTranspose2d (padding 0, no output padding) by its scatter definition:
  out[n, o, i*s + a, j*s + b] += x[n, c, i, j] * w[c, o, a, b]; x (N,C,H,W), w (C,O,kh,kw)."""
  n, c, h, wd = x.shape
  _, o, kh, kw = w.shape
  out = np.zeros((n, o, (h - 1) * stride + kh, (wd - 1) * stride + kw))
  for i in range(h):
    for j in range(wd):
      for a in range(kh):
        for b in range(kw):
          out[:, :, i * stride + a, j * stride + b] += x[:, :, i, j] @ w[:, :, a, b]
  return out + bias[None, :, None, None]


def _deconv_internals_formula(x_nhwc, kernel, bias):
  """internals.md: out[2i+a, 2j+b, o] = bias[o] + sum_c x[i, j, c] k[a, b, c, o]."""
  n, h, wd, _ = x_nhwc.shape
  o = kernel.shape[-1]
  out = np.zeros((n, 2 * h, 2 * wd, o))
  for a in range(2):
    for b in range(2):
      out[:, a::2, b::2, :] = np.einsum('nijc,co->nijo', x_nhwc, kernel[a, b]) + bias
  return out


def test_deconv_matches_conv_transpose2d():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 3, 4, 5))
  w = rng.standard_normal((3, 6, 2, 2))  # ConvTranspose2d(3, 6, 2, 2): weight (I, O, kh, kw)
  bias = rng.standard_normal(6)
  kernel = nm.deconv_kernel(w)
  assert kernel.shape == (2, 2, 3, 6)
  ours = _deconv_internals_formula(x.transpose(0, 2, 3, 1), kernel, bias)
  reference = _conv_transpose2d_loop(x, w, bias, stride=2)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    torch = None
  if torch is not None:
    ref_torch = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias), stride=2).numpy()
    np.testing.assert_allclose(reference, ref_torch, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('name,key', [
    ('mmdet_mask_rcnn_r50_fpn_1x_coco', 'roi_head.mask_head.upsample.weight'),
    ('detectron2_mask_rcnn_R_50_FPN_3x', 'roi_heads.mask_head.deconv.weight'),
    ('torchvision_maskrcnn_resnet50_fpn_v1', 'roi_heads.mask_predictor.conv5_mask.weight'),
])
def test_deconv_weight_lands_in_the_tree(name, key):
  m = MODELS[name]
  w = distinct((256, 256, 2, 2))
  v = to_variables(zeros_state(name, {key: w}), framework=m.framework, spec=m.spec())
  k = v['params']['mask_head']['deconv']['kernel']
  for (a, b, i, o) in [(0, 1, 3, 200), (1, 0, 255, 0), (1, 1, 17, 18)]:
    assert k[a, b, i, o] == w[i, o, a, b]


def test_linear_and_norm_leaves():
  name = 'mmdet_mask_rcnn_r50_fpn_1x_coco'
  cls = distinct((81, 1024))
  bn = {f'backbone.layer2.0.bn3.{leaf}': distinct((512,), offset=1000.0 * i)
        for i, leaf in enumerate(('weight', 'bias', 'running_mean', 'running_var'))}
  v = to_variables(zeros_state(name, {'roi_head.bbox_head.fc_cls.weight': cls, **bn}),
                      framework='mmdet', spec=MODELS[name].spec())
  np.testing.assert_array_equal(v['params']['box_predictor']['cls_score']['kernel'], cls.T)
  norm_p = v['params']['backbone']['res3_0']['norm3']
  norm_s = v['batch_stats']['backbone']['res3_0']['norm3']
  np.testing.assert_array_equal(norm_p['scale'], bn['backbone.layer2.0.bn3.weight'])
  np.testing.assert_array_equal(norm_p['bias'], bn['backbone.layer2.0.bn3.bias'])
  np.testing.assert_array_equal(norm_s['mean'], bn['backbone.layer2.0.bn3.running_mean'])
  np.testing.assert_array_equal(norm_s['var'], bn['backbone.layer2.0.bn3.running_var'])


def test_native_class_layout_is_kept():
  """No 91 -> 80 conversion (parity_spec 5 item 4): tv heads stay 91-way, row order unchanged."""
  m = MODELS['torchvision_maskrcnn_resnet50_fpn_v1']
  cls = distinct((91, 1024))
  v = to_variables(zeros_state('torchvision_maskrcnn_resnet50_fpn_v1',
                                  {'roi_heads.box_predictor.cls_score.weight': cls}),
                      framework='torchvision', spec=m.spec())
  np.testing.assert_array_equal(v['params']['box_predictor']['cls_score']['kernel'][:, 0], cls[0])


def test_torchvision_legacy_names_give_the_same_tree():
  current = keys_of('torchvision_maskrcnn_resnet50_fpn_v1')
  seeded = synthetic.seeded_state_dict([k for k in current if 'layer' not in k], seed=3)
  current_state = zeros_state('torchvision_maskrcnn_resnet50_fpn_v1', seeded)
  # The legacy file lists "(current name: ...)" as a 4th column.
  rename = {}
  with open(os.path.join(KEYS_DIR, 'torchvision_maskrcnn_resnet50_fpn_v1_legacy_names.tsv')) as f:
    for line in f:
      parts = line.rstrip('\n').split('\t')
      if len(parts) == 4:
        rename[re.search(r'current name: (\S+)\)', parts[3]).group(1)] = parts[0]
  assert len(rename) == 8 * 2 + 2 + 4 * 2  # FPN 8 convs, rpn conv, 4 mask convs
  legacy_state = {rename.get(k, k): v for k, v in current_state.items()}
  legacy_keys = keys_of('torchvision_maskrcnn_resnet50_fpn_v1_legacy_names')
  assert set(legacy_state) == {k for k, _, _ in legacy_keys}
  spec = MODELS['torchvision_maskrcnn_resnet50_fpn_v1'].spec()
  a = nm.flatten_variables(to_variables(current_state, framework='torchvision', spec=spec))
  b = nm.flatten_variables(to_variables(legacy_state, framework='torchvision', spec=spec))
  assert a.keys() == b.keys()
  for p in a:
    np.testing.assert_array_equal(a[p], b[p])


def test_both_spellings_is_an_error():
  name = 'torchvision_maskrcnn_resnet50_fpn_v1'
  state = zeros_state(name, {'rpn.head.conv.weight': np.zeros((256, 256, 3, 3), np.float32)})
  with pytest.raises(nm.CheckpointMismatchError,
                     match=r'rpn\.head\.conv\.weight and rpn\.head\.conv\.0\.0\.weight both map to '
                           r'params/rpn_head/conv0/kernel'):
    to_variables(state, framework='torchvision', spec=MODELS[name].spec())


def test_d2_cell_anchors_are_dropped_and_exposed():
  name = 'detectron2_mask_rcnn_R_50_FPN_3x'
  names = [f'proposal_generator.anchor_generator.cell_anchors.{i}' for i in range(5)]
  anchors = {n: distinct((3, 4), offset=100 * i) for i, n in enumerate(names)}
  state = zeros_state(name, anchors)
  result = nm.map_state_dict(state, framework='detectron2', spec=MODELS[name].spec())
  assert sorted(result.dropped) == sorted(anchors)
  assert result.unmatched == []
  got = nm.cell_anchors(state)
  assert len(got) == 5
  for i in range(5):
    np.testing.assert_array_equal(got[i], anchors[names[i]])
  assert nm.cell_anchors(zeros_state(name)) is None
  to_variables(state, framework='detectron2', spec=MODELS[name].spec())


def test_dtype_cast_and_keep():
  name = 'mmdet_mask_rcnn_r50_fpn_1x_coco'
  state = {k: v.astype(np.float16) if v.dtype == np.float32 else v
           for k, v in zeros_state(name).items()}
  v = to_variables(state, framework='mmdet', spec=MODELS[name].spec())
  assert v['params']['fpn']['lateral2']['kernel'].dtype == np.float32
  v = to_variables(state, framework='mmdet', spec=MODELS[name].spec(), dtype=None)
  assert v['params']['fpn']['lateral2']['kernel'].dtype == np.float16


# ---------------------------------------------------------------------------------------------
# Strictness and the messages for checkpoints of another architecture.


def _mismatch(state, framework, spec, **kw) -> str:
  with pytest.raises(nm.CheckpointMismatchError) as info:
    to_variables(state, framework=framework, spec=spec, **kw)
  return str(info.value)


def test_resnet101_checkpoint_for_r50_spec():
  # An mmdet R101 key set: the X101 list with plain-ResNet widths gives the same names.
  state = zeros_state('mmdet_mask_rcnn_x101_32x4d_fpn_1x_coco')
  msg = _mismatch(state, 'mmdet', nm.ModelSpec(depth=50))
  assert ('unexpected key backbone.layer3.6.conv1.weight: the checkpoint has more blocks than '
          'ResNet-50 — is it a ResNet-101 checkpoint?') in msg
  extra = [k for k in state if re.match(r'backbone\.layer3\.([6-9]|1\d|2[0-2])\.', k)
           and not k.endswith('num_batches_tracked')]
  assert f'{len(extra)} unmatched checkpoint key(s):' in msg
  for k in extra:
    assert f'\n    {k}\n' in msg + '\n'


def test_resnet101_checkpoint_for_r50_spec_detectron2():
  state = zeros_state('detectron2_mask_rcnn_X_101_32x8d_FPN_3x')
  msg = _mismatch(state, 'detectron2', nm.ModelSpec(depth=50))
  assert ('unexpected key backbone.bottom_up.res4.6.conv1.weight: the checkpoint has more blocks '
          'than ResNet-50 — is it a ResNet-101 checkpoint?') in msg


def test_resnet50_checkpoint_for_r101_spec():
  msg = _mismatch(zeros_state('mmdet_mask_rcnn_r50_fpn_1x_coco'), 'mmdet', nm.ModelSpec(depth=101))
  assert ('missing params/backbone/res4_6/conv1/kernel: the checkpoint has fewer blocks than '
          'ResNet-101 — is it a ResNet-50 checkpoint?') in msg
  assert 'params/backbone/res4_22/norm3/scale (1024,)' in msg


def test_faster_rcnn_checkpoint_without_mask_head():
  state = {k: v for k, v in zeros_state('mmdet_mask_rcnn_r50_fpn_1x_coco').items()
           if '.mask_head.' not in k}
  msg = _mismatch(state, 'mmdet', nm.ModelSpec())
  assert ('the checkpoint has no mask-head keys — is it a Faster R-CNN (box-only) '
          'checkpoint?') in msg
  assert '12 model path(s) missing from the checkpoint:' in msg
  assert 'params/mask_head/deconv/kernel (2,2,256,256)' in msg


def test_mask_scoring_checkpoint_for_plain_spec_and_back():
  msg = _mismatch(zeros_state('mmdet_ms_rcnn_r50_caffe_fpn_1x_coco'), 'mmdet', nm.ModelSpec())
  assert ('unexpected key roi_head.mask_iou_head.convs.0.weight: the checkpoint has a MaskIoU '
          'head — is it a Mask Scoring R-CNN checkpoint?') in msg
  msg = _mismatch(zeros_state('mmdet_mask_rcnn_r50_caffe_fpn_1x_coco'), 'mmdet',
                  nm.ModelSpec(has_maskiou=True))
  assert 'the checkpoint has no MaskIoU-head keys — is it a plain Mask R-CNN checkpoint?' in msg


def test_torchvision_v2_checkpoint_for_v1_spec_and_back():
  msg = _mismatch(zeros_state('torchvision_maskrcnn_resnet50_fpn_v2'), 'torchvision',
                  nm.ModelSpec())
  assert 'is it a torchvision v2 (maskrcnn_resnet50_fpn_v2) checkpoint?' in msg
  msg = _mismatch(zeros_state('torchvision_maskrcnn_resnet50_fpn_v1'), 'torchvision',
                  nm.ModelSpec(torchvision_v2=True))
  assert 'unexpected key roi_heads.box_head.fc6.weight: is it a torchvision v1' in msg


def test_wrong_framework():
  msg = _mismatch(zeros_state('detectron2_mask_rcnn_R_50_FPN_3x'), 'mmdet', nm.ModelSpec())
  assert "the keys look like a detectron2 state dict, not mmdet" in msg
  assert "use a detectron2 recipe (convention 'detectron2')" in msg


def test_mmdet_v1_checkpoint_is_rejected():
  name = 'mmdet_mask_rcnn_r50_fpn_1x_coco'
  f32 = np.float32
  state = zeros_state(name, {
      'roi_head.bbox_head.fc_cls.weight': np.zeros((81, 1024), f32),
      'roi_head.bbox_head.fc_reg.weight': np.zeros((324, 1024), f32),
      'roi_head.bbox_head.fc_reg.bias': np.zeros((324,), f32),
      'roi_head.mask_head.conv_logits.weight': np.zeros((81, 256, 1, 1), f32),
      'roi_head.mask_head.conv_logits.bias': np.zeros((81,), f32)})
  with pytest.raises(nm.LegacyMmdetCheckpointError) as info:
    to_variables(state, framework='mmdet', spec=nm.ModelSpec(), source='old.pth')
  msg = str(info.value)
  assert msg.startswith('old.pth: this is an mmdetection 1.x checkpoint: fc_cls has 81 rows, '
                        'fc_reg 324 rows, conv_logits 81 channels')
  assert 'upgrade_model_version.py' in msg
  # The 1.x spelling (no roi_head. prefix) is recognised too, even when strict=False.
  v1_names = {k.replace('roi_head.', ''): v for k, v in state.items()}
  with pytest.raises(nm.LegacyMmdetCheckpointError, match='mmdetection 1.x'):
    conversion.to_variables(v1_names, framework='mmdet', spec=nm.ModelSpec(), strict=False)


def test_every_problem_is_listed_with_shapes():
  name = 'mmdet_mask_rcnn_r50_fpn_1x_coco'
  state = zeros_state(name, {
      'roi_head.bbox_head.fc_cls.weight': np.zeros((21, 1024), np.float32),
      'roi_head.bbox_head.fc_cls.bias': np.zeros((21,), np.float32),
      'roi_head.bbox_head.extra_fc.weight': np.zeros((3, 3), np.float32),
  })
  del state['rpn_head.rpn_reg.bias']
  msg = _mismatch(state, 'mmdet', nm.ModelSpec(num_classes=80), source='ckpt.pth')
  assert msg.startswith('ckpt.pth: the mmdet checkpoint does not match the model (ResNet-50-FPN):')
  assert '1 unmatched checkpoint key(s):\n    roi_head.bbox_head.extra_fc.weight' in msg
  assert ('1 model path(s) missing from the checkpoint:\n'
          '    params/rpn_head/deltas/bias (12,)') in msg
  assert '2 shape disagreement(s):' in msg
  assert ('params/box_predictor/cls_score/kernel: checkpoint (1024,21) vs model (1024,81) '
          '[roi_head.bbox_head.fc_cls.weight]') in msg
  assert 'params/box_predictor/cls_score/bias: checkpoint (21,) vs model (81,)' in msg
  assert 'has 21 classes, the model 81' in msg


def test_layout_problem_is_reported():
  name = 'mmdet_mask_rcnn_r50_fpn_1x_coco'
  state = zeros_state(name, {'rpn_head.rpn_cls.weight': np.zeros((3, 256), np.float32)})
  msg = _mismatch(state, 'mmdet', nm.ModelSpec())
  assert ('rpn_head.rpn_cls.weight: expected a 4-D conv weight (O, I/g, kh, kw), '
          'got shape (3, 256)') in msg


def test_check_against_model_shapes():
  name = 'mmdet_mask_rcnn_x101_32x4d_fpn_1x_coco'
  m = MODELS[name]
  v = to_variables(zeros_state(name), framework='mmdet', spec=m.spec())
  diagnose.check_against(v, model_shapes('mmdet', m.spec()))  # passes
  # A model built as plain ResNet-101: the hint names the ResNeXt widths.
  with pytest.raises(nm.CheckpointMismatchError) as info:
    resnet101 = nm.ModelSpec(depth=101, groups=1, width_per_group=64)
    diagnose.check_against(v, model_shapes('mmdet', resnet101))
  msg = str(info.value)
  assert 'the checkpoint backbone is a ResNeXt 32x4d (groups=32, width_per_group=4)' in msg
  assert 'params/backbone/res2_0/conv2/kernel: checkpoint (3,3,4,128) vs model (3,3,64,64)' in msg
  # Variables the model does not have are listed too.
  extra = dict(v)
  extra['params'] = dict(v['params'], stray={'kernel': np.zeros((2, 2))})
  with pytest.raises(nm.CheckpointMismatchError,
                     match=r'1 variable\(s\) the model does not have:\n    params/stray/kernel'):
    diagnose.check_against(extra, model_shapes('mmdet', m.spec()))


def test_describe_match():
  name = 'mmdet_ms_rcnn_r50_caffe_fpn_1x_coco'
  state = zeros_state(name)
  result = nm.map_state_dict(state, framework='mmdet', spec=MODELS[name].spec())
  text = diagnose.describe_match(result.variables, model_shapes('mmdet', MODELS[name].spec()),
                                 unmatched_keys=result.unmatched, dropped_keys=result.dropped)
  lines = text.splitlines()
  assert lines[0] == 'backbone: 265/265 variables matched, 0 missing, 0 shape mismatches'
  assert [l.split(':')[0] for l in lines] == [
      'backbone', 'fpn', 'rpn_head', 'box_head', 'box_predictor', 'mask_head', 'maskiou_head',
      'checkpoint']
  assert lines[-1] == ('checkpoint: 0 unmatched key(s), 53 dropped on purpose '
                       '(53 x num_batches_tracked)')
  # Unmatched and dropped keys are named as they are (a lenient mapping of an extra key).
  text = diagnose.describe_match(result.variables, unmatched_keys=['roi_head.extra.weight'],
                                 dropped_keys=['proposal_generator.anchor_generator.cell_anchors.0',
                                               'a.num_batches_tracked'])
  assert text.splitlines()[-1] == (
      'checkpoint: 1 unmatched key(s) (roi_head.extra.weight), 2 dropped on purpose '
      '(1 x cell_anchors, 1 x num_batches_tracked)')
  # Without expected shapes it tallies the tree.
  assert diagnose.describe_match(result.variables).splitlines()[1] == (
      'fpn: 16/16 variables matched, 0 missing, 0 shape mismatches')


def test_no_jax_or_torch_import():
  code = (
      'import sys\n'
      'import maskrcnn_jax\n'
      'before = set(sys.modules)\n'
      'from maskrcnn_jax.checkpoints import diagnose, name_maps, torch_reader\n'
      'new = set(sys.modules) - before\n'
      'bad = sorted(m for m in new if m.split(".")[0] in ("jax", "jaxlib", "flax", "torch"))\n'
      'assert not bad, bad\n')
  subprocess.run([sys.executable, '-c', code], check=True,
                 cwd=os.path.join(os.path.dirname(__file__), '..', '..'))
