"""The RoI heads (detectron2 modeling/roi_heads/roi_heads.py): per-RoI box and mask branches.

* `StandardROIHeads` (FPN, DC5): RoIAlign of the feature maps (7x7 box, 14x14 mask), the box head
  (2 FC, or 4 conv + 1 FC for torchvision v2) and predictor, the 4-conv mask head, and the MaskIoU
  head of Mask Scoring R-CNN (Huang et al. 2019).
* `Res5ROIHeads` (C4): RoIAlign 14x14 of res4, then res5 shared by the box predictor (mean over
  its 7x7 output) and the mask head (deconv to 14x14), detectron2 `Res5ROIHeads`.

Each does inference (`__call__`: detection post-processing and the masks of the detections) and
training (`label_and_sample_proposals`, then `losses`: box, mask and MaskIoU losses). The layers are
created by the parent (`MaskRCNN.setup`) and passed in, so their variables keep the flat names
(`box_head`, `box_predictor`, `mask_head`, `maskiou_head`, `roi_res5`) that converted and trained
checkpoints use; these modules hold no variables of their own.

Shapes: N images, R RoIs per image (boxes float32 xyxy, resized-image pixels), D detections per
image, K_cls classifier outputs (background included), K_reg regression / mask classes, M mask side
(28; 14 for C4).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.ops import losses as losses_lib
from maskrcnn_jax.ops import poolers, postprocess
from maskrcnn_jax.ops import targets as targets_lib

if TYPE_CHECKING:  # mask_rcnn imports this module
  from maskrcnn_jax.modeling.mask_rcnn import ModelConfig

FPN_POOL_LEVELS = ("p2", "p3", "p4", "p5")  # RoIAlign reads P2..P5 (P6 is RPN only)


def train_class_index(cfg: "ModelConfig", labels: jax.Array,
                      category_ids: Optional[Tuple[int, ...]] = None) -> jax.Array:
  """Contiguous dataset labels (0..K-1, as in the batch) -> the model's class index.

  bg_last layouts (mmdet v2, detectron2): the label itself (background = num_classes).
  bg_first (torchvision, background = 0): `category_ids[label]` when a table is given (COCO with
  the 91-way torchvision head: the 80 COCO category ids, `coco_categories.COCO_CATEGORY_IDS`, so the
  class index is the category id as torchvision trains it), else label + 1 (a custom dataset with
  num_classes = K). The same index selects the regression slot and the mask channel.
  """
  labels = jnp.asarray(labels, jnp.int32)
  if cfg.conv.class_layout == "bg_last":
    return labels
  if category_ids is not None:
    return jnp.asarray(np.asarray(category_ids, np.int32))[labels]
  return labels + 1


def background_class(cfg: "ModelConfig") -> int:
  """The classifier's background index: num_classes (bg_last) or 0 (bg_first)."""
  return cfg.num_classes if cfg.conv.class_layout == "bg_last" else 0


def mask_canvas_hw(cfg: "ModelConfig", image_hw: jax.Array) -> jax.Array:
  """[N, 2] int32 size of the bitmap each reference RoIAligns for mask targets.

  mmdet v2 pads the gt masks with the image (`Pad(size_divisor=32)` pads `mask_fields`), so its
  clip bound (`mask_target_single`) is the 32-padded size; detectron2 and torchvision keep the
  masks at the resized image size (`Convention.mask_target_canvas_divisor`).
  """
  image_hw = jnp.asarray(image_hw, jnp.int32)
  d = int(cfg.conv.mask_target_canvas_divisor)
  return (image_hw + d - 1) // d * d


class ROIHeads(nn.Module):
  """What both RoI-head layouts share: pooling, the predictors, inference and the losses.

  A subclass says how box and mask features are computed from pooled RoIs (`_box_features`,
  `_mask_features`) and whether the two branches share a per-RoI computation
  (`shared_roi_features`: res5 for C4).
  """
  cfg: "ModelConfig" = None
  box_predictor: Optional[nn.Module] = None
  mask_head: Optional[nn.Module] = None
  maskiou_head: Optional[nn.Module] = None  # Mask Scoring R-CNN only

  # ---- pooling and the two branches ----

  def pool(self, feats: Mapping[str, jax.Array], boxes: jax.Array, valid: jax.Array,
           output_size: int) -> jax.Array:
    """RoIAlign of [N, R, 4] boxes ([N, R] valid) -> [N * R, s, s, C] (image-major).

    FPN: on P2..P5 with the convention's level rule; C4 / DC5: on the single stride-16 map
    (detectron2's ROIPooler with one level).
    """
    cfg, conv = self.cfg, self.cfg.conv
    n, r = boxes.shape[:2]
    batch_idx = jnp.repeat(jnp.arange(n, dtype=jnp.int32), r)
    if cfg.arch == "FPN":
      maps, strides = [feats[k] for k in FPN_POOL_LEVELS], tuple(cfg.anchor_strides[:4])
    else:
      maps, strides = [feats[cfg.feature_names[0]]], cfg.feature_strides
    return poolers.multilevel_roi_align(
        maps, boxes.reshape(n * r, 4), batch_idx, level_rule=conv.level_map,
        output_size=output_size, sampling_ratio=conv.roi_align_sampling_ratio,
        aligned=conv.roi_align_aligned, strides=strides, max_grid=cfg.roi_align_max_grid,
        valid=valid.reshape(-1), impl=cfg.roi_align_impl,
        canonical_box_size=cfg.roi_canonical_box_size)

  def shared_roi_features(self, feats, boxes: jax.Array, valid: jax.Array) -> Optional[jax.Array]:
    """Per-RoI features both branches read ([N * R, ...]), or None when they share nothing."""
    return None

  def _box_features(self, feats, boxes, valid, shared) -> jax.Array:
    raise NotImplementedError

  def _mask_features(self, feats, boxes, valid, shared) -> jax.Array:
    raise NotImplementedError

  def box_branch(self, feats, boxes: jax.Array, valid: jax.Array,
                 shared: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    """Class logits [N, R, K_cls] and deltas [N, R, K_reg, 4] for [N, R, 4] boxes ([N, R] valid);
    `shared`: precomputed `shared_roi_features` of these boxes (computed here when None)."""
    n, r = boxes.shape[:2]
    logits, deltas = self.box_predictor(self._box_features(feats, boxes, valid, shared))
    return logits.reshape(n, r, -1), deltas.reshape(n, r, -1, 4)

  def mask_branch(self, feats, boxes: jax.Array, labels: jax.Array, valid: jax.Array,
                  shared: Optional[jax.Array] = None):
    """Mask logits [N, D, M, M] of each box's class channel `labels` [N, D] int32, and MaskIoU
    [N, D] float32 for Mask Scoring R-CNN (else None)."""
    cfg = self.cfg
    n, d = boxes.shape[:2]
    roi_feats = self._mask_features(feats, boxes, valid, shared)
    all_logits = self.mask_head(roi_feats, valid.reshape(-1))  # [N*D, M, M, K_mask]
    channel = labels.reshape(-1)  # bg_last: label c -> channel c; tv: category index -> channel
    logits = jnp.take_along_axis(all_logits, channel[:, None, None, None], axis=-1)[..., 0]
    mask_iou = None
    if cfg.mask_scoring:
      iou = self.maskiou_head(roi_feats, logits)  # [N*D, K]
      mask_iou = jnp.take_along_axis(iou, channel[:, None], axis=-1)[:, 0].reshape(n, d)
    return logits.reshape(n, d, cfg.mask_size, cfg.mask_size), mask_iou

  # ---- inference ----

  def __call__(self, feats, proposals: jax.Array, proposals_valid: jax.Array,
               image_hw: jax.Array, orig_hw: jax.Array, scale_factor: jax.Array
               ) -> Dict[str, jax.Array]:
    """Detections of [N, P, 4] proposals: see `MaskRCNN.__call__` for the returned dict."""
    cfg = self.cfg
    logits, deltas = self.box_branch(feats, proposals, proposals_valid)
    det_fn = lambda lg, dl, p, v, hw, ohw, sf: postprocess.detect(
        lg, dl, p, v, hw, ohw, sf, convention=cfg.conv,
        bbox_reg_weights=tuple(cfg.bbox_reg_weights), score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh, max_detections=cfg.detections_per_image,
        max_candidates=cfg.max_candidates, nms_trick_max_boxes=cfg.trick_max_boxes)
    dets = jax.vmap(det_fn)(logits, deltas, proposals, proposals_valid, image_hw, orig_hw,
                            scale_factor)
    mask_logits, mask_iou = self.mask_branch(feats, dets["mask_rois"], dets["labels"],
                                             dets["valid"])
    out = dict(boxes=dets["boxes"], scores=dets["scores"], labels=dets["labels"],
               valid=dets["valid"], paste_boxes=dets["paste_boxes"],
               mask_probs=jax.nn.sigmoid(mask_logits))
    if cfg.mask_scoring:
      out["mask_scores"] = jnp.where(dets["valid"], mask_iou * dets["scores"], 0.0)
    return out

  # ---- training ----

  def label_and_sample_proposals(self, proposals, proposals_valid, gt, rng, samples, *,
                                 num_samples: int, positive_fraction: float):
    """R-CNN matching and sampling (detectron2 `ROIHeads.label_and_sample_proposals`).

    proposals [N, P, 4], proposals_valid [N, P]; gt dict (boxes [N, M, 4], valid [N, M],
    classes [N, M] int32 class index); `samples['roi_index' / 'roi_valid']` replace the sampler
    (see `MaskRCNN.losses`). Returns the `targets.roi_rows` dict of [N, R] rows (positives
    first), without gradient.
    """
    cfg, conv = self.cfg, self.cfg.conv
    n = proposals.shape[0]
    cand = jax.vmap(lambda p, pv, g, v: targets_lib.roi_candidates(
        p, pv, g, v, convention=conv))(proposals, proposals_valid, gt["boxes"], gt["valid"])
    if "roi_index" in samples:
      index = jnp.asarray(samples["roi_index"], jnp.int32)
      index_valid = jnp.asarray(samples["roi_valid"], bool)
      if index.shape[1] > num_samples:
        raise ValueError(f"samples['roi_index'] has {index.shape[1]} RoIs per image, more than "
                         f"roi_batch_per_image = {num_samples}")
    else:
      index, index_valid = jax.vmap(lambda lab, v, r: targets_lib.sample_rois(
          lab, v, r, num_samples=num_samples, positive_fraction=positive_fraction))(
              cand["labels"], cand["valid"], jax.random.split(rng, n))
    roi_t = jax.vmap(lambda c, i, iv, g, cl: targets_lib.roi_rows(
        c, i, iv, g, cl, convention=conv, bbox_reg_weights=tuple(cfg.bbox_reg_weights),
        background_class=background_class(cfg)))(cand, index, index_valid, gt["boxes"],
                                                 gt["classes"])
    return jax.lax.stop_gradient(roi_t)

  def losses(self, feats, roi_t, gt, batch, *, num_mask_rows: int) -> Dict[str, jax.Array]:
    """Box, mask and MaskIoU losses on sampled RoIs (detectron2 `_forward_box`, `_forward_mask`).

    Args: feats; roi_t (`label_and_sample_proposals`, positives in the first `num_mask_rows`
      rows); gt as there; batch (gt_masks, optional gt_mask_boxes, image_hw; `MaskRCNN.losses`).
    Returns: dict of float32 scalars: loss_cls, loss_box, loss_mask[, loss_mask_iou] and the
      statistics (no gradient) num_fg_rois (mean per image), cls_accuracy, fg_cls_accuracy.
    """
    cfg, conv = self.cfg, self.cfg.conv
    n, r = roi_t["rois"].shape[:2]
    image_hw = jnp.asarray(batch["image_hw"], jnp.int32)
    # C4: res5 runs once on the sampled RoIs; the mask branch reuses the rows of the positives.
    shared = self.shared_roi_features(feats, roi_t["rois"], roi_t["valid"])
    cls_logits, box_deltas = self.box_branch(feats, roi_t["rois"], roi_t["valid"], shared)
    terms = losses_lib.rcnn_losses(
        cls_logits, box_deltas, roi_t["classes"], roi_t["valid"], roi_t["pos"],
        roi_t["box_targets"], roi_t["classes"], convention=conv)

    # Masks on the positive rows (the first num_mask_rows rows hold every positive).
    p = num_mask_rows
    m_rois, m_pos = roi_t["rois"][:, :p], roi_t["pos"][:, :p]
    m_gt = roi_t["matched_gt"][:, :p]
    m_channel = jnp.where(m_pos, roi_t["classes"][:, :p], 0)
    m_shared = None
    if shared is not None:
      rest = shared.shape[1:]
      m_shared = shared.reshape((n, r) + rest)[:, :p].reshape((n * p,) + rest)
    mask_logits, mask_iou = self.mask_branch(feats, m_rois, m_channel, m_pos, m_shared)
    crop_boxes = jnp.asarray(batch.get("gt_mask_boxes", gt["boxes"]), jnp.float32)
    m_crop_boxes = jnp.take_along_axis(crop_boxes, m_gt[..., None], axis=1)
    crops = jax.vmap(lambda c, i: c[i])(jnp.asarray(batch["gt_masks"]), m_gt)
    canvas = mask_canvas_hw(cfg, image_hw)
    settings = targets_lib.mask_target_settings(conv)
    m_targets = jax.vmap(lambda rr, g, c, hw: targets_lib.mask_targets(
        rr, g, c, hw, max_grid=cfg.roi_align_max_grid, output_size=cfg.mask_size, **settings))(
            m_rois, m_crop_boxes, crops, canvas)
    terms["loss_mask"] = losses_lib.mask_loss(mask_logits, m_targets, m_pos)
    if cfg.mask_scoring:
      frac = jax.vmap(targets_lib.mask_area_fraction)(m_rois, m_crop_boxes, crops, canvas)
      iou_t = targets_lib.maskiou_targets(jax.lax.stop_gradient(mask_logits), m_targets, frac)
      terms["loss_mask_iou"] = losses_lib.maskiou_loss(mask_iou, iou_t, m_pos)

    # Statistics (detectron2 logs fast_rcnn/cls_accuracy and fg_cls_accuracy).
    pred = jnp.argmax(jax.lax.stop_gradient(cls_logits), axis=-1)
    correct = (pred == roi_t["classes"]).astype(jnp.float32)
    valid_f, pos_f = roi_t["valid"].astype(jnp.float32), roi_t["pos"].astype(jnp.float32)
    terms["num_fg_rois"] = jnp.sum(pos_f) / n
    terms["cls_accuracy"] = jnp.sum(correct * valid_f) / jnp.maximum(jnp.sum(valid_f), 1.0)
    terms["fg_cls_accuracy"] = jnp.sum(correct * pos_f) / jnp.maximum(jnp.sum(pos_f), 1.0)
    return terms


class StandardROIHeads(ROIHeads):
  """FPN / DC5 RoI heads: pooled 7x7 -> `box_head` -> predictor; pooled 14x14 -> mask head."""
  box_head: Optional[nn.Module] = None

  def _box_features(self, feats, boxes, valid, shared) -> jax.Array:
    """[N * R, fc_dim] box-head output of the 7x7 RoIAlign."""
    return self.box_head(self.pool(feats, boxes, valid, self.cfg.box_pool_size),
                         valid.reshape(-1))

  def _mask_features(self, feats, boxes, valid, shared) -> jax.Array:
    """[N * D, 14, 14, C] RoIAlign of the feature maps."""
    return self.pool(feats, boxes, valid, 14)


class Res5ROIHeads(ROIHeads):
  """C4 RoI heads (detectron2 `Res5ROIHeads`): res5 on the 14x14 RoIAlign of res4, shared."""
  res5: Optional[nn.Module] = None

  def shared_roi_features(self, feats, boxes: jax.Array, valid: jax.Array) -> jax.Array:
    """res5 of the 14x14 RoIAlign of res4 -> [N * R, 7, 7, 2048] (`_shared_roi_transform`)."""
    return self.res5(self.pool(feats, boxes, valid, self.cfg.box_pool_size), valid.reshape(-1))

  def _box_features(self, feats, boxes, valid, shared) -> jax.Array:
    """[N * R, 2048]: the mean over res5's 7x7 output."""
    if shared is None:
      shared = self.shared_roi_features(feats, boxes, valid)
    return jnp.mean(shared, axis=(1, 2))

  def _mask_features(self, feats, boxes, valid, shared) -> jax.Array:
    """[N * D, 7, 7, 2048]: res5 output (detectron2 reuses the foreground RoIs' box features)."""
    return shared if shared is not None else self.shared_roi_features(feats, boxes, valid)

