"""FPN anchors, computed in numpy at trace time (parity_spec 3.7).

Anchor boxes are (x1, y1, x2, y2) float32 in padded-input-image pixels. Within a level the anchor
index is (y * W + x) * A + a, with `a` running over the aspect ratios in the given order (ratio =
h / w, so ratio 0.5 is the wide anchor); all three frameworks agree on that order.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def cell_anchors(sizes, aspect_ratios, *, round_to_int: bool,
                 size_major: bool = False) -> np.ndarray:
  """Zero-centred anchors of one level.

  Args:
    sizes: a number or sequence of S anchor sizes (sqrt of the area) in pixels.
    aspect_ratios: sequence of R ratios h / w.
    round_to_int: False for detectron2 / mmdet, True for torchvision.
    size_major: order of the A anchors when there are several sizes: False gives a = r * S + s
      (torchvision, mmdet `scale_major=True`, which despite its name varies the scale fastest),
      True gives a = s * R + r (detectron2 loops sizes outside). Irrelevant for FPN (S = 1).

  Returns:
    [A, 4] float32, A = R * S, xyxy pixels around (0, 0).

  detectron2 (`detectron2/modeling/anchor_generator.py:generate_cell_anchors`): w = sqrt(size^2 / r)
  and h = r * w in float64, corners +-w/2, +-h/2, then cast to float32. mmdet
  (v2 `mmdet/core/anchor/anchor_generator.py`, float32 sqrt of the ratios,
  base = stride, scale 8) gives bitwise the same float32 values for the standard configs (golden
  anchors.npz). torchvision (`torchvision/models/detection/anchor_utils.py:generate_anchors`) works
  in float32: h_ratio = sqrt(r), w_ratio = 1 / h_ratio, ws = w_ratio * size,
  [-ws, -hs, ws, hs] / 2, then `round()` (half to even, like np.round).
  """
  if not isinstance(sizes, Sequence):
    sizes = (sizes,)
  if round_to_int:
    scales = np.asarray(sizes, dtype=np.float32)
    ratios = np.asarray(aspect_ratios, dtype=np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)).astype(np.float32)
  else:
    rows = []
    for r in aspect_ratios:
      for size in sizes:
        area = float(size) ** 2.0
        w = math.sqrt(area / float(r))
        h = float(r) * w
        rows.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    base = np.asarray(rows, dtype=np.float64).astype(np.float32)
  if size_major:
    num_r, num_s = len(aspect_ratios), len(sizes)
    base = base.reshape(num_r, num_s, 4).transpose(1, 0, 2).reshape(-1, 4)
  return base


def grid_anchors(cell, feature_hw, stride_hw) -> np.ndarray:
  """Shifts the cell anchors over a feature map.

  Args:
    cell: [A, 4] float32 zero-centred anchors (`cell_anchors`).
    feature_hw: (H, W) of the (padded) feature map.
    stride_hw: (stride_y, stride_x) in pixels (ints; torchvision may give different y / x).

  Returns:
    [H * W * A, 4] float32, index (y * W + x) * A + a; anchor = cell + (x*sx, y*sy, x*sx, y*sy),
    offset 0 (d2 `ANCHOR_GENERATOR.OFFSET` 0.0, mmdet center_offset 0). The shifts are integers
    exactly representable in float32, so the single float32 add matches all three frameworks.
  """
  cell = np.asarray(cell, dtype=np.float32)
  h, w = (int(v) for v in feature_hw)
  sy, sx = (int(v) for v in stride_hw)
  shift_x = (np.arange(w, dtype=np.int64) * sx).astype(np.float32)
  shift_y = (np.arange(h, dtype=np.int64) * sy).astype(np.float32)
  yy, xx = np.meshgrid(shift_y, shift_x, indexing="ij")
  xx = xx.reshape(-1)
  yy = yy.reshape(-1)
  shifts = np.stack([xx, yy, xx, yy], axis=1)
  return (shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4).astype(np.float32)


def _per_level(x, num_levels):
  """Broadcasts a shared spec (number or flat sequence) to one entry per level."""
  if isinstance(x, Sequence) and len(x) and isinstance(x[0], Sequence):
    assert len(x) == num_levels, (len(x), num_levels)
    return list(x)
  return [x] * num_levels


def fpn_anchors(*, padded_hw, feature_sizes, sizes, aspect_ratios, strides, round_to_int: bool,
                dynamic_stride: bool) -> list[np.ndarray]:
  """Anchors of all FPN levels.

  Args:
    padded_hw: (H, W) of the padded input batch (only used with `dynamic_stride`).
    feature_sizes: L pairs (H_l, W_l), e.g. P2..P6.
    sizes: per level either a number (FPN: 32, 64, ...) or a sequence of sizes, e.g.
      ((32,), (64,), (128,), (256,), (512,)) or (32, 64, 128, 256, 512).
    aspect_ratios: one flat sequence shared by all levels, e.g. (0.5, 1.0, 2.0), or one per level.
    strides: L nominal strides (4, 8, 16, 32, 64); ignored when `dynamic_stride`.
    round_to_int: torchvision rounds the cell anchors (`Convention.anchor_round`).
    dynamic_stride: torchvision derives the stride per axis as padded // feature size
      (`Convention.anchor_dynamic_stride`; P6 of an 800-high input gets y-stride 800 // 13 = 61).

  Returns:
    list of L arrays [H_l * W_l * A, 4] float32, xyxy padded-image pixels.
  """
  num_levels = len(feature_sizes)
  if len(sizes) == num_levels and not isinstance(sizes[0], Sequence):
    sizes = [(s,) for s in sizes]
  sizes = _per_level(sizes, num_levels)
  ratios = _per_level(aspect_ratios, num_levels)
  out = []
  for level, (fh, fw) in enumerate(feature_sizes):
    if dynamic_stride:
      stride_hw = (int(padded_hw[0]) // int(fh), int(padded_hw[1]) // int(fw))
    else:
      s = strides[level]
      stride_hw = (s, s) if not isinstance(s, Sequence) else tuple(s)
    cell = cell_anchors(sizes[level], ratios[level], round_to_int=round_to_int)
    out.append(grid_anchors(cell, (fh, fw), stride_hw))
  return out
