"""Host side of the device mask paste (ops/paste_device.py): tile plan and unpacking, numpy only.

Importable without JAX (the evaluation's worker processes unpack and RLE-encode with it). A
detection's paste window (the pixels the host paste evaluates, ops/paste.py) is covered by
`TILE` x `TILE` tiles; the device computes each tile's binary mask and sends it back 8 pixels per
byte; `unpack_window` reassembles the window.
"""
from __future__ import annotations

import dataclasses
from typing import List, Sequence, Tuple

import numpy as np

TILE = 32  # pixels per tile side; a multiple of 8 (packed rows)
MIN_CHUNK = 64  # smallest number of tiles per device call (then 128, 256, ... up to chunk_tiles)
TV_LIMIT = 1 << 30  # torchvision integer boxes must stay within +-2^30 (int32 arithmetic)

# Columns of the tile table.
DET, TY, TX, EY, EX, BX0, BY0, BX1, BY1 = range(9)
COLUMNS = 9


@dataclasses.dataclass
class TilePlan:
  """Where each detection's window lies and which tiles cover it.

  windows: [N, 4] int64 (y0, x0, h, w) window of each detection in its image (h or w 0: nothing
    pasted, the box lies outside the image).
  grid: [N, 2] int64 (tiles down, tiles across) per detection.
  first: [N + 1] int64 offsets of each detection's tiles in `table`.
  table: [T, 9] int32 tile rows (`paste_tiles`).
  """
  windows: np.ndarray
  grid: np.ndarray
  first: np.ndarray
  table: np.ndarray


def window_bounds(boxes: np.ndarray, image_hw: np.ndarray, method: str, mask_size: int
                  ) -> Tuple[np.ndarray, np.ndarray]:
  """Each detection's paste window, vectorized: exactly the windows of ops/paste.py.

  Args:
    boxes: [N, 4] float32 xyxy paste boxes in original-image pixels.
    image_hw: [N, 2] int (H, W) of each detection's image.
    method: 'grid_sample' (`paste.grid_sample_window_bounds`) or 'tv_legacy' (the in-image part of
      `paste.tv_legacy_expanded_box`, rows / columns [max(b, 0), min(b_end + 1, size))).
    mask_size: M (tv_legacy's expansion is (M + 2) / M).

  Returns:
    (windows [N, 4] int64 (y0, x0, h, w), tv_boxes [N, 4] int64 expanded integer boxes (zeros for
    grid_sample)).

  Raises:
    ValueError: a non-finite torchvision box (as `paste.tv_legacy_expanded_box`).
  """
  b = np.asarray(boxes, np.float32).reshape(-1, 4)
  hw = np.asarray(image_hw, np.int64).reshape(-1, 2)
  h_img, w_img = hw[:, 0], hw[:, 1]
  n = len(b)
  tv = np.zeros((n, 4), np.int64)
  if method == "grid_sample":
    finite = np.all(np.isfinite(b), axis=1)
    b64 = np.where(finite[:, None], b.astype(np.float64), 0.0)
    x0 = np.clip(np.floor(b64[:, 0]) - 1, 0, w_img).astype(np.int64)
    y0 = np.clip(np.floor(b64[:, 1]) - 1, 0, h_img).astype(np.int64)
    x1 = np.clip(np.ceil(b64[:, 2]) + 1, 0, w_img).astype(np.int64)
    y1 = np.clip(np.ceil(b64[:, 3]) + 1, 0, h_img).astype(np.int64)
    x1 = np.where(finite, x1, x0)
    y1 = np.where(finite, y1, y0)
  elif method == "tv_legacy":
    scale = np.float32(float(mask_size + 2) / mask_size)
    half = np.float32(0.5)
    with np.errstate(invalid="ignore", over="ignore"):
      # The float32 expressions of `paste.tv_legacy_expanded_box`, elementwise.
      w_half = (b[:, 2] - b[:, 0]) * half * scale
      h_half = (b[:, 3] - b[:, 1]) * half * scale
      x_c = (b[:, 2] + b[:, 0]) * half
      y_c = (b[:, 3] + b[:, 1]) * half
      exp = np.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], 1).astype(np.float32)
    bad = ~np.all(np.isfinite(exp), axis=1)
    if bad.any():
      raise ValueError(f"non-finite box {b[np.flatnonzero(bad)[0]]}")
    tv = np.trunc(exp.astype(np.float64)).astype(np.int64)
    x0, y0 = np.maximum(tv[:, 0], 0), np.maximum(tv[:, 1], 0)
    x1, y1 = np.minimum(tv[:, 2] + 1, w_img), np.minimum(tv[:, 3] + 1, h_img)
  else:
    raise ValueError(f"unknown paste method {method!r}; expected 'grid_sample' or 'tv_legacy'")
  h = np.maximum(y1 - y0, 0)
  w = np.maximum(x1 - x0, 0)
  empty = (h == 0) | (w == 0)
  windows = np.stack([np.where(empty, 0, y0), np.where(empty, 0, x0),
                      np.where(empty, 0, h), np.where(empty, 0, w)], 1).astype(np.int64)
  return windows, tv


def plan_tiles(det_index: np.ndarray, boxes: np.ndarray, image_hw: np.ndarray, *, method: str,
               mask_size: int, tile: int = TILE) -> TilePlan:
  """The tiles covering each detection's paste window.

  Args:
    det_index: [N] int index of each detection in the flattened leading axes of the device arrays
      `paste_tiles` reads.
    boxes: [N, 4] float32 the same paste boxes, on the host.
    image_hw: [N, 2] (or [2], shared) int (H, W) of each detection's image.
    method, mask_size: see `window_bounds`.
    tile: tile side.

  Returns:
    `TilePlan`, tiles ordered by detection, row-major inside a detection.
  """
  det_index = np.asarray(det_index, np.int64).reshape(-1)
  n = len(det_index)
  hw = np.broadcast_to(np.asarray(image_hw, np.int64).reshape(-1, 2), (n, 2))
  windows, tv = window_bounds(boxes, hw, method, mask_size)
  if np.any(np.abs(tv) >= TV_LIMIT):
    # The host paste would interpolate the whole expanded box (gigapixels) as well.
    raise ValueError(f"torchvision paste box beyond 2^30 pixels: {tv[np.abs(tv).max(1).argmax()]}")
  grid = -(-windows[:, 2:] // tile)  # ceil
  counts = grid[:, 0] * grid[:, 1]
  first = np.zeros(n + 1, np.int64)
  np.cumsum(counts, out=first[1:])
  total = int(first[-1])
  table = np.zeros((total, COLUMNS), np.int32)
  if total:
    owner = np.repeat(np.arange(n), counts)
    k = np.arange(total) - first[owner]  # tile number inside its detection
    tw = grid[owner, 1]
    table[:, DET] = det_index[owner]
    table[:, TY] = windows[owner, 0] + (k // tw) * tile
    table[:, TX] = windows[owner, 1] + (k % tw) * tile
    table[:, EY] = windows[owner, 0] + windows[owner, 2]
    table[:, EX] = windows[owner, 1] + windows[owner, 3]
    table[:, BX0:BY1 + 1] = tv[owner]
  return TilePlan(windows, grid, first, table)


def chunk_sizes(num_tiles: int, chunk_tiles: int) -> List[int]:
  """Static chunk sizes (powers of two, MIN_CHUNK..chunk_tiles) covering num_tiles tiles."""
  chunk_tiles = max(int(chunk_tiles), 1)
  out = []
  left = int(num_tiles)
  while left > 0:
    size = min(chunk_tiles, max(MIN_CHUNK, 1 << (left - 1).bit_length()))
    out.append(size)
    left -= size
  return out


def unpack_window(packed: np.ndarray, grid: Sequence[int], hw: Sequence[int]) -> np.ndarray:
  """One detection's [h, w] bool window from its [th * tw, tile, tile // 8] packed tiles."""
  th, tw = int(grid[0]), int(grid[1])
  h, w = int(hw[0]), int(hw[1])
  if h == 0 or w == 0:
    return np.zeros((h, w), bool)
  tile, row_bytes = packed.shape[1], packed.shape[2]
  rows = packed.reshape(th, tw, tile, row_bytes).transpose(0, 2, 1, 3).reshape(th * tile, -1)
  return np.unpackbits(rows[:h], axis=1, count=w).view(bool)


def unpack_windows(plan: TilePlan, packed: np.ndarray) -> List[np.ndarray]:
  """Every detection's [h, w] bool window from the [T, tile, tile // 8] packed tiles of `plan`."""
  return [unpack_window(packed[plan.first[i]:plan.first[i + 1]], plan.grid[i],
                        plan.windows[i, 2:]) for i in range(len(plan.windows))]


def tiles_bytes(plan: TilePlan, tile: int = TILE) -> int:
  """Bytes the device sends back for `plan` (before chunk padding)."""
  return int(len(plan.table)) * tile * tile // 8
