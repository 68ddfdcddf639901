"""Exact greedy NMS with fixed shapes (parity_spec 3.10).

The algorithm of torchvision (`csrc/ops/cpu/nms_kernel.cpp`) and mmcv
(`mmcv/ops/csrc/pytorch/cpu/nms.cpp`):
sort by score (descending), walk the boxes in that order, keep a box unless an earlier kept box
suppressed it, and suppress every later box j with IoU(i, j) > iou_threshold (strict). The IoU is
float32 `inter / (area_i + area_j - inter)` with `area = (x2 - x1) * (y2 - y1)` (no +1), so two
identical zero-area boxes get 0/0 = NaN, which never suppresses. Kept indices come out in
processing order. Golden nms.npz shows that this reproduces torchvision's and mmcv's kept lists bit
for bit once the processing order is the framework's.

The loop is a `lax.while_loop` over kept boxes only: each step takes the first still-active box
in processing order, computes its IoU row against all N boxes (O(N) memory; no N x N matrix) and
deactivates the suppressed ones. It stops after `max_output` keeps or when nothing is active.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from maskrcnn_jax.ops.boxes import area
from maskrcnn_jax.ops.boxes import no_fma


def processing_order(scores):
  """Stable descending order of `scores` ([N] float) -> [N] int32; ties keep index order.

  torchvision sorts with `stable=True` (parity_spec 3.10). mmcv uses torch's default unstable
  sort, whose tie order cannot be reproduced in general; pass that order explicitly to `nms`.
  """
  return jnp.argsort(scores, descending=True, stable=True).astype(jnp.int32)


def _greedy(boxes, valid, order, same_group, *, iou_threshold, max_output, any_group=False):
  """Greedy NMS over `boxes` in processing `order`; returns kept positions into `boxes`.

  boxes [N, 4] float (xyxy), valid [N] bool, order [N] int32 (a permutation), same_group: None or
  [N] int32 group ids (IoU only counts within a group). any_group: bool scalar (may be traced);
  where True the groups are ignored (every box may suppress every other). Returns (idx
  [max_output] int32 into `boxes`, padded with 0; keep_valid [max_output] bool).
  """
  n = boxes.shape[0]
  if n == 0:
    return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)
  b = jnp.take(boxes, order, axis=0)
  active0 = jnp.take(valid, order, axis=0)
  grp = None if same_group is None else jnp.take(same_group, order, axis=0)
  areas = area(b)  # rounded once, like the kernels' precomputed `areas` tensor
  thr = jnp.asarray(iou_threshold, dtype=boxes.dtype)
  x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]

  def cond(state):
    _, count, _, _, has_next = state
    return has_next & (count < max_output)

  def body(state):
    keep, count, active, i, _ = state
    keep = keep.at[count].set(i)
    # One IoU row, op by op as in nms_kernel.cpp: inter / (iarea + areas[j] - inter).
    w = jnp.maximum(jnp.minimum(x2[i], x2) - jnp.maximum(x1[i], x1), 0)
    h = jnp.maximum(jnp.minimum(y2[i], y2) - jnp.maximum(y1[i], y1), 0)
    inter = no_fma(w * h)
    iou = inter / ((areas[i] + areas) - inter)
    suppress = iou > thr  # strict; NaN compares False
    if grp is not None:
      suppress = suppress & ((grp == grp[i]) | any_group)
    active = active & ~suppress
    active = active.at[i].set(False)
    nxt = jnp.argmax(active).astype(jnp.int32)  # first active position in processing order
    return keep, count + 1, active, nxt, active[nxt]

  first = jnp.argmax(active0).astype(jnp.int32)
  init = (jnp.zeros((max_output,), jnp.int32), jnp.int32(0), active0, first, active0[first])
  keep, count, _, _, _ = lax.while_loop(cond, body, init)
  keep_valid = jnp.arange(max_output) < count
  idx = jnp.where(keep_valid, jnp.take(order, keep), 0).astype(jnp.int32)
  return idx, keep_valid


def nms(boxes, scores, *, iou_threshold, max_output: int, valid=None, order=None):
  """Greedy NMS, exact and jittable.

  Args:
    boxes: [N, 4] float32, (x1, y1, x2, y2) pixels.
    scores: [N] float32.
    iou_threshold: suppress when IoU > threshold (strict, compared in the boxes' dtype).
    max_output: static number of output slots; the loop stops after that many keeps.
    valid: optional [N] bool; invalid boxes are never kept and never suppress.
    order: optional [N] int processing order (a permutation of 0..N-1), e.g. the unstable torch
      sort order that mmcv uses; default `processing_order(scores)` (stable, ties by index).

  Returns:
    keep_idx: [max_output] int32 indices into `boxes`, in processing (score) order; padded with 0.
    keep_valid: [max_output] bool, True for the real entries (a prefix).
  """
  n = boxes.shape[0]
  if valid is None:
    valid = jnp.ones((n,), bool)
  if order is None:
    order = processing_order(scores)
  return _greedy(boxes, valid.astype(bool), jnp.asarray(order, jnp.int32), None,
                 iou_threshold=iou_threshold, max_output=max_output)


def trick_applies(num_boxes, trick_max_boxes: int, static_size: int):
  """Whether a batched NMS over `num_boxes` boxes uses the coordinate-offset trick.

  The references decide by the number of boxes of the call (parity_spec 3.10): torchvision's
  `batched_nms` (which detectron2 calls) offsets when `boxes.numel() <= 4000` on CPU (1000
  boxes; 100,000 on CUDA) and runs per-class NMS above; mmcv always offsets. `trick_max_boxes`
  is that limit in boxes (conventions.NMS_TRICK_ALWAYS for mmcv, negative for never).

  Args:
    num_boxes: int32 scalar (may be traced), the boxes the reference's call would hold.
    trick_max_boxes: static int.
    static_size: static upper bound of num_boxes.

  Returns:
    A Python bool where the static sizes decide it, else a traced bool scalar.
  """
  if trick_max_boxes < 0:
    return False
  if trick_max_boxes >= static_size:
    return True
  return jnp.asarray(num_boxes) <= trick_max_boxes


def batched_nms(boxes, scores, idxs, *, iou_threshold, max_output: int, valid=None,
                coordinate_trick=True, order=None, max_coordinate=None):
  """Class- (or level-) aware NMS.

  Args:
    boxes: [N, 4] float32 xyxy pixels; scores: [N] float32; idxs: [N] int group ids (class or
      FPN level), >= 0.
    iou_threshold, max_output, valid, order: as in `nms`.
    coordinate_trick: bool, or a traced bool scalar (`trick_applies`). True emulates
      torchvision `_batched_nms_coordinate_trick` / mmcv `batched_nms`: NMS on
      `boxes + idxs * (max_coordinate + 1)` computed in the boxes' dtype, where max_coordinate is
      the largest coordinate over the valid boxes. In float32 the offset rounds the coordinates
      (ulp ~0.008 px at 1e5) and can flip near-threshold decisions. False runs exact per-group
      NMS (IoU only between boxes with equal idxs), i.e. torchvision's `_batched_nms_vanilla` up
      to the order of score ties (vanilla re-sorts its result with an unstable sort).
    max_coordinate: optional float scalar overriding the maximum over `boxes` (the reference
      computed it over more boxes than enter here, e.g. before a top-k).

  Returns:
    (keep_idx [max_output] int32, keep_valid [max_output] bool) as in `nms`, in processing order.
  """
  n = boxes.shape[0]
  if valid is None:
    valid = jnp.ones((n,), bool)
  valid = valid.astype(bool)
  if order is None:
    order = processing_order(scores)
  order = jnp.asarray(order, jnp.int32)
  groups = jnp.asarray(idxs, jnp.int32)
  if coordinate_trick is False:
    return _greedy(boxes, valid, order, groups, iou_threshold=iou_threshold,
                   max_output=max_output)
  if max_coordinate is None:
    masked = jnp.where(valid[:, None], boxes, -jnp.inf)
    max_coordinate = jnp.max(masked) if n else jnp.zeros((), boxes.dtype)
    max_coordinate = jnp.where(jnp.any(valid), max_coordinate, 0)
  max_coordinate = jnp.asarray(max_coordinate).astype(boxes.dtype)
  # offsets = idxs.to(boxes) * (max_coordinate + 1), then one add in the boxes' dtype
  # (torchvision/ops/boxes.py:_batched_nms_coordinate_trick, mmcv/ops/nms.py:batched_nms).
  offsets = no_fma(idxs.astype(boxes.dtype) * (max_coordinate + jnp.ones((), boxes.dtype)))
  if coordinate_trick is True:
    return _greedy(boxes + offsets[:, None], valid, order, None,
                   iou_threshold=iou_threshold, max_output=max_output)
  # Decided at run time: offsets and no group test (the trick), or neither (per-group NMS).
  use = jnp.asarray(coordinate_trick, bool)
  shifted = jnp.where(use, boxes + offsets[:, None], boxes)
  return _greedy(shifted, valid, order, groups, iou_threshold=iou_threshold,
                 max_output=max_output, any_group=use)
