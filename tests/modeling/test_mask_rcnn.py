"""Whole-model wiring on small inputs: fixed shapes, batching, Mask Scoring outputs.

Numerical parity with a real framework is in tests/test_parity_torchvision.py; here the model runs
with random weights on 128x160 inputs to check what parity cannot see: batch independence and the
output contract.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import config_lib
from maskrcnn_jax.modeling.build import build_model, init_variables

ROOT = Path(__file__).resolve().parents[2]


def _config(recipe):
  config = config_lib.load_config_file(str(ROOT / "configs" / f"{recipe}.py"))
  config.model.detections_per_image = 20
  config.model.rpn_pre_nms_topk_test = 300
  config.model.rpn_post_nms_topk_test = 100
  return config


def _inputs(n):
  rng = np.random.RandomState(0)
  images = rng.randn(n, 128, 160, 3).astype(np.float32)
  image_hw = np.array([[120, 150], [128, 100]][:n], np.int32)
  images[1:, :, 100:] = 0  # the second image is narrower: zero padding on the right
  orig_hw = np.array([[60, 75], [64, 50]][:n], np.int32)
  scale = np.array([[2.0, 2.0], [2.0, 2.0]][:n], np.float32)
  return images, image_hw, orig_hw, scale


@pytest.fixture(scope="module")
def d2_model():
  config = _config("detectron2/mask_rcnn_R_50_FPN_1x")
  # A larger score threshold would leave nothing with random weights; keep 0.05.
  model = build_model(config)
  variables = init_variables(model, jax.random.PRNGKey(1), (128, 160))
  return model, variables


def test_batch_of_two_equals_two_single_runs(d2_model):
  model, variables = d2_model
  apply = jax.jit(model.apply)
  images, image_hw, orig_hw, scale = _inputs(2)
  both = apply(variables, images, image_hw, orig_hw, scale)
  for i in range(2):
    one = apply(variables, images[i:i + 1], image_hw[i:i + 1], orig_hw[i:i + 1], scale[i:i + 1])
    np.testing.assert_array_equal(np.asarray(both["valid"][i]), np.asarray(one["valid"][0]))
    for key in ("boxes", "scores", "mask_probs"):
      np.testing.assert_allclose(np.asarray(both[key][i]), np.asarray(one[key][0]),
                                 rtol=1e-4, atol=1e-4, err_msg=key)


def test_output_contract(d2_model):
  model, variables = d2_model
  images, image_hw, orig_hw, scale = _inputs(2)
  out = jax.jit(model.apply)(variables, images, image_hw, orig_hw, scale)
  assert out["boxes"].shape == (2, 20, 4) and out["mask_probs"].shape == (2, 20, 28, 28)
  for i in range(2):
    valid = np.asarray(out["valid"][i])
    assert valid.any(), "random weights should still give some detections above 0.05"
    boxes = np.asarray(out["boxes"][i])[valid]
    h, w = orig_hw[i]
    # detectron2 clips to the original image and drops empty boxes.
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
    scores = np.asarray(out["scores"][i])[valid]
    assert (scores > 0.05).all() and (np.diff(scores) <= 0).all()
    labels = np.asarray(out["labels"][i])[valid]
    assert ((labels >= 0) & (labels < 80)).all()
    probs = np.asarray(out["mask_probs"][i])[valid]
    assert ((probs >= 0) & (probs <= 1)).all()
    assert not np.asarray(out["scores"][i])[~valid].any()  # padding is zeroed


def test_mask_scoring_outputs_iou_times_score():
  config = _config("mmdet/ms_rcnn_r50_caffe_fpn_1x_coco")
  model = build_model(config)
  variables = init_variables(model, jax.random.PRNGKey(2), (128, 160))
  images, image_hw, orig_hw, scale = _inputs(1)
  out = jax.jit(model.apply)(variables, images, image_hw, orig_hw, scale)
  assert "mask_scores" in out
  valid = np.asarray(out["valid"][0])
  assert valid.any()

  # Recompute MaskIoU for the returned detections through the module's own stages.
  def maskiou(mdl, imgs, boxes, labels, v):
    feats = mdl.features(imgs)
    return mdl.roi_heads.mask_branch(feats, boxes, labels, v)[1]

  iou = model.apply(variables, images, out["paste_boxes"] * jnp.asarray(scale)[:, None, [0, 1, 0, 1]],
                    out["labels"], out["valid"], method=maskiou)
  expected = np.asarray(iou[0] * out["scores"][0])[valid]
  np.testing.assert_allclose(np.asarray(out["mask_scores"][0])[valid], expected, rtol=1e-4,
                             atol=1e-5)
