"""RPN proposal generation at fixed shapes (Ren et al. 2015), per convention.

References (parity_spec 3.9): mmdet/models/dense_heads/rpn_head.py (_get_bboxes_single,
_bbox_post_process), detectron2/modeling/proposal_generator/proposal_utils.py
(find_top_rpn_proposals), torchvision/models/detection/rpn.py (filter_proposals).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax import conventions as conventions_lib
from maskrcnn_jax.ops import box_coder, boxes as boxes_lib, nms as nms_lib


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
