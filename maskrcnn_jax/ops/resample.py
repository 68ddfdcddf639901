"""Torch's CPU bilinear resampling and fused multiply-add, reproduced bit for bit in numpy.

Host-side (numpy), shared by the image pipeline (`data.transforms`: torchvision's resize of the
normalized image) and the mask paste (`ops.paste`: torchvision's legacy paste). They live in ops so
that the paste, an op, does not import the data pipeline. Bitwise equal to torch 2.13 on x86-64
with FMA (golden/resize.npz, golden/mask_paste.npz).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def fma_f32(a, b, c) -> np.ndarray:
  """Correctly rounded float32 fused multiply-add a * b + c, elementwise (numpy has no fma).

  The float32 product is exact in float64, so float32(float64(a * b) + c) is the FMA except where
  the float64 sum lands exactly on a float32 rounding midpoint (double rounding). Only there (and
  near the subnormal / overflow range) the sum is made exact with TwoSum and rounded to odd, after
  which the rounding to float32 is correct (53 >= 2 * 24 + 2). This equals the hardware FMA that
  torch's x86-64 kernels use (gcc contracts `a * b + c`).

  Args:
    a, b, c: float32 arrays (broadcastable).

  Returns:
    float32 array, the broadcast shape.
  """
  a, b, c = (np.asarray(v, np.float32) for v in (a, b, c))
  p = a.astype(np.float64) * b
  with np.errstate(invalid="ignore", over="ignore"):
    s = np.atleast_1d(p + c)
    bits = s.view(np.uint64)
    # A float32 midpoint in float64: the 29 mantissa bits below float32's are exactly 1000...0.
    suspect = (bits & np.uint64(0x1FFFFFFF)) == np.uint64(0x10000000)
    exp = (bits >> np.uint64(52)) & np.uint64(0x7FF)
    suspect |= (exp < np.uint64(1023 - 125)) | (exp > np.uint64(1023 + 126))  # tiny / huge
    if np.any(suspect):
      pb = np.broadcast_to(p, s.shape)[suspect]
      cb = np.broadcast_to(c, s.shape)[suspect].astype(np.float64)
      sb = s[suspect]
      pv = sb - cb
      t = (cb - (sb - pv)) + (pb - pv)  # Knuth TwoSum residual: sb + t == p + c exactly.
      fix = np.isfinite(sb) & (t != 0) & ((sb.view(np.uint64) & np.uint64(1)) == 0)
      s[suspect] = np.where(fix, np.nextafter(sb, np.where(t > 0, np.inf, -np.inf)), sb)
    return s.astype(np.float32).reshape(np.broadcast_shapes(a.shape, b.shape, c.shape))


def linear_source_indices(in_size: int, out_size: int):
  """torch CPU `compute_source_index_and_lambda` (ATen/native/UpSample.h), align_corners=False.

  Returns i0, i1 int64 [out] and lambda0, lambda1 float32 [out]. The ratio is in/out in float32
  (`compute_scales_value` with no scale: recompute_scale_factor=True or an explicit size); the
  source index ratio * (dst + 0.5) - 0.5 is rounded once (double literals / FMA), clamped at 0.
  """
  if out_size == in_size:
    i = np.arange(out_size)
    return i, i, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
  ratio = np.float32(in_size) / np.float32(out_size)
  d = np.arange(out_size, dtype=np.float64) + 0.5
  src = (np.float64(ratio) * d - 0.5).astype(np.float32)  # exact product, one rounding
  src = np.maximum(src, np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  l1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
  i1 = i0 + (i0 < in_size - 1)
  l0 = (np.float32(1) - l1).astype(np.float32)
  return i0, i1, l0, l1


def torch_bilinear_kernel(channels: int, out_hw: Sequence[int], num_threads: int = 1) -> str:
  """Which torch CPU float kernel `F.interpolate(bilinear)` dispatches to (UpSampleKernel.cpp).

  'channels_last' (`cpu_upsample_linear_channels_last`) when out_h + out_w <= 128, or with one
  thread and 3 channels; otherwise 'generic' (`upsample_generic_Nd_kernel_impl`). (A channels-last
  input with C > 3 also takes the first; our inputs are NCHW.) The two sum in different orders and
  differ by up to 1 ulp.
  """
  if out_hw[0] + out_hw[1] <= 128 or (num_threads == 1 and channels == 3):
    return "channels_last"
  return "generic"


def torch_upsample_bilinear(x: np.ndarray, out_hw: Sequence[int], *,
                            kernel: str = "auto", num_threads: int = 1) -> np.ndarray:
  """Numpy twin of torch CPU `F.interpolate(x[None], size=out_hw, mode='bilinear')`.

  align_corners=False. Also what `F.interpolate(scale_factor=s, recompute_scale_factor=True)`
  computes once the output size floor(in * s) is known: torch then discards s and uses in/out
  (UpSample.h:compute_scales_value).

  Args:
    x: [C, H, W] float32.
    out_hw: (out_h, out_w).
    kernel: 'channels_last' | 'generic' | 'auto' (`torch_bilinear_kernel(C, out_hw, num_threads)`).
    num_threads: torch's thread count, only used by 'auto'.

  Returns:
    [C, out_h, out_w] float32, bitwise equal to torch 2.13 on x86-64 (FMA builds), see
    `bilinear_from_indices`.
  """
  x = np.asarray(x, np.float32)
  oh, ow = int(out_hw[0]), int(out_hw[1])
  if kernel == "auto":
    kernel = torch_bilinear_kernel(x.shape[0], (oh, ow), num_threads)
  return bilinear_from_indices(x, linear_source_indices(x.shape[1], oh),
                               linear_source_indices(x.shape[2], ow), kernel)


def bilinear_from_indices(x: np.ndarray, h_idx, w_idx, kernel: str) -> np.ndarray:
  """The bilinear sums of torch's CPU kernels for given (i0, i1, lambda0, lambda1) per axis.

  Args:
    x: [C, H, W] float32.
    h_idx, w_idx: `linear_source_indices` tuples (possibly a subset of the output rows / columns).
    kernel: 'channels_last' or 'generic' (`torch_bilinear_kernel`).

  Returns:
    [C, len(h_idx[0]), len(w_idx[0])] float32:
    * channels_last (`cpu_upsample_linear_channels_last`, scalar tail since C < vector width):
      w_ab = lambda_h * lambda_w (float32);
      out = fma(x11, w11, fma(x10, w10, fma(x00, w00, x01 * w01)))
      (gcc's contraction of i00*w00 + i01*w01 + i10*w10 + i11*w11);
    * generic (`upsample_generic_Nd_kernel_impl`, `Interpolate<2>`):
      t_h = fma(x_h,w0, lw0, x_h,w1 * lw1) for the two rows, out = fma(t0, lh0, t1 * lh1).
  """
  h0, h1, lh0, lh1 = h_idx
  w0, w1, lw0, lw1 = w_idx
  rows0, rows1 = x[:, h0], x[:, h1]
  x00, x01 = rows0[:, :, w0], rows0[:, :, w1]
  x10, x11 = rows1[:, :, w0], rows1[:, :, w1]
  if kernel == "channels_last":
    w00 = lh0[:, None] * lw0[None]
    w01 = lh0[:, None] * lw1[None]
    w10 = lh1[:, None] * lw0[None]
    w11 = lh1[:, None] * lw1[None]
    acc = x01 * w01
    acc = fma_f32(x00, np.broadcast_to(w00, acc.shape), acc)
    acc = fma_f32(x10, np.broadcast_to(w10, acc.shape), acc)
    return fma_f32(x11, np.broadcast_to(w11, acc.shape), acc)
  if kernel == "generic":
    lw0b = np.broadcast_to(lw0[None, None], x00.shape)
    lw1b = np.broadcast_to(lw1[None, None], x00.shape)
    t0 = fma_f32(x00, lw0b, x01 * lw1b)
    t1 = fma_f32(x10, lw0b, x11 * lw1b)
    lh0b = np.broadcast_to(lh0[None, :, None], t0.shape)
    lh1b = np.broadcast_to(lh1[None, :, None], t0.shape)
    return fma_f32(t0, lh0b, t1 * lh1b)
  raise ValueError(f"unknown kernel {kernel!r}; expected 'channels_last', 'generic' or 'auto'")
