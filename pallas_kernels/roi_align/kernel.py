"""RoIAlign as Pallas kernels (forward, and two backwards), NHWC, torchvision / mmcv semantics.

The kernels reproduce `reference.py` (the pure-JAX twin): same arguments, same float32 sample
coordinates and weights (they are computed by the reference's own `_axis_samples` / `_taps` /
`_window`, in XLA), so only the order of the float32 sums differs (~1e-7 relative).

Two lowerings (`KernelConfig.lowering`), the same taps, backwards and pyramid handling:

* 'triton': the Pallas *Triton* lowering (`compiler_params=pltriton.CompilerParams(...)`), run
  natively on a GPU (`impl='pallas'`) or by the generic Pallas interpreter (`impl='interpret'`,
  `pallas_call(..., interpret=True)`). The Triton lowering turns an integer-array index of a ref
  into a tensor of pointers (a gather: the forward reads [XB, CB] tiles of XB columns) and
  `pltriton.atomic_add` into a tensor of `atomic_rmw`s. It is deprecated since JAX 0.11.0 (a
  DeprecationWarning when a kernel is lowered) but present in 0.11.x.
* 'mosaic': Mosaic GPU (`jax.experimental.pallas.mosaic_gpu`, the default Pallas lowering on
  Hopper), `kernel_mosaic.py`: one warpgroup per (RoI, channel block); Mosaic GPU has no
  per-element gather on Hopper, so each tap is a dynamic-start load of one contiguous [CB] channel
  vector, and the atomic backward uses `plgpu.atomic_add` of [CB] vectors. Run natively on a
  Hopper GPU (`impl='mosaic'`) or by Mosaic GPU's own interpreter on any backend
  (`impl='mosaic_interpret'`).

`impl='auto'` picks neither unless a GPU benchmark measured it faster (`AUTO_PALLAS_DEVICE_KINDS`
in `__init__.py`).

Structure (all three kernels share it):

* XLA precomputes, per RoI, the separable bilinear taps of the reference (parity_spec 3.11):
  per output row ph up to TY rows `ry` (as a row index of the level's flattened [N*H*W, C]
  table, image offset included) with weights `wy`, per output column pw up to TX columns `rx`
  with weights `wx`, the count, and how many taps are live (`ny`, `nx`: the rest have weight 0).
  With the adaptive grid each axis of each RoI uses the reference's dense window (G + 1 slots,
  taps summed per row) unless that RoI is capped or spills, then the tap list (2G slots); the
  choice is per RoI and axis, which gives the same products as the reference's per-chunk choice.
  This is O(K * (oh + ow) * G) work, negligible next to the O(K * oh * ow * G^2 * C) gathers.
* Forward, grid (K, C / CB): one program per RoI and channel block. For each bin, for each live
  y tap and block of XB x slots, a [XB, CB] gather of XB columns x CB contiguous channels (NHWC:
  a channel block of a pixel is contiguous), weighted by wy * wx into a [XB, CB] float32
  accumulator, summed over XB once per bin; the bin is divided by the count and stored (dtype of
  the features).
* Backward 'atomic' (default), grid (K, C / CB): the transpose, walked in the same order; each
  live tap adds w * g / count (a CB-vector) into a float32 gradient table with
  `pltriton.atomic_add` (one row per call, which the interpreter also executes exactly, see
  `_scatter_add`). Atomics make the float32 summation order, so the last bits, vary from run to
  run on a GPU (like XLA's own scatter-add).
* Backward 'deterministic', grid (bands, C / CB): RoIs are sorted (stably) by (level, image);
  each program owns a band of BAND_ROWS consecutive table rows of one image and level, walks the
  RoIs of that image and level in the sorted order, and adds only the taps that fall in its
  band with a plain read-add-write (no other program touches those rows). The order of every sum
  is fixed, so the result is bitwise reproducible; it scans every RoI of the image once per band
  (a cheap row-range test skips RoIs and tap rows outside the band).

Multi-level (FPN) pooling: each level is its own table ([N*H_l*W_l, C], a free reshape of the
NHWC map); the kernel picks the RoI's level with `pl.when` (one copy of the loop per level), so
neither the forward nor the backward copies the pyramid into one table (the reference
concatenates). The gradient comes back per level.

Float32 / bfloat16 features; accumulation is float32 in both directions (the backward's table is
float32 and is rounded once to the features' dtype; the reference's bfloat16 gradient is
scatter-added in bfloat16). No gradient flows to the boxes (as in torchvision / mmcv, whose
RoIAlign backward returns none for the RoIs); the reference differentiates through the weights.

Triton constraints honoured here (the Mosaic GPU ones: kernel_mosaic.py): every vector is a power of two ([XB, CB], [CB], [XB]); all other
values are scalars loaded from the tap tables; loops are `lax.fori_loop` with bounds read from
refs (scf.for / scf.while); the deterministic kernel's read-add-write of a row is ordered by the
program (same layout for load and store) and its loops are not software-pipelined
(num_stages=1).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.roi_align import reference

try:  # The Triton-specific Pallas API (atomics, CompilerParams); present in jax 0.10.x / 0.11.x.
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - a JAX without the Triton lowering
  pltriton = None

# Channels per program (the largest power of two <= this that the padded C needs).
MAX_CHANNEL_BLOCK = 128
# Columns gathered at once in the forward ([XB, CB] tile); a power of two.
MAX_X_BLOCK = 8
# Table rows (pixels) owned by one program of the deterministic backward.
BAND_ROWS = 2048


def _next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static launch parameters (hashable: part of the custom_vjp's static arguments)."""
  output_size: tuple[int, int]
  channel_block: int
  x_block: int
  interpret: bool | str  # False, True (the generic Pallas interpreter) or 'mosaic_gpu'
  num_warps: int = 4
  num_stages: int = 2
  deterministic: bool = False
  band_rows: int = BAND_ROWS
  lowering: str = "triton"  # 'triton' | 'mosaic' (module docstring)


# ------------------------------------------------------------------------------------------------
# Taps (XLA): the reference's sample coordinates and weights, as per-RoI tables.
# ------------------------------------------------------------------------------------------------

def _axis_taps(lo, hi, scale, size, *, pooled, sampling_ratio, aligned, max_grid):
  """Per-RoI tap table of one axis: (idx [K, P, T], w [K, P, T], grid [K]).

  The reference's tap list (2G slots per bin: lo and hi of each sample), or for the adaptive grid
  its dense window (G + 1 slots, weights summed per row) padded to 2G, per RoI: the window unless
  the RoI is capped or a weight spills out of it (`reference._window`).
  """
  i_lo, i_hi, w_lo, w_hi, grid, capped = reference._axis_samples(
      lo, hi, scale, size, pooled=pooled, sampling_ratio=sampling_ratio, aligned=aligned,
      max_grid=max_grid)
  idx, w = reference._taps(i_lo, i_hi, w_lo, w_hi)
  if sampling_ratio == 0 and max_grid > 1:
    vidx, vw, spill = reference._window(i_lo, i_hi, w_lo, w_hi, size)
    pad = [(0, 0), (0, 0), (0, idx.shape[-1] - vidx.shape[-1])]
    vidx, vw = jnp.pad(vidx, pad), jnp.pad(vw, pad)
    use_list = (capped | spill)[:, None, None]
    idx = jnp.where(use_list, idx, vidx)
    w = jnp.where(use_list, w, vw)
  return idx, w, grid


def _live(w):
  """[K, P, T] weights -> [K] int32: 1 + the last slot with a nonzero weight in any bin, or 0."""
  t = jnp.arange(1, w.shape[-1] + 1, dtype=jnp.int32)
  return jnp.max(jnp.where(w != 0, t, 0), axis=(1, 2)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Taps:
  level: jax.Array   # [K] int32
  ny: jax.Array      # [K] int32 live y slots
  nx: jax.Array      # [K] int32 live x slots
  cnt: jax.Array     # [K] float32 samples per bin (>= 1)
  ry: jax.Array      # [K, oh, TY] int32 table row of (image, y, x = 0)
  wy: jax.Array      # [K, oh, TY] float32
  rx: jax.Array      # [K, ow, TXP] int32 column x
  wx: jax.Array      # [K, ow, TXP] float32
  rmin: jax.Array    # [K] int32 first table row any live tap touches (deterministic backward)
  rmax: jax.Array    # [K] int32 last one
  cmin: jax.Array    # [K] int32 smallest live column
  cmax: jax.Array    # [K] int32 largest live column


jax.tree_util.register_dataclass(
    _Taps, data_fields=[f.name for f in dataclasses.fields(_Taps)], meta_fields=[])


def _prepare_taps(boxes, batch_idx, levels, level_shapes, spatial_scales, *, output_size,
                  sampling_ratio, aligned, max_grid, x_block):
  """Tap tables of every RoI on its level (see the module docstring)."""
  oh, ow = output_size
  boxes = jax.lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
  levels = jnp.asarray(levels, jnp.int32)
  batch_idx = jnp.asarray(batch_idx, jnp.int32)
  pick = lambda vals, dt: jnp.asarray(vals, dt)[levels]
  # The scales may be traced (a jitted argument), so they are stacked, not converted.
  scale = jnp.stack([jnp.asarray(s, jnp.float32) for s in spatial_scales])[levels]
  height = pick([h for h, _ in level_shapes], jnp.int32)
  width = pick([w for _, w in level_shapes], jnp.int32)
  common = dict(sampling_ratio=sampling_ratio, aligned=aligned, max_grid=max_grid)
  iy, wy, gy = _axis_taps(boxes[:, 1], boxes[:, 3], scale, height, pooled=oh, **common)
  ix, wx, gx = _axis_taps(boxes[:, 0], boxes[:, 2], scale, width, pooled=ow, **common)
  # const T count = std::max(roi_bin_grid_h * roi_bin_grid_w, 1)
  cnt = jnp.maximum(gy * gx, 1).astype(jnp.float32)
  base = batch_idx * height * width
  ry = iy * width[:, None, None] + base[:, None, None]
  tx = ix.shape[-1]
  txp = -(-tx // x_block) * x_block
  pad = [(0, 0), (0, 0), (0, txp - tx)]
  rx, wx = jnp.pad(ix, pad), jnp.pad(wx, pad)
  ny, nx = _live(wy), _live(wx)
  big = jnp.iinfo(jnp.int32).max
  ry_live = jnp.where(wy != 0, ry, big)
  rx_live = jnp.where(wx != 0, rx, big)
  cmin = jnp.min(rx_live, axis=(1, 2))
  cmax = jnp.max(jnp.where(wx != 0, rx, -1), axis=(1, 2))
  rmin = jnp.min(ry_live, axis=(1, 2)) + jnp.where(cmin == big, 0, cmin)
  rmax = jnp.max(jnp.where(wy != 0, ry, -1), axis=(1, 2)) + cmax
  empty = (ny == 0) | (nx == 0)
  rmin = jnp.where(empty, big, rmin)
  rmax = jnp.where(empty, -1, rmax)
  return _Taps(level=levels, ny=ny, nx=nx, cnt=cnt, ry=ry.astype(jnp.int32), wy=wy,
               rx=rx.astype(jnp.int32), wx=wx, rmin=rmin.astype(jnp.int32),
               rmax=rmax.astype(jnp.int32), cmin=jnp.where(empty, 0, cmin).astype(jnp.int32),
               cmax=cmax.astype(jnp.int32))


# ------------------------------------------------------------------------------------------------
# Kernels.
# ------------------------------------------------------------------------------------------------

def _per_level(level, tables, body):
  """body(l, tables[l]) for the RoI's level (static unrolled `pl.when`s; none for one level)."""
  if len(tables) == 1:
    body(0, tables[0])
    return
  for l, t in enumerate(tables):
    pl.when(level == l)(functools.partial(body, l, t))


def _program_id(cfg: KernelConfig, axis: int):
  """The program's index along grid axis 0 (RoI or band) or 1 (channel block)."""
  if cfg.lowering == "mosaic":
    from pallas_kernels.roi_align import kernel_mosaic
    return kernel_mosaic.program_id(cfg, axis)
  return pl.program_id(axis)


def _fwd_kernel(level_ref, ny_ref, nx_ref, cnt_ref, ry_ref, wy_ref, rx_ref, wx_ref, *refs,
                num_levels, cfg: KernelConfig):
  tables, (out_ref,) = refs[:num_levels], refs[num_levels:]
  oh, ow = cfg.output_size
  cb, xb = cfg.channel_block, cfg.x_block
  k = _program_id(cfg, 0)
  c0 = _program_id(cfg, 1) * cb
  ny = ny_ref[k]
  nxb = jax.lax.div(nx_ref[k] + (xb - 1), xb)
  cnt = cnt_ref[k]

  def level_body(_, table_ref):
    def bin_body(b, carry):
      ph = jax.lax.div(b, ow)
      pw = b - ph * ow

      def x_body(jb, acc, r, w):
        cols = rx_ref[k, pw, pl.ds(jb * xb, xb)]
        wxs = wx_ref[k, pw, pl.ds(jb * xb, xb)]
        vals = table_ref[r + cols, pl.ds(c0, cb)].astype(jnp.float32)    # [XB, CB] gather
        # The tap weight wy * wx, as the reference's; the XB partial sums stay apart (in each
        # thread's registers) until the bin is done, so no cross-thread reduction per tap.
        return acc + (w * wxs)[:, None] * vals

      def y_body(i, acc):
        return jax.lax.fori_loop(
            0, nxb, functools.partial(x_body, r=ry_ref[k, ph, i], w=wy_ref[k, ph, i]), acc)

      acc = jnp.sum(jax.lax.fori_loop(0, ny, y_body, jnp.zeros((xb, cb), jnp.float32)), axis=0)
      # output_val /= count (a true division, as the reference).
      _store(cfg, out_ref.at[k, ph, pw, pl.ds(c0, cb)], (acc / cnt).astype(out_ref.dtype))
      return carry

    jax.lax.fori_loop(0, oh * ow, bin_body, 0)

  _per_level(level_ref[k], tables, level_body)


def _store(cfg: KernelConfig, ref, val):
  """ref[...] = val without reading the old value (a plain `ref[...] = val` is a swap, which the
  Triton lowering emits as a load and a store; Mosaic GPU has only the swap)."""
  if cfg.lowering == "triton" and pltriton is not None:
    pltriton.store(ref, val)
  else:
    ref[...] = val


def _scatter_add(cfg: KernelConfig, ref, row, c0, cb, val, *, atomic):
  """ref[row, c0:c0+cb] += val (one table row). `atomic`: a GPU atomic add (`pltriton.atomic_add`:
  the generic interpreter executes it as a dynamic-slice add, exact since a call touches one row;
  Mosaic GPU: `kernel_mosaic.atomic_add`), else a plain read-add-write (the deterministic kernel
  owns the row)."""
  if atomic and cfg.lowering == "mosaic":
    from pallas_kernels.roi_align import kernel_mosaic
    kernel_mosaic.atomic_add(cfg, ref.at[row, pl.ds(c0, cb)], val)
  elif atomic and pltriton is not None:
    pltriton.atomic_add(ref, (row, pl.ds(c0, cb)), val)
  else:  # (also the interpreter's fallback should a JAX drop the Triton module: it is sequential)
    view = ref.at[row, pl.ds(c0, cb)]
    _store(cfg, view, view[...] + val)


def _walk_roi(k, c0, ny_ref, nx_ref, cnt_ref, ry_ref, wy_ref, rx_ref, wx_ref, g_ref, d_ref, *,
              cfg: KernelConfig, band=None, cspan=None):
  """Adds RoI k's share of the gradient (channel block c0) to the table d_ref.

  band: None (every tap, atomically) or (lo, hi): only taps with table row in [lo, hi), plain adds.
  cspan: (cmin, cmax) of the RoI's live columns (used with band to skip tap rows).
  """
  oh, ow = cfg.output_size
  cb = cfg.channel_block
  ny, nx = ny_ref[k], nx_ref[k]
  cnt = cnt_ref[k]

  def bin_body(b, carry):
    ph = jax.lax.div(b, ow)
    pw = b - ph * ow
    gv = g_ref[k, ph, pw, pl.ds(c0, cb)].astype(jnp.float32) / cnt       # d out / d acc

    def y_body(i, carry_y):
      r = ry_ref[k, ph, i]
      w = wy_ref[k, ph, i]
      live = w != 0
      if band is not None:
        live &= (r + cspan[0] < band[1]) & (r + cspan[1] >= band[0])

      @pl.when(live)
      def _():
        def x_body(j, carry_x):
          t = r + rx_ref[k, pw, j]
          wj = w * wx_ref[k, pw, j]
          hit = wj != 0
          if band is not None:
            hit &= (t >= band[0]) & (t < band[1])

          @pl.when(hit)
          def _():
            _scatter_add(cfg, d_ref, t, c0, cb, wj * gv, atomic=band is None)
          return carry_x

        jax.lax.fori_loop(0, nx, x_body, 0)
      return carry_y

    jax.lax.fori_loop(0, ny, y_body, 0)
    return carry

  jax.lax.fori_loop(0, oh * ow, bin_body, 0)


def _bwd_atomic_kernel(level_ref, ny_ref, nx_ref, cnt_ref, ry_ref, wy_ref, rx_ref, wx_ref, g_ref,
                       *refs, num_levels, cfg: KernelConfig):
  # refs end with the L zero-filled gradient tables (Triton: the L zero-filled inputs aliased to
  # the L outputs, which come last; Mosaic GPU: the L refs updated in place).
  d_refs = refs[-num_levels:]
  k = _program_id(cfg, 0)
  c0 = _program_id(cfg, 1) * cfg.channel_block
  _per_level(level_ref[k], d_refs, lambda _, d_ref: _walk_roi(
      k, c0, ny_ref, nx_ref, cnt_ref, ry_ref, wy_ref, rx_ref, wx_ref, g_ref, d_ref, cfg=cfg))


def _bwd_band_kernel(band_level_ref, band_seg_ref, band_lo_ref, band_hi_ref, seg_start_ref,
                     seg_end_ref, order_ref, rmin_ref, rmax_ref, cmin_ref, cmax_ref, ny_ref, nx_ref,
                     cnt_ref, ry_ref, wy_ref, rx_ref, wx_ref, g_ref, *refs, num_levels,
                     cfg: KernelConfig):
  d_refs = refs[-num_levels:]
  p = _program_id(cfg, 0)
  c0 = _program_id(cfg, 1) * cfg.channel_block
  lo, hi = band_lo_ref[p], band_hi_ref[p]
  seg = band_seg_ref[p]

  def level_body(_, d_ref):
    def roi_body(s, carry):
      k = order_ref[s]

      @pl.when((rmin_ref[k] < hi) & (rmax_ref[k] >= lo))
      def _():
        _walk_roi(k, c0, ny_ref, nx_ref, cnt_ref, ry_ref, wy_ref, rx_ref, wx_ref, g_ref, d_ref,
                  cfg=cfg, band=(lo, hi), cspan=(cmin_ref[k], cmax_ref[k]))
      return carry

    jax.lax.fori_loop(seg_start_ref[seg], seg_end_ref[seg], roi_body, 0)

  _per_level(band_level_ref[p], d_refs, level_body)


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers and the custom VJP.
# ------------------------------------------------------------------------------------------------

def _call(kernel, grid, out_shape, cfg: KernelConfig, *, aliases=None, num_stages=None):
  """The kernel launched on `grid`: a function of the inputs returning `out_shape`'s arrays.
  aliases: {input index: output index} (the zero-filled gradient tables, updated in place)."""
  if cfg.lowering == "mosaic":
    from pallas_kernels.roi_align import kernel_mosaic
    return kernel_mosaic.call(kernel, grid, out_shape, cfg, aliases=aliases or {})
  kwargs = dict(grid=grid, out_shape=out_shape, input_output_aliases=aliases or {})
  if cfg.interpret:
    kwargs["interpret"] = True
  else:
    if pltriton is None:
      raise RuntimeError("impl='pallas' needs the Pallas Triton lowering "
                         "(jax.experimental.pallas.triton), absent from this JAX")
    kwargs["compiler_params"] = pltriton.CompilerParams(
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages if num_stages is None else num_stages)
  return pl.pallas_call(kernel, **kwargs)


def _taps_args(t: _Taps):
  return (t.level, t.ny, t.nx, t.cnt, t.ry, t.wy, t.rx, t.wx)


def _forward(tables, taps: _Taps, cfg: KernelConfig):
  k = taps.ny.shape[0]
  oh, ow = cfg.output_size
  c = tables[0].shape[1]
  body = _fwd_kernel
  if cfg.lowering == "mosaic":
    from pallas_kernels.roi_align import kernel_mosaic
    body = kernel_mosaic.fwd_kernel
  kernel = functools.partial(body, num_levels=len(tables), cfg=cfg)
  out_shape = jax.ShapeDtypeStruct((k, oh, ow, c), tables[0].dtype)
  return _call(kernel, (k, c // cfg.channel_block), out_shape, cfg)(*_taps_args(taps), *tables)


def _band_table(level_rows, num_images, band_rows):
  """Static bands (level, segment = level * N + image, lo, hi) of the deterministic backward."""
  lv, sg, lo, hi = [], [], [], []
  for l, rows in enumerate(level_rows):
    for n in range(num_images):
      for start in range(0, rows, band_rows):
        lv.append(l)
        sg.append(l * num_images + n)
        lo.append(n * rows + start)
        hi.append(n * rows + min(start + band_rows, rows))
  return [np.asarray(a, np.int32) for a in (lv, sg, lo, hi)]


def _backward(tables_meta, taps: _Taps, batch_idx, g, cfg: KernelConfig):
  """Gradient tables (float32, [N * H_l * W_l, C] per level) of sum(out * g)."""
  shapes, num_images = tables_meta
  k = taps.ny.shape[0]
  c = g.shape[-1]
  nl = len(shapes)
  out_shape = tuple(jax.ShapeDtypeStruct((m, c), jnp.float32) for m in shapes)
  zeros = tuple(jnp.zeros((m, c), jnp.float32) for m in shapes)
  nc = c // cfg.channel_block
  common = (taps.ny, taps.nx, taps.cnt, taps.ry, taps.wy, taps.rx, taps.wx, g)
  if not cfg.deterministic:
    kernel = functools.partial(_bwd_atomic_kernel, num_levels=nl, cfg=cfg)
    first = 1 + len(common)
    aliases = {first + l: l for l in range(nl)}
    return _call(kernel, (k, nc), out_shape, cfg, aliases=aliases)(taps.level, *common, *zeros)
  per_image = [m // num_images for m in shapes]
  band_level, band_seg, band_lo, band_hi = _band_table(per_image, num_images, cfg.band_rows)
  key = taps.level * num_images + batch_idx
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  sorted_key = key[order]
  segs = jnp.arange(nl * num_images, dtype=jnp.int32)
  seg_start = jnp.searchsorted(sorted_key, segs, side="left").astype(jnp.int32)
  seg_end = jnp.searchsorted(sorted_key, segs, side="right").astype(jnp.int32)
  kernel = functools.partial(_bwd_band_kernel, num_levels=nl, cfg=cfg)
  head = (band_level, band_seg, band_lo, band_hi, seg_start, seg_end, order, taps.rmin, taps.rmax,
          taps.cmin, taps.cmax)
  first = len(head) + len(common)
  aliases = {first + l: l for l in range(nl)}
  return _call(kernel, (len(band_lo), nc), out_shape, cfg, aliases=aliases, num_stages=1)(
      *head, *common, *zeros)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _pool(tables, taps, batch_idx, meta, cfg):
  """meta: static (num_images, rows of each table, dtype name)."""
  return _forward(tables, taps, cfg)


def _pool_fwd(tables, taps, batch_idx, meta, cfg):
  return _forward(tables, taps, cfg), (taps, batch_idx)


def _pool_bwd(meta, cfg, res, g):
  taps, batch_idx = res
  num_images, rows, dtype = meta
  grads = _backward((rows, num_images), taps, batch_idx, g, cfg)
  grads = tuple(d.astype(dtype) for d in grads)
  # No gradient w.r.t. the boxes (torchvision / mmcv) nor the integer inputs.
  zero_taps = jax.tree_util.tree_map(
      lambda a: (jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.floating)
                 else np.zeros(a.shape, jax.dtypes.float0)), taps)
  return grads, zero_taps, np.zeros(batch_idx.shape, jax.dtypes.float0)


_pool.defvjp(_pool_fwd, _pool_bwd)


# ------------------------------------------------------------------------------------------------
# Public entry points (dispatched to by pallas_kernels.roi_align).
# ------------------------------------------------------------------------------------------------

def _check_args(sampling_ratio, max_grid):
  if sampling_ratio < 0:
    raise ValueError(f"sampling_ratio must be >= 0, got {sampling_ratio}")
  if sampling_ratio == 0:
    if max_grid is None:
      raise ValueError(
          "roi_align with sampling_ratio=0 (adaptive grid) needs a static max_grid: the number of "
          "samples per bin and axis allocated for every RoI (e.g. 8; the golden tests use 43). "
          "RoIs whose grid ceil(roi_size / output_size) exceeds it are sampled with max_grid "
          "evenly spaced points per bin.")
    if max_grid < 1:
      raise ValueError(f"max_grid must be >= 1, got {max_grid}")


def _pair(v):
  if isinstance(v, int):
    return (v, v)
  oh, ow = v
  return (int(oh), int(ow))


def pool_levels(features: Sequence, boxes, batch_idx, levels, *, spatial_scales, output_size,
                sampling_ratio, aligned, max_grid=None, interpret=False, deterministic=False,
                channel_block=None, num_warps=None, lowering="triton"):
  """RoIAlign of every RoI on its own level with the Pallas kernels.

  Args:
    features: L arrays [N, H_l, W_l, C] float32 / bfloat16 (same N, C, dtype), NHWC.
    boxes: [K, 4] float32 (x1, y1, x2, y2) image pixels. batch_idx: [K] int32 in [0, N).
    levels: [K] int32 in [0, L) (None: all 0, for one level).
    spatial_scales: L floats. output_size, sampling_ratio, aligned, max_grid: as the reference.
    interpret: run the kernels in the Pallas interpreter (any backend) instead of natively; for
      lowering='mosaic' also 'mosaic_gpu': Mosaic GPU's own interpreter (`kernel_mosaic.py`).
    deterministic: use the band-owner backward (bitwise reproducible) instead of atomics.
    channel_block, num_warps: launch parameters (None: defaults for C; Triton only: num_warps).
    lowering: 'triton' or 'mosaic' (module docstring).

  Returns:
    [K, oh, ow, C] in the features' dtype. Differentiable w.r.t. the features (custom VJP).
  """
  features = [jnp.asarray(f) for f in features]
  sampling_ratio, aligned = int(sampling_ratio), bool(aligned)
  _check_args(sampling_ratio, max_grid)
  if len(spatial_scales) != len(features):
    raise ValueError(f"{len(features)} levels but {len(spatial_scales)} spatial scales")
  dtype = features[0].dtype
  if any(f.dtype != dtype for f in features):
    raise ValueError("all levels must have the same dtype")
  if dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"features must be float32 or bfloat16, got {dtype}")
  n, c = features[0].shape[0], features[0].shape[-1]
  oh, ow = _pair(output_size)
  boxes = jnp.asarray(boxes, jnp.float32)
  k = boxes.shape[0]
  if k == 0:
    return jnp.zeros((0, oh, ow, c), dtype)
  batch_idx = jnp.asarray(batch_idx, jnp.int32)
  levels = (jnp.zeros((k,), jnp.int32) if levels is None else jnp.asarray(levels, jnp.int32))

  g_static = sampling_ratio if sampling_ratio > 0 else max_grid
  tx = 2 * g_static  # tap-list slots per bin (the window's G + 1 fit: G + 1 <= 2G)
  if lowering == "mosaic":
    from pallas_kernels.roi_align import kernel_mosaic
    cb = kernel_mosaic.channel_block(c, channel_block)
    xb, num_warps = 1, 4  # one tap per load; one warpgroup per program
  elif lowering == "triton":
    cb = channel_block or min(MAX_CHANNEL_BLOCK, _next_pow2(c))
    if cb & (cb - 1):
      raise ValueError(f"channel_block must be a power of two, got {cb}")
    xb = min(MAX_X_BLOCK, _next_pow2(tx))
    if num_warps is None:
      num_warps = 4 if cb * xb >= 512 else (2 if cb * xb >= 128 else 1)
  else:
    raise ValueError(f"lowering must be 'triton' or 'mosaic', got {lowering!r}")
  cp = -(-c // cb) * cb
  if interpret not in (False, True) and not (lowering == "mosaic" and interpret == "mosaic_gpu"):
    raise ValueError(f"interpret must be a bool (or 'mosaic_gpu' with lowering='mosaic'), got "
                     f"{interpret!r}")
  interpret = interpret if isinstance(interpret, str) else bool(interpret)
  cfg = KernelConfig(output_size=(oh, ow), channel_block=cb, x_block=xb, interpret=interpret,
                     num_warps=num_warps, deterministic=bool(deterministic), lowering=lowering)

  taps = _prepare_taps(boxes, batch_idx, levels, [(f.shape[1], f.shape[2]) for f in features],
                       spatial_scales, output_size=(oh, ow), sampling_ratio=sampling_ratio,
                       aligned=aligned, max_grid=max_grid if sampling_ratio == 0 else None,
                       x_block=xb)
  tables = []
  for f in features:
    t = f.reshape(-1, c)
    if cp != c:
      t = jnp.pad(t, [(0, 0), (0, cp - c)])
    tables.append(t)
  meta = (n, tuple(int(t.shape[0]) for t in tables), jnp.dtype(dtype).name)
  out = _pool(tuple(tables), taps, batch_idx, meta, cfg)
  return out[..., :c] if cp != c else out
