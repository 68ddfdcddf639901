"""The region proposal network (Ren et al. 2015) at fixed shapes, per convention.

`RPN` is detectron2's `RPN` (modeling/proposal_generator/rpn.py): the head on every feature map,
the anchors, the proposals (test and training) and the RPN losses with their anchor targets.
The functions below it are the per-image proposal selection it vmaps.

References (parity_spec 3.9): mmdet/models/dense_heads/rpn_head.py (_get_bboxes_single,
_bbox_post_process), detectron2/modeling/proposal_generator/proposal_utils.py
(find_top_rpn_proposals), torchvision/models/detection/rpn.py (filter_proposals).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax import conventions as conventions_lib
from maskrcnn_jax.ops import anchors as anchors_lib
from maskrcnn_jax.ops import box_coder, boxes as boxes_lib, losses as losses_lib, nms as nms_lib
from maskrcnn_jax.ops import targets as targets_lib

if TYPE_CHECKING:  # mask_rcnn imports this module
  from maskrcnn_jax.modeling.mask_rcnn import ModelConfig


def image_anchors(cfg: "ModelConfig", padded_hw: tuple[int, int]) -> list[np.ndarray]:
  """Anchors of every RPN level for a padded input size; numpy constants, [H_l*W_l*A, 4] each
  (float32 xyxy, padded-image pixels, in the head's output order (y * W + x) * A + a)."""
  h, w = padded_hw
  if cfg.arch != "FPN":
    # One level at stride 16 with every size (detectron2 DefaultAnchorGenerator with
    # SIZES [[32, 64, 128, 256, 512]]): A = sizes x ratios, in the convention's cell order.
    stride = cfg.feature_strides[0]
    cell = anchors_lib.cell_anchors(
        tuple(cfg.anchor_sizes), tuple(cfg.anchor_ratios), round_to_int=cfg.conv.anchor_round,
        size_major=cfg.conv.anchor_size_major)
    return [anchors_lib.grid_anchors(cell, (h // stride, w // stride), (stride, stride))]
  feature_sizes = []
  for stride in cfg.anchor_strides[:4]:
    feature_sizes.append((h // stride, w // stride))
  # P6 = P5[::2, ::2]: ceil(H5 / 2).
  feature_sizes.append(((feature_sizes[-1][0] + 1) // 2, (feature_sizes[-1][1] + 1) // 2))
  return anchors_lib.fpn_anchors(
      padded_hw=padded_hw, feature_sizes=feature_sizes, sizes=cfg.anchor_sizes,
      aspect_ratios=cfg.anchor_ratios, strides=cfg.anchor_strides,
      round_to_int=cfg.conv.anchor_round, dynamic_stride=cfg.conv.anchor_dynamic_stride)


class RPN(nn.Module):
  """Head, anchors, proposals and losses of the RPN (detectron2 `RPN`).

  `head` is the `heads.RPNHead` the parent module created: its variables stay under the
  parent's `rpn_head` (the name converted and trained checkpoints use); this module holds none.
  Arrays are per batch: N images, A = all anchors of the padded size (`image_anchors` order),
  boxes float32 xyxy in resized-image pixels.
  """
  cfg: "ModelConfig"
  head: nn.Module

  def outputs(self, feats: Mapping[str, jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per level of `cfg.feature_names`: logits [N, H*W*A_l] and deltas [N, H*W*A_l, 4]."""
    logits, deltas = [], []
    for name in self.cfg.feature_names:
      lg, dl = self.head(feats[name])
      n = lg.shape[0]
      logits.append(lg.reshape(n, -1))
      deltas.append(dl.reshape(n, -1, 4))
    return logits, deltas

  def anchors(self, feats: Mapping[str, jax.Array]) -> list[np.ndarray]:
    """`image_anchors` of the padded size the feature maps come from."""
    first = feats[self.cfg.feature_names[0]]
    stride = self.cfg.feature_strides[0]
    return image_anchors(self.cfg, (first.shape[1] * stride, first.shape[2] * stride))

  def anchor_valid(self, feats: Mapping[str, jax.Array], image_hw: jax.Array
                   ) -> Optional[jax.Array]:
    """[N, A] bool: the anchors that take part in training for images of size image_hw [N, 2]
    int32, or None when all do (`Convention.rpn_anchor_pad_divisor` 0).

    mmdet `AnchorGenerator.valid_flags`: on a level of stride s and size H x W, the locations
    y < min(ceil(pad_h / s), H) and x < min(ceil(pad_w / s), W) of the image's own padded size.
    """
    d = int(self.cfg.conv.rpn_anchor_pad_divisor)
    if d <= 0:
      return None
    pad = (jnp.asarray(image_hw, jnp.int32) + d - 1) // d * d  # [N, 2]
    per_level = []
    for name, stride in zip(self.cfg.feature_names, self.cfg.feature_strides):
      h, w = feats[name].shape[1:3]
      a = self.cfg.num_anchors
      # Anchor order (y * W + x) * A + a (`image_anchors`): static row / column of each anchor.
      ys = jnp.asarray(np.repeat(np.arange(h), w * a), jnp.int32)
      xs = jnp.asarray(np.tile(np.repeat(np.arange(w), a), h), jnp.int32)
      valid_h = (pad[:, :1] + stride - 1) // stride
      valid_w = (pad[:, 1:] + stride - 1) // stride
      per_level.append((ys[None] < valid_h) & (xs[None] < valid_w))
    return jnp.concatenate(per_level, axis=1)

  def __call__(self, feats: Mapping[str, jax.Array], image_hw: jax.Array):
    """Test-time proposals: boxes [N, P, 4], scores [N, P], valid [N, P] bool (P =
    rpn_post_nms_topk_test); image_hw [N, 2] int32 resized unpadded sizes."""
    cfg = self.cfg
    anchors = self.anchors(feats)
    logits, deltas = self.outputs(feats)
    fn = lambda lg, dl, hw: select_proposals(
        lg, dl, anchors, hw, convention=cfg.conv, pre_nms_topk=cfg.rpn_pre_nms_topk_test,
        post_nms_topk=cfg.rpn_post_nms_topk_test, nms_thresh=cfg.rpn_nms_thresh,
        nms_trick_max_boxes=cfg.trick_max_boxes)
    return jax.vmap(fn)(logits, deltas, image_hw)

  def training_proposals(self, logits, deltas, anchors, image_hw: jax.Array):
    """`train_proposals` of each image (no gradient): boxes [N, P, 4], scores, valid [N, P]
    (P = rpn_post_nms_topk_train); logits / deltas / anchors as `outputs` / `anchors`."""
    cfg = self.cfg
    fn = lambda lg, dl, hw: train_proposals(
        lg, dl, anchors, hw, convention=cfg.conv, pre_nms_topk=cfg.rpn_pre_nms_topk_train,
        post_nms_topk=cfg.rpn_post_nms_topk_train, nms_thresh=cfg.rpn_nms_thresh,
        nms_trick_max_boxes=cfg.trick_max_boxes)
    return jax.vmap(fn)(logits, deltas, image_hw)

  def losses(self, logits, deltas, anchors, gt: Mapping[str, jax.Array], rng: jax.Array,
             samples: Mapping[str, jax.Array], *, num_samples: int, positive_fraction: float,
             anchor_valid: Optional[jax.Array] = None
             ) -> tuple[Dict[str, jax.Array], jax.Array]:
    """Anchor matching, sampling (or given `samples['rpn_pos' / 'rpn_neg']` [N, A] bool) and
    the RPN losses (detectron2 `RPN.losses`).

    Args: logits / deltas per level (`outputs`); anchors per level (`anchors`); gt dict (boxes
      [N, M, 4] float32, valid [N, M] bool); rng; samples (see `MaskRCNN.losses`); the
      sampler's num_samples / positive_fraction per image; anchor_valid [N, A] bool or None
      (`anchor_valid`).
    Returns: (dict(loss_rpn_cls, loss_rpn_box) float32 scalars, pos [N, A] bool positives).
    """
    conv = self.cfg.conv
    n = logits[0].shape[0]
    all_anchors = jnp.asarray(np.concatenate(anchors, axis=0))
    if anchor_valid is None:
      anchor_valid = jnp.ones((n, all_anchors.shape[0]), bool)
    if "rpn_pos" in samples:
      pos = jnp.asarray(samples["rpn_pos"], bool)
      neg = jnp.asarray(samples["rpn_neg"], bool)
      if pos.shape != (n, all_anchors.shape[0]) or neg.shape != pos.shape:
        raise ValueError(f"samples['rpn_pos'] / ['rpn_neg'] must be [{n}, {all_anchors.shape[0]}]"
                         f" (all anchors), got {pos.shape} / {neg.shape}")
      matches = jax.vmap(lambda g, v, av: targets_lib.rpn_match(
          all_anchors, g, v, convention=conv, anchor_valid=av)[0])(
              gt["boxes"], gt["valid"], anchor_valid)
      box_targets = jax.vmap(lambda g, m, p: targets_lib.rpn_sampled_targets(
          all_anchors, g, m, p, convention=conv))(gt["boxes"], matches, pos)
    else:
      rpn_t = jax.vmap(
          lambda g, v, r, av: targets_lib.rpn_targets(
              all_anchors, g, v, r, convention=conv, num_samples=num_samples,
              positive_fraction=positive_fraction, anchor_valid=av))(
                  gt["boxes"], gt["valid"], jax.random.split(rng, n), anchor_valid)
      pos, neg, box_targets = rpn_t["pos"], rpn_t["neg"], rpn_t["box_targets"]
    terms = losses_lib.rpn_losses(
        jnp.concatenate(logits, axis=1), jnp.concatenate(deltas, axis=1), pos, neg, box_targets,
        convention=conv, num_samples_per_image=num_samples)
    return terms, pos


def select_proposals(
    logits: Sequence[jax.Array],
    deltas: Sequence[jax.Array],
    anchors: Sequence[np.ndarray],
    image_hw: jax.Array,
    *,
    convention: conventions_lib.Convention,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
    nms_trick_max_boxes: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Proposals of one image.

  Args:
    logits: per level [M_l] float32 objectness logits, anchor order (y * W + x) * A + a.
    deltas: per level [M_l, 4] float32 (dx, dy, dw, dh).
    anchors: per level [M_l, 4] float32 xyxy anchors (numpy constants, padded-image pixels).
    image_hw: [2] int32, resized unpadded image size; proposals are clipped to it.
    convention: ranking key, size filter and NMS flavour.
    pre_nms_topk: top-k per level before NMS (1000 at test time).
    post_nms_topk: proposals kept after NMS (1000 at test time).
    nms_thresh: IoU threshold of the per-level NMS (0.7).
    nms_trick_max_boxes: the per-level NMS uses the coordinate-offset trick when at most this many
      proposals pass the size filter (`nms.trick_applies`, parity_spec 3.10).

  Returns:
    proposals [post_nms_topk, 4] float32 xyxy (resized-image pixels), scores [post_nms_topk]
    float32 (the NMS ranking score: sigmoid for mmdet/torchvision, logit for detectron2), valid
    [post_nms_topk] bool.
  """
  sel_boxes, sel_scores, sel_levels = [], [], []
  for level, (lg, dl, an) in enumerate(zip(logits, deltas, anchors)):
    k = min(pre_nms_topk, lg.shape[0])
    # mmdet sorts by sigmoid score (ties where the sigmoid saturates); d2/tv by logit.
    key = jax.nn.sigmoid(lg) if convention.rpn_rank_on == "sigmoid" else lg
    _, idx = jax.lax.top_k(key, k)
    boxes = box_coder.decode(dl[idx], jnp.asarray(an)[idx], form=convention.box_coder,
                             weights=(1.0, 1.0, 1.0, 1.0))
    sel_boxes.append(boxes)
    sel_scores.append(lg[idx])
    sel_levels.append(jnp.full((k,), level, jnp.int32))
  boxes = jnp.concatenate(sel_boxes)
  logit = jnp.concatenate(sel_scores)
  levels = jnp.concatenate(sel_levels)
  boxes = boxes_lib.clip_boxes(boxes, image_hw)
  w = boxes[:, 2] - boxes[:, 0]
  h = boxes[:, 3] - boxes[:, 1]
  if convention.rpn_min_size_inclusive:
    valid = (w >= convention.rpn_min_size) & (h >= convention.rpn_min_size)
  else:
    valid = (w > convention.rpn_min_size) & (h > convention.rpn_min_size)
  valid &= jnp.all(jnp.isfinite(boxes), axis=1) & jnp.isfinite(logit)
  # d2 runs NMS on logits; mmdet on sigmoid scores; tv sigmoids before its NMS (rpn.py).
  score = logit if convention.rpn_nms_score == "logits" else jax.nn.sigmoid(logit)
  use_trick = nms_lib.trick_applies(jnp.sum(valid), nms_trick_max_boxes, valid.shape[0])
  keep, keep_valid = nms_lib.batched_nms(
      boxes, score, levels, iou_threshold=nms_thresh, max_output=post_nms_topk, valid=valid,
      coordinate_trick=use_trick)
  proposals = jnp.where(keep_valid[:, None], boxes[keep], 0.0)
  return proposals, jnp.where(keep_valid, score[keep], -jnp.inf), keep_valid


def train_proposals(
    logits: Sequence[jax.Array],
    deltas: Sequence[jax.Array],
    anchors: Sequence[np.ndarray],
    image_hw: jax.Array,
    *,
    convention: conventions_lib.Convention,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
    nms_trick_max_boxes: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-time proposals of one image: `select_proposals` on stop-gradient'ed RPN outputs.

  The references select training proposals with the test-time procedure and only other sizes
  (parity_spec 4.1: pre 2000 per level; post 1000 per image for mmdet / d2, 2000 for
  torchvision; NMS 0.7), and no gradient flows through the proposal boxes into the RPN (d2
  `find_top_rpn_proposals` runs under no_grad, mmdet detaches the proposal list, torchvision
  `proposals.detach()`). Arguments and returns as `select_proposals`.
  """
  # float32 decoding and ranking also when the heads run in bfloat16 (mixed precision).
  logits = [jax.lax.stop_gradient(x).astype(jnp.float32) for x in logits]
  deltas = [jax.lax.stop_gradient(x).astype(jnp.float32) for x in deltas]
  boxes, scores, valid = select_proposals(
      logits, deltas, anchors, image_hw, convention=convention, pre_nms_topk=pre_nms_topk,
      post_nms_topk=post_nms_topk, nms_thresh=nms_thresh, nms_trick_max_boxes=nms_trick_max_boxes)
  return jax.lax.stop_gradient(boxes), jax.lax.stop_gradient(scores), valid
