"""The converter against the Flax model: every released key list maps onto its recipe's model.

The key lists in tests/fixtures/checkpoint_keys were dumped from the frameworks' own model
definitions (../shared/reference/checkpoint_keys); the model's variable shapes come from
jax.eval_shape of the Flax module, so this checks the name maps, the layout hooks' shapes and the
recipe configs against each other.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from maskrcnn_jax import config_lib
from maskrcnn_jax.checkpoints import conversion, name_maps, orbax_io, torch_reader
from tests import synthetic_weights as synthetic
from maskrcnn_jax.modeling.build import build_model, variable_shapes

ROOT = Path(__file__).resolve().parents[1]
KEYS = ROOT / "tests" / "fixtures" / "checkpoint_keys"

CASES = [
    ("detectron2_mask_rcnn_R_50_FPN_3x", "detectron2/mask_rcnn_R_50_FPN_3x"),
    ("detectron2_mask_rcnn_X_101_32x8d_FPN_3x", "detectron2/mask_rcnn_X_101_32x8d_FPN_3x"),
    ("detectron2_mask_rcnn_R_50_C4_1x", "detectron2/mask_rcnn_R_50_C4_1x"),
    ("detectron2_mask_rcnn_R_50_C4_3x", "detectron2/mask_rcnn_R_50_C4_3x"),
    ("detectron2_mask_rcnn_R_50_DC5_1x", "detectron2/mask_rcnn_R_50_DC5_1x"),
    ("detectron2_mask_rcnn_R_50_DC5_3x", "detectron2/mask_rcnn_R_50_DC5_3x"),
    ("detectron2_mask_rcnn_R_101_C4_3x", "detectron2/mask_rcnn_R_101_C4_3x"),
    ("detectron2_mask_rcnn_R_101_DC5_3x", "detectron2/mask_rcnn_R_101_DC5_3x"),
    ("mmdet_mask_rcnn_r50_caffe_fpn_1x_coco", "mmdet/mask_rcnn_r50_caffe_fpn_1x_coco"),
    ("mmdet_mask_rcnn_r50_fpn_1x_coco", "mmdet/mask_rcnn_r50_fpn_1x_coco"),
    ("mmdet_mask_rcnn_x101_32x4d_fpn_1x_coco", "mmdet/mask_rcnn_x101_32x4d_fpn_1x_coco"),
    ("mmdet_mask_rcnn_x101_64x4d_fpn_1x_coco", "mmdet/mask_rcnn_x101_64x4d_fpn_1x_coco"),
    ("mmdet_ms_rcnn_r50_caffe_fpn_1x_coco", "mmdet/ms_rcnn_r50_caffe_fpn_1x_coco"),
    ("torchvision_maskrcnn_resnet50_fpn_v1", "torchvision/maskrcnn_resnet50_fpn"),
    ("torchvision_maskrcnn_resnet50_fpn_v1_legacy_names", "torchvision/maskrcnn_resnet50_fpn"),
    ("torchvision_maskrcnn_resnet50_fpn_v2", "torchvision/maskrcnn_resnet50_fpn_v2"),
]


def zero_state(tsv: str) -> dict:
  """A state dict with exactly the key list's names and shapes (zeros; no memory until touched)."""
  state = {}
  for name, shape, dtype in synthetic.read_key_tsv(KEYS / f"{tsv}.tsv"):
    state[name] = np.zeros(shape, np.int64 if "int" in str(dtype) else np.float32)
  return state


def load(recipe: str):
  return config_lib.load_config_file(str(ROOT / "configs" / f"{recipe}.py"))


@pytest.mark.parametrize("tsv,recipe", CASES, ids=[c[0] for c in CASES])
def test_key_list_converts_onto_model(tsv, recipe):
  config = load(recipe)
  variables, summary = conversion.convert_state_dict(config, zero_state(tsv), source=tsv)
  expected = variable_shapes(build_model(config))
  flat = name_maps.flatten_variables(variables)
  assert {k: tuple(v.shape) for k, v in flat.items()} == expected
  assert "missing" in summary
  # The summary counts what the file really held besides the variables: its BatchNorm step
  # counters (num_batches_tracked) are dropped on purpose and named; nothing is unmatched.
  state = zero_state(tsv)
  counters = sum(k.endswith("num_batches_tracked") for k in state)
  last = summary.splitlines()[-1]
  assert last.startswith("checkpoint: 0 unmatched key(s), ")
  if counters:
    assert f"{counters} dropped on purpose ({counters} x num_batches_tracked)" in last
  else:
    assert last.endswith(", 0 dropped on purpose")


def test_wrong_recipe_is_refused_with_names():
  # An R-50 mmdet file converted with the X-101 recipe: widths disagree, named per variable.
  config = load("mmdet/mask_rcnn_x101_32x4d_fpn_1x_coco")
  with pytest.raises(name_maps.CheckpointMismatchError) as err:
    conversion.convert_state_dict(config, zero_state("mmdet_mask_rcnn_r50_fpn_1x_coco"), "r50.pth")
  msg = str(err.value)
  assert "checkpoint" in msg and "model" in msg
  assert "res2_0" in msg  # names a parameter whose shape disagrees


@pytest.mark.parametrize("tsv,recipe,arch", [
    ("detectron2_mask_rcnn_R_50_C4_1x", "detectron2/mask_rcnn_R_50_DC5_1x", "C4"),
    ("detectron2_mask_rcnn_R_50_DC5_1x", "detectron2/mask_rcnn_R_50_FPN_1x", "DC5"),
    ("detectron2_mask_rcnn_R_50_FPN_3x", "detectron2/mask_rcnn_R_50_C4_1x", "FPN"),
])
def test_other_detectron2_architecture_is_named(tsv, recipe, arch):
  """A C4 / DC5 / FPN file under another architecture's recipe: refused, the file's arch named."""
  with pytest.raises(name_maps.CheckpointMismatchError) as err:
    conversion.convert_state_dict(load(recipe), zero_state(tsv), "model_final.pkl")
  assert f"looks like a detectron2 {arch} model" in str(err.value)
  assert name_maps.infer_spec(zero_state(tsv), framework="detectron2").arch == arch


def test_faster_rcnn_file_is_refused():
  state = {k: v for k, v in zero_state("mmdet_mask_rcnn_r50_fpn_1x_coco").items()
           if "mask_head" not in k}
  with pytest.raises(name_maps.CheckpointMismatchError, match="mask"):
    conversion.convert_state_dict(load("mmdet/mask_rcnn_r50_fpn_1x_coco"), state, "faster.pth")


def test_truncated_and_malicious_files_are_refused(tmp_path):
  src = ROOT / "tests" / "fixtures" / "pth" / "mmdet_like_legacy.pth"
  data = src.read_bytes()
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(data[: len(data) * 2 // 3])
  config = load("mmdet/mask_rcnn_r50_fpn_1x_coco")
  with pytest.raises(torch_reader.CheckpointFormatError, match="truncated"):
    conversion.convert_file(config, str(truncated))

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

  evil = tmp_path / "evil.pkl"
  evil.write_bytes(pickle.dumps({"model": {"x": Evil()}, "__author__": "x"}, protocol=2))
  with pytest.raises(torch_reader.UnsafeCheckpointError, match="os.system|posix.system"):
    conversion.convert_file(config, str(evil))
  assert not (tmp_path / "pwned").exists()


def test_d2_pickle_round_trip_to_orbax(tmp_path):
  """A detectron2-style .pkl of seeded weights -> convert -> orbax -> identical arrays."""
  config = load("detectron2/mask_rcnn_R_50_FPN_3x")
  keys = synthetic.read_key_tsv(KEYS / "detectron2_mask_rcnn_R_50_FPN_3x.tsv")
  state = synthetic.seeded_state_dict(keys, seed=3)
  src = tmp_path / "model_final.pkl"
  with open(src, "wb") as f:
    pickle.dump({"model": state, "__author__": "test", "matching_heuristics": True}, f)
  variables, _, _ = conversion.convert_file(config, str(src), str(tmp_path / "out"))
  restored = orbax_io.load_variables(str(tmp_path / "out"))
  a, b = name_maps.flatten_variables(variables), name_maps.flatten_variables(restored)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  # Spot-check one layout hook end to end: d2 stem conv (64, 3, 7, 7) OIHW -> HWIO.
  np.testing.assert_array_equal(
      b[("params", "backbone", "stem_conv", "kernel")],
      state["backbone.bottom_up.stem.conv1.weight"].transpose(2, 3, 1, 0))
