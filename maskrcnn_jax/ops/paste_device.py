"""Mask paste on the accelerator, bit-identical to the host paste (ops/paste.py, parity_spec 3.13).

detectron2 pastes on the GPU (`layers/mask_ops.py:paste_masks_in_image`, `_do_paste_mask` over
chunks of detections into the full image grid). Here the work is cut into fixed-size tiles instead, so that
every shape is static, device memory is bounded and only the pixels near a box are computed and
moved:

* Host plan (`plan_tiles`, numpy, O(detections)): each detection's paste window (exactly the window
  the host paste evaluates: `paste.grid_sample_window_bounds`, or the in-image part of torchvision's
  expanded integer box) is covered by `tile` x `tile` tiles; one int32 row per tile (which
  detection, the tile's top-left pixel, the window's end, torchvision's integer box).
* Device (`paste_tiles`, jitted): the soft value of every tile pixel with the convention's float32
  arithmetic, the threshold (>= or >), pixels outside the window cleared, 8 pixels per byte
  (`jnp.packbits`). A chunk of `chunk_tiles` tiles per call bounds device memory; chunk sizes are
  powers of two, so a run compiles a handful of shapes.
* Host (`unpack_windows`): each detection's tiles back to its [h, w] window; `evaluation.host`
  RLE-encodes straight from the window. A detection moves ceil(h/32) * ceil(w/32) * 128 bytes.

Bitwise equality with the host paste (tested on random and edge cases). The references' CPU kernels
round some expressions once (gcc contracts them to FMAs, see `resample.fma_f32`) and the others
operation by operation. XLA contracts `a * b + c` on its own (observed on CPU), and may or may not
for a given backend and fusion, so nothing here relies on it: every FMA of the references is
computed exactly in float64 (the float32 product is exact there; TwoSum plus rounding to odd makes
the one rounding to float32 correct, as `resample.fma_f32` does), and every division is done in
float64 and rounded once to float32 (equal to the float32 division: 53 >= 2 * 24 + 2). The kernel is
therefore traced with 64-bit types enabled (`jax.enable_x64()` around the call, thread-local; inputs
and outputs stay 32-bit). Deliberate difference: XLA on CPU flushes float32 denormals to zero; the
soft values can then differ below 1e-38, which never changes a >= 0.5 / > 0.5 decision.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.ops.paste_plan import (BX0, BX1, BY0, BY1, COLUMNS, DET, EX, EY, TILE, TX, TY,
                                         TilePlan, chunk_sizes, plan_tiles, unpack_windows)


# ------------------------------------------------------------------------------------------------
# Exact float32 arithmetic under XLA
# ------------------------------------------------------------------------------------------------


def fma_f32(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
  """Correctly rounded float32 a * b + c (the references' contracted FMA), whatever XLA contracts.

  Needs 64-bit types at trace time. The float32 product is exact in float64; the float64 sum is
  corrected to round-to-odd with Knuth's TwoSum residual, after which the conversion to float32
  rounds correctly (the jnp twin of `resample.fma_f32`). Every float64 product here is exact, so
  an FMA contraction by the compiler cannot change a value.

  Args:
    a, b, c: float32 arrays (broadcastable).

  Returns:
    float32, the broadcast shape.
  """
  a64, b64, c64 = (jnp.asarray(v, jnp.float32).astype(jnp.float64) for v in (a, b, c))
  p = a64 * b64
  s = p + c64
  pv = s - c64
  t = (c64 - (s - pv)) + (p - pv)  # s + t == p + c exactly
  even = (jax.lax.bitcast_convert_type(s, jnp.uint64) & jnp.uint64(1)) == 0
  fix = jnp.isfinite(s) & (t != 0) & even
  toward = jnp.where(t > 0, jnp.float64(np.inf), jnp.float64(-np.inf))
  s = jnp.where(fix, jax.lax.nextafter(s, toward), s)
  return s.astype(jnp.float32)


def _div_f32(a: jax.Array, b: jax.Array) -> jax.Array:
  """float32 a / b, correctly rounded (division in float64, one rounding: equal to IEEE float32)."""
  return (a.astype(jnp.float64) / b.astype(jnp.float64)).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Device kernel
# ------------------------------------------------------------------------------------------------


def _grid_sample_tiles(padded: jax.Array, boxes: jax.Array, table: jax.Array, mask_hw, tile: int,
                       inf_to_zero: bool) -> jax.Array:
  """Soft grid_sample values of each tile, [T, tile, tile] float32 (ops/paste.py twin)."""
  mh, mw = mask_hw
  f32 = jnp.float32
  det = table[:, DET]
  offs = jnp.arange(tile, dtype=jnp.int32)
  rows = table[:, TY, None] + offs  # [T, tile] image rows
  cols = table[:, TX, None] + offs
  box = boxes[det]  # [T, 4] float32
  one = f32(1)

  def grid(pix, lo, hi):
    # _do_paste_mask: (arange + 0.5 - x0) / (x1 - x0) * 2 - 1, float32 op by op. The product by 2
    # is exact, so a contraction of `* 2 - 1` cannot change it.
    g = _div_f32(pix.astype(f32) + f32(0.5) - lo[:, None], (hi - lo)[:, None]) * f32(2) - one
    if inf_to_zero:
      g = jnp.where(jnp.isinf(g), f32(0), g)
    return g

  gx = grid(cols, box[:, 0], box[:, 2])
  gy = grid(rows, box[:, 1], box[:, 3])
  # GridSamplerKernel.cpp unnormalize (align_corners=False): (g + 1) * (size / 2) - 0.5, one FMA.
  ix = fma_f32(gx + one, f32(mw / 2), f32(-0.5))
  iy = fma_f32(gy + one, f32(mh / 2), f32(-0.5))
  x_w = jnp.floor(ix)
  y_n = jnp.floor(iy)
  w = ix - x_w
  e = one - w
  n = iy - y_n
  s = one - n
  nw = s[:, :, None] * e[:, None, :]
  ne = s[:, :, None] * w[:, None, :]
  sw = n[:, :, None] * e[:, None, :]
  se = n[:, :, None] * w[:, None, :]

  # Zero padding: a corner outside [0, M-1] (or NaN) reads the zero border of the padded mask.
  def index(v, size):
    ok = (v > -1) & (v < size)
    return jnp.where(ok, v + one, f32(0)).astype(jnp.int32)

  stride = mw + 2
  base = det[:, None, None] * ((mh + 2) * stride)
  xw_i, xe_i = index(x_w, mw), index(x_w + one, mw)
  yn_i, ys_i = index(y_n, mh), index(y_n + one, mh)
  flat = padded.reshape(-1)

  def val(yi, xi):
    return jnp.take(flat, base + yi[:, :, None] * stride + xi[:, None, :])

  # nw_val*nw + ne_val*ne + sw_val*sw + se_val*se, contracted left to right.
  acc = val(yn_i, xw_i) * nw
  acc = fma_f32(val(yn_i, xe_i), ne, acc)
  acc = fma_f32(val(ys_i, xw_i), sw, acc)
  return fma_f32(val(ys_i, xe_i), se, acc)


def _tv_source(dst: jax.Array, in_size: int, out_size: jax.Array):
  """`resample.linear_source_indices(in_size, out_size)` at output positions dst (int32 [T, k],
  out_size int32 [T, 1]): (i0, i1, lambda0, lambda1)."""
  f32, f64 = jnp.float32, jnp.float64
  ratio = _div_f32(jnp.full(out_size.shape, in_size, f32), out_size.astype(f32))
  # ratio * (dst + 0.5) - 0.5: exact in float64 (24-bit ratio times 25-bit number), one rounding.
  src = (ratio.astype(f64) * (dst.astype(f64) + 0.5) - 0.5).astype(f32)
  src = jnp.maximum(src, f32(0))
  i0 = jnp.minimum(jnp.floor(src), f32(in_size - 1)).astype(jnp.int32)
  l1 = jnp.clip(src - i0.astype(f32), f32(0), f32(1))
  i1 = i0 + (i0 < in_size - 1).astype(jnp.int32)
  l0 = f32(1) - l1
  same = out_size == in_size  # torch's identity shortcut
  i0 = jnp.where(same, dst, i0)
  i1 = jnp.where(same, dst, i1)
  l0 = jnp.where(same, f32(1), l0)
  l1 = jnp.where(same, f32(0), l1)
  return i0, i1, l0, l1


def _tv_legacy_tiles(padded: jax.Array, table: jax.Array, mask_hw, tile: int) -> jax.Array:
  """Soft torchvision legacy paste values of each tile, [T, tile, tile] float32 (ops/paste.py
  `paste_mask_tv_legacy` and `resample.bilinear_from_indices` twins)."""
  mh, mw = mask_hw
  in_h, in_w = mh + 2, mw + 2
  det = table[:, DET]
  offs = jnp.arange(tile, dtype=jnp.int32)
  bx0, by0 = table[:, BX0, None], table[:, BY0, None]
  out_w = jnp.maximum(table[:, BX1, None] - bx0 + 1, 1)
  out_h = jnp.maximum(table[:, BY1, None] - by0 + 1, 1)
  # Output positions of the tile in the resized (out_h, out_w) box image; positions outside it
  # (padding, pixels past the window) are clamped and cleared later.
  dst_y = jnp.clip(table[:, TY, None] + offs - by0, 0, out_h - 1)
  dst_x = jnp.clip(table[:, TX, None] + offs - bx0, 0, out_w - 1)
  h0, h1, lh0, lh1 = _tv_source(dst_y, in_h, out_h)
  w0, w1, lw0, lw1 = _tv_source(dst_x, in_w, out_w)
  flat = padded.reshape(-1)
  base = det[:, None, None] * (in_h * in_w)

  def val(hi, wi):
    return jnp.take(flat, base + hi[:, :, None] * in_w + wi[:, None, :])

  x00, x01, x10, x11 = val(h0, w0), val(h0, w1), val(h1, w0), val(h1, w1)
  # channels_last kernel (out_h + out_w <= 128): w_ab = lambda_h * lambda_w, then
  # fma(x11, w11, fma(x10, w10, fma(x00, w00, x01 * w01))).
  acc = x01 * (lh0[:, :, None] * lw1[:, None, :])
  acc = fma_f32(x00, lh0[:, :, None] * lw0[:, None, :], acc)
  acc = fma_f32(x10, lh1[:, :, None] * lw0[:, None, :], acc)
  last = fma_f32(x11, lh1[:, :, None] * lw1[:, None, :], acc)
  # generic kernel: per row fma(x_h0, lw0, x_h1 * lw1), then fma(t0, lh0, t1 * lh1).
  t0 = fma_f32(x00, lw0[:, None, :], x01 * lw1[:, None, :])
  t1 = fma_f32(x10, lw0[:, None, :], x11 * lw1[:, None, :])
  generic = fma_f32(t0, lh0[:, :, None], t1 * lh1[:, :, None])
  channels_last = (out_h + out_w <= 128)[:, :, None]  # resample.torch_bilinear_kernel, C = 1
  return jnp.where(channels_last, last, generic)


def paste_tiles(probs: jax.Array, boxes: jax.Array, table: jax.Array, *, method: str,
                threshold: float = 0.5, inclusive: bool = True, inf_to_zero: bool = True,
                tile: int = TILE) -> jax.Array:
  """Binary pasted masks of a chunk of tiles, 8 pixels per byte. Trace with `jax.enable_x64()`.

  Args:
    probs: [..., M, M] float32 mask probabilities (e.g. the model's [B, D, M, M]); the table's
      detection index addresses the flattened leading axes.
    boxes: [..., 4] float32 xyxy paste boxes in original-image pixels, same leading axes
      (grid_sample only; torchvision's integer boxes are in the table).
    table: [T, 9] int32 tile rows from `plan_tiles`: detection, tile top / left pixel, window end
      row / column (exclusive), torchvision's expanded integer box (x0, y0, x1, y1).
    method: 'grid_sample' (mmdet / detectron2) or 'tv_legacy' (torchvision).
    threshold, inclusive: soft >= threshold (inclusive) or soft > threshold.
    inf_to_zero: grid_sample only, see `paste.paste_mask_grid_sample_soft` (mmdet True).
    tile: tile side in pixels (multiple of 8).

  Returns:
    [T, tile, tile // 8] uint8: `np.packbits` (big-endian bit order) of each tile's rows; pixels
    outside the detection's window are 0.
  """
  soft, inside = soft_tiles(probs, boxes, table, method=method, inf_to_zero=inf_to_zero, tile=tile)
  thr = jnp.float32(threshold)
  binary = (soft >= thr) if inclusive else (soft > thr)
  return jnp.packbits(binary & inside, axis=-1)


def soft_tiles(probs: jax.Array, boxes: jax.Array, table: jax.Array, *, method: str,
               inf_to_zero: bool = True, tile: int = TILE) -> Tuple[jax.Array, jax.Array]:
  """The soft values before the threshold: ([T, tile, tile] float32, [T, tile, tile] bool inside
  the detection's window). Arguments as `paste_tiles`; trace with `jax.enable_x64()`."""
  mh, mw = probs.shape[-2:]
  probs = probs.reshape(-1, mh, mw).astype(jnp.float32)
  padded = jnp.pad(probs, ((0, 0), (1, 1), (1, 1)))  # the zero border both algorithms read
  if method == "grid_sample":
    soft = _grid_sample_tiles(padded, boxes.reshape(-1, 4).astype(jnp.float32), table, (mh, mw),
                              tile, inf_to_zero)
  elif method == "tv_legacy":
    soft = _tv_legacy_tiles(padded, table, (mh, mw), tile)
  else:
    raise ValueError(f"unknown paste method {method!r}; expected 'grid_sample' or 'tv_legacy'")
  offs = jnp.arange(tile, dtype=jnp.int32)
  inside = (((table[:, TY, None] + offs) < table[:, EY, None])[:, :, None]
            & ((table[:, TX, None] + offs) < table[:, EX, None])[:, None, :])
  return soft, inside


@functools.lru_cache(maxsize=64)
def _jitted(method: str, threshold: float, inclusive: bool, inf_to_zero: bool, tile: int):
  return jax.jit(functools.partial(paste_tiles, method=method, threshold=threshold,
                                   inclusive=inclusive, inf_to_zero=inf_to_zero, tile=tile))


# ------------------------------------------------------------------------------------------------
# Dispatch and collection (the plan and the unpacking are ops/paste_plan.py)
# ------------------------------------------------------------------------------------------------


def dispatch(plan: TilePlan, probs: jax.Array, boxes: jax.Array, *, method: str,
             threshold: float = 0.5, inclusive: bool = True, inf_to_zero: bool = True,
             tile: int = TILE, chunk_tiles: int = 4096, device: Optional[jax.Device] = None
             ) -> List[jax.Array]:
  """Starts the paste of `plan`'s tiles (asynchronous): one packed device array per chunk.

  probs / boxes: the device arrays `plan_tiles`' det_index addresses (e.g. one device's shard of
  the model outputs); `device`: where the table goes (default: probs' device).
  """
  fn = _jitted(method, float(threshold), bool(inclusive), bool(inf_to_zero), int(tile))
  if device is None:
    device = next(iter(probs.devices())) if isinstance(probs, jax.Array) else jax.devices()[0]
  out, start = [], 0
  with jax.enable_x64(True):
    for size in chunk_sizes(len(plan.table), chunk_tiles):
      part = np.zeros((size, COLUMNS), np.int32)
      rows = plan.table[start:start + size]
      part[:len(rows)] = rows  # padding rows: window end 0, nothing inside
      out.append(fn(probs, boxes, jax.device_put(part, device)))
      start += size
  return out


def gather_packed(plan: TilePlan, chunks: Sequence[jax.Array]) -> np.ndarray:
  """The chunks on the host as one [T, tile, tile // 8] uint8 array (blocks until they are done)."""
  if not chunks:
    return np.zeros((0, TILE, TILE // 8), np.uint8)
  return np.concatenate([np.asarray(c) for c in chunks])[:len(plan.table)]


# ------------------------------------------------------------------------------------------------
# Convenience: one image
# ------------------------------------------------------------------------------------------------


def paste_windows(masks: np.ndarray, boxes: np.ndarray, image_hw: Sequence[int], *,
                  method: str = "grid_sample", threshold: float = 0.5, inclusive: bool = True,
                  inf_to_zero: bool = True, chunk_tiles: int = 4096,
                  device: Optional[jax.Device] = None) -> List[Tuple[int, int, np.ndarray]]:
  """(y0, x0, window [h, w] bool) per detection of one image, pasted on `device`.

  The same windows and values as the host's `paste.paste_mask_grid_sample` /
  `paste.paste_mask_tv_legacy` + threshold.

  Args:
    masks: [N, M, M] float32 probabilities.
    boxes: [N, 4] float32 xyxy in original-image pixels.
    image_hw: (H, W).
    method, threshold, inclusive, inf_to_zero: as `paste.paste_masks`.
    chunk_tiles: tiles per device call (memory bound: chunk_tiles * 1024 pixels).
    device: default the first device.
  """
  masks = np.asarray(masks, np.float32)
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  n = len(boxes)
  if n == 0:
    return []
  device = device or jax.devices()[0]
  plan = plan_tiles(np.arange(n), boxes, np.asarray(image_hw), method=method,
                    mask_size=masks.shape[-1])
  chunks = dispatch(plan, jax.device_put(masks, device), jax.device_put(boxes, device),
                    method=method, threshold=threshold, inclusive=inclusive,
                    inf_to_zero=inf_to_zero, chunk_tiles=chunk_tiles, device=device)
  windows = unpack_windows(plan, gather_packed(plan, chunks))
  return [(int(plan.windows[i, 0]), int(plan.windows[i, 1]), windows[i]) for i in range(n)]


def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_hw: Sequence[int], **kwargs
                ) -> np.ndarray:
  """Full-image [N, H, W] bool masks pasted on the device (`paste.paste_masks` twin; tests)."""
  h, w = int(image_hw[0]), int(image_hw[1])
  windows = paste_windows(masks, boxes, (h, w), **kwargs)
  out = np.zeros((len(windows), h, w), bool)
  for i, (y0, x0, win) in enumerate(windows):
    out[i, y0:y0 + win.shape[0], x0:x0 + win.shape[1]] = win
  return out
