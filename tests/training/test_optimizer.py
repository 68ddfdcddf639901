"""Schedules against hand-computed values (mmcv / detectron2 / torchvision formulas), parameter
groups (frozen, norm decay) and the SGD update against torch.optim.SGD's arithmetic."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maskrcnn_jax import config_lib
from maskrcnn_jax.training import optimizer


def _config(convention="mmdet", schedule="1x", upstream=""):
  return config_lib.mask_rcnn(convention=convention, schedule=schedule, upstream=upstream)


def _lr(s, step):
  return float(s(jnp.int32(step)))


def test_mmdet_1x_warmup_and_steps():
  c = _config("mmdet", "1x")
  # 7330 iterations per epoch at batch 16 (COCO train2017 without empty images, ceil).
  s = optimizer.make_schedule(c, global_batch=16, num_train_images=117266)
  assert s.total_steps == 12 * 7330
  assert s.boundaries == (8 * 7330, 11 * 7330)
  assert s.warmup_steps == 500
  # mmcv LrUpdaterHook linear warmup: lr = base * (1 - (1 - it / 500) * (1 - 0.001)).
  for it in (0, 1, 250, 499):
    expected = 0.02 * (1 - (1 - it / 500) * (1 - 0.001))
    assert _lr(s, it) == pytest.approx(expected, rel=1e-6), it
  assert _lr(s, 0) == pytest.approx(2e-5, rel=1e-6)
  assert _lr(s, 500) == pytest.approx(0.02, rel=1e-6)
  assert _lr(s, 8 * 7330 - 1) == pytest.approx(0.02, rel=1e-6)
  assert _lr(s, 8 * 7330) == pytest.approx(0.002, rel=1e-6)  # runner epoch 8 (0-based) >= 8
  assert _lr(s, 11 * 7330 - 1) == pytest.approx(0.002, rel=1e-6)
  assert _lr(s, 11 * 7330) == pytest.approx(0.0002, rel=1e-5)


def test_mmdet_2x_and_3x_and_overrides():
  s = optimizer.make_schedule(_config("mmdet", "2x"), global_batch=16, steps_per_epoch=100)
  assert (s.total_steps, s.boundaries) == (2400, (1600, 2200))
  # mstrain-poly 3x: RepeatDataset x3 over 12 epochs, steps [9, 11] -> real epochs 27 and 33.
  c = _config("mmdet", "3x", "mask_rcnn_r50_fpn_mstrain-poly_3x_coco")
  assert c.schedule.repeat == 3 and tuple(c.schedule.steps) == (9, 11)
  s = optimizer.make_schedule(c, global_batch=16, steps_per_epoch=100)
  assert (s.total_steps, s.boundaries) == (3600, (2700, 3300))
  c = _config("mmdet", "3x", "mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco")
  s = optimizer.make_schedule(c, global_batch=16, steps_per_epoch=100)
  assert (s.total_steps, s.boundaries) == (3600, (2800, 3400))
  c = _config("mmdet", "2x", "mask_rcnn_r50_caffe_fpn_mstrain-poly_2x_coco")
  s = optimizer.make_schedule(c, global_batch=16, steps_per_epoch=100)
  assert (s.total_steps, s.boundaries) == (2400, (1600, 2300))


def test_detectron2_iterations_and_warmup():
  c = _config("detectron2", "1x")
  s = optimizer.make_schedule(c, global_batch=16)
  assert (s.total_steps, s.boundaries, s.warmup_steps) == (90000, (60000, 80000), 1000)
  # detectron2 WarmupParamScheduler linear: factor = f * (1 - it / W) + it / W, f = 1/1000.
  for it in (0, 10, 999):
    alpha = it / 1000
    assert _lr(s, it) == pytest.approx(0.02 * (0.001 * (1 - alpha) + alpha), rel=1e-6)
  assert _lr(s, 1000) == pytest.approx(0.02)
  assert _lr(s, 59999) == pytest.approx(0.02)
  assert _lr(s, 60000) == pytest.approx(0.002)
  assert _lr(s, 80000) == pytest.approx(0.0002, rel=1e-5)
  s3 = optimizer.make_schedule(_config("detectron2", "3x"), global_batch=16)
  assert (s3.total_steps, s3.boundaries) == (270000, (210000, 250000))
  # Batch 8: lr 0.01, iterations doubled (DefaultTrainer.auto_scale_workers).
  s8 = optimizer.make_schedule(c, global_batch=8)
  assert s8.peak_lr == pytest.approx(0.01)
  assert (s8.total_steps, s8.boundaries, s8.warmup_steps) == (180000, (120000, 160000), 2000)


def test_linear_lr_scaling_and_torchvision_warmup():
  c = _config("mmdet", "1x")
  assert optimizer.make_schedule(c, global_batch=32, steps_per_epoch=10).peak_lr == \
      pytest.approx(0.04)
  assert optimizer.make_schedule(c, global_batch=2, steps_per_epoch=10).peak_lr == \
      pytest.approx(0.0025)
  c.optim.scale_lr = False
  assert optimizer.make_schedule(c, global_batch=2, steps_per_epoch=10).peak_lr == 0.02
  tv = config_lib.mask_rcnn(convention="torchvision", schedule="26e")
  s = optimizer.make_schedule(tv, global_batch=16, steps_per_epoch=300)
  assert s.warmup_steps == 299  # min(1000, len(data_loader) - 1)
  assert (s.total_steps, s.boundaries) == (26 * 300, (16 * 300, 22 * 300))
  assert _lr(s, 100) == pytest.approx(0.02 * (0.001 + 0.999 * 100 / 299), rel=1e-6)


def test_cosine_schedule():
  c = _config("mmdet", "1x")
  c.schedule.update(unit="step", length=100, steps=(), decay="cosine", warmup_steps=0)
  s = optimizer.make_schedule(c, global_batch=16)
  assert _lr(s, 0) == pytest.approx(0.02)
  assert _lr(s, 50) == pytest.approx(0.01, rel=1e-5)
  assert _lr(s, 100) == pytest.approx(0.0, abs=1e-9)


def _toy_params():
  z = lambda *s: jnp.ones(s, jnp.float32)
  return {
      "backbone": {
          "stem_conv": {"kernel": z(3, 3, 3, 4)},
          "stem_norm": {"scale": z(4), "bias": z(4)},
          "res2_0": {"conv1": {"kernel": z(1, 1, 4, 4)}, "norm1": {"scale": z(4), "bias": z(4)}},
          "res3_0": {"conv1": {"kernel": z(1, 1, 4, 4)}, "norm1": {"scale": z(4), "bias": z(4)},
                     "shortcut_norm": {"scale": z(4), "bias": z(4)}},
      },
      "fpn": {"lateral2": {"kernel": z(1, 1, 4, 4), "bias": z(4)},
              "lateral2_norm": {"scale": z(4), "bias": z(4)}},
      "box_predictor": {"cls_score": {"kernel": z(4, 3), "bias": z(3)}},
  }


def test_param_labels_frozen_and_norm():
  c = _config("detectron2")
  labels = optimizer.param_labels(_toy_params(), c)  # freeze_at 2, frozen_bn
  b = labels["backbone"]
  assert b["stem_conv"]["kernel"] == "frozen" and b["stem_norm"]["scale"] == "frozen"
  assert b["res2_0"]["conv1"]["kernel"] == "frozen"
  assert b["res3_0"]["conv1"]["kernel"] == "default"
  assert b["res3_0"]["norm1"]["scale"] == "frozen"  # FrozenBN: no parameters in torch
  assert b["res3_0"]["shortcut_norm"]["bias"] == "frozen"
  assert labels["fpn"]["lateral2"]["bias"] == "default"
  assert labels["fpn"]["lateral2_norm"]["scale"] == "norm"
  c.model.norm, c.model.freeze_at = "bn", 0
  labels = optimizer.param_labels(_toy_params(), c)
  assert labels["backbone"]["stem_conv"]["kernel"] == "default"
  assert labels["backbone"]["res3_0"]["norm1"]["scale"] == "norm"
  c.optim.frozen_patterns = ("^fpn/",)
  labels = optimizer.param_labels(_toy_params(), c)
  assert labels["fpn"]["lateral2"]["kernel"] == "frozen"


def _one_step(c, params, grads, steps=1):
  s = optimizer.Schedule(peak_lr=0.1, total_steps=10)
  tx = optimizer.build_optimizer(c, params, s)
  st = tx.init(params)
  for _ in range(steps):
    upd, st = tx.update(grads, st, params)
    params = optax.apply_updates(params, upd)
  return params


def test_weight_decay_groups_and_torch_sgd_arithmetic():
  params = _toy_params()
  grads = jax.tree_util.tree_map(lambda x: 0.5 * jnp.ones_like(x), params)
  lr, wd, mom = 0.1, 1e-4, 0.9
  # torch.optim.SGD: d = g + wd * p; buf = d (step 1), buf = mom * buf + d; p -= lr * buf.

  def torch_sgd(p, g, decay, steps):
    buf = None
    for _ in range(steps):
      d = g + decay * p
      buf = d if buf is None else mom * buf + d
      p = p - lr * buf
    return p

  for convention, wd_norm in (("mmdet", wd), ("detectron2", 0.0)):
    c = _config(convention)
    c.model.norm, c.model.freeze_at = "bn", 1  # stem frozen, everything else trainable
    out = _one_step(c, params, grads, steps=2)
    # Frozen: unchanged.
    np.testing.assert_array_equal(out["backbone"]["stem_conv"]["kernel"], 1.0)
    np.testing.assert_array_equal(out["backbone"]["stem_norm"]["scale"], 1.0)
    np.testing.assert_allclose(out["backbone"]["res2_0"]["conv1"]["kernel"],
                               torch_sgd(1.0, 0.5, wd, 2), rtol=1e-6)
    np.testing.assert_allclose(out["fpn"]["lateral2"]["bias"], torch_sgd(1.0, 0.5, wd, 2),
                               rtol=1e-6)  # biases decay in both frameworks
    np.testing.assert_allclose(out["backbone"]["res2_0"]["norm1"]["scale"],
                               torch_sgd(1.0, 0.5, wd_norm, 2), rtol=1e-6)
    np.testing.assert_allclose(out["fpn"]["lateral2_norm"]["bias"],
                               torch_sgd(1.0, 0.5, wd_norm, 2), rtol=1e-6)


def test_frozen_params_have_no_optimizer_state():
  c = _config("detectron2")
  params = _toy_params()
  tx = optimizer.build_optimizer(c, params, optimizer.Schedule(peak_lr=0.1, total_steps=1))
  state = tx.init(params)
  n_state = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(state)
                if np.ndim(x) > 0)
  trainable = sum(int(v.size) for k, v in
                  jax.tree_util.tree_flatten_with_path(params)[0]
                  if "res3_0/conv1" in "/".join(p.key for p in k) or
                  "fpn" in "/".join(p.key for p in k) or
                  "box_predictor" in "/".join(p.key for p in k))
  assert n_state == trainable  # one momentum buffer per trainable element only


def test_grad_clip():
  c = _config("mmdet")
  c.model.norm, c.model.freeze_at = "bn", 0
  c.optim.grad_clip_norm = 1.0
  c.optim.weight_decay = 0.0
  c.optim.momentum = 0.0
  params = _toy_params()
  grads = jax.tree_util.tree_map(lambda x: 10.0 * jnp.ones_like(x), params)
  out = _one_step(c, params, grads)
  delta = jax.tree_util.tree_map(lambda a, b: a - b, params, out)
  assert float(optax.tree.norm(delta)) == pytest.approx(0.1, rel=1e-5)  # lr * clip
