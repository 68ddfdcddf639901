"""Instance-mask crops for training, computed inside each box only (numpy + pycocotools).

The training mask target of an instance is its bitmap cropped to the gt box and resampled to S x S
(`crop_from_bitmap` states the rule). The references rasterize the full-image bitmap first (mmdet
`BitmapMasks` / `PolygonMasks.to_bitmap`, detectron2 `polygons_to_bitmask`, torchvision
`convert_coco_poly_to_mask`: pycocotools `frPyObjects` + `merge` + `decode`). Here the bitmap is
never built at image size: the segmentation goes to pycocotools' compressed RLE (`frPyObjects` +
`merge` for polygons, which costs O(perimeter); a json RLE as it is), the RLE string is decoded into
run lengths with numpy (`rle_counts`, pycocotools `rleFrString`), and only the window of pixels the
crop samples is filled from the runs (`window_from_counts`). The crop is bit-identical to cropping
`pycocotools.mask.decode` of the full image (tests/data/test_masks.py), at a cost proportional to
the box instead of the image.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import numpy as np
from pycocotools import mask as mask_util


def to_rle(segm: Any, h: int, w: int) -> Dict[str, Any]:
  """pycocotools compressed RLE of a json segmentation: a polygon list (frPyObjects + merge: how
  mmdet `_poly2mask`, detectron2 `polygons_to_bitmask` and torchvision `convert_coco_poly_to_mask`
  rasterize), an uncompressed RLE dict (counts a list) or a compressed one (counts a str)."""
  if isinstance(segm, list):
    return mask_util.merge(mask_util.frPyObjects(segm, h, w))
  counts = segm["counts"]
  if isinstance(counts, list):
    return mask_util.frPyObjects(segm, h, w)
  return {"size": [int(v) for v in segm["size"]],
          "counts": counts.encode("utf-8") if isinstance(counts, str) else counts}


def rle_counts(counts: Any) -> np.ndarray:
  """Run lengths of a COCO RLE, zeros first, in column-major (Fortran) pixel order.

  Args:
    counts: a list of ints (uncompressed RLE) or the compressed string (str / bytes).

  Returns:
    [R] int64. The compressed form is pycocotools' `rleFrString` (maskApi.c): 5 data bits per
    character (value - 48), bit 0x20 = more characters follow, bit 0x10 of the last = negative,
    and counts from the fourth on are stored as the difference to the count two places before.
  """
  if isinstance(counts, (list, tuple, np.ndarray)):
    return np.asarray(counts, np.int64).reshape(-1)
  if isinstance(counts, str):
    counts = counts.encode("ascii")
  c = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
  if c.size == 0:
    return np.zeros(0, np.int64)
  last = (c & 0x20) == 0  # the final character of each number
  ends = np.flatnonzero(last)
  starts = np.concatenate([[0], ends[:-1] + 1])
  k = np.arange(c.size) - np.repeat(starts, ends - starts + 1)  # character index inside its number
  values = np.add.reduceat((c & 0x1F) << (5 * k), starts)
  negative = (c[ends] & 0x10) != 0
  values = np.where(negative, values - (np.int64(1) << (5 * (k[ends] + 1))), values)
  # cnts[m] = x + cnts[m - 2] for m > 2: running sums over the odd and the even (from 2) entries.
  out = values.copy()
  out[1::2] = np.cumsum(values[1::2])
  out[2::2] = np.cumsum(values[2::2])
  return out


def _columns_from_counts(counts: np.ndarray, h: int, rows: Tuple[int, int],
                         cols: Tuple[int, int]) -> np.ndarray:
  """`window_from_counts`, transposed: [c1 - c0, r1 - r0] uint8 {0, 1} (column-major, as RLE)."""
  r0, r1 = rows
  c0, c1 = cols
  # Pixel p (column-major index) is foreground iff an odd number of run boundaries lie at or
  # before it; boundary b = cumsum(counts) toggles the value from pixel b on.
  bounds = np.cumsum(counts)[:-1]  # non-decreasing
  lo, hi = np.searchsorted(bounds, (c0 * h, c1 * h))  # the toggles of the window's columns
  col, row = np.divmod(bounds[lo:hi] - c0 * h, h)
  # One slot per window row plus one below it, column after column: a running sum over them
  # counts, at each pixel, the toggles at or before it. A toggle above the window counts from the
  # column's top row, one below it from the next column on; those left of the window from the
  # start.
  slots = r1 - r0 + 1
  delta = np.bincount(col * slots + np.clip(row - r0, 0, r1 - r0),
                      minlength=(c1 - c0) * slots)
  delta[0] += lo
  # Parity only: uint8 sums wrap modulo 256, which keeps it.
  parity = np.cumsum(delta.astype(np.uint8), dtype=np.uint8).reshape(c1 - c0, slots)
  return parity[:, :-1] & 1


def window_from_counts(counts: np.ndarray, h: int, rows: Tuple[int, int],
                       cols: Tuple[int, int]) -> np.ndarray:
  """The bitmap of an RLE inside a window.

  Args:
    counts: [R] run lengths (`rle_counts`) of an image with h rows, column-major.
    h: image height.
    rows, cols: the window [r0, r1) x [c0, c1), inside the image.

  Returns:
    [r1 - r0, c1 - c0] bool, equal to `pycocotools.mask.decode(rle)[r0:r1, c0:c1]`.
  """
  return _columns_from_counts(counts, h, rows, cols).T.astype(bool)


def _sample_indices(lo: float, hi: float, size: int, limit: int) -> Tuple[np.ndarray, int]:
  """Pixel indices of the G * size evenly spread sample points of [lo, hi) and G (>= 1)."""
  extent = max(hi - lo, 0.0)
  g = max(1, int(math.ceil(extent / size)))
  pts = lo + (np.arange(size * g, dtype=np.float64) + 0.5) * (extent / (size * g))
  return np.clip(np.floor(pts).astype(np.int64), 0, limit - 1), g


def _crop(columns: np.ndarray, ix: np.ndarray, iy: np.ndarray, size: int, gx: int,
          gy: int) -> np.ndarray:
  """The S x S crop from a column-major bitmap.

  Args:
    columns: [n_cols, n_rows] {0, 1} (x first).
    ix, iy: [size * gx], [size * gy] sample column / row indices into it.

  Returns:
    [S, S] uint8 (y first), 1 where at least half of the cell's gy x gx samples are set. The
    column samples are summed per cell before the rows are gathered (separable counts).
  """
  counts = columns[ix].astype(np.uint16)  # [S * gx, n_rows]
  if gx > 1:
    counts = counts.reshape(size, gx, -1).sum(axis=1, dtype=np.uint16)
  counts = counts[:, iy]  # [S, S * gy]
  if gy > 1:
    counts = counts.reshape(size, size, gy).sum(axis=2, dtype=np.uint16)
  return np.ascontiguousarray((2 * counts >= gx * gy).T, np.uint8)


def crop_from_bitmap(mask: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
  """Crops a bitmap to a box and resamples it to size x size.

  Cell (i, j) of the output covers [x1 + j bw / S, x1 + (j + 1) bw / S) x (same for y) of the box,
  bw = x2 - x1. It is 1 iff at least half of its G_y x G_x sample points, spread evenly over the
  cell at (k + 0.5) / G, fall on mask pixels; pixel c covers [c, c + 1) (sample x -> column
  floor(x), clamped to the image). G = ceil(box side / S) per axis (at least 1), so a box of at most
  S pixels is sampled once per cell at its centre (the nearest pixel; exact up to the pixel grid)
  and a larger one is area-averaged.

  Args:
    mask: [H, W] bool (or 0/1) bitmap, original-image pixels.
    box: (x1, y1, x2, y2) float, same pixels.
    size: S.

  Returns:
    [S, S] uint8 in {0, 1}. A box of zero width or height samples one column / row.
  """
  mask = np.asarray(mask).astype(bool)
  x1, y1, x2, y2 = (float(v) for v in box)
  ix, gx = _sample_indices(x1, x2, size, mask.shape[1])
  iy, gy = _sample_indices(y1, y2, size, mask.shape[0])
  return _crop(mask.T, ix, iy, size, gx, gy)


def crop_segmentation(segm: Any, box: Sequence[float], image_hw: Sequence[int],
                      size: int) -> np.ndarray:
  """`crop_from_bitmap` of a json segmentation's full-image bitmap, without building the bitmap.

  Args:
    segm: a json segmentation (polygon list, uncompressed or compressed RLE dict) of an image of
      `image_hw`, or None for a box-only annotation, whose bitmap is the filled box: the pixels
      whose centre lies inside `box`.
    box: (x1, y1, x2, y2) float, the (clipped) gt box in original-image pixels.
    image_hw: (H, W) of the original image.
    size: S.

  Returns:
    [S, S] uint8 in {0, 1}, equal to `crop_from_bitmap(full_bitmap, box, size)`.
  """
  h, w = int(image_hw[0]), int(image_hw[1])
  x1, y1, x2, y2 = (float(v) for v in box)
  ix, gx = _sample_indices(x1, x2, size, w)
  iy, gy = _sample_indices(y1, y2, size, h)
  r0, r1 = int(iy[0]), int(iy[-1]) + 1  # sample indices are sorted
  c0, c1 = int(ix[0]), int(ix[-1]) + 1
  if segm is None:
    ys = np.arange(r0, r1) + 0.5
    xs = np.arange(c0, c1) + 0.5
    columns = ((xs >= x1) & (xs < x2))[:, None] & ((ys >= y1) & (ys < y2))[None, :]
  else:
    rle = to_rle(segm, h, w)
    columns = _columns_from_counts(rle_counts(rle["counts"]), h, (r0, r1), (c0, c1))
  return _crop(columns, ix - c0, iy - r0, size, gx, gy)
