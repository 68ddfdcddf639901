"""Mask R-CNN / Mask Scoring R-CNN losses per convention (parity_spec 4.2).

Per term (B = images in the batch, "#sampled" = sampled anchors / RoIs of the whole batch):
* rpn_cls: BCE; mmdet sum / #sampled; detectron2 sum / (256 B); torchvision mean over sampled.
* rpn_box: mmdet L1 sum / #sampled; detectron2 smooth-L1 beta 0 (= L1) sum / (256 B);
  torchvision smooth-L1 beta 1/9 sum / #sampled.
* cls: softmax cross-entropy, mean over the sampled RoIs (all three).
* box: class-specific; mmdet L1, detectron2 smooth-L1 beta 0, torchvision smooth-L1 beta 1/9;
  sum over positives / #sampled RoIs.
* mask: BCE on the GT class's channel, mean over #positives x 28 x 28 (all three).
* mask_iou: MSE x 0.5 over the positives whose IoU target is > 0 (mmdet MaskIoUHead.loss).

"#sampled" counts over the whole batch given (the references concatenate the images of a GPU
before normalizing). With data parallelism the references normalize per GPU and average the
gradients; here the batch passed in is the normalization unit (the global batch under a sharded
jit), which makes the loss independent of the device count. Sources: mmdet
`dense_heads/anchor_head.py:loss`, `roi_heads/bbox_heads/bbox_head.py:loss`,
`mask_heads/fcn_mask_head.py:loss`, `mask_heads/maskiou_head.py:loss`; detectron2
`proposal_generator/rpn.py:losses`, `roi_heads/fast_rcnn.py:losses`,
`roi_heads/mask_head.py:mask_rcnn_loss`; torchvision `models/detection/rpn.py:compute_loss`,
`roi_heads.py:fastrcnn_loss, maskrcnn_loss`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from maskrcnn_jax import conventions as conventions_lib


def sigmoid_bce(logits, targets):
  """Elementwise binary cross-entropy with logits (torch `binary_cross_entropy_with_logits`).

  logits, targets: same shape float32 (targets may be soft, in [0, 1]).
  """
  logits = logits.astype(jnp.float32)
  return (jnp.maximum(logits, 0) - logits * targets
          + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def smooth_l1(diff, beta: float):
  """Elementwise smooth-L1 of `diff` (fvcore / torchvision form); beta 0 is exactly |diff|."""
  a = jnp.abs(diff)
  if beta == 0:
    return a
  return jnp.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)


def _safe_div(a, b):
  return a / jnp.maximum(b, 1.0)


def rpn_losses(objectness, deltas, pos, neg, box_targets, *,
               convention: conventions_lib.Convention, num_samples_per_image: int = 256):
  """RPN objectness and box losses over a batch.

  Args:
    objectness: [B, A] float32 logits, all levels concatenated (anchor order).
    deltas: [B, A, 4] float32 predicted (dx, dy, dw, dh).
    pos, neg: [B, A] bool sampled positives / negatives (`targets.rpn_targets`).
    box_targets: [B, A, 4] float32 (0 where not positive).
    convention: selects the loss form and normalizer.
    num_samples_per_image: the sampler's batch size per image (d2 normalizer).

  Returns dict(loss_rpn_cls, loss_rpn_box) of float32 scalars.
  """
  f32 = jnp.float32
  sampled = (pos | neg).astype(f32)
  bce = sigmoid_bce(objectness, pos.astype(f32)) * sampled
  reg = smooth_l1(deltas.astype(f32) - box_targets, convention.box_loss_beta)
  reg = jnp.sum(reg, axis=-1) * pos.astype(f32)
  if convention.rpn_loss_normalizer == "batch":
    norm = f32(num_samples_per_image * objectness.shape[0])
  else:
    norm = jnp.sum(sampled)
  return dict(loss_rpn_cls=_safe_div(jnp.sum(bce), norm),
              loss_rpn_box=_safe_div(jnp.sum(reg), norm))


def rcnn_losses(cls_logits, deltas, classes, valid, pos, box_targets, reg_class, *,
                convention: conventions_lib.Convention):
  """R-CNN classification and class-specific box regression losses over a batch.

  Args:
    cls_logits: [B, R, K_cls] float32.
    deltas: [B, R, K_reg, 4] float32 class-specific predictions.
    classes: [B, R] int32 target class in the model's layout (background included).
    valid: [B, R] bool sampled RoIs.
    pos: [B, R] bool positives.
    box_targets: [B, R, 4] float32.
    reg_class: [B, R] int32 regression slot of each positive (bg_last: the class; bg_first: the
      class index including the background slot 0); ignored for non-positives.

  Returns dict(loss_cls, loss_box).
  """
  f32 = jnp.float32
  logp = jax.nn.log_softmax(cls_logits.astype(f32), axis=-1)
  ce = -jnp.take_along_axis(logp, classes[..., None], axis=-1)[..., 0]
  n = jnp.sum(valid.astype(f32))
  loss_cls = _safe_div(jnp.sum(jnp.where(valid, ce, 0.0)), n)
  slot = jnp.where(pos, reg_class, 0)
  pred = jnp.take_along_axis(deltas.astype(f32), slot[..., None, None], axis=-2)[..., 0, :]
  reg = jnp.sum(smooth_l1(pred - box_targets, convention.box_loss_beta), axis=-1)
  loss_box = _safe_div(jnp.sum(jnp.where(pos, reg, 0.0)), n)
  return dict(loss_cls=loss_cls, loss_box=loss_box)


def mask_loss(mask_logits, mask_targets, pos):
  """Per-pixel BCE on the GT class's channel, mean over positives x 28 x 28 (all three).

  mask_logits: [..., 28, 28] float32 (already the GT class's channel); mask_targets: same shape,
  binary (mmdet / d2) or soft (torchvision); pos: [...] bool. 0 when there is no positive.
  """
  bce = sigmoid_bce(mask_logits, mask_targets.astype(jnp.float32))
  per_roi = jnp.sum(bce, axis=(-1, -2))
  pixels = mask_logits.shape[-1] * mask_logits.shape[-2]
  return _safe_div(jnp.sum(jnp.where(pos, per_roi, 0.0)),
                   jnp.sum(pos.astype(jnp.float32))) / pixels


def maskiou_loss(mask_iou_pred, mask_iou_targets, pos, *, loss_weight: float = 0.5):
  """MSE x loss_weight over positives whose IoU target is > 0 (mmdet MaskIoUHead.loss).

  mask_iou_pred: [...] float32 predicted IoU of the GT class; mask_iou_targets: [...];
  pos: [...] bool.
  """
  use = pos & (mask_iou_targets > 0)
  se = jnp.square(mask_iou_pred.astype(jnp.float32) - mask_iou_targets)
  return loss_weight * _safe_div(jnp.sum(jnp.where(use, se, 0.0)),
                                 jnp.sum(use.astype(jnp.float32)))
