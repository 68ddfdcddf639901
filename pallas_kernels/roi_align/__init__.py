"""RoIAlign for maskrcnn_jax: a pure-JAX reference (this package imports only JAX).

`roi_align(..., impl='reference')` dispatches to an implementation; only 'reference' exists so far
(`reference.py`). A Pallas kernel will register here under another name and must pass the same
tests (`test_roi_align.py`).
"""
from __future__ import annotations

from pallas_kernels.roi_align import reference

IMPLS = ("reference",)


def roi_align(features, boxes, batch_idx, *, output_size, spatial_scale, sampling_ratio, aligned,
              max_grid=None, roi_chunk=None, impl="reference"):
  """RoIAlign, NHWC; see `reference.roi_align` for the arguments, shapes and semantics.

  Args:
    features: [N, H, W, C] float32 / bfloat16. boxes: [K, 4] float32 (x1, y1, x2, y2) image
      pixels. batch_idx: [K] int32.
    impl: 'reference' (pure JAX).

  Returns:
    [K, oh, ow, C] in features.dtype.
  """
  if impl != "reference":
    raise ValueError(f"unknown roi_align impl {impl!r}; available: {IMPLS}")
  return reference.roi_align(features, boxes, batch_idx, output_size=output_size,
                             spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                             aligned=aligned, max_grid=max_grid, roi_chunk=roi_chunk)


def roi_align_pyramid(features, boxes, batch_idx, levels, *, spatial_scales, output_size,
                      sampling_ratio, aligned, max_grid=None, roi_chunk=None, impl="reference"):
  """Each RoI pooled once from its own level; see `reference.roi_align_pyramid`.

  Args:
    features: L arrays [N, H_l, W_l, C]. boxes: [K, 4] float32 (x1, y1, x2, y2) image pixels.
    batch_idx: [K] int32. levels: [K] int32 in [0, L).
    impl: 'reference' (pure JAX).

  Returns:
    [K, oh, ow, C] in the features' dtype.
  """
  if impl != "reference":
    raise ValueError(f"unknown roi_align impl {impl!r}; available: {IMPLS}")
  return reference.roi_align_pyramid(features, boxes, batch_idx, levels,
                                     spatial_scales=spatial_scales, output_size=output_size,
                                     sampling_ratio=sampling_ratio, aligned=aligned,
                                     max_grid=max_grid, roi_chunk=roi_chunk)


__all__ = ["IMPLS", "reference", "roi_align", "roi_align_pyramid"]
