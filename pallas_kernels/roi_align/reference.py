"""Pure-JAX RoIAlign with the exact torchvision / mmcv semantics (parity_spec 3.11).

This is the reference implementation that a Pallas kernel must reproduce. It imports only JAX (the
`pallas_kernels` package never imports `maskrcnn_jax`).

Algorithm (per RoI, per output bin (ph, pw), per sample (iy, ix); `vision:torchvision/csrc/ops/cpu/
roi_align_kernel.cpp` + `roi_align_common.h`, identical to `mmcv:ops/csrc/common/cuda/
roi_align_cuda_kernel.cuh`):

  1. offset = 0.5 if aligned else 0; start = x1 * scale - offset; end = x2 * scale - offset;
     roi = end - start (same for y).
  2. Not aligned: roi = max(roi, 1) ("force malformed RoIs to be 1x1").
  3. bin = roi / pooled.
  4. grid = sampling_ratio if > 0 else ceil(bin) (may be <= 0 for inverted boxes: no samples).
  5. y = (start + ph * bin) + ((iy + 0.5) * bin) / grid, evaluated in this order in float32.
  6. Bilinear sample: zero if not (-1 <= y <= H and -1 <= x <= W) (NaN -> zero); y <= 0 -> 0;
     y_lo = int(y); if y_lo >= H - 1: y_lo = y_hi = H - 1, y = y_lo; else y_hi = y_lo + 1;
     weights hy*hx, hy*lx, ly*hx, ly*lx with ly = y - y_lo, hy = 1 - ly.
  7. out = sum / max(grid_h * grid_w, 1).

Formulation. The bilinear weight of a sample factorizes into a y part and an x part, so for every
RoI each axis is described by a tap list: per output row ph, `2 * G` row indices (y_lo, y_hi of each
of the G samples) and their weights (hy, ly; 0 for an invalid or masked sample). The output is

  out[ph, pw, c] = sum_{i, j} wy[ph, i] * wx[pw, j] * F[b, ry[ph, i], rx[pw, j], c] / count,

i.e. exactly the 4 taps of each of the G*G samples of the bin, gathered from the feature map (never
a per-RoI copy of the map): (2G)^2 pixel rows of C channels per bin. RoIs are processed in chunks
of `roi_chunk` with `lax.map`, which bounds memory; the gradient w.r.t. the features is JAX's
transpose of the gather (a scatter-add).

Window path (sampling_ratio = 0). With the adaptive grid, grid = ceil(bin) >= bin, so the samples
of a bin are at most one pixel apart and all their taps fall within G + 1 consecutive rows. Summing
the tap weights per row there (`_window`) gathers (G+1)^2 pixels per bin instead of (2G)^2 (81 vs
256 for G = 8), with the same products. A chunk holding a RoI for which this does not hold (a
capped grid, see below, or a rounding overflow) takes the tap-list path instead (`lax.cond`).

Float32 agreement. The arithmetic follows the reference's float32 evaluation order, with two
caveats. (1) XLA rewrites a division by a broadcast operand into a multiplication by the reciprocal
(49 / 7 -> 7.0000005, which would change ceil() and so the adaptive grid); `_true_div` prevents it.
(2) XLA contracts a * b + c into an FMA inside fusions (on CPU as well; there is no flag to turn it
off, and an optimization barrier does not survive to fusion), so a sample coordinate such as
start + ph * bin can differ by one ulp from the reference's separately rounded product. Outputs then
differ by up to ~1e-5, the same size as torchvision float32 vs float64 (golden README 1); jitted and
eager results differ from each other at that level too. The summation order differs as well
(~1e-7 relative).

Adaptive grid (sampling_ratio = 0). Shapes must be static, so samples are taken `max_grid` (G)
per bin and axis at a time. A RoI whose grid ceil(bin) exceeds G is computed in passes: pass
(py, px) takes the samples iy in [py G, (py + 1) G) and ix in [px G, (px + 1) G), masked past the
RoI's grid, and the passes' sums add up to the reference's sum over all grid_h x grid_w samples
(only the float32 summation order differs). The number of passes is static: enough for the
largest grid any RoI inside the feature map can have (ceil((extent + 1) / pooled) per axis), so
every RoI that lies within its map (proposals and detections are clipped to the image) is
computed exactly whatever its shape. A RoI reaching further than that (only possible for boxes
outside the map) is sampled with the bound's number of evenly spaced points per bin, (iy + 0.5) *
bin / grid_eff, a midpoint-rule estimate of the same bin average. Chunks whose RoIs all fit in G
take one pass (the window path below); only chunks holding a larger RoI loop over passes.
`max_grid` is required for sampling_ratio = 0 (a silent default would hide a change of cost); it
is ignored for sampling_ratio > 0.

Multi-level pooling (`roi_align_pyramid`). All pyramid levels are flattened into one [N * T, C]
table (T = sum_l H_l * W_l) and every RoI gathers its taps from its own level, with a per-RoI
scale, height, width and table offset. Each RoI is pooled once, so the cost equals one single-level
RoIAlign over all RoIs (plus one copy of the pyramid for the concatenation), instead of pooling
every RoI at every level and selecting (4x the gathers).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

# Elements (taps * channels) of one chunk's gathered tensor: the forward materializes the gathered
# taps (XLA does not fuse the gather into the weighted sum) and the backward their cotangent, so
# this (64 MiB in float32) bounds the working set of either direction.
_CHUNK_BUDGET_ELEMENTS = 1 << 24


def _true_div(a, b):
  """a / b as an IEEE division, broadcast to a common shape.

  XLA's algebraic simplifier rewrites a division by a broadcast operand (a scalar constant, or an
  array broadcast along new axes) into a multiplication by its reciprocal, which is not exact:
  49 / 7 gives 7.0000005 and ceil() then picks an adaptive grid of 8 instead of torchvision's 7.
  Materializing the divisor behind an optimization barrier keeps the division a division (checked
  by the golden case B 'beyond_all_sides', whose roi_w / 7 is exactly 7).
  """
  a, b = jnp.broadcast_arrays(a, b)
  return a / jax.lax.optimization_barrier(b)


def _axis_samples(lo, hi, scale, size, *, pooled, sampling_ratio, aligned, max_grid,
                  grid_bound=None, first=0):
  """Bilinear taps of the samples along one axis (parity_spec 3.11 steps 1-6, one coordinate).

  Args:
    lo, hi: [K] float32, RoI start / end coordinate (x1, x2 or y1, y2) in image pixels.
    scale: [K] or scalar float32 spatial scale (1 / stride).
    size: [K] or scalar int32, feature-map extent along this axis (padded H or W).
    pooled: static int, output bins along this axis.
    sampling_ratio: static int; > 0 fixed grid, 0 adaptive.
    aligned: static bool, subtract the half-pixel offset.
    max_grid: static int G, samples per bin taken at a time for sampling_ratio = 0.
    grid_bound: static int >= max_grid, the largest adaptive grid sampled exactly (module
      docstring); None = max_grid (one pass; the Pallas kernels' semantics).
    first: int32 scalar (may be traced), index of the first sample of this pass (a multiple of G).

  Returns:
    i_lo, i_hi: [K, pooled, G] int32 lower / upper tap index, in [0, size - 1] (0 when masked).
    w_lo, w_hi: [K, pooled, G] float32 weights hy / ly (0 for invalid or masked samples).
    grid: [K] int32, samples per bin used (grid_eff = min(grid, grid_bound) when adaptive).
    capped: [K] bool, the RoI's samples do not fit in one pass of G (always False for
      sampling_ratio > 0).
  """
  f32 = jnp.float32
  offset = f32(0.5) if aligned else f32(0.0)
  # roi_align_kernel.cpp: roi_start_w = offset_rois[1] * spatial_scale - offset.
  start = lo * scale - offset
  end = hi * scale - offset
  roi = end - start
  if not aligned:
    roi = jnp.maximum(roi, f32(1.0))  # "Force malformed ROIs to be 1x1"
  bin_size = _true_div(roi, f32(pooled))
  if sampling_ratio > 0:
    g_static = sampling_ratio
    grid = jnp.full(lo.shape, sampling_ratio, jnp.int32)
    capped = jnp.zeros(lo.shape, bool)
  else:
    g_static = max_grid
    bound = max_grid if grid_bound is None else grid_bound
    # roi_bin_grid_h = ceil(roi_height / pooled_height): <= 0 for inverted boxes, i.e. no samples
    # (NaN boxes get none either). Bounded by grid_bound (module docstring).
    grid_f = jnp.ceil(bin_size)  # the same float division as bin_size
    capped = grid_f > f32(max_grid)
    grid_f = jnp.where(grid_f >= 1, jnp.minimum(grid_f, f32(bound)), f32(0))
    grid = grid_f.astype(jnp.int32)
  grid_den = jnp.maximum(grid, 1).astype(f32)

  ph = jnp.arange(pooled, dtype=f32)
  g = jnp.asarray(first, jnp.int32) + jnp.arange(g_static, dtype=jnp.int32)
  # y = roi_start_h + ph * bin_size_h + static_cast<T>(iy + .5f) * bin_size_h / grid (C++ order).
  base = start[:, None] + ph[None, :] * bin_size[:, None]                       # [K, P]
  step = _true_div((g.astype(f32) + f32(0.5))[None, :] * bin_size[:, None],
                   grid_den[:, None])                                           # [K, G]
  y = base[:, :, None] + step[:, None, :]                                       # [K, P, G]

  size_b = jnp.broadcast_to(jnp.asarray(size, jnp.int32), lo.shape)[:, None, None]
  # roi_align_common.h tests !(y >= -1 && y <= height && ...), so NaN coordinates are empty too.
  valid = (y >= f32(-1.0)) & (y <= size_b.astype(f32))
  valid &= g[None, None, :] < grid[:, None, None]
  yc = jnp.where(y <= 0, f32(0), y)
  yc = jnp.where(valid, yc, f32(0))           # keeps the int conversion defined
  i_lo = jnp.floor(yc).astype(jnp.int32)      # (int)y, y >= 0
  at_end = i_lo >= size_b - 1
  i_lo = jnp.where(at_end, size_b - 1, i_lo)
  i_hi = jnp.where(at_end, size_b - 1, i_lo + 1)
  yc = jnp.where(at_end, i_lo.astype(f32), yc)
  ly = yc - i_lo.astype(f32)
  hy = f32(1.0) - ly
  zero = f32(0)
  return (jnp.where(valid, i_lo, 0), jnp.where(valid, i_hi, 0), jnp.where(valid, hy, zero),
          jnp.where(valid, ly, zero), grid, capped)


def _taps(i_lo, i_hi, w_lo, w_hi):
  """Tap list: [K, P, 2G] indices and weights, (lo, hi) of each sample (any configuration)."""
  k, p, g = i_lo.shape
  idx = jnp.stack([i_lo, i_hi], axis=-1).reshape(k, p, 2 * g)
  w = jnp.stack([w_lo, w_hi], axis=-1).reshape(k, p, 2 * g)
  return idx, w


def _window(i_lo, i_hi, w_lo, w_hi, size):
  """Per-bin dense window (uncapped adaptive grid): the taps summed per row.

  With the adaptive grid, grid = ceil(bin) >= bin, so the samples of a bin are at most 1 pixel
  apart and span (grid - 1) * bin / grid <= G - 1 pixels: all their taps fall in the G + 1 rows
  starting at the lowest tap. Summing the tap weights per row there gathers (G+1)^2 pixels per bin
  instead of (2G)^2 with the same products (only the summation order changes). This fails for
  capped RoIs, whose samples are more than a pixel apart, and could fail by rounding when a sample
  lands within an ulp of an integer; such RoIs are flagged in `spill`, and `_pool_flat` uses the
  tap list for chunks holding one.

  Returns:
    idx: [K, P, G+1] int32 row (or column) of each window slot, clamped to size - 1.
    w: [K, P, G+1] float32 summed weight of each slot.
    spill: [K] bool, some nonzero weight fell outside the window.
  """
  g = i_lo.shape[-1]
  has = (w_lo != 0) | (w_hi != 0)
  big = jnp.iinfo(jnp.int32).max
  r0 = jnp.min(jnp.where(has, i_lo, big), axis=-1)
  r0 = jnp.where(r0 == big, 0, r0)                                       # [K, P]
  slots = jnp.arange(g + 1, dtype=jnp.int32)
  onehot = lambda i: (i - r0[..., None])[..., None] == slots             # [K, P, G, G+1]
  w = (jnp.sum(jnp.where(onehot(i_lo), w_lo[..., None], 0), axis=-2)
       + jnp.sum(jnp.where(onehot(i_hi), w_hi[..., None], 0), axis=-2))  # [K, P, G+1]
  spill = jnp.any(((i_hi - r0[..., None] > g) & (w_hi != 0))
                  | ((i_lo - r0[..., None] > g) & (w_lo != 0)), axis=(1, 2))
  size_b = jnp.broadcast_to(jnp.asarray(size, jnp.int32), r0.shape[:1])[:, None, None]
  idx = jnp.minimum(r0[..., None] + slots, size_b - 1)                   # weight 0 past the end
  return idx, w, spill


def _gather_pool(table, ry, wy, rx, wx, count):
  """out[k, p, q, c] = sum_ij wy[k,p,i] wx[k,q,j] table[ry[k,p,i] + rx[k,q,j], c] / count[k].

  ry already holds row * width + table offset; rx holds the column. Returns float32.
  """
  rows = ry[:, :, :, None, None] + rx[:, None, None, :, :]               # [R, oh, I, ow, J]
  wgt = wy[:, :, :, None, None] * wx[:, None, None, :, :]
  # Indices are in range by construction (clamped; invalid taps point at row 0 with weight 0).
  vals = table.at[rows].get(mode="promise_in_bounds")                    # [R, oh, I, ow, J, C]
  acc = jnp.sum(wgt[..., None] * vals.astype(jnp.float32), axis=(2, 4))
  # output_val /= count (a true division, see _true_div).
  return _true_div(acc, count[:, None, None, None])


def _pool_flat(table, row_base, boxes, scale, height, width, *, output_size, sampling_ratio,
               aligned, max_grid, roi_chunk, max_hw):
  """RoIAlign from a flattened feature table; every RoI carries its own map geometry.

  Args:
    table: [M, C] float32 / bfloat16, flattened NHWC feature rows (row = pixel).
    row_base: [K] int32, table row of pixel (0, 0) of the RoI's map (image and level).
    boxes: [K, 4] float32, (x1, y1, x2, y2) in image pixels.
    scale: [K] or scalar float32, spatial scale of the RoI's map.
    height, width: [K] or scalar int32, size of the RoI's map.
    max_hw: static (H, W), the largest map height and width: bounds the adaptive grid of a RoI
      inside its map, and so the number of passes (module docstring).

  Returns:
    [K, oh, ow, C] in table.dtype.
  """
  oh, ow = output_size
  k = boxes.shape[0]
  c = table.shape[1]
  if sampling_ratio < 0:
    raise ValueError(f"sampling_ratio must be >= 0, got {sampling_ratio}")
  if sampling_ratio == 0:
    if max_grid is None:
      raise ValueError(
          "roi_align with sampling_ratio=0 (adaptive grid) needs a static max_grid: the number of "
          "samples per bin and axis taken per pass (e.g. 16; the golden tests use 43). RoIs whose "
          "grid ceil(roi_size / output_size) exceeds it are computed in several passes.")
    if max_grid < 1:
      raise ValueError(f"max_grid must be >= 1, got {max_grid}")
  if k == 0:
    return jnp.zeros((0, oh, ow, c), table.dtype)
  boxes = boxes.astype(jnp.float32)
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (k,))
  height = jnp.broadcast_to(jnp.asarray(height, jnp.int32), (k,))
  width = jnp.broadcast_to(jnp.asarray(width, jnp.int32), (k,))
  row_base = row_base.astype(jnp.int32)
  # The largest adaptive grid of a RoI inside its map: roi <= extent (+ 1 for the unaligned
  # minimum size and rounding), grid = ceil(roi / pooled).
  bound_y = max(max_grid or 1, -(-(max_hw[0] + 1) // oh))
  bound_x = max(max_grid or 1, -(-(max_hw[1] + 1) // ow))
  n_py, n_px = -(-bound_y // (max_grid or 1)), -(-bound_x // (max_grid or 1))
  multipass = sampling_ratio == 0 and n_py * n_px > 1

  def samples(b, sc, h, w, first_y=0, first_x=0):
    common = dict(sampling_ratio=sampling_ratio, aligned=aligned, max_grid=max_grid)
    sx = _axis_samples(b[:, 0], b[:, 2], sc, w, pooled=ow, grid_bound=bound_x, first=first_x,
                       **common)
    sy = _axis_samples(b[:, 1], b[:, 3], sc, h, pooled=oh, grid_bound=bound_y, first=first_y,
                       **common)
    return sy, sx

  sy, sx = samples(boxes, scale, height, width)
  # const T count = std::max(roi_bin_grid_h * roi_bin_grid_w, 1)
  count = jnp.maximum(sy[4] * sx[4], 1).astype(jnp.float32)
  to_rows = lambda idx, w, base: idx * w[:, None, None] + base[:, None, None]

  ty, wty = _taps(*sy[:4])
  tx, wtx = _taps(*sx[:4])
  operands = [to_rows(ty, width, row_base), wty, tx, wtx, count]
  per_roi = oh * ow * ty.shape[-1] * tx.shape[-1]
  # The window (G + 1 slots) is smaller than the tap list (2G) from G = 2 on.
  use_window = sampling_ratio == 0 and max_grid > 1
  if use_window:
    vy, wvy, spill_y = _window(*sy[:4], height)
    vx, wvx, spill_x = _window(*sx[:4], width)
    needs_taps = sy[5] | sx[5] | spill_y | spill_x
    operands += [to_rows(vy, width, row_base), wvy, vx, wvx, needs_taps]
  if multipass:
    # Passes each RoI needs per axis; the geometry to recompute its taps pass by pass.
    passes_y = -(-jnp.maximum(sy[4], 1) // max_grid)
    passes_x = -(-jnp.maximum(sx[4], 1) // max_grid)
    operands += [boxes, scale, height, width, row_base, passes_y, passes_x]

  if roi_chunk is None:
    # The taps path is the worst case (a chunk with a capped RoI).
    roi_chunk = max(1, _CHUNK_BUDGET_ELEMENTS // (per_roi * max(c, 1)))
  roi_chunk = int(min(roi_chunk, k))
  n_chunks = -(-k // roi_chunk)
  roi_chunk = -(-k // n_chunks)  # same number of chunks, least padding
  pad = n_chunks * roi_chunk - k

  def chunked(a):
    # Padding RoIs: index 0, weight 0, count 1 (a count of 0 would put 0/0 = NaN into the
    # gradient, even though their outputs are sliced off).
    fill = 1 if a is count else 0
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
    return a.reshape((n_chunks, roi_chunk) + a.shape[1:])

  def all_passes(cnt, b, sc, h, w, base, py_need, px_need):
    """The exact sum over every pass (py, px) that some RoI of the chunk needs."""
    def one_pass(acc, p):
      py, px = p // n_px, p % n_px

      def run():
        sy_p, sx_p = samples(b, sc, h, w, py * max_grid, px * max_grid)
        ry, wy = _taps(*sy_p[:4])
        rx, wx = _taps(*sx_p[:4])
        return _gather_pool(table, to_rows(ry, w, base), wy, rx, wx, cnt)

      needed = jnp.any((py < py_need) & (px < px_need))
      return acc + jax.lax.cond(needed, run, lambda: jnp.zeros_like(acc)), None

    acc0 = jnp.zeros((b.shape[0], oh, ow, c), jnp.float32)
    acc, _ = jax.lax.scan(one_pass, acc0, jnp.arange(n_py * n_px, dtype=jnp.int32))
    return acc

  def pool_chunk(args):
    if not use_window:
      return _gather_pool(table, *args).astype(table.dtype)
    ry, wy, rx, wx, cnt, vy, wvy, vx, wvx, needs_taps = args[:10]
    one = lambda: jax.lax.cond(jnp.any(needs_taps),
                               lambda: _gather_pool(table, ry, wy, rx, wx, cnt),
                               lambda: _gather_pool(table, vy, wvy, vx, wvx, cnt))
    if not multipass:
      return one().astype(table.dtype)
    b, sc, h, w, base, py_need, px_need = args[10:]
    out = jax.lax.cond(jnp.any((py_need > 1) | (px_need > 1)),
                       lambda: all_passes(cnt, b, sc, h, w, base, py_need, px_need), one)
    return out.astype(table.dtype)

  out = jax.lax.map(pool_chunk, tuple(chunked(a) for a in operands))
  return out.reshape((n_chunks * roi_chunk, oh, ow, c))[:k]


def _pair(v):
  if isinstance(v, int):
    return (v, v)
  oh, ow = v
  return (int(oh), int(ow))


def roi_align(features, boxes, batch_idx, *, output_size, spatial_scale, sampling_ratio, aligned,
              max_grid=None, roi_chunk=None):
  """RoIAlign (torchvision.ops.roi_align / mmcv RoIAlign 'avg'), NHWC.

  Args:
    features: [N, H, W, C] float32 or bfloat16, NHWC feature map; H, W are the padded sizes.
    boxes: [K, 4] float32, (x1, y1, x2, y2) in input-image pixels (scaled by spatial_scale).
    batch_idx: [K] int32, image of each RoI, in [0, N).
    output_size: int or (oh, ow).
    spatial_scale: float, feature pixels per image pixel (1 / stride).
    sampling_ratio: int; > 0 fixed sampling_ratio x sampling_ratio samples per bin, 0 adaptive
      ceil(roi_size / output_size) per axis (taken max_grid at a time, see the module docstring).
    aligned: bool; True shifts by -0.5 pixel (torchvision aligned=True, detectron2 ROIAlignV2,
      mmcv default), False forces RoI sizes >= 1 (torchvision default, legacy Mask R-CNN).
    max_grid: int, samples per bin and axis of one pass of the adaptive grid (larger grids take
      several passes); required when sampling_ratio = 0, ignored otherwise.
    roi_chunk: RoIs per `lax.map` step; None picks one so a chunk's taps x channels stay within
      2**24 elements.

  Returns:
    [K, oh, ow, C] in features.dtype (accumulated in float32): the pooled features, NHWC per RoI.
  """
  features = jnp.asarray(features)
  n, h, w, c = features.shape
  table = features.reshape(n * h * w, c)
  row_base = jnp.asarray(batch_idx, jnp.int32) * (h * w)
  return _pool_flat(table, row_base, boxes, spatial_scale, h, w, output_size=_pair(output_size),
                    sampling_ratio=int(sampling_ratio), aligned=bool(aligned), max_grid=max_grid,
                    roi_chunk=roi_chunk, max_hw=(h, w))


def roi_align_pyramid(features: Sequence, boxes, batch_idx, levels, *, spatial_scales,
                      output_size, sampling_ratio, aligned, max_grid=None, roi_chunk=None):
  """RoIAlign of each RoI from its own pyramid level, each RoI pooled once.

  Equivalent to `roi_align(features[levels[k]], ...)` row by row (the mmdet / detectron2 /
  torchvision multi-level poolers), at the cost of one single-level RoIAlign.

  Args:
    features: sequence of L arrays [N, H_l, W_l, C] float32 / bfloat16 (same N, C, dtype), NHWC.
    boxes: [K, 4] float32, (x1, y1, x2, y2) in input-image pixels.
    batch_idx: [K] int32, image of each RoI.
    levels: [K] int32 in [0, L), the level each RoI is pooled from.
    spatial_scales: L floats, the scale of each level (1 / stride).
    output_size, sampling_ratio, aligned, max_grid, roi_chunk: as in `roi_align`.

  Returns:
    [K, oh, ow, C] in the features' dtype.
  """
  features = [jnp.asarray(f) for f in features]
  if len(spatial_scales) != len(features):
    raise ValueError(f"{len(features)} levels but {len(spatial_scales)} spatial scales")
  n, c = features[0].shape[0], features[0].shape[-1]
  sizes = [f.shape[1] * f.shape[2] for f in features]
  offsets = [sum(sizes[:i]) for i in range(len(sizes))]
  total = sum(sizes)
  # [N, T, C] then [N * T, C]: image-major, then level, then row-major pixel.
  table = jnp.concatenate([f.reshape(n, s, c) for f, s in zip(features, sizes)], axis=1)
  table = table.reshape(n * total, c)
  levels = jnp.asarray(levels, jnp.int32)
  pick = lambda vals, dt: jnp.asarray(vals, dt)[levels]
  scale = pick([float(s) for s in spatial_scales], jnp.float32)
  height = pick([f.shape[1] for f in features], jnp.int32)
  width = pick([f.shape[2] for f in features], jnp.int32)
  row_base = jnp.asarray(batch_idx, jnp.int32) * total + pick(offsets, jnp.int32)
  return _pool_flat(table, row_base, boxes, scale, height, width,
                    output_size=_pair(output_size), sampling_ratio=int(sampling_ratio),
                    aligned=bool(aligned), max_grid=max_grid, roi_chunk=roi_chunk,
                    max_hw=(max(f.shape[1] for f in features), max(f.shape[2] for f in features)))
