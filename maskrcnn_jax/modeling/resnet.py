"""ResNet / ResNeXt backbones in caffe and pytorch style (He et al. 2016; Xie et al. 2017).

Names follow detectron2 (`res2`..`res5`, `stem`), see docs/internals.md for the variable tree.
References: detectron2/modeling/backbone/resnet.py (BottleneckBlock, BasicStem),
mmdet/models/backbones/resnet.py (Bottleneck, `style`), mmdet/models/backbones/resnext.py.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import Conv, Norm

BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def stage_widths(groups: int, width_per_group: int) -> tuple[int, ...]:
  """Bottleneck width of res2..res5: floor(planes * base_width / 64) * groups (mmdet resnext.py).

  ResNet: (64, 128, 256, 512); X-101 32x4d: (128, 256, 512, 1024); 64x4d: (256, ..., 2048);
  32x8d: (256, 512, 1024, 2048).
  """
  return tuple(groups * width_per_group * 2**i for i in range(4))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (groups) -> 1x1 with a projection shortcut on the first block of a stage.

  `stride_in_1x1` puts the stage stride on conv1 (caffe style / detectron2 MSRA weights) instead
  of conv2 (pytorch style, torchvision). The shortcut always carries the stride.
  Input [N, H, W, C_in] -> [N, H / stride, W / stride, out_channels].
  """
  width: int
  out_channels: int
  stride: int
  groups: int
  stride_in_1x1: bool
  dilation: int = 1
  has_shortcut: bool = False
  norm: str = "frozen_bn"
  norm_eps: float = 1e-5
  train: bool = False
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
    norm = lambda name: Norm(self.norm, self.norm_eps, self.train, name=name)
    y = Conv(self.width, 1, s1, use_bias=False, precision=self.precision, name="conv1")(x)
    y = nn.relu(norm("norm1")(y))
    y = Conv(self.width, 3, s3, dilation=self.dilation, groups=self.groups, use_bias=False,
             precision=self.precision, name="conv2")(y)
    y = nn.relu(norm("norm2")(y))
    y = Conv(self.out_channels, 1, use_bias=False, precision=self.precision, name="conv3")(y)
    y = norm("norm3")(y)
    if self.has_shortcut:
      x = Conv(self.out_channels, 1, self.stride, use_bias=False, precision=self.precision,
               name="shortcut")(x)
      x = norm("shortcut_norm")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet-50/101 and ResNeXt backbones returning C2..C5.

  Attributes:
    depth: 50 or 101 (152 also accepted).
    groups, width_per_group: 1/64 for ResNet; 32/4, 64/4, 32/8 for ResNeXt.
    stride_in_1x1: caffe style (True) or pytorch style (False).
    norm: 'frozen_bn' | 'bn' | 'gn'; norm_eps: 1e-5, or 0.0 for torchvision v1 weights.
    freeze_at: 0 trains everything; 1 freezes the stem; k freezes the stem and res2..res(k)
      (detectron2 FREEZE_AT, mmdet frozen_stages + 1); implemented with stop_gradient.
    res5_dilation: 2 for the DC5 variant (stride 1, dilation 2 in res5).
    stem_out_channels, res2_out_channels: 64 and 256 (detectron2 RESNETS.STEM_OUT_CHANNELS /
      RES2_OUT_CHANNELS); stage i's output has res2_out_channels * 2**(i-2) channels. Smaller
      values make the narrow from-scratch models of configs/quickstart.py.
    last_stage: the last stage built (5, or 4 for the C4 backbone, whose res5 runs in the
      RoI head).
  Input [N, H, W, 3] float32 (normalized, padded to a multiple of 32) -> dict 'c2'..'c5' of
  [N, H/4, W/4, 256 * e] ... [N, H/32, W/32, 2048 * e] features.
  """
  depth: int = 50
  groups: int = 1
  width_per_group: int = 64
  stride_in_1x1: bool = False
  norm: str = "frozen_bn"
  norm_eps: float = 1e-5
  freeze_at: int = 2
  res5_dilation: int = 1
  stem_out_channels: int = 64
  res2_out_channels: int = 256
  last_stage: int = 5
  train: bool = False
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> Dict[str, jax.Array]:
    if self.depth not in BLOCKS_PER_STAGE:
      raise ValueError(f"unsupported ResNet depth {self.depth}; expected one of "
                       f"{sorted(BLOCKS_PER_STAGE)}")
    x = Conv(self.stem_out_channels, 7, 2, use_bias=False, precision=self.precision, name="stem_conv")(x)
    x = nn.relu(Norm(self.norm, self.norm_eps, self.train, name="stem_norm")(x))
    # 3x3 stride-2 max-pool with padding 1, padded with -inf (torch MaxPool2d semantics).
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    if self.freeze_at >= 1:
      x = jax.lax.stop_gradient(x)
    outputs = {}
    widths = stage_widths(self.groups, self.width_per_group)
    for i, (n_blocks, width) in enumerate(zip(BLOCKS_PER_STAGE[self.depth], widths)):
      stage = i + 2
      if stage > self.last_stage:
        break
      dilation = self.res5_dilation if stage == 5 else 1
      stride = 1 if stage == 2 or dilation > 1 else 2
      for b in range(n_blocks):
        x = Bottleneck(
            width=width, out_channels=self.res2_out_channels * 2**i, stride=stride if b == 0 else 1,
            groups=self.groups, stride_in_1x1=self.stride_in_1x1, dilation=dilation,
            has_shortcut=b == 0, norm=self.norm, norm_eps=self.norm_eps, train=self.train,
            precision=self.precision, name=f"res{stage}_{b}")(x)
      if self.freeze_at >= stage:
        x = jax.lax.stop_gradient(x)
      outputs[f"c{stage}"] = x
    return outputs
