"""RPN head, box head, box predictor, mask head and MaskIoU head (Flax Linen, NHWC).

Names follow docs/internals.md. References: detectron2/modeling/proposal_generator/rpn.py
(StandardRPNHead), detectron2/modeling/roi_heads/box_head.py (FastRCNNConvFCHead),
fast_rcnn.py (FastRCNNOutputLayers), mask_head.py (MaskRCNNConvUpsampleHead),
mmdet/models/roi_heads/mask_heads/maskiou_head.py (MaskIoUHead), torchvision v2's 4conv1fc head.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import Conv, ConvTranspose2x2, Dense, Norm


def flatten_roi_features(x: jax.Array) -> jax.Array:
  """[R, h, w, C] -> [R, h * w * C] in NHWC order (row h*w*C + w*C + c).

  The converter permutes the first FC's rows from PyTorch's NCHW flatten to this order
  (parity_spec 2.9), so no transpose is needed at run time.
  """
  return x.reshape(x.shape[0], -1)


class RPNHead(nn.Module):
  """Shared 3x3 conv(s) + ReLU, then 1x1 objectness (A) and 1x1 deltas (4A) on every level.

  Input: one feature map [N, H, W, C]; returns (logits [N, H, W, A], deltas [N, H, W, A, 4]).
  Anchor index within a location is a (ratio order 0.5, 1, 2); deltas are (dx, dy, dw, dh).
  """
  num_anchors: int = 3
  num_convs: int = 1
  channels: int = 256
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    for i in range(self.num_convs):
      x = nn.relu(Conv(self.channels, 3, precision=self.precision, name=f"conv{i}",
                       kernel_init=nn.initializers.normal(0.01))(x))
    logits = Conv(self.num_anchors, 1, precision=self.precision, name="objectness",
                  kernel_init=nn.initializers.normal(0.01))(x)
    deltas = Conv(4 * self.num_anchors, 1, precision=self.precision, name="deltas",
                  kernel_init=nn.initializers.normal(0.01))(x)
    n, h, w, _ = deltas.shape
    return logits, deltas.reshape(n, h, w, self.num_anchors, 4)


class BoxHead(nn.Module):
  """`num_conv` x (3x3 conv [+ norm] + ReLU), flatten, `num_fc` x (FC + ReLU).

  mmdet/detectron2/torchvision v1: num_conv 0, num_fc 2 (fc1, fc2 of 1024).
  torchvision v2: num_conv 4 with BN (no conv bias), num_fc 1.
  Input [R, 7, 7, 256] -> [R, fc_dim].
  """
  num_conv: int = 0
  conv_dim: int = 256
  num_fc: int = 2
  fc_dim: int = 1024
  norm: Optional[str] = None
  norm_eps: float = 1e-5
  train: bool = False
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
    """x [R, 7, 7, C]; valid [R] bool: the real RoIs, the only ones in BN statistics (`Norm`)."""
    for i in range(self.num_conv):
      x = Conv(self.conv_dim, 3, use_bias=self.norm is None, precision=self.precision,
               name=f"conv{i}")(x)
      if self.norm is not None:
        x = Norm(self.norm, self.norm_eps, self.train, name=f"conv{i}_norm")(x, valid)
      x = nn.relu(x)
    x = flatten_roi_features(x)
    for i in range(self.num_fc):
      x = nn.relu(Dense(self.fc_dim, precision=self.precision, name=f"fc{i + 1}")(x))
    return x


class BoxPredictor(nn.Module):
  """Class logits [R, num_cls_outputs] and class-specific deltas [R, num_reg_classes, 4].

  mmdet/d2: 81 logits (background last) and 80 regression classes; torchvision: 91 logits
  (background first) and 91 regression classes (parity_spec 2.10).
  """
  num_cls_outputs: int
  num_reg_classes: int
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = Dense(self.num_cls_outputs, precision=self.precision, name="cls_score",
                   kernel_init=nn.initializers.normal(0.01))(x)
    deltas = Dense(4 * self.num_reg_classes, precision=self.precision, name="bbox_pred",
                   kernel_init=nn.initializers.normal(0.001))(x)
    return logits, deltas.reshape(x.shape[0], self.num_reg_classes, 4)


class MaskHead(nn.Module):
  """4 x (3x3 conv + ReLU) -> 2x2 stride-2 deconv + ReLU -> 1x1 conv to per-class logits.

  Input [R, 14, 14, 256] -> mask logits [R, 28, 28, num_classes].
  """
  num_classes: int
  num_conv: int = 4
  conv_dim: int = 256
  norm: Optional[str] = None
  norm_eps: float = 1e-5
  train: bool = False
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
    """x [R, 14, 14, C]; valid [R] bool: the real (positive) RoIs, the only ones in BN
    statistics (`Norm`)."""
    for i in range(self.num_conv):
      x = Conv(self.conv_dim, 3, use_bias=self.norm is None, precision=self.precision,
               name=f"conv{i + 1}")(x)
      if self.norm is not None:
        x = Norm(self.norm, self.norm_eps, self.train, name=f"conv{i + 1}_norm")(x, valid)
      x = nn.relu(x)
    x = nn.relu(ConvTranspose2x2(self.conv_dim, precision=self.precision, name="deconv")(x))
    return Conv(self.num_classes, 1, precision=self.precision, name="predictor",
                kernel_init=nn.initializers.normal(0.001))(x)


class MaskIoUHead(nn.Module):
  """Mask Scoring R-CNN's MaskIoU head (Huang et al. 2019; mmdet maskiou_head.py).

  Inputs: RoI features [R, 14, 14, 256] (the mask RoI extractor output, before the mask head) and
  the predicted class's mask logits [R, 28, 28]. The mask is sigmoid-ed and 2x2 max-pooled to
  14x14, concatenated as channel 257, then 4 x (3x3 conv + ReLU) with the 4th at stride 2,
  flatten, fc 1024 + ReLU, fc 1024 + ReLU, fc to num_classes (linear).
  Returns predicted mask IoU [R, num_classes].
  """
  num_classes: int = 80
  num_conv: int = 4
  conv_dim: int = 256
  fc_dim: int = 1024
  precision: Any = None

  @nn.compact
  def __call__(self, feats: jax.Array, mask_logits: jax.Array) -> jax.Array:
    probs = jax.nn.sigmoid(mask_logits)[..., None]
    pooled = nn.max_pool(probs, (2, 2), strides=(2, 2))
    x = jnp.concatenate([feats, pooled.astype(feats.dtype)], axis=-1)
    for i in range(self.num_conv):
      stride = 2 if i == self.num_conv - 1 else 1
      x = nn.relu(Conv(self.conv_dim, 3, stride, precision=self.precision,
                       name=f"conv{i + 1}")(x))
    x = flatten_roi_features(x)
    x = nn.relu(Dense(self.fc_dim, precision=self.precision, name="fc1")(x))
    x = nn.relu(Dense(self.fc_dim, precision=self.precision, name="fc2")(x))
    return Dense(self.num_classes, precision=self.precision, name="fc_mask_iou",
                 kernel_init=nn.initializers.normal(0.01))(x)
