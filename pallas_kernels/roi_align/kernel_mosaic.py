"""The RoIAlign kernels in Mosaic GPU (Pallas' default lowering on Hopper): `impl='mosaic'`.

kernel.py holds everything the two lowerings share (the taps computed in XLA, the two backward
kernels, the pyramid handling, the custom VJP); this module holds what Mosaic GPU does differently.

Why the kernels look like this. In Mosaic GPU (`jax.experimental.pallas.mosaic_gpu`) one Pallas
program is one warpgroup (128 threads) executing array code in lockstep, and its arrays carry a
register layout. It has no per-element gather from global memory on Hopper (the indexed TMA copy
needs sm_100), so the Triton kernels' [XB, CB] gathers have no equivalent. What it has: scalar
loads (each thread loads the same address), loads of a static-size slice at a dynamic start
(`ref[row, pl.ds(c0, CB)]`: one contiguous channel vector of the NHWC table, CB / 128 elements per
thread, a `WG_STRIDED` layout) and `plgpu.atomic_add` of such a vector (one `red.global.add.f32`
per element). So:

* Forward, grid (K, C / CB) (`fwd_kernel`): per output bin, for each live y tap (row `ry`, weight
  `wy`, read as scalars) and each live x tap (column `rx`, weight `wx`), one dynamic-start load of
  the [CB] channel vector of pixel `ry + rx`, accumulated in float32 as `(wy * wx) * value` (the
  reference's product order); the bin is divided by the count and stored in the features' dtype.
* Backward, atomic (kernel.py `_bwd_atomic_kernel`, grid (K, C / CB)): each live tap adds
  `(wy * wx) * g / count` to the float32 gradient table with `plgpu.atomic_add` of a [CB] vector.
* Backward, deterministic (kernel.py `_bwd_band_kernel`, grid (bands, C / CB)): the band-owner
  kernel with plain read-add-writes, bitwise reproducible.
* The zero-filled gradient tables are `jax.new_ref`s passed to `pl.kernel`, which updates them in
  place (Mosaic GPU's `plgpu.kernel` has no `input_output_aliases`).

CB is 256 when C is a multiple of 256, else 128 (C is padded to a multiple of CB): a vector must
hold a multiple of 128 elements, and 256 keeps the float32 and bfloat16 vectors on the same
layout (2 elements per thread), so the bfloat16 values and the float32 accumulator line up. The
accumulator's initial zeros are cast to that layout (`plgpu.layout_cast`): a `jnp.zeros` is a splat,
and a loop carry must keep its layout.

Interpretation on CPU. Two interpreters run these kernel bodies:

* `impl='mosaic_interpret'` (`interpret=True`): the generic Pallas interpreter (`pallas_call(...,
  interpret=True)`: the grid and the body become XLA loops, as for `impl='interpret'`), the
  kernels launched as a `pallas_call` over the same grid (program ids from `pl.program_id`). Fast
  enough for every golden test.
* `interpret='mosaic_gpu'`: Mosaic GPU's own interpreter (`InterpretGPUParams`, JAX >= 0.10: GMEM
  simulated, grid points run one after the other, uninitialized memory filled with NaN,
  out-of-bounds reads raise), through the same `pl.kernel` launch as on the device (a Mosaic GPU
  mesh, `lax.axis_index`, the gradient tables as `jax.new_ref`s). It executes every load through
  a host callback: ~130 s for one 40-RoI golden forward on the 2-core CPU, so the tests run it on
  one small case only (`test_mosaic_gpu_interpreter`).

Both need two substitutions (JAX 0.10.2 and 0.11.2): neither interpreter has a rule for
`plgpu.layout_cast` (the zeros stay a plain `jnp.zeros`, the same values) nor for
`plgpu.atomic_add` (the primitive's discharge rule fails in the generic interpreter; Mosaic GPU's
interpreter has no case for it), so the atomic add becomes a read-add-write of the same row, exact
because both interpreters run one program at a time. The atomic itself is checked by lowering
(`mosaic_check.py`: `red.relaxed.gpu.add.f32` in the module), not by execution.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # Mosaic GPU Pallas (jax 0.10.x / 0.11.x).
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - a JAX without Mosaic GPU
  plgpu = None

try:  # Not exported publicly in 0.10.2 / 0.11.2; the path is the same in both.
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
except ImportError:  # pragma: no cover
  InterpretGPUParams = None

# Names of the two grid axes (RoI or band, channel block) of the Mosaic GPU mesh; read with
# lax.axis_index (Mosaic GPU's interpreter answers pl.program_id with 0 for every program).
GRID_NAMES = ("p0", "p1")
MOSAIC_GPU_INTERPRETER = "mosaic_gpu"  # the value of `interpret` that selects it
WARPGROUP = 128


def available() -> bool:
  return plgpu is not None


def interpreter_available() -> bool:
  """Mosaic GPU's own interpreter (the generic one needs nothing beyond Pallas)."""
  return plgpu is not None and InterpretGPUParams is not None


def channel_block(c: int, requested=None) -> int:
  """Channels per program: 128 or 256 (module docstring)."""
  if requested is not None:
    if requested not in (128, 256):
      raise ValueError(f"Mosaic GPU channel_block must be 128 or 256, got {requested}")
    return int(requested)
  return 256 if c % 256 == 0 else 128


def program_id(cfg, axis: int):
  if cfg.interpret is True:  # the generic interpreter runs a pallas_call
    return pl.program_id(axis)
  return jax.lax.axis_index(GRID_NAMES[axis])


def _strided_vec(cb: int) -> int:
  """Elements per thread of a [cb] float32 / bfloat16 vector loaded from memory (Mosaic GPU's
  `WGStridedFragLayout.from_shaped_type`: at most 8 bytes, cb / 128 at most): 1 or 2 here."""
  return min(2, cb // WARPGROUP)


def acc_zeros(cfg):
  """The float32 [CB] accumulator's initial value, in the layout of the loaded vectors."""
  zeros = jnp.zeros((cfg.channel_block,), jnp.float32)
  if cfg.interpret:
    return zeros
  layout = plgpu.Layout.WG_STRIDED((cfg.channel_block,), vec_size=_strided_vec(cfg.channel_block))
  return plgpu.layout_cast(zeros, layout)


def atomic_add(cfg, view, val):
  """view[...] += val atomically (module docstring: a read-add-write in the interpreter)."""
  if cfg.interpret:
    view[...] = view[...] + val
  else:
    plgpu.atomic_add(view, val)


def fwd_kernel(level_ref, ny_ref, nx_ref, cnt_ref, ry_ref, wy_ref, rx_ref, wx_ref, *refs,
               num_levels, cfg):
  """Forward, one program per (RoI, channel block); the refs as kernel.py's `_fwd_kernel`."""
  from pallas_kernels.roi_align import kernel as common
  tables, (out_ref,) = refs[:num_levels], refs[num_levels:]
  oh, ow = cfg.output_size
  cb = cfg.channel_block
  k = program_id(cfg, 0)
  c0 = program_id(cfg, 1) * cb
  ny, nx = ny_ref[k], nx_ref[k]
  cnt = cnt_ref[k]

  def level_body(_, table_ref):
    def bin_body(b, carry):
      ph = jax.lax.div(b, ow)
      pw = b - ph * ow

      def y_body(i, acc):
        r = ry_ref[k, ph, i]
        w = wy_ref[k, ph, i]

        def x_body(j, acc):
          wj = w * wx_ref[k, pw, j]  # the reference's tap weight wy * wx
          vals = table_ref[r + rx_ref[k, pw, j], pl.ds(c0, cb)].astype(jnp.float32)
          return acc + wj * vals

        return jax.lax.fori_loop(0, nx, x_body, acc)

      acc = jax.lax.fori_loop(0, ny, y_body, acc_zeros(cfg))
      # output_val /= count (a true division, as the reference).
      out_ref[k, ph, pw, pl.ds(c0, cb)] = (acc / cnt).astype(out_ref.dtype)
      return carry

    jax.lax.fori_loop(0, oh * ow, bin_body, 0)

  common._per_level(level_ref[k], tables, level_body)  # pylint: disable=protected-access


def call(kernel, grid, out_shape, cfg, *, aliases):
  """`kernel` on `grid` with `pl.kernel` over a Mosaic GPU mesh (or a `pallas_call` for the
  generic interpreter).

  aliases: {input index: output index}; those inputs (the zero-filled gradient tables) become
  `jax.new_ref`s that the kernel updates in place, and are returned frozen as the outputs.
  Without aliases: the outputs are `out_shape` (the forward).
  """
  if cfg.interpret is True:
    return pl.pallas_call(kernel, grid=grid, out_shape=out_shape, input_output_aliases=aliases,
                          interpret=True)
  if plgpu is None:
    raise RuntimeError("impl='mosaic' needs Mosaic GPU Pallas (jax.experimental.pallas.mosaic_gpu),"
                       " absent from this JAX")
  mesh = plgpu.Mesh(grid=tuple(grid), grid_names=GRID_NAMES[:len(grid)])
  kwargs = dict(mesh=mesh, name=getattr(kernel, "func", kernel).__name__)
  if cfg.interpret:
    if cfg.interpret != MOSAIC_GPU_INTERPRETER or InterpretGPUParams is None:
      raise RuntimeError(f"interpret={cfg.interpret!r}: Mosaic GPU's interpreter "
                         "(jax._src.pallas.mosaic_gpu.interpret, JAX >= 0.10) is needed")
    kwargs["interpret"] = InterpretGPUParams()
  else:
    # No automatic warpgroup barriers around every load and store: each thread reads and writes
    # only its own elements of a vector (the same layout everywhere), and programs never share
    # rows except through atomics.
    kwargs["compiler_params"] = plgpu.CompilerParams(unsafe_no_auto_barriers=True)
  if not aliases:
    return pl.kernel(kernel, out_type=out_shape, **kwargs)
  outs = out_shape if isinstance(out_shape, (tuple, list)) else (out_shape,)
  if sorted(aliases.values()) != list(range(len(outs))):
    raise ValueError(f"every output must be an aliased input, got {aliases} for {len(outs)}")
  run = pl.kernel(kernel, out_type=(), **kwargs)

  def launch(*args):
    refs = {o: jax.new_ref(args[i], memory_space=plgpu.GMEM) for i, o in aliases.items()}
    # The aliased inputs come last in every kernel here, in output order.
    plain = [a for i, a in enumerate(args) if i not in aliases]
    run(*plain, *[refs[o] for o in range(len(outs))])
    return tuple(jax.freeze(refs[o]) for o in range(len(outs)))

  return launch


__all__ = ["GRID_NAMES", "MOSAIC_GPU_INTERPRETER", "InterpretGPUParams", "acc_zeros", "atomic_add", "available", "call",
           "channel_block", "fwd_kernel", "interpreter_available", "program_id"]
