"""Loss forms and normalizations (ops/losses.py) and the train-mode forward MaskRCNN.losses."""
from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import config_lib, conventions
from maskrcnn_jax.data import coco_categories
from maskrcnn_jax.modeling.build import build_model
from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN
from maskrcnn_jax.ops import losses

MM, D2, TV = conventions.MMDET, conventions.DETECTRON2, conventions.TORCHVISION
ROOT = Path(__file__).resolve().parents[2]


def _bce(x, t):
  p = 1 / (1 + math.exp(-x))
  return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def test_elementwise_forms():
  x = np.array([-3.0, -0.2, 0.0, 0.7, 4.0], np.float32)
  t = np.array([0.0, 1.0, 1.0, 0.0, 0.3], np.float32)
  np.testing.assert_allclose(np.asarray(losses.sigmoid_bce(x, t)),
                             [_bce(a, b) for a, b in zip(x, t)], rtol=1e-5)
  # Stable for large logits (no inf / nan).
  big = np.asarray(losses.sigmoid_bce(np.array([200.0, -200.0]), np.array([0.0, 1.0])))
  np.testing.assert_allclose(big, [200.0, 200.0], rtol=1e-6)
  d = np.array([-0.5, -0.05, 0.0, 0.05, 1.0], np.float32)
  np.testing.assert_array_equal(np.asarray(losses.smooth_l1(d, 0.0)), np.abs(d))
  b = 1.0 / 9.0
  np.testing.assert_allclose(np.asarray(losses.smooth_l1(d, b)),
                             [0.5 - b / 2, 0.5 * 0.0025 / b, 0.0, 0.5 * 0.0025 / b, 1 - b / 2],
                             rtol=1e-5)


def _rpn_case():
  obj = np.array([[2.0, -1.0, 0.5, 3.0], [0.0, -2.0, 1.0, -0.5]], np.float32)
  pos = np.array([[1, 0, 0, 0], [0, 0, 1, 0]], bool)
  neg = np.array([[0, 1, 1, 0], [1, 0, 0, 0]], bool)   # anchor (0, 3) and (1, 1), (1, 3) unsampled
  deltas = np.zeros((2, 4, 4), np.float32)
  deltas[0, 0] = [0.1, -0.2, 0.0, 0.3]
  deltas[1, 2] = [0.05, 0.0, -0.02, 1.0]
  deltas[0, 3] = [9.0, 9.0, 9.0, 9.0]  # not positive: ignored
  tgt = np.zeros((2, 4, 4), np.float32)
  tgt[0, 0] = [0.0, 0.0, 0.1, 0.1]
  tgt[1, 2] = [0.0, 0.0, 0.0, 0.0]
  return obj, deltas, pos, neg, tgt


def test_rpn_losses_per_convention():
  obj, deltas, pos, neg, tgt = _rpn_case()
  cls_sum = (_bce(2.0, 1) + _bce(-1.0, 0) + _bce(0.5, 0) + _bce(0.0, 0) + _bce(1.0, 1))
  l1 = (0.1 + 0.2 + 0.1 + 0.2) + (0.05 + 0.0 + 0.02 + 1.0)
  b = 1 / 9
  sl1 = lambda v: 0.5 * v * v / b if v < b else v - 0.5 * b
  tv_box = sum(sl1(v) for v in (0.1, 0.2, 0.1, 0.2, 0.05, 0.0, 0.02, 1.0))
  want = {
      "mmdet": (cls_sum / 5, l1 / 5),                  # avg_factor = #sampled (5)
      "detectron2": (cls_sum / 512, l1 / 512),         # 256 x 2 images
      "torchvision": (cls_sum / 5, tv_box / 5),        # mean over sampled; smooth-L1 1/9
  }
  for conv in (MM, D2, TV):
    got = losses.rpn_losses(obj, deltas, pos, neg, tgt, convention=conv)
    np.testing.assert_allclose(float(got["loss_rpn_cls"]), want[conv.name][0], rtol=1e-5)
    np.testing.assert_allclose(float(got["loss_rpn_box"]), want[conv.name][1], rtol=1e-5)


def test_rcnn_losses():
  # 1 image, 3 RoIs (2 sampled: one positive of class 1, one background), 3 classes bg_last.
  logits = np.array([[[1.0, 2.0, 0.0, -1.0], [0.5, 0.5, 0.5, 3.0], [9.0, 9.0, 9.0, 9.0]]],
                    np.float32)
  classes = np.array([[1, 3, 3]], np.int32)
  valid = np.array([[True, True, False]])
  pos = np.array([[True, False, False]])
  deltas = np.full((1, 3, 3, 4), 7.0, np.float32)      # other slots must be ignored
  deltas[0, 0, 1] = [0.5, -0.5, 0.25, 0.0]
  tgt = np.zeros((1, 3, 4), np.float32)
  tgt[0, 0] = [0.4, -0.5, 0.0, 0.02]

  def ce(row, c):
    row = np.asarray(row, np.float64)
    return -(row[c] - np.log(np.exp(row).sum()))

  cls_want = (ce(logits[0, 0], 1) + ce(logits[0, 1], 3)) / 2
  diffs = np.abs(np.array([0.1, 0.0, 0.25, 0.02]))
  for conv in (MM, D2, TV):
    got = losses.rcnn_losses(logits, deltas, classes, valid, pos, tgt, classes, convention=conv)
    np.testing.assert_allclose(float(got["loss_cls"]), cls_want, rtol=1e-5)
    if conv is TV:
      b = 1 / 9
      box = sum(0.5 * v * v / b if v < b else v - 0.5 * b for v in diffs)
    else:
      box = diffs.sum()
    np.testing.assert_allclose(float(got["loss_box"]), box / 2, rtol=1e-5)  # / #sampled


def test_mask_and_maskiou_losses():
  logits = np.zeros((1, 3, 28, 28), np.float32)
  logits[0, 0, :14] = 2.0
  logits[0, 1] = 100.0  # not positive: ignored
  tgt = np.zeros((1, 3, 28, 28), np.float32)
  tgt[0, 0, :7] = 1.0
  pos = np.array([[True, False, False]])
  per_pixel = np.where(np.arange(28)[:, None] < 7, _bce(2.0, 1),
                       np.where(np.arange(28)[:, None] < 14, _bce(2.0, 0), _bce(0.0, 0)))
  per_pixel = np.broadcast_to(per_pixel, (28, 28))
  np.testing.assert_allclose(float(losses.mask_loss(logits, tgt, pos)), per_pixel.mean(),
                             rtol=1e-4)
  # torchvision's soft targets go through the same BCE.
  soft = np.full((1, 3, 28, 28), 0.25, np.float32)
  np.testing.assert_allclose(float(losses.mask_loss(logits, soft, pos)),
                             (14 * _bce(2.0, 0.25) + 14 * _bce(0.0, 0.25)) / 28, rtol=1e-4)
  assert float(losses.mask_loss(logits, tgt, np.zeros((1, 3), bool))) == 0.0

  pred = np.array([[0.8, 0.3, 0.5, 0.9]], np.float32)
  t = np.array([[0.6, 0.0, 0.5, 0.1]], np.float32)
  p = np.array([[True, True, True, False]])
  # target 0 and non-positive rows are left out; mean over the rest, x 0.5
  want = 0.5 * ((0.8 - 0.6) ** 2 + 0.0) / 2
  np.testing.assert_allclose(float(losses.maskiou_loss(pred, t, p)), want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# MaskRCNN.losses on a tiny batch. The R-50 model compiles slowly on CPU: one jit does init, the
# gradient and a few steps; 64 x 64 images, 32 RoIs per image, RoIAlign grid capped at 2.


def _small(config):
  config.model.rpn_pre_nms_topk_train = 100
  config.model.rpn_post_nms_topk_train = 50
  config.model.roi_align_max_grid = 2
  return config


def _batch(s=32):
  rs = np.random.RandomState(0)
  b, h, w, m = 2, 64, 64, 4
  image = rs.randn(b, h, w, 3).astype(np.float32)
  gt_boxes = np.zeros((b, m, 4), np.float32)
  gt_boxes[0, :3] = [[8, 8, 40, 36], [30, 20, 60, 60], [2, 40, 20, 62]]
  gt_boxes[1, :2] = [[4, 10, 30, 50], [10, 10, 50, 40]]
  gt_valid = np.zeros((b, m), bool)
  gt_valid[0, :3] = True
  gt_valid[1, :2] = True
  gt_crowd = np.zeros((b, m), bool)
  gt_crowd[0, 2] = True
  masks = np.zeros((b, m, s, s), np.uint8)
  yy, xx = np.mgrid[:s, :s]
  masks[:, :] = (((yy - s / 2 + 0.5) ** 2 + (xx - s / 2 + 0.5) ** 2) < (s / 2) ** 2)
  image[1, :, 50:] = 0  # second image narrower (padding)
  return dict(image=image, image_hw=np.array([[64, 64], [64, 50]], np.int32), gt_boxes=gt_boxes,
              gt_labels=np.array([[3, 7, 1, 0], [1, 5, 0, 0]], np.int32), gt_valid=gt_valid,
              gt_crowd=gt_crowd, gt_masks=masks)


def _config(recipe):
  return _small(config_lib.load_config_file(str(ROOT / "configs" / f"{recipe}.py")))


STEPS = 3
KW = dict(rpn_batch_per_image=64, roi_batch_per_image=32)


def _numpy_init(model, batch):
  """Random variables without compiling `model.init` (shapes from eval_shape, values from numpy):
  kernels N(0, 1 / fan_in), norm scale / var 1, biases / means 0."""
  shapes = jax.eval_shape(
      lambda r: model.init(r, batch, r, method=MaskRCNN.losses, **KW), jax.random.PRNGKey(0))
  rs = np.random.default_rng(0)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(s.shape[:-1]))
      return (rs.standard_normal(s.shape, dtype=np.float32) / np.sqrt(fan_in)).astype(np.float32)
    if name in ("scale", "var"):
      return np.ones(s.shape, np.float32)
    return np.zeros(s.shape, np.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope="module")
def trained():
  """Mask Scoring R-CNN (mmdet) with trainable BN: gradient and SGD steps in one jit."""
  config = _config("mmdet/ms_rcnn_r50_caffe_fpn_1x_coco")
  config.model.norm = "bn"
  model = build_model(config, train=True)
  batch = _batch()
  variables = _numpy_init(model, batch)
  params, stats0 = dict(variables["params"]), variables["batch_stats"]
  # Mask logits start above mmdet's mask_thr_binary (0.5, applied to logits), so the predicted
  # masks are not empty and the MaskIoU targets (hence the MaskIoU head's gradient) are non-zero;
  # from a zero bias they are all 0 until the mask head learns, as in mmdet.
  params["mask_head"] = dict(params["mask_head"])
  params["mask_head"]["predictor"] = dict(
      kernel=params["mask_head"]["predictor"]["kernel"],
      bias=np.ones_like(params["mask_head"]["predictor"]["bias"]))

  def loss_fn(params, stats, rng):
    (total, terms), new = model.apply({"params": params, "batch_stats": stats}, batch, rng,
                                      method=MaskRCNN.losses, mutable=["batch_stats"], **KW)
    return total, (terms, new["batch_stats"])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  @jax.jit
  def step(params, stats):
    # The same sampler key every step: one fixed batch, one fixed set of sampled targets
    # (proposals still move with the RPN). Normalized gradient steps: a random-init R-50 has
    # large gradients, and plain SGD at any fixed rate either crawls or diverges.
    (total, (terms, stats)), g = grad_fn(params, stats, jax.random.PRNGKey(5))
    norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))
    params = jax.tree.map(lambda p, d: p - 0.02 * d / norm, params, g)
    gnorms = jax.tree.map(lambda d: jnp.sqrt(jnp.sum(d * d)), g)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(d)) for d in jax.tree.leaves(g)]))
    return params, stats, (total, terms, gnorms, finite)

  stats = stats0
  history = []
  for _ in range(STEPS):  # a Python loop: lax.scan compiles and runs far slower here on CPU
    params, stats, out = step(params, stats)
    history.append(jax.device_get(out))
  totals = np.array([h[0] for h in history])
  stats_moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                    zip(jax.tree.leaves(stats), jax.tree.leaves(stats0)))
  total0, terms0, gnorms0, _ = history[0]
  return total0, terms0, gnorms0, np.array([h[3] for h in history]), totals, stats_moved


def test_losses_finite_with_expected_terms(trained):
  total0, terms0, _, _, _, _ = trained
  keys = {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask", "loss_mask_iou"}
  assert keys <= set(terms0)
  assert np.isfinite(total0)
  np.testing.assert_allclose(total0, sum(terms0[k] for k in keys), rtol=1e-5)
  for k in keys:
    assert np.isfinite(terms0[k]) and terms0[k] >= 0, k
  for k in ("loss_rpn_cls", "loss_cls", "loss_mask"):
    assert terms0[k] > 0, k
  # Two images with 2 non-crowd GTs each: GT boxes alone give >= 2 foreground RoIs per image.
  assert terms0["num_fg_rois"] >= 2 and terms0["num_pos_anchors"] >= 1


def test_gradients_finite_and_nonzero_for_heads(trained):
  _, _, gnorms, finite, _, _ = trained
  assert finite.all()
  for head in ("rpn_head", "box_head", "box_predictor", "mask_head", "maskiou_head", "fpn",
               "backbone"):
    total = sum(float(v) for v in jax.tree.leaves(gnorms[head]))
    assert total > 0, head
  for layer in ("cls_score", "bbox_pred"):
    assert float(gnorms["box_predictor"][layer]["kernel"]) > 0, layer
  assert float(gnorms["mask_head"]["predictor"]["kernel"]) > 0
  assert float(gnorms["maskiou_head"]["fc_mask_iou"]["kernel"]) > 0


def test_sgd_steps_reduce_the_loss_and_update_bn_stats(trained):
  total0, _, _, _, totals, stats_moved = trained
  assert np.isfinite(totals).all()
  assert totals[-1] < totals[0], totals  # the loss after 2 updates is below the initial one
  assert stats_moved > 0  # trainable BN updated its running statistics


@pytest.mark.parametrize("recipe", ["detectron2/mask_rcnn_R_50_FPN_1x",
                                    "torchvision/maskrcnn_resnet50_fpn"])
def test_losses_trace_for_other_conventions(recipe):
  """The d2 and torchvision (bg_first, soft mask targets) paths trace to the same outputs
  (shapes only: eval_shape compiles nothing)."""
  config = _config(recipe)
  model = build_model(config, train=True)
  batch = _batch(16)
  ids = coco_categories.COCO_CATEGORY_IDS if "torchvision" in recipe else None

  def f(rng):
    variables = model.init(rng, batch, rng, method=MaskRCNN.losses, category_ids=ids, **KW)
    return model.apply(variables, batch, rng, method=MaskRCNN.losses, category_ids=ids,
                       mutable=["batch_stats"], **KW)[0]

  total, terms = jax.eval_shape(f, jax.random.PRNGKey(0))
  assert total.shape == () and "loss_mask" in terms and "loss_mask_iou" not in terms


def test_losses_take_given_samples():
  """`samples` replace the samplers (traced with eval_shape: nothing compiles); a group given in
  part, or RoI indices without the proposals they index, are errors."""
  config = _config("detectron2/mask_rcnn_R_50_FPN_1x")
  model = build_model(config, train=True)
  batch = _batch(16)
  n_anchors = 3 * sum((64 // s) ** 2 for s in (4, 8, 16, 32)) + 3  # P6 is 1 x 1
  samples = dict(rpn_pos=np.zeros((2, n_anchors), bool), rpn_neg=np.ones((2, n_anchors), bool),
                 proposals=np.tile(np.array([[0, 0, 20, 20]], np.float32), (2, 5, 1)),
                 proposals_valid=np.ones((2, 5), bool),
                 roi_index=np.tile(np.arange(6, dtype=np.int32), (2, 1)),
                 roi_valid=np.ones((2, 6), bool))

  def f(rng, samples):
    kw = dict(samples=samples, mask_rows_per_image=4, **KW)
    variables = model.init(rng, batch, rng, method=MaskRCNN.losses, **kw)
    return model.apply(variables, batch, rng, method=MaskRCNN.losses, **kw)

  total, terms = jax.eval_shape(f, jax.random.PRNGKey(0), samples)
  assert total.shape == () and "loss_mask" in terms
  for bad in ({k: v for k, v in samples.items() if k != "rpn_neg"},
              {k: v for k, v in samples.items() if not k.startswith("proposals")},
              dict(samples, rpn_pos=samples["rpn_pos"][:, 1:], rpn_neg=samples["rpn_neg"][:, 1:]),
              dict(samples, extra=1)):
    with pytest.raises(ValueError):
      jax.eval_shape(f, jax.random.PRNGKey(0), bad)

