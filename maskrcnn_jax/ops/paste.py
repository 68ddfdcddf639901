"""Pasting M x M mask probabilities into the original image, on the host (parity_spec 3.13).

Host-side numpy (float32 arithmetic, operation by operation as the references), memory bounded:
each mask is only evaluated inside its box window clipped to the image, never as an [N, H, W] float
stack. Two algorithms:

* `paste_mask_grid_sample` (mmdet `fcn_mask_head.py:_do_paste_mask`, detectron2
  `layers/mask_ops.py:_do_paste_mask`): grid_sample of the probabilities at every pixel centre,
  bilinear, align_corners=False, zero padding; binarized with >= 0.5. Bitwise equal to both on
  golden/mask_paste.npz, exact-0.5 pixels included.
* `paste_mask_tv_legacy` (torchvision `roi_heads.py:paste_masks_in_image`): pad to (M+2)^2, expand
  the box by (M+2)/M, truncate to int, bilinear `F.interpolate` to the box size, copy. Soft output;
  torchvision's reference evaluation binarizes with > 0.5. Bitwise equal on golden/mask_paste.npz.

The reference values come from torch's x86-64 CPU kernels, whose float expressions gcc contracts to
FMAs; `fma_f32` reproduces those roundings exactly.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple, Union

import numpy as np

from maskrcnn_jax import conventions as conventions_lib
from maskrcnn_jax.ops.resample import (bilinear_from_indices, fma_f32, linear_source_indices,
                                       torch_bilinear_kernel)

_F1 = np.float32(1)


def _grid_sample_window(mask: np.ndarray, box: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                        inf_to_zero: bool) -> np.ndarray:
  """Soft grid_sample values at pixel centres rows x cols: [len(rows), len(cols)] float32."""
  mh, mw = mask.shape
  x0, y0, x1, y1 = (np.float32(v) for v in box)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    # _do_paste_mask: img_x = arange(x0_int, x1_int).float() + 0.5;
    # img_x = (img_x - x0) / (x1 - x0) * 2 - 1, every op a float32 tensor op.
    gx = (cols.astype(np.float32) + np.float32(0.5) - x0) / (x1 - x0) * np.float32(2) - _F1
    gy = (rows.astype(np.float32) + np.float32(0.5) - y0) / (y1 - y0) * np.float32(2) - _F1
    if inf_to_zero:
      # mmdet only: `img_x[torch.isinf(img_x)] = 0` (zero-width boxes); NaN (0/0) is kept.
      gx = np.where(np.isinf(gx), np.float32(0), gx)
      gy = np.where(np.isinf(gy), np.float32(0), gy)
    # aten/src/ATen/native/cpu/GridSamplerKernel.cpp, ComputeLocationBase<align_corners=false>::
    # unnormalize: (g + 1) * (size / 2) - 0.5, contracted to one FMA.
    ix = fma_f32(gx + _F1, np.float32(mw / 2), np.float32(-0.5))
    iy = fma_f32(gy + _F1, np.float32(mh / 2), np.float32(-0.5))
    # compute_interp_params: floor, distances, corner weights (float32).
    x_w = np.floor(ix)
    y_n = np.floor(iy)
    w = ix - x_w
    e = _F1 - w
    n = iy - y_n
    s = _F1 - n
    shape = (rows.size, cols.size)
    nw = s[:, None] * e[None, :]
    ne = s[:, None] * w[None, :]
    sw = n[:, None] * e[None, :]
    se = n[:, None] * w[None, :]

    # Zero padding: a corner outside [0, M-1] (or a NaN / huge coordinate, which converts to
    # INT_MIN) gathers 0 (`mask_gather` with a zeroed mask). Index a zero-bordered copy instead:
    # in-range index i -> i + 1, anything else -> 0 (a zero of the border).
    padded = np.pad(mask, 1)

    def index_1d(v, size):
      ok = (v > -1) & (v < size)
      return np.where(ok, v + 1, 0).astype(np.int64)

    xw_i, xe_i = index_1d(x_w, mw), index_1d(x_w + 1, mw)
    yn_i, ys_i = index_1d(y_n, mh), index_1d(y_n + 1, mh)

    def val(yi, xi):
      return padded[yi[:, None], xi[None, :]]

    # interpolated = nw_val*nw + ne_val*ne + sw_val*sw + se_val*se, contracted left to right.
    acc = val(yn_i, xw_i) * nw
    acc = fma_f32(val(yn_i, xe_i), ne, acc)
    acc = fma_f32(val(ys_i, xw_i), sw, acc)
    acc = fma_f32(val(ys_i, xe_i), se, acc)
  return acc.reshape(shape)


def grid_sample_window_bounds(box: np.ndarray,
                              image_hw: Sequence[int]) -> Tuple[int, int, int, int]:
  """The pixel window mmdet's / detectron2's CPU paths evaluate (`_do_paste_mask(skip_empty=True)`).

  Args:
    box: [4] float32 (x1, y1, x2, y2) in original-image pixels.
    image_hw: (H, W).

  Returns:
    (y0, y1, x0, x1) ints: x0 = max(floor(x1_box) - 1, 0), x1 = min(ceil(x2_box) + 1, W), likewise
    for y; y1 <= y0 or x1 <= x0 means an empty window (box outside the image, where the references
    raise in `torch.arange`).
  """
  h, w = int(image_hw[0]), int(image_hw[1])
  b = np.asarray(box, np.float32)
  if not np.all(np.isfinite(b)):
    return 0, 0, 0, 0

  def clamp_int(v, lo, hi):
    return int(min(max(v, lo), hi))

  x0 = clamp_int(math.floor(b[0]) - 1, 0, w)
  y0 = clamp_int(math.floor(b[1]) - 1, 0, h)
  x1 = clamp_int(math.ceil(b[2]) + 1, 0, w)
  y1 = clamp_int(math.ceil(b[3]) + 1, 0, h)
  return y0, y1, x0, x1


def paste_mask_grid_sample_soft(mask: np.ndarray, box: np.ndarray, image_hw: Sequence[int], *,
                                full_image: bool = False, inf_to_zero: bool = True
                                ) -> Tuple[int, int, np.ndarray]:
  """Soft pasted probabilities (before the threshold) of one mask, mmdet / detectron2 algorithm.

  Args:
    mask: [M, M] (or [Mh, Mw]) float32 probabilities.
    box: [4] float32 (x1, y1, x2, y2) in original-image pixels.
    image_hw: (H, W) of the original image.
    full_image: evaluate every pixel (the GPU path, `skip_empty=False`) instead of the CPU window
      (`grid_sample_window_bounds`). Outside that window the soft values are tiny but not always 0
      (boxes wider than 56 px); the binary result is identical either way.
    inf_to_zero: mmdet replaces infinite grid coordinates (zero-width / zero-height boxes) by 0;
      detectron2 does not (it drops empty boxes before pasting).

  Returns:
    (y0, x0, soft [h, w] float32): the window's top-left corner and values; h or w is 0 for a box
    outside the image.
  """
  mask = np.asarray(mask, np.float32)
  box = np.asarray(box, np.float32).reshape(4)
  ih, iw = int(image_hw[0]), int(image_hw[1])
  if full_image:
    y0, y1, x0, x1 = 0, ih, 0, iw
  else:
    y0, y1, x0, x1 = grid_sample_window_bounds(box, (ih, iw))
  if y1 <= y0 or x1 <= x0:
    return 0, 0, np.zeros((0, 0), np.float32)
  soft = _grid_sample_window(mask, box, np.arange(y0, y1), np.arange(x0, x1), inf_to_zero)
  return y0, x0, soft


def paste_mask_grid_sample(mask: np.ndarray, box: np.ndarray, image_hw: Sequence[int], *,
                           threshold: float = 0.5, inclusive: bool = True,
                           inf_to_zero: bool = True) -> Tuple[int, int, np.ndarray]:
  """Binary pasted mask of one detection, mmdet / detectron2 `_do_paste_mask` (parity_spec 3.13).

  Args:
    mask: [M, M] float32 probabilities (sigmoid of the predicted class's 28x28 logits).
    box: [4] float32 (x1, y1, x2, y2) in original-image pixels (mmdet: (det * sf) / sf; d2: scaled
      and clipped).
    image_hw: (H, W) of the original image.
    threshold: 0.5 (`mask_thr_binary`, d2 `paste_masks_in_image(threshold=0.5)`).
    inclusive: >= threshold (mmdet, d2) or > threshold.
    inf_to_zero: see `paste_mask_grid_sample_soft` (mmdet True; irrelevant for d2's nonempty boxes).

  Returns:
    (y0, x0, window [h, w] bool): the mask inside the CPU window of the box; the full-image mask is
    zeros with `full[y0:y0+h, x0:x0+w] = window`. A box entirely outside the image gives an empty
    (0, 0) window (the references raise there).
  """
  y0, x0, soft = paste_mask_grid_sample_soft(mask, box, image_hw, inf_to_zero=inf_to_zero)
  thr = np.float32(threshold)
  return y0, x0, (soft >= thr) if inclusive else (soft > thr)


def tv_legacy_expanded_box(box: np.ndarray, mask_size: int, padding: int = 1) -> np.ndarray:
  """torchvision `expand_boxes(boxes, (M + 2p) / M).to(int64)`: [4] int64.

  float32: w_half = (x2 - x1) * 0.5, x_c = (x2 + x1) * 0.5, w_half *= float32(scale) (torch casts
  the Python scalar to float32), then x_c -/+ w_half, truncated toward 0 by the int64 cast.
  """
  b = np.asarray(box, np.float32).reshape(4)
  scale = np.float32(float(mask_size + 2 * padding) / mask_size)
  half = np.float32(0.5)
  with np.errstate(invalid="ignore", over="ignore"):
    w_half = (b[2] - b[0]) * half * scale
    h_half = (b[3] - b[1]) * half * scale
    x_c = (b[2] + b[0]) * half
    y_c = (b[3] + b[1]) * half
    exp = np.array([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], np.float32)
  if not np.all(np.isfinite(exp)):
    raise ValueError(f"non-finite box {box}")
  return np.trunc(exp).astype(np.int64)


def paste_mask_tv_legacy(mask: np.ndarray, box: np.ndarray, image_hw: Sequence[int], *,
                         padding: int = 1) -> Tuple[int, int, np.ndarray]:
  """Soft pasted mask of one detection, torchvision's legacy algorithm (parity_spec 3.13).

  `roi_heads.py:expand_masks, expand_boxes, paste_mask_in_image`: zero-pad the M x M probabilities
  to (M+2p)^2, expand the box by (M+2p)/M and cast to int64, w = max(int(x2 - x1 + 1), 1) (h
  likewise), bilinear `F.interpolate(align_corners=False)` to (h, w) (torch's CPU kernel choice
  for one channel: channels-last formula if h + w <= 128, else generic; reproduced bitwise), and
  copy rows [max(y1, 0), min(y2 + 1, H)) x columns [max(x1, 0), min(x2 + 1, W)).

  Args:
    mask: [M, M] float32 probabilities.
    box: [4] float32 (x1, y1, x2, y2) in original-image pixels (the detections after
      `resize_boxes`).
    image_hw: (H, W).
    padding: 1 (torchvision's default).

  Returns:
    (y0, x0, soft [h, w] float32) window of the full-image soft mask (zeros elsewhere). Binarize
    with `soft > 0.5` (torchvision `references/detection/coco_eval.py`). A box entirely outside the
    image gives an empty (0, 0) window (torchvision raises there).
  """
  mask = np.asarray(mask, np.float32)
  ih, iw = int(image_hw[0]), int(image_hw[1])
  m = mask.shape[-1]
  padded = np.pad(mask, padding)  # torch.nn.functional.pad(mask, (padding,) * 4), zeros
  b = tv_legacy_expanded_box(box, m, padding)
  w = max(int(b[2] - b[0] + 1), 1)
  h = max(int(b[3] - b[1] + 1), 1)
  x_0, x_1 = max(int(b[0]), 0), min(int(b[2]) + 1, iw)
  y_0, y_1 = max(int(b[1]), 0), min(int(b[3]) + 1, ih)
  if x_1 <= x_0 or y_1 <= y_0:
    return 0, 0, np.zeros((0, 0), np.float32)
  # Only the rows / columns that land in the image are interpolated; the bilinear source indices
  # of an output pixel do not depend on the others.
  full_rows = np.arange(y_0 - b[1], y_1 - b[1])
  full_cols = np.arange(x_0 - b[0], x_1 - b[0])
  resized = _tv_interpolate_subset(padded, (h, w), full_rows, full_cols)
  return y_0, x_0, resized


def _tv_interpolate_subset(x: np.ndarray, out_hw: Tuple[int, int], rows: np.ndarray,
                           cols: np.ndarray) -> np.ndarray:
  """`torch_upsample_bilinear(x[None], out_hw)[0][rows][:, cols]` without the full output.

  The kernel choice (summation order), source indices and weights all depend on the full output
  size; they are computed for it and then only the wanted rows / columns are evaluated.
  """
  oh, ow = out_hw
  kernel = torch_bilinear_kernel(1, (oh, ow))
  h_idx = tuple(v[rows] for v in linear_source_indices(x.shape[0], oh))
  w_idx = tuple(v[cols] for v in linear_source_indices(x.shape[1], ow))
  return bilinear_from_indices(x[None], h_idx, w_idx, kernel)[0]


def convention_args(convention: Union[str, conventions_lib.Convention]) -> Dict[str, Any]:
  """A convention's paste rule as `paste_mask` / `paste_masks` / `paste_device.dispatch` keyword
  arguments (parity_spec 3.13): method (str: 'grid_sample' for mmdet / detectron2, 'tv_legacy'
  for torchvision), threshold (float, 0.5 in all three) and inclusive (bool: >= 0.5 for mmdet /
  detectron2, torchvision's > 0.5). Every paste of a convention's masks reads it here."""
  conv = (convention if isinstance(convention, conventions_lib.Convention)
          else conventions_lib.get(convention))
  return dict(method=conv.paste, threshold=0.5, inclusive=bool(conv.mask_threshold_inclusive))


def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_hw: Sequence[int], *,
                method: str = "grid_sample", threshold: float = 0.5, inclusive: bool = True,
                inf_to_zero: bool = True) -> np.ndarray:
  """Full-image binary masks of N detections (convenience for small images and tests).

  Args:
    masks: [N, M, M] float32 probabilities.
    boxes: [N, 4] float32 (x1, y1, x2, y2) in original-image pixels.
    image_hw: (H, W).
    method: 'grid_sample' (mmdet / detectron2) or 'tv_legacy' (torchvision; soft values binarized
      with the same threshold rule: use inclusive=False for torchvision's > 0.5).
    threshold, inclusive: soft >= threshold (inclusive) or soft > threshold.
    inf_to_zero: grid_sample only, see `paste_mask_grid_sample_soft`.

  Returns:
    [N, H, W] bool (N * H * W bytes: prefer the per-mask window functions for large images).
  """
  masks = np.asarray(masks, np.float32)
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  ih, iw = int(image_hw[0]), int(image_hw[1])
  out = np.zeros((len(boxes), ih, iw), bool)
  for i, (mask, box) in enumerate(zip(masks, boxes)):
    y0, x0, binary = paste_mask(mask, box, (ih, iw), method, threshold, inclusive, inf_to_zero)
    out[i, y0:y0 + binary.shape[0], x0:x0 + binary.shape[1]] = binary
  return out


def paste_mask(mask: np.ndarray, box: np.ndarray, image_hw: Sequence[int], method: str,
               threshold: float = 0.5, inclusive: bool = True, inf_to_zero: bool = True
               ) -> Tuple[int, int, np.ndarray]:
  """Binary pasted mask of one detection, either algorithm and threshold rule.

  Args:
    mask: [M, M] float32 probabilities. box: [4] float32 xyxy in original-image pixels.
    image_hw: (H, W). method: 'grid_sample' | 'tv_legacy'. threshold, inclusive: soft >= threshold
      (inclusive) or soft > threshold. inf_to_zero: grid_sample only
      (`paste_mask_grid_sample_soft`).

  Returns:
    (y0, x0, window [h, w] bool), as `paste_mask_grid_sample`.
  """
  if method == "grid_sample":
    y0, x0, soft = paste_mask_grid_sample_soft(mask, box, image_hw, inf_to_zero=inf_to_zero)
  elif method == "tv_legacy":
    y0, x0, soft = paste_mask_tv_legacy(mask, box, image_hw)
  else:
    raise ValueError(f"unknown paste method {method!r}; expected 'grid_sample' or 'tv_legacy'")
  thr = np.float32(threshold)
  return y0, x0, (soft >= thr) if inclusive else (soft > thr)
