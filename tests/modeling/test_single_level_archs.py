"""detectron2's C4 and DC5 architectures (model.arch): wiring, anchors and training steps.

Numerical parity with detectron2 itself is in tests/test_parity_detectron2_c4_dc5.py; here the
real recipes are narrowed (detectron2's own width knobs: STEM_OUT_CHANNELS, RES2_OUT_CHANNELS,
WIDTH_PER_GROUP) so that the R-50 topology compiles and runs quickly on CPU:

* the output contract (14x14 masks for C4, 28x28 for DC5; one stride-16 RPN level with 15
  anchors per location in detectron2's size-major order);
* a few training steps on a built-in-dataset batch: finite and decreasing losses, every loss term
  present, gradients reaching res5 in the RoI head (C4) or the dilated backbone (DC5).
"""
from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import config_lib
from maskrcnn_jax.modeling.build import build_model, init_variables
from maskrcnn_jax.modeling.mask_rcnn import ModelConfig
from maskrcnn_jax.modeling.rpn import image_anchors

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {"C4": "detectron2/mask_rcnn_R_50_C4_1x", "DC5": "detectron2/mask_rcnn_R_50_DC5_1x"}


def narrow(config):
  """The recipe with 1/8 of its widths (the R-50 topology is kept)."""
  m = config.model
  m.stem_out_channels, m.res2_out_channels, m.width_per_group = 8, 32, 8
  m.box_head_fc_dim, m.mask_head_conv_dim = 64, 32
  m.rpn_pre_nms_topk_test, m.rpn_post_nms_topk_test = 300, 50
  m.rpn_pre_nms_topk_train, m.rpn_post_nms_topk_train = 300, 100
  m.detections_per_image = 10
  return config


def recipe(arch):
  return config_lib.load_config_file(str(ROOT / "configs" / f"{RECIPES[arch]}.py"))


def test_detectron2_single_level_anchors():
  """15 anchors per location at stride 16: size-major (generate_cell_anchors loops sizes outside
  ratios), w = sqrt(size^2 / ratio), h = ratio * w, centred on (16 x, 16 y)."""
  cfg = ModelConfig.from_config(recipe("C4"))
  (anchors,) = image_anchors(cfg, (64, 96))
  assert anchors.shape == (4 * 6 * 15, 4)
  a = anchors.reshape(4, 6, 15, 4)
  for s_i, size in enumerate((32, 64, 128, 256, 512)):
    for r_i, ratio in enumerate((0.5, 1.0, 2.0)):
      w = math.sqrt(size * size / ratio)
      h = ratio * w
      want = np.array([16 * 5 - w / 2, 16 * 3 - h / 2, 16 * 5 + w / 2, 16 * 3 + h / 2])
      np.testing.assert_allclose(a[3, 5, s_i * 3 + r_i], want, rtol=1e-6)


@pytest.mark.parametrize("arch", ["C4", "DC5"])
def test_inference_contract(arch):
  config = narrow(recipe(arch))
  model = build_model(config)
  variables = init_variables(model, jax.random.PRNGKey(0), hw=(64, 64))
  # RPN head: one level, 15 anchors; res4 (C4) / dilated res5 (DC5) channels.
  rpn = variables["params"]["rpn_head"]
  channels = 32 * (4 if arch == "C4" else 8)
  assert rpn["objectness"]["kernel"].shape == (1, 1, channels, 15)
  assert ("roi_res5" in variables["params"]) == (arch == "C4")
  assert ("box_head" in variables["params"]) == (arch == "DC5")
  assert ("fpn" in variables["params"]) is False
  rng = np.random.RandomState(0)
  images = rng.randn(2, 96, 128, 3).astype(np.float32)
  hw = np.array([[96, 128], [80, 100]], np.int32)
  out = jax.jit(model.apply)(variables, images, hw, hw, np.ones((2, 2), np.float32))
  m = 14 if arch == "C4" else 28
  assert out["mask_probs"].shape == (2, 10, m, m)
  assert out["boxes"].shape == (2, 10, 4)
  assert np.isfinite(np.asarray(out["mask_probs"])).all()
  # Features: one map at stride 16.
  feats = jax.jit(lambda v, x: model.apply(v, x, method=model.features))(variables, images)
  (name,) = feats
  assert name == ("c4" if arch == "C4" else "c5")
  assert feats[name].shape == (2, 6, 8, channels)


def _builtin_batch(tmp_path, config, batch_size):
  from maskrcnn_jax.data import coco as coco_lib, loader as loader_lib
  from maskrcnn_jax.training import trainer
  config.data.builtin = dict(num_train=8, num_val=2, image_size=64, seed=0,
                             cache_dir=str(tmp_path / "data"))
  config.data.train_short, config.data.train_max_size = (64,), 64
  config.data.test_short, config.data.test_max_size = 64, 64
  config.data.max_instances, config.data.gt_mask_size, config.data.num_workers = 5, 16, 0
  trainer.resolve_data(config)
  ds = coco_lib.CocoDataset(config.data.train_json, config.data.train_images,
                            convention=config.convention)
  trainer.set_categories(config, ds.category_ids)
  ld = loader_lib.TrainLoader(ds, config, seed=0, global_batch=batch_size, num_workers=0)
  return trainer._take_train_keys(next(ld))  # pylint: disable=protected-access


@pytest.mark.parametrize("arch", ["C4", "DC5"])
def test_training_steps_decrease_the_loss(tmp_path, arch):
  from maskrcnn_jax.training import optimizer, sharding, train_state, trainer
  config = narrow(recipe(arch))
  config.model.norm, config.model.freeze_at = "bn", 0  # from scratch: trainable BN
  batch = _builtin_batch(tmp_path, config, 2)
  assert config.model.num_classes == 5
  model = build_model(config, train=True)
  variables = init_variables(model, jax.random.PRNGKey(0), hw=(64, 64))
  mesh = sharding.make_mesh(1)
  schedule = optimizer.Schedule(peak_lr=0.02, total_steps=100)
  tx = optimizer.build_optimizer(config, variables["params"], schedule)
  state = train_state.place_state(
      train_state.create_train_state(variables, tx, jax.random.PRNGKey(1)), mesh)
  step = train_state.make_train_step(
      model, tx, schedule, mesh, state,
      loss_kwargs=dict(roi_batch_per_image=64, rpn_batch_per_image=64),
      prepare_batch=trainer.prepare_batch_fn(config))
  first = jax.device_get(state.params)
  b = sharding.shard_batch(batch, mesh)
  losses = []
  for _ in range(8):
    state, metrics = step(state, b)
    metrics = jax.device_get(metrics)
    losses.append(float(metrics["loss"]))
    assert metrics["finite"] == 1.0
    for k in ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask"):
      assert np.isfinite(metrics[k]), k
  assert metrics["num_fg_rois"] > 0
  assert np.mean(losses[-2:]) < 0.8 * losses[0], losses
  # The arch-specific parts learn.
  part = ("roi_res5", "res5_2", "conv3", "kernel") if arch == "C4" else (
      "backbone", "res5_2", "conv2", "kernel")
  before, after = first, jax.device_get(state.params)
  for k in part:
    before, after = before[k], after[k]
  assert np.abs(np.asarray(after) - np.asarray(before)).max() > 0


def test_resnet18_basic_blocks():
  """ResNet-18 (detectron2 / torchvision BasicBlock layout): 2 blocks per stage, 3x3-3x3, a
  projection shortcut only where the shape changes, strides 4..32, channels 64..512."""
  from maskrcnn_jax.modeling.resnet import ResNet
  net = ResNet(depth=18, res2_out_channels=64, norm="bn", freeze_at=0, train=False)
  x = jnp.ones((1, 64, 96, 3), jnp.float32)
  variables = net.init(jax.random.PRNGKey(0), x)
  out = net.apply(variables, x)
  assert [out[f"c{s}"].shape for s in (2, 3, 4, 5)] == [
      (1, 16, 24, 64), (1, 8, 12, 128), (1, 4, 6, 256), (1, 2, 3, 512)]
  p = variables["params"]
  assert sorted(k for k in p if k.startswith("res")) == [
      f"res{s}_{b}" for s in (2, 3, 4, 5) for b in (0, 1)]
  assert "shortcut" not in p["res2_0"] and "conv3" not in p["res2_0"]
  assert p["res3_0"]["shortcut"]["kernel"].shape == (1, 1, 64, 128)
  assert p["res3_0"]["conv1"]["kernel"].shape == (3, 3, 64, 128)
  n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(p))
  # torchvision resnet18 without fc: 11,176,512 parameters (conv weights + BN affine).
  assert n == 11176512
