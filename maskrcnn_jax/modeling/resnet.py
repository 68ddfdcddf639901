"""ResNet / ResNeXt backbones in caffe and pytorch style (He et al. 2016; Xie et al. 2017).

Names follow detectron2 (`res2`..`res5`, `stem`), see docs/internals.md for the variable tree.
References: detectron2/modeling/backbone/resnet.py (BottleneckBlock, BasicStem),
mmdet/models/backbones/resnet.py (Bottleneck, `style`), mmdet/models/backbones/resnext.py.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import flax.linen as nn
import jax

from maskrcnn_jax import errors
from maskrcnn_jax.modeling.layers import Conv, Norm

BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
                    152: (3, 8, 36, 3)}
# ResNet-18/34 use BasicBlock (detectron2 `build_resnet_backbone`: RES2_OUT_CHANNELS 64, no
# bottleneck width); no zoo Mask R-CNN uses them, they serve small from-scratch models.
BASIC_BLOCK_DEPTHS = (18, 34)


def stage_widths(groups: int, width_per_group: int) -> tuple[int, ...]:
  """Bottleneck width of res2..res5: floor(planes * base_width / 64) * groups (mmdet resnext.py).

  ResNet: (64, 128, 256, 512); X-101 32x4d: (128, 256, 512, 1024); 64x4d: (256, ..., 2048);
  32x8d: (256, 512, 1024, 2048).
  """
  return tuple(groups * width_per_group * 2**i for i in range(4))


class BasicBlock(nn.Module):
  """3x3 (stride) -> 3x3, with a projection shortcut when the shape changes (He et al. 2016;
  detectron2 `BasicBlock`). Input [N, H, W, C_in] -> [N, H / stride, W / stride, out_channels]."""
  out_channels: int
  stride: int
  has_shortcut: bool = False
  norm: str = "frozen_bn"
  norm_eps: float = 1e-5
  train: bool = False
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    y = Conv(self.out_channels, 3, self.stride, use_bias=False, precision=self.precision,
             name="conv1")(x)
    y = nn.relu(_norm(self, "norm1", y, mask))
    y = Conv(self.out_channels, 3, use_bias=False, precision=self.precision, name="conv2")(y)
    y = _norm(self, "norm2", y, mask)
    return nn.relu(_shortcut(self, x, mask) + y)


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
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
    y = Conv(self.width, 1, s1, use_bias=False, precision=self.precision, name="conv1")(x)
    y = nn.relu(_norm(self, "norm1", y, mask))
    y = Conv(self.width, 3, s3, dilation=self.dilation, groups=self.groups, use_bias=False,
             precision=self.precision, name="conv2")(y)
    y = nn.relu(_norm(self, "norm2", y, mask))
    y = Conv(self.out_channels, 1, use_bias=False, precision=self.precision, name="conv3")(y)
    y = _norm(self, "norm3", y, mask)
    return nn.relu(_shortcut(self, x, mask) + y)


# Helpers of the blocks' compact __call__ (BasicBlock, Bottleneck): the variables they create
# live under `block`.


def _norm(block: nn.Module, name: str, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """The block's norm layer `name` on x, with the batch-statistics mask (layers.Norm)."""
  return Norm(block.norm, block.norm_eps, block.train, parent=block, name=name)(x, mask)


def _shortcut(block: nn.Module, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """The identity, or the 1x1 strided projection + norm of the stage's first block (variables
  `shortcut`, `shortcut_norm`)."""
  if not block.has_shortcut:
    return x
  x = Conv(block.out_channels, 1, block.stride, use_bias=False, precision=block.precision,
           parent=block, name="shortcut")(x)
  return _norm(block, "shortcut_norm", x, mask)


def bottleneck_stage(x: jax.Array, *, stage: int, num_blocks: int, width: int, out_channels: int,
                     stride: int, dilation: int, groups: int, stride_in_1x1: bool, norm: str,
                     norm_eps: float, train: bool, precision: Any,
                     mask: Optional[jax.Array] = None) -> jax.Array:
  """The blocks `res{stage}_0 .. res{stage}_{num_blocks - 1}` of one stage, created as children of
  the calling compact module (the first block carries the stride and the projection shortcut).
  width 0 builds BasicBlocks (ResNet-18/34) instead of bottlenecks. `mask` [N] bool: the samples
  in the batch statistics of trainable BN (the C4 RoI head's padded RoI batch; layers.Norm).

  detectron2 `ResNet.make_stage(BottleneckBlock, num_blocks, stride_per_block=[stride, 1, ...])`.
  """
  if width == 0:  # BasicBlock stages (ResNet-18/34)
    for b in range(num_blocks):
      x = BasicBlock(
          out_channels=out_channels, stride=stride if b == 0 else 1,
          has_shortcut=b == 0 and (stride != 1 or x.shape[-1] != out_channels), norm=norm,
          norm_eps=norm_eps, train=train, precision=precision, name=f"res{stage}_{b}")(x, mask)
    return x
  for b in range(num_blocks):
    x = Bottleneck(
        width=width, out_channels=out_channels, stride=stride if b == 0 else 1, groups=groups,
        stride_in_1x1=stride_in_1x1, dilation=dilation, has_shortcut=b == 0, norm=norm,
        norm_eps=norm_eps, train=train, precision=precision, name=f"res{stage}_{b}")(x, mask)
  return x


class ResNet(nn.Module):
  """ResNet-50/101 and ResNeXt backbones returning C2..C5.

  Attributes:
    depth: 50 or 101 (152 also accepted; 18 / 34 build BasicBlocks, for small models, with
      res2_out_channels 64 as detectron2 requires).
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
      raise errors.ConfigError(
          f"unsupported ResNet depth {self.depth}; expected one of "
          f"{sorted(BLOCKS_PER_STAGE)}")
    x = Conv(self.stem_out_channels, 7, 2, use_bias=False, precision=self.precision,
             name="stem_conv")(x)
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
      if self.depth in BASIC_BLOCK_DEPTHS and dilation > 1:
        raise errors.ConfigError(
            "ResNet-18/34 with a dilated res5 is not supported (detectron2 neither)")
      x = bottleneck_stage(
          x, stage=stage, num_blocks=n_blocks,
          width=0 if self.depth in BASIC_BLOCK_DEPTHS else width,
          out_channels=self.res2_out_channels * 2**i,
          stride=1 if stage == 2 or dilation > 1 else 2, dilation=dilation, groups=self.groups,
          stride_in_1x1=self.stride_in_1x1, norm=self.norm, norm_eps=self.norm_eps,
          train=self.train, precision=self.precision)
      if self.freeze_at >= stage:
        x = jax.lax.stop_gradient(x)
      outputs[f"c{stage}"] = x
    return outputs


class Res5Head(nn.Module):
  """res5 as the shared RoI head of the C4 models (detectron2 `Res5ROIHeads._build_res5_block`;
  He et al. 2016, appendix A): 3 bottleneck blocks, the first with stride 2 (in the 1x1 or the 3x3
  conv per style), width groups * width_per_group * 8, output res2_out_channels * 8.

  Input: RoI features pooled from res4, [R, 14, 14, res2_out_channels * 4] -> [R, 7, 7,
  res2_out_channels * 8]. Variables `res5_0 .. res5_2` as in the backbone (detectron2
  `roi_heads.res5.{0,1,2}`).
  """
  groups: int = 1
  width_per_group: int = 64
  stride_in_1x1: bool = False
  norm: str = "frozen_bn"
  norm_eps: float = 1e-5
  res2_out_channels: int = 256
  train: bool = False
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """x [R, 14, 14, C]; mask [R] bool: the real RoIs (trainable BN statistics, layers.Norm)."""
    return bottleneck_stage(
        x, stage=5, num_blocks=3, width=stage_widths(self.groups, self.width_per_group)[3],
        out_channels=self.res2_out_channels * 8, stride=2, dilation=1, groups=self.groups,
        stride_in_1x1=self.stride_in_1x1, norm=self.norm, norm_eps=self.norm_eps,
        train=self.train, precision=self.precision, mask=mask)
