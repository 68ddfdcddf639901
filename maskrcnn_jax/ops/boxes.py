"""Elementary box ops: area, pairwise IoU, clipping (parity_spec 3.10, 3.8, 4.1).

All boxes are (x1, y1, x2, y2) in absolute pixels, no "+1" (mmcv `offset=0`, detectron2 `Boxes`,
torchvision `box_area`). The arithmetic follows the reference frameworks operation by operation so
that float32 results are bitwise equal to theirs.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def no_fma(x):
  """Returns `x` unchanged (bitwise, NaN included), rounded to its dtype before any later add.

  XLA's CPU backend (and GPU) lets LLVM contract `a * b + c` into one fused multiply-add, which
  rounds once instead of twice. PyTorch evaluates every op separately, so e.g. d2's
  `dx * widths + ctr_x` or the IoU's `area_a + area_b - w * h` round the product first. `copysign(
  |x|, x)` is the identity, but LLVM does not see through it, so the product keeps its own
  rounding (an optimization_barrier or reduce_precision is removed before codegen and does not
  help). The golden tests (box_coding.npz, nms.npz) catch it should a compiler learn this trick.
  """
  return jnp.copysign(jnp.abs(x), x)


def exact_div(x, y):
  """`x / y` with `y` broadcast to `x`'s shape, divided exactly (IEEE division, one rounding).

  XLA's algebraic simplifier rewrites `A / broadcast(B)` into `A * broadcast(1 / B)`, which
  rounds twice (e.g. 14 % of float32 values divided by 0.1 change). The barrier hides the
  broadcast from that rewrite. Use it wherever the reference divides a tensor by a scalar or a
  per-column constant (d2 `deltas / wx`, mmdet `deltas / stds`).
  """
  y = jnp.broadcast_to(jnp.asarray(y, dtype=x.dtype), jnp.broadcast_shapes(x.shape, jnp.shape(y)))
  return x / lax.optimization_barrier(y)


def area(boxes):
  """Box areas.

  Args:
    boxes: [..., 4] float, (x1, y1, x2, y2) in pixels.

  Returns:
    [...] same dtype: (x2 - x1) * (y2 - y1), no +1 and no clamping, so an inverted box gets a
    negative or zero area exactly as in `torchvision/ops/boxes.py:box_area` and d2 `Boxes.area`.
  """
  return no_fma((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))


def pairwise_intersection(a, b):
  """Intersection areas of every pair.

  Args:
    a: [N, 4] float, xyxy pixels.
    b: [M, 4] float, xyxy pixels.

  Returns:
    [N, M] same dtype: max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1))
    (`detectron2/structures/boxes.py:pairwise_intersection`, mmdet `bbox_overlaps`).
  """
  lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
  rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = jnp.maximum(rb - lt, 0)
  return no_fma(wh[..., 0] * wh[..., 1])


def pairwise_iou(a, b):
  """IoU of every pair, the way detectron2 / mmdet / torchvision compute it in float32.

  iou = inter / (area_a + area_b - inter) (parity_spec 3.10). Where the boxes do not intersect
  (inter == 0) the result is 0, as in `detectron2/structures/boxes.py:pairwise_iou`
  (`torch.where(inter > 0, ..., 0)`). That also covers mmdet `bbox_overlaps` (union clamped to
  eps=1e-6, so 0 / union = 0) and torchvision `box_iou` except for two zero-area boxes, where
  torchvision gets 0/0 = NaN; NMS never suppresses on either value (`IoU > thr` is False), so the
  difference cannot change a decision.

  Args:
    a: [N, 4] float32, xyxy pixels.
    b: [M, 4] float32, xyxy pixels.

  Returns:
    [N, M] float32 (dtype of the inputs).
  """
  inter = pairwise_intersection(a, b)
  union = area(a)[:, None] + area(b)[None, :] - inter
  # Divide only where inter > 0 so that 0/0 never appears (same values as d2's torch.where).
  safe_union = jnp.where(inter > 0, union, jnp.ones_like(union))
  return jnp.where(inter > 0, inter / safe_union, jnp.zeros_like(inter))


def clip_boxes(boxes, hw):
  """Clips boxes to the image: x to [0, w], y to [0, h].

  Same values as d2 `Boxes.clip`, torchvision `clip_boxes_to_image` and mmdet `delta2bbox`'s
  `clip_border` branch (parity_spec 3.8); NaN stays NaN in all of them.

  Args:
    boxes: [..., 4] float, xyxy pixels.
    hw: (h, w): python numbers or an array of shape [2], or [..., 2] broadcastable against
      `boxes[..., :1]` (e.g. [B, 1, 2] for boxes [B, K, 4]) for per-image sizes under jit.

  Returns:
    [..., 4] same dtype as `boxes`.
  """
  hw = jnp.asarray(hw, dtype=boxes.dtype)
  h = hw[..., 0:1]
  w = hw[..., 1:2]
  x = jnp.clip(boxes[..., 0::2], 0, w)
  y = jnp.clip(boxes[..., 1::2], 0, h)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)
