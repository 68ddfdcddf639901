"""Box delta coding (parity_spec 3.8), in the exact operation order of each framework.

Deltas are (dx, dy, dw, dh); boxes are (x1, y1, x2, y2) in pixels. Two forms:

* 'mmdet': `mmdet/models/task_modules/coders/delta_xywh_bbox_coder.py` (`delta2bbox`,
  `bbox2delta`; v2: `mmdet/core/bbox/coder/`); `weights` are the target stds (RPN (1,1,1,1),
  R-CNN (0.1,0.1,0.2,0.2)); the means are 0.
  Decode multiplies the deltas by the stds and clamps dw, dh to [-clamp, clamp].
* 'detectron2': `detectron2/modeling/box_regression.py:Box2BoxTransform` (torchvision's
  `models/detection/_utils.py:BoxCoder` is bitwise the same); `weights` RPN (1,1,1,1), box head
  (10,10,5,5). Decode divides the deltas by the weights and clamps dw, dh from above only.

Neither form clips to the image here; call `boxes.clip_boxes` (mmdet clips inside its decoder,
d2 / tv in the callers). The computation runs in the dtype of the inputs (float32 in the model;
float64 when x64 is enabled, which reproduces the frameworks' float64 paths).
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from maskrcnn_jax.ops.boxes import exact_div
from maskrcnn_jax.ops.boxes import no_fma

DEFAULT_CLAMP = math.log(1000.0 / 16)

FORMS = ("mmdet", "detectron2")


def _check_form(form):
  if form not in FORMS:
    raise ValueError(f"unknown box coder form {form!r}; expected one of {FORMS}")


def decode(deltas, boxes, *, form: str, weights, clamp: float = DEFAULT_CLAMP):
  """Applies deltas to boxes.

  Args:
    deltas: [..., 4] float, (dx, dy, dw, dh) raw network outputs. For class-specific deltas
      [N, K*4] reshape to [N, K, 4] and pass boxes [N, 1, 4].
    boxes: [..., 4] float, xyxy pixels, broadcastable against `deltas`.
    form: 'mmdet' or 'detectron2' (torchvision = 'detectron2').
    weights: 4 floats: stds for 'mmdet', weights for 'detectron2'.
    clamp: the dw / dh bound, log(1000/16) (mmdet: |log(wh_ratio_clip=16/1000)|, same value).

  Returns:
    [..., 4] decoded boxes, xyxy pixels, dtype of `deltas`; not clipped.
  """
  _check_form(form)
  dtype = deltas.dtype
  boxes = boxes.astype(dtype)
  w4 = jnp.asarray(weights, dtype=dtype)
  if form == "mmdet":
    # delta2bbox: denorm = deltas * stds + means (means are 0, adding them is the identity).
    d = deltas * w4
    pxy = (boxes[..., :2] + boxes[..., 2:]) * 0.5
    pwh = boxes[..., 2:] - boxes[..., :2]
    dxy_wh = no_fma(pwh * d[..., :2])
    dwh = jnp.clip(d[..., 2:], -clamp, clamp)
    gxy = pxy + dxy_wh
    gwh = pwh * jnp.exp(dwh)
    x1y1 = gxy - gwh * 0.5
    x2y2 = gxy + gwh * 0.5
    return jnp.concatenate([x1y1, x2y2], axis=-1)
  # Box2BoxTransform.apply_deltas
  wh = boxes[..., 2:] - boxes[..., :2]
  ctr = boxes[..., :2] + 0.5 * wh
  d = exact_div(deltas, w4)
  dwh = jnp.minimum(d[..., 2:], clamp)
  pred_ctr = no_fma(d[..., :2] * wh) + ctr
  pred_wh = jnp.exp(dwh) * wh
  return jnp.concatenate([pred_ctr - 0.5 * pred_wh, pred_ctr + 0.5 * pred_wh], axis=-1)


def encode(boxes, gt_boxes, *, form: str, weights):
  """Deltas that turn `boxes` into `gt_boxes` (the inverse of `decode`, without clamping).

  Args:
    boxes: [..., 4] float, source boxes (anchors / proposals), xyxy pixels.
    gt_boxes: [..., 4] float, targets, xyxy pixels, same shape.
    form: 'mmdet' (`bbox2delta`: (delta - mean) / std) or 'detectron2' (`get_deltas`:
      weight * delta; torchvision `encode_single(gt, proposals)` is bitwise the same).
    weights: 4 floats, stds ('mmdet') or weights ('detectron2').

  Returns:
    [..., 4] (dx, dy, dw, dh), dtype of `boxes`. A zero-width source gives inf / nan, as in the
    frameworks.
  """
  _check_form(form)
  dtype = boxes.dtype
  gt_boxes = gt_boxes.astype(dtype)
  w4 = jnp.asarray(weights, dtype=dtype)
  if form == "mmdet":
    pxy = (boxes[..., :2] + boxes[..., 2:]) * 0.5
    pwh = boxes[..., 2:] - boxes[..., :2]
    gxy = (gt_boxes[..., :2] + gt_boxes[..., 2:]) * 0.5
    gwh = gt_boxes[..., 2:] - gt_boxes[..., :2]
    dxy = (gxy - pxy) / pwh
    dwh = jnp.log(gwh / pwh)
    return exact_div(jnp.concatenate([dxy, dwh], axis=-1), w4)
  swh = boxes[..., 2:] - boxes[..., :2]
  sctr = boxes[..., :2] + 0.5 * swh
  twh = gt_boxes[..., 2:] - gt_boxes[..., :2]
  tctr = gt_boxes[..., :2] + 0.5 * twh
  # d2: dx = wx * (tctr - sctr) / sw, evaluated left to right: (wx * diff) / sw.
  dxy = w4[:2] * (tctr - sctr) / swh
  dwh = w4[2:] * jnp.log(twh / swh)
  return jnp.concatenate([dxy, dwh], axis=-1)
