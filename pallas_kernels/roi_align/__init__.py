"""RoIAlign for maskrcnn_jax: a pure-JAX reference and Pallas kernels behind one entry point.

`roi_align(..., impl=...)` and `roi_align_pyramid(..., impl=...)` dispatch to an implementation:

* 'reference': pure JAX (`reference.py`), any backend; the CPU default.
* 'pallas': the Pallas kernels (`kernel.py`, Triton lowering), natively on a GPU.
* 'interpret': the same kernels run by the Pallas interpreter on any backend (tests on CPU).
* 'mosaic': the kernels in Mosaic GPU (`kernel_mosaic.py`), natively on a Hopper (or newer) GPU.
* 'mosaic_interpret': the Mosaic GPU kernel bodies run by the Pallas interpreter on any backend
  (`kernel_mosaic.py` says how Mosaic GPU's own, much slower, interpreter is also used in tests).
* 'auto' (default): the implementation `AUTO_PALLAS_DEVICE_KINDS` names for this GPU's
  `device_kind` (where scripts/benchmark_roi_align.py measured it faster than the reference), else
  'reference'. The table is empty until a GPU benchmark fills it, so 'auto' is 'reference'
  everywhere today. `auto_impl(impl)` overrides what 'auto' means inside a `with` block.

All implementations follow the same semantics (`reference.py`, parity_spec 3.11) and pass the same
tests (`test_roi_align.py`). Differences: the kernels return no gradient w.r.t. the boxes (as
torchvision / mmcv; the reference differentiates through the sampling weights), accumulate the
bfloat16 gradient in float32, ignore `roi_chunk`, and take `deterministic` (see `roi_align`).
See pallas_kernels/README.md for what runs where.
"""
from __future__ import annotations

import contextlib
import threading

import jax

from pallas_kernels.roi_align import reference

IMPLS = ("reference", "pallas", "interpret", "mosaic", "mosaic_interpret")
# The kernel implementations: (native, interpreted) pairs.
KERNEL_IMPLS = ("pallas", "interpret", "mosaic", "mosaic_interpret")

# GPUs (jax.devices()[0].device_kind) on which impl='auto' picks a kernel: device kind -> (impl,
# the measurement that justified it: scripts/gpu_check.sh or scripts/benchmark_roi_align.py,
# forward+backward at the training shapes, kernels vs reference, on that device and JAX version).
# Empty: no GPU benchmark has been run yet, so 'auto' = 'reference' everywhere. Example entry:
#   "NVIDIA H100 80GB HBM3": ("mosaic", "jax 0.11.2: fwd+bwd 2x512 RoIs 7x7 3.4x (README table)"),
AUTO_PALLAS_DEVICE_KINDS: dict[str, tuple[str, str]] = {}

_local = threading.local()


@contextlib.contextmanager
def auto_impl(impl: str | None):
  """Within the block, impl='auto' resolves to `impl` (None: the default rule). Trace-time only:
  functions jitted inside the block keep the choice made when they were traced."""
  if impl is not None and impl not in IMPLS:
    raise ValueError(f"unknown roi_align impl {impl!r}; available: {IMPLS}")
  old = getattr(_local, "auto", None)
  _local.auto = impl
  try:
    yield
  finally:
    _local.auto = old


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _on_hopper() -> bool:
  """A GPU of compute capability 9.0 or newer (Mosaic GPU's targets)."""
  if not _on_gpu():
    return False
  capability = getattr(jax.devices()[0], "compute_capability", "0.0")
  try:
    return int(str(capability).split(".")[0]) >= 9
  except ValueError:
    return False


def available_impls() -> tuple[str, ...]:
  """The implementations that run on this process's default backend."""
  from pallas_kernels.roi_align import kernel_mosaic
  impls = ("reference", "interpret", "mosaic_interpret")
  if _on_gpu():
    impls += ("pallas",)
  if _on_hopper() and kernel_mosaic.available():
    impls += ("mosaic",)
  return impls


def resolve_impl(impl: str) -> str:
  """'auto' -> a concrete implementation (see the module docstring); checks the others."""
  if impl == "auto":
    override = getattr(_local, "auto", None)
    if override is not None:
      return override
    if _on_gpu() and jax.devices()[0].device_kind in AUTO_PALLAS_DEVICE_KINDS:
      return AUTO_PALLAS_DEVICE_KINDS[jax.devices()[0].device_kind][0]
    return "reference"
  if impl not in IMPLS:
    raise ValueError(f"unknown roi_align impl {impl!r}; available: {IMPLS} or 'auto'")
  if impl == "pallas" and not _on_gpu():
    raise ValueError(f"impl='pallas' runs natively on a GPU only (default backend here: "
                     f"{jax.default_backend()!r}); impl='interpret' runs the same kernels here")
  if impl == "mosaic" and not _on_hopper():
    raise ValueError(f"impl='mosaic' runs natively on a Hopper (sm_90) or newer GPU only (default "
                     f"backend here: {jax.default_backend()!r}); impl='mosaic_interpret' runs the "
                     "same kernels here")
  return impl


def _kernel_dtype_fallback(impl: str, features) -> str:
  """resolve_impl(impl), except that 'auto' keeps features the kernels do not take (float16) on
  the reference."""
  resolved = resolve_impl(impl)
  if impl == "auto" and resolved != "reference" and any(
      jax.numpy.result_type(f) not in (jax.numpy.float32, jax.numpy.bfloat16) for f in features):
    return "reference"
  return resolved


def _pool_kwargs(impl: str):
  """kernel.pool_levels arguments of a kernel implementation."""
  return dict(interpret=impl in ("interpret", "mosaic_interpret"),
              lowering="mosaic" if impl.startswith("mosaic") else "triton")


def roi_align(features, boxes, batch_idx, *, output_size, spatial_scale, sampling_ratio, aligned,
              max_grid=None, roi_chunk=None, impl="auto", deterministic=False):
  """RoIAlign, NHWC; see `reference.roi_align` for the arguments, shapes and semantics.

  Args:
    features: [N, H, W, C] float32 / bfloat16. boxes: [K, 4] float32 (x1, y1, x2, y2) image
      pixels. batch_idx: [K] int32.
    output_size: int or (oh, ow). spatial_scale: float (may be traced). sampling_ratio: int, 0 =
      adaptive (needs max_grid). aligned: bool.
    max_grid: static bound of the adaptive grid (required for sampling_ratio 0).
    roi_chunk: RoIs per step of the reference ('reference' only).
    impl: 'auto' | 'reference' | 'pallas' | 'interpret' | 'mosaic' | 'mosaic_interpret' (module
      docstring).
    deterministic: kernels only: a bitwise reproducible backward (band-owner kernel, no atomics)
      instead of the atomic one. The reference's backward is XLA's scatter-add (deterministic on
      CPU; on GPU as XLA's flags make it).

  Returns:
    [K, oh, ow, C] in features.dtype.
  """
  impl = _kernel_dtype_fallback(impl, [features])
  if impl == "reference":
    return reference.roi_align(features, boxes, batch_idx, output_size=output_size,
                               spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                               aligned=aligned, max_grid=max_grid, roi_chunk=roi_chunk)
  from pallas_kernels.roi_align import kernel
  return kernel.pool_levels([features], boxes, batch_idx, None, spatial_scales=[spatial_scale],
                            output_size=output_size, sampling_ratio=sampling_ratio,
                            aligned=aligned, max_grid=max_grid, deterministic=deterministic,
                            **_pool_kwargs(impl))


def roi_align_pyramid(features, boxes, batch_idx, levels, *, spatial_scales, output_size,
                      sampling_ratio, aligned, max_grid=None, roi_chunk=None, impl="auto",
                      deterministic=False):
  """Each RoI pooled once from its own level; see `reference.roi_align_pyramid`.

  Args:
    features: L arrays [N, H_l, W_l, C]. boxes: [K, 4] float32 (x1, y1, x2, y2) image pixels.
    batch_idx: [K] int32. levels: [K] int32 in [0, L).
    impl, deterministic: as in `roi_align`. The kernels read every level in place (no
      concatenated copy of the pyramid) and return the gradient per level.

  Returns:
    [K, oh, ow, C] in the features' dtype.
  """
  impl = _kernel_dtype_fallback(impl, features)
  if impl == "reference":
    return reference.roi_align_pyramid(features, boxes, batch_idx, levels,
                                       spatial_scales=spatial_scales, output_size=output_size,
                                       sampling_ratio=sampling_ratio, aligned=aligned,
                                       max_grid=max_grid, roi_chunk=roi_chunk)
  from pallas_kernels.roi_align import kernel
  return kernel.pool_levels(list(features), boxes, batch_idx, levels,
                            spatial_scales=spatial_scales, output_size=output_size,
                            sampling_ratio=sampling_ratio, aligned=aligned, max_grid=max_grid,
                            deterministic=deterministic, **_pool_kwargs(impl))


__all__ = ["AUTO_PALLAS_DEVICE_KINDS", "IMPLS", "KERNEL_IMPLS", "auto_impl", "available_impls", "reference",
           "resolve_impl", "roi_align", "roi_align_pyramid"]
