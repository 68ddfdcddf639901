"""Small building blocks shared by the backbone and the heads (NHWC, float32 by default).

PyTorch's `padding=k // 2` is symmetric; Flax's 'SAME' pads asymmetrically for stride-2 convs
(parity_spec 3.4), so every conv here takes explicit symmetric padding.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax import errors

Dtype = Any


class Conv(nn.Module):
  """A 2-D convolution with PyTorch's symmetric padding.

  Attributes:
    features: output channels.
    kernel_size: square kernel side k; padding is k // 2 * dilation on every side.
    strides: stride on both axes.
    dilation: kernel dilation on both axes.
    groups: feature_group_count (ResNeXt).
    use_bias: whether the conv has a bias.
  Input [N, H, W, C_in] -> output [N, H', W', features].
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  dilation: int = 1
  groups: int = 1
  use_bias: bool = True
  dtype: Optional[Dtype] = None
  precision: Any = None
  kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = (self.kernel_size // 2) * self.dilation
    kernel = self.param(
        "kernel", self.kernel_init,
        (self.kernel_size, self.kernel_size, x.shape[-1] // self.groups, self.features),
        jnp.float32)
    dtype = self.dtype or x.dtype
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), kernel.astype(dtype),
        window_strides=(self.strides, self.strides),
        padding=((pad, pad), (pad, pad)),
        rhs_dilation=(self.dilation, self.dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.groups,
        precision=self.precision,
    )
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(dtype)
    return y


class FrozenBatchNorm(nn.Module):
  """Inference-form BatchNorm: y = (x - mean) * scale / sqrt(var + eps) + bias.

  The frozen statistics of detectron2's FrozenBatchNorm2d, torchvision's FrozenBatchNorm2d and
  mmdetection's BatchNorm2d in eval mode (parity_spec 3.5). Variables follow flax.linen.BatchNorm:
  params {scale, bias} and batch_stats {mean, var}, all (C,) float32, so a converted checkpoint fits
  either module. Nothing here is trained: gradients are stopped.
  """
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _frozen_bn(self, x)


class Norm(nn.Module):
  """Selects the norm layer by name: 'frozen_bn', 'bn' (trainable BatchNorm) or 'gn' (GroupNorm 32).

  `train` only matters for 'bn', which then uses and updates batch statistics.
  Call with x [N, H, W, C] and optionally `mask` [N] bool: the samples that count in the 'bn'
  batch statistics. The RoI heads pass it because their RoI batches are padded to a static size
  (the mask head's slots beyond the positives, the sampler's slots beyond the proposals), and
  the references run their heads on the real RoIs only (torchvision's v2 heads with
  nn.BatchNorm2d, detectron2 / mmdet heads with norm 'BN' / 'SyncBN'). Masked-out samples are
  normalized with the statistics of the others. 'frozen_bn' and 'gn' (per sample) ignore it.
  """
  kind: str = "frozen_bn"
  epsilon: float = 1e-5
  train: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    if self.kind == "frozen_bn":
      return _frozen_bn(self, x)
    if self.kind == "bn":
      return _bn_here(self, x, mask)
    if self.kind == "gn":
      return _gn_here(self, x)
    raise errors.ConfigError(f"unknown norm kind {self.kind!r}; expected 'frozen_bn', 'bn' or 'gn'")


def _frozen_bn(m: nn.Module, x: jax.Array) -> jax.Array:
  """Frozen BN body; variables are created directly under `m` (no extra nesting level)."""
  c = x.shape[-1]
  scale = m.param("scale", nn.initializers.ones, (c,), jnp.float32)
  bias = m.param("bias", nn.initializers.zeros, (c,), jnp.float32)
  mean = m.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32)).value
  var = m.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32)).value
  # Folded as torchvision/detectron2 FrozenBatchNorm2d.forward: scale = w * rsqrt(rv + eps),
  # shift = b - rm * scale, y = x * scale + shift.
  s = jax.lax.stop_gradient(scale * jax.lax.rsqrt(var + m.epsilon))
  shift = jax.lax.stop_gradient(bias - mean * s)
  return x * s.astype(x.dtype) + shift.astype(x.dtype)


def _bn_here(m: nn.Module, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
  """Trainable BatchNorm with the same variable names as flax.linen.BatchNorm (momentum 0.9).

  `mask` [N] (see `Norm`): statistics over the masked-in samples only; with none of them (a batch
  without a positive RoI) the running statistics are left as they are.
  """
  c = x.shape[-1]
  scale = m.param("scale", nn.initializers.ones, (c,), jnp.float32)
  bias = m.param("bias", nn.initializers.zeros, (c,), jnp.float32)
  ra_mean = m.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
  ra_var = m.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
  if m.train:
    xf = x.astype(jnp.float32)
    pixels = xf.shape[1] * xf.shape[2]
    if mask is None:
      n = xf.shape[0] * pixels
      mean = jnp.mean(xf, axis=(0, 1, 2))
      var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
      any_counted = True
    else:
      w = mask.astype(jnp.float32).reshape(-1, 1, 1, 1)
      n = jnp.sum(w) * pixels
      denom = jnp.maximum(n, 1.0)
      mean = jnp.sum(xf * w, axis=(0, 1, 2)) / denom
      var = jnp.sum(jnp.square(xf - mean) * w, axis=(0, 1, 2)) / denom
      any_counted = n > 0
    if not m.is_initializing():
      # PyTorch momentum 0.1 on the running statistics (unbiased variance as torch keeps it).
      unbiased = var * (n / jnp.maximum(n - 1, 1))
      ra_mean.value = jnp.where(any_counted, 0.9 * ra_mean.value + 0.1 * mean, ra_mean.value)
      ra_var.value = jnp.where(any_counted, 0.9 * ra_var.value + 0.1 * unbiased, ra_var.value)
  else:
    mean, var = ra_mean.value, ra_var.value
  s = scale * jax.lax.rsqrt(var + m.epsilon)
  return (x * s.astype(x.dtype) + (bias - mean * s).astype(x.dtype))


def _gn_here(m: nn.Module, x: jax.Array, groups: int = 32) -> jax.Array:
  c = x.shape[-1]
  scale = m.param("scale", nn.initializers.ones, (c,), jnp.float32)
  bias = m.param("bias", nn.initializers.zeros, (c,), jnp.float32)
  if c % groups:
    raise errors.ConfigError(
        f"GroupNorm({groups}) at {'/'.join(m.scope.path)} needs a channel count "
        f"divisible by {groups}, got {c}: choose widths that are multiples of "
        f"{groups} or another norm")
  n, h, w, _ = x.shape
  xg = x.astype(jnp.float32).reshape(n, h, w, groups, c // groups)
  mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
  xg = (xg - mean) * jax.lax.rsqrt(var + m.epsilon)
  return (xg.reshape(n, h, w, c) * scale + bias).astype(x.dtype)


class ConvTranspose2x2(nn.Module):
  """ConvTranspose2d(kernel 2, stride 2, padding 0) as an einsum plus depth-to-space.

  The 2x2 windows do not overlap, so out[n, 2i+a, 2j+b, o] = bias[o] + sum_c x[n,i,j,c] k[a,b,c,o]
  exactly (parity_spec 2.9), with no kernel-flip convention to get wrong. The kernel is
  (2, 2, C_in, C_out); converted from torch (C_in, C_out, 2, 2) by transpose(2, 3, 0, 1).
  Input [N, H, W, C_in] -> [N, 2H, 2W, C_out].
  """
  features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                        (2, 2, c, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    n, h, w, _ = x.shape
    y = jnp.einsum("nhwc,abco->nhawbo", x, kernel.astype(x.dtype), precision=self.precision)
    return y.reshape(n, 2 * h, 2 * w, self.features) + bias.astype(x.dtype)


class Dense(nn.Module):
  """nn.Dense with PyTorch Linear's role; kernel (in, out), bias (out,)."""
  features: int
  precision: Any = None
  kernel_init: Callable = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return jnp.dot(x, kernel.astype(x.dtype), precision=self.precision) + bias.astype(x.dtype)
