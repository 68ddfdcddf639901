"""config.init: fine-tuning from a converted checkpoint / zoo file with another class count
re-initialises exactly the class-dependent layers; orbax train checkpoints round-trip."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from maskrcnn_jax import config_lib
from maskrcnn_jax.checkpoints import orbax_io, torch_reader
from tests import synthetic_weights as synthetic
from maskrcnn_jax.modeling.build import build_model, variable_shapes
from maskrcnn_jax.training import checkpointing, sharding, train_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEYS = os.path.join(REPO, "tests", "fixtures", "checkpoint_keys")


def _random_variables(config, seed):
  """Variables of the config's model filled with seeded random numbers (no init, no compile)."""
  shapes = variable_shapes(build_model(config))
  rng = np.random.default_rng(seed)
  flat = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  return traverse_util.unflatten_dict(flat)


CLASS_PATHS = {
    ("params", "box_predictor", "cls_score", "kernel"), ("params", "box_predictor", "cls_score",
                                                          "bias"),
    ("params", "box_predictor", "bbox_pred", "kernel"), ("params", "box_predictor", "bbox_pred",
                                                          "bias"),
    ("params", "mask_head", "predictor", "kernel"), ("params", "mask_head", "predictor", "bias"),
}


@pytest.fixture(scope="module")
def converted_80(tmp_path_factory):
  config = config_lib.load_config_file(
      os.path.join(REPO, "configs", "detectron2", "mask_rcnn_R_50_FPN_1x.py"))
  directory = str(tmp_path_factory.mktemp("converted"))
  variables = _random_variables(config, seed=1)
  orbax_io.save_variables(directory, variables, config)
  return config, directory, traverse_util.flatten_dict(variables)


def test_finetune_with_other_class_count_reinitialises_only_class_layers(converted_80):
  config80, directory, source = converted_80
  config = config_lib.load_config_file(
      os.path.join(REPO, "configs", "detectron2", "mask_rcnn_R_50_FPN_1x.py"))
  config.model.num_classes = 5
  fresh = _random_variables(config, seed=2)
  loaded, reinit = checkpointing.load_init(config, fresh, directory)
  flat_fresh = traverse_util.flatten_dict(fresh)
  flat = traverse_util.flatten_dict(loaded)
  assert set(flat) == set(flat_fresh)
  assert {tuple(p.split("/")) for p in reinit} == CLASS_PATHS
  for path, value in flat.items():
    if path in CLASS_PATHS:
      np.testing.assert_array_equal(value, flat_fresh[path])  # the new model's own init
    else:
      np.testing.assert_array_equal(value, source[path])  # everything else from the checkpoint
  assert flat[("params", "box_predictor", "cls_score", "kernel")].shape == (1024, 6)
  assert flat[("params", "mask_head", "predictor", "kernel")].shape == (1, 1, 256, 5)


def test_same_class_count_loads_everything(converted_80):
  config80, directory, source = converted_80
  fresh = _random_variables(config80, seed=3)
  loaded, reinit = checkpointing.load_init(config80, fresh, directory)
  assert reinit == []
  for path, value in traverse_util.flatten_dict(loaded).items():
    np.testing.assert_array_equal(value, source[path])


def test_other_architecture_is_refused(converted_80):
  _, directory, _ = converted_80
  config = config_lib.load_config_file(
      os.path.join(REPO, "configs", "detectron2", "mask_rcnn_R_101_FPN_3x.py"))
  fresh = jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, s.dtype),
      jax.eval_shape(lambda: _random_variables_abstract(config)))
  with pytest.raises(ValueError, match="does not fit the model"):
    checkpointing.load_init(config, fresh, directory)


def _random_variables_abstract(config):
  shapes = variable_shapes(build_model(config))
  return traverse_util.unflatten_dict({k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()})


def test_zoo_file_is_converted_and_class_layers_reinitialised(tmp_path, monkeypatch):
  """A Mask Scoring R-CNN zoo state dict (80 classes) -> a 5-class Mask R-CNN: the MaskIoU head
  is ignored, the class layers are re-initialised, the rest is the converted checkpoint."""
  keys = synthetic.read_key_tsv(os.path.join(KEYS, "mmdet_ms_rcnn_r50_caffe_fpn_1x_coco.tsv"))
  state = synthetic.seeded_state_dict(keys, seed=5)
  fake = tmp_path / "ms_rcnn.pth"
  fake.write_bytes(b"not read")
  monkeypatch.setattr(torch_reader, "load_checkpoint", lambda path: ("mmdet", state, {}))
  config = config_lib.load_config_file(
      os.path.join(REPO, "configs", "mmdet", "mask_rcnn_r50_caffe_fpn_1x_coco.py"))
  config.model.num_classes = 5
  fresh = _random_variables(config, seed=6)
  loaded, reinit = checkpointing.load_init(config, fresh, str(fake))
  assert {tuple(p.split("/")) for p in reinit} == CLASS_PATHS
  from maskrcnn_jax.checkpoints import conversion
  src_config = config_lib.load_config_file(
      os.path.join(REPO, "configs", "mmdet", "ms_rcnn_r50_caffe_fpn_1x_coco.py"))
  expected, _ = conversion.convert_state_dict(src_config, state)
  expected = traverse_util.flatten_dict(expected)
  flat_fresh = traverse_util.flatten_dict(fresh)
  for path, value in traverse_util.flatten_dict(loaded).items():
    ref = flat_fresh[path] if path in CLASS_PATHS else expected[path]
    np.testing.assert_array_equal(value, ref, err_msg="/".join(path))


def test_checkpointer_round_trip(tmp_path):
  mesh = sharding.make_mesh(-1)
  params = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones(4)}}
  tx = optax.chain(optax.trace(0.9), optax.scale_by_learning_rate(0.1))
  state = train_state.create_train_state({"params": params, "batch_stats": {"m": jnp.zeros(2)}},
                                         tx, jax.random.PRNGKey(3), step=7)
  state = train_state.place_state(state, mesh)
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
  for step in (7, 8, 9):
    ckpt.save(step, state.replace(step=jnp.int32(step)), {"epoch": 1, "step_in_epoch": step})
  ckpt.wait_until_finished()
  assert list(ckpt.all_steps()) == [8, 9]  # keep the last 2
  zeros = jax.tree_util.tree_map(jnp.zeros_like, state)
  restored, loader_state = ckpt.restore(zeros)
  ckpt.close()
  assert loader_state == {"epoch": 1, "step_in_epoch": 9}
  assert int(restored.step) == 9
  for a, b in zip(jax.tree_util.tree_leaves(restored.params), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(restored.rng, jax.random.PRNGKey(3))
  assert restored.params["a"].sharding.is_equivalent_to(sharding.replicated(mesh), 2)
