"""Feature Pyramid Network (Lin et al. 2017), P2..P6 with P6 = stride-2 subsampling of P5.

References: detectron2/modeling/backbone/fpn.py (FPN, LastLevelMaxPool),
mmdet/models/necks/fpn.py (add_extra_convs=False, num_outs=5), torchvision/ops/feature_pyramid_network.py.
All three: lateral 1x1, top-down nearest x2 upsampling added, 3x3 output conv, no activation;
P6 = max_pool(k=1, s=2) of the P5 *output* (parity_spec 3.6).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import Conv, Norm


def upsample_nearest_2x(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Nearest x2 upsampling to `out_hw`: out[y, x] = in[y // 2, x // 2].

  Padded sizes are multiples of 32, so out_hw == 2 * in_hw for P2..P5; the crop handles the
  general case the way torch's `interpolate(size=...)` does for exact multiples.
  x: [N, h, w, C] -> [N, out_h, out_w, C].
  """
  y = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return y[:, :out_hw[0], :out_hw[1]]


class FPN(nn.Module):
  """Top-down FPN over C2..C5.

  Attributes:
    out_channels: 256.
    norm: None (mmdet, detectron2, torchvision v1) or 'bn' / 'frozen_bn' (torchvision v2, where
      the convs then have no bias).
  Input dict 'c2'..'c5' [N, H/s, W/s, C_s] -> dict 'p2'..'p6' [N, H/s, W/s, 256], s = 4..64.
  """
  out_channels: int = 256
  norm: Optional[str] = None
  norm_eps: float = 1e-5
  train: bool = False
  precision: Any = None

  @nn.compact
  def __call__(self, feats: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    use_bias = self.norm is None

    def conv_norm(x, k, name):
      x = Conv(self.out_channels, k, use_bias=use_bias, precision=self.precision, name=name)(x)
      if self.norm is not None:
        x = Norm(self.norm, self.norm_eps, self.train, name=f"{name}_norm")(x)
      return x

    laterals = {l: conv_norm(feats[f"c{l}"], 1, f"lateral{l}") for l in (2, 3, 4, 5)}
    top = laterals[5]
    outs = {5: conv_norm(top, 3, "output5")}
    for l in (4, 3, 2):
      lat = laterals[l]
      top = lat + upsample_nearest_2x(top, lat.shape[1:3])
      outs[l] = conv_norm(top, 3, f"output{l}")
    result = {f"p{l}": outs[l] for l in (2, 3, 4, 5)}
    result["p6"] = outs[5][:, ::2, ::2]
    return result
