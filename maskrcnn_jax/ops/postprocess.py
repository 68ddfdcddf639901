"""Detection post-processing at fixed shapes: softmax, decode, clip, score filter, class-wise NMS.

References (parity_spec 3.12): mmdet/models/roi_heads/bbox_heads/bbox_head.py (get_bboxes) +
mmdet/core/post_processing/bbox_nms.py (multiclass_nms); detectron2/modeling/roi_heads/fast_rcnn.py
(fast_rcnn_inference_single_image) + modeling/postprocessing.py (detector_postprocess);
torchvision/models/detection/roi_heads.py (postprocess_detections) + transform.py (resize_boxes).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from maskrcnn_jax import conventions as conventions_lib
from maskrcnn_jax.ops import box_coder, boxes as boxes_lib, nms as nms_lib


def detect(
    cls_logits: jax.Array,
    box_deltas: jax.Array,
    proposals: jax.Array,
    proposal_valid: jax.Array,
    image_hw: jax.Array,
    orig_hw: jax.Array,
    scale_factor: jax.Array,
    *,
    convention: conventions_lib.Convention,
    bbox_reg_weights: tuple[float, float, float, float],
    score_thresh: float,
    nms_thresh: float,
    max_detections: int,
    max_candidates: int,
    nms_trick_max_boxes: int,
) -> dict[str, jax.Array]:
  """Final detections of one image.

  Args:
    cls_logits: [R, K_cls] float32 (81 with background last, or 91 with background first).
    box_deltas: [R, K_reg, 4] float32 class-specific deltas.
    proposals: [R, 4] float32 xyxy in resized-image pixels.
    proposal_valid: [R] bool.
    image_hw: [2] int32 resized unpadded size; orig_hw: [2] int32 original image size.
    scale_factor: [2] float32 (sx, sy) = (new_w / w, new_h / h) as mmdet keeps it.
    bbox_reg_weights: stds (mmdet form) or weights (detectron2 form).
    max_candidates: static bound of (RoI, class) pairs that enter the NMS, taken by score. The
      result is exact whenever the last kept detection ranks within it.
    nms_trick_max_boxes: the class-wise NMS uses the coordinate-offset trick when at most this
      many candidates pass the score filter (`nms.trick_applies`; the reference counts every
      candidate, before any top-k).

  Returns dict of [D = max_detections] arrays:
    boxes [D, 4] float32 xyxy in original-image pixels (the reported boxes);
    scores [D] float32; labels [D] int32 (0-based contiguous class for bg_last layouts, the
    torchvision category index 1..90 for bg_first); valid [D] bool;
    mask_rois [D, 4] float32: the boxes the mask branch pools, in resized-image pixels;
    paste_boxes [D, 4] float32: the boxes masks are pasted into, in original-image pixels.
  """
  probs = jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)
  num_rois = cls_logits.shape[0]
  if convention.class_layout == "bg_last":
    fg = probs[:, :-1]
    deltas = box_deltas
    label_offset = 0
  else:
    fg = probs[:, 1:]
    deltas = box_deltas[:, 1:]
    label_offset = 1
  num_fg = fg.shape[1]
  boxes = box_coder.decode(deltas, jnp.broadcast_to(proposals[:, None, :], deltas.shape),
                           form=convention.box_coder, weights=bbox_reg_weights)
  boxes = boxes_lib.clip_boxes(boxes, image_hw)
  sx, sy = scale_factor[0], scale_factor[1]
  if convention.det_nms_in_original_coords:
    # mmdet: rescale to the original image *before* the NMS, dividing by the float32 factors.
    boxes = boxes / jnp.stack([sx, sy, sx, sy]).astype(jnp.float32)
  boxes = boxes.reshape(num_rois * num_fg, 4)  # roi-major, class-minor, as all three flatten
  scores = fg.reshape(-1)
  labels = jnp.tile(jnp.arange(num_fg, dtype=jnp.int32), num_rois) + label_offset
  valid = (scores > score_thresh) & jnp.repeat(proposal_valid, num_fg)
  if convention.det_min_box_side > 0:  # torchvision remove_small_boxes(1e-2)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    valid &= (w >= convention.det_min_box_side) & (h >= convention.det_min_box_side)
  # The trick's decision and its offset use every candidate of the call, as torchvision / mmcv
  # see them, before the static top-k below drops low scores.
  use_trick = nms_lib.trick_applies(jnp.sum(valid), nms_trick_max_boxes, valid.shape[0])
  max_coord = jnp.where(jnp.any(valid), jnp.max(jnp.where(valid[:, None], boxes, -jnp.inf)), 0.0)
  k = min(max_candidates, scores.shape[0])
  _, cand = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), k)
  keep, keep_valid = nms_lib.batched_nms(
      boxes[cand], scores[cand], labels[cand], iou_threshold=nms_thresh,
      max_output=max_detections, valid=valid[cand], coordinate_trick=use_trick,
      max_coordinate=max_coord)
  idx = cand[keep]
  det_boxes = boxes[idx]
  det_scores = scores[idx]
  det_labels = labels[idx]
  sxy = jnp.stack([sx, sy, sx, sy]).astype(jnp.float32)
  if convention.det_nms_in_original_coords:  # mmdet
    out_boxes = det_boxes
    # The mask head reads resized-image RoIs: det_boxes * scale_factor. mmdet's simple_test_mask
    # also pastes at those divided again (a float32 round trip, parity_spec 3.13).
    mask_rois = det_boxes * sxy
    paste_boxes = mask_rois / sxy if convention.mask_roi_round_trip else det_boxes
  elif convention.drop_empty_after_rescale:  # detectron2 detector_postprocess
    oh, ow = orig_hw[0].astype(jnp.float32), orig_hw[1].astype(jnp.float32)
    ih, iw = image_hw[0].astype(jnp.float32), image_hw[1].astype(jnp.float32)
    scale = jnp.stack([ow / iw, oh / ih, ow / iw, oh / ih])
    out_boxes = boxes_lib.clip_boxes(det_boxes * scale, orig_hw)
    keep_valid &= ((out_boxes[:, 2] - out_boxes[:, 0]) > 0) & (
        (out_boxes[:, 3] - out_boxes[:, 1]) > 0)
    mask_rois = det_boxes
    paste_boxes = out_boxes
  else:  # torchvision transform.resize_boxes: float32 ratios orig / resized, no clip
    ratio_h = orig_hw[0].astype(jnp.float32) / image_hw[0].astype(jnp.float32)
    ratio_w = orig_hw[1].astype(jnp.float32) / image_hw[1].astype(jnp.float32)
    out_boxes = det_boxes * jnp.stack([ratio_w, ratio_h, ratio_w, ratio_h])
    mask_rois = det_boxes
    paste_boxes = out_boxes
  zero = lambda a: jnp.where(keep_valid.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0)
  return dict(boxes=zero(out_boxes), scores=zero(det_scores), labels=zero(det_labels),
              valid=keep_valid, mask_rois=zero(mask_rois), paste_boxes=zero(paste_boxes))
