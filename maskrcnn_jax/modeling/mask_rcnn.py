"""Mask R-CNN (He et al. 2017) and Mask Scoring R-CNN (Huang et al. 2019): the wiring.

`MaskRCNN.from_config(config)` builds the module; `__call__` runs inference on a batch of
normalized, padded images and returns fixed-size detections (padded to `detections_per_image`
with a `valid` mask). Mask pasting and RLE encoding happen on the host (ops/paste.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskrcnn_jax import conventions as conventions_lib
from maskrcnn_jax.modeling import heads, rpn as rpn_lib
from maskrcnn_jax.modeling.fpn import FPN
from maskrcnn_jax.modeling.resnet import ResNet
from maskrcnn_jax.ops import anchors as anchors_lib, poolers, postprocess

LEVELS = ("p2", "p3", "p4", "p5", "p6")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The static hyper-parameters of the model (hashable; read from config.model)."""
  convention: str = "detectron2"
  depth: int = 50
  groups: int = 1
  width_per_group: int = 64
  stride_in_1x1: bool = False
  norm: str = "frozen_bn"
  norm_eps: float = 1e-5
  freeze_at: int = 2
  fpn_norm: str = ""
  fpn_channels: int = 256
  anchor_sizes: Tuple[int, ...] = (32, 64, 128, 256, 512)
  anchor_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)
  anchor_strides: Tuple[int, ...] = (4, 8, 16, 32, 64)
  rpn_num_convs: int = 1
  rpn_pre_nms_topk_test: int = 1000
  rpn_post_nms_topk_test: int = 1000
  rpn_pre_nms_topk_train: int = 2000
  rpn_post_nms_topk_train: int = 1000
  rpn_nms_thresh: float = 0.7
  num_classes: int = 80
  box_head_num_conv: int = 0
  box_head_num_fc: int = 2
  box_head_norm: str = ""
  mask_head_norm: str = ""
  bbox_reg_weights: Tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
  score_thresh: float = 0.05
  nms_thresh: float = 0.5
  detections_per_image: int = 100
  max_candidates: int = 4000
  mask_scoring: bool = False
  roi_align_max_grid: int = 8
  nms_coordinate_trick: Optional[bool] = None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "ModelConfig":
    """Reads config.model and config.convention; unknown keys are an error (typos)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {"convention": config.convention}
    for key, value in config.model.items():
      if key in ("pixel_mean", "pixel_std", "to_rgb", "input_scale"):
        continue  # host-side preprocessing
      if key not in fields:
        raise ValueError(f"unknown config key model.{key}; valid keys: {sorted(fields)}")
      values[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    conventions_lib.get(values["convention"])  # validates the name
    return cls(**values)

  @property
  def conv(self) -> conventions_lib.Convention:
    return conventions_lib.get(self.convention)

  @property
  def coordinate_trick(self) -> bool:
    if self.nms_coordinate_trick is None:
      return self.conv.nms_coordinate_trick
    return bool(self.nms_coordinate_trick)

  @property
  def num_cls_outputs(self) -> int:
    """81 (background last) for mmdet/d2; 91 (background first, COCO ids) for torchvision."""
    return self.num_classes + 1

  @property
  def num_reg_classes(self) -> int:
    return self.num_classes if self.conv.class_layout == "bg_last" else self.num_classes + 1


def image_anchors(cfg: ModelConfig, padded_hw: tuple[int, int]) -> list[np.ndarray]:
  """Anchors of every FPN level for a padded input size; numpy constants, [H_l*W_l*A, 4] each."""
  feature_sizes = []
  h, w = padded_hw
  for stride in cfg.anchor_strides[:4]:
    feature_sizes.append((h // stride, w // stride))
  # P6 = P5[::2, ::2]: ceil(H5 / 2).
  feature_sizes.append(((feature_sizes[-1][0] + 1) // 2, (feature_sizes[-1][1] + 1) // 2))
  return anchors_lib.fpn_anchors(
      padded_hw=padded_hw, feature_sizes=feature_sizes, sizes=cfg.anchor_sizes,
      aspect_ratios=cfg.anchor_ratios, strides=cfg.anchor_strides,
      round_to_int=cfg.conv.anchor_round, dynamic_stride=cfg.conv.anchor_dynamic_stride)


class MaskRCNN(nn.Module):
  """Backbone + FPN + RPN + box/mask(/MaskIoU) heads."""
  cfg: ModelConfig
  train: bool = False
  precision: Any = None

  def setup(self):
    cfg = self.cfg
    self.backbone = ResNet(
        depth=cfg.depth, groups=cfg.groups, width_per_group=cfg.width_per_group,
        stride_in_1x1=cfg.stride_in_1x1, norm=cfg.norm, norm_eps=cfg.norm_eps,
        freeze_at=cfg.freeze_at, train=self.train, precision=self.precision)
    self.fpn = FPN(cfg.fpn_channels, norm=cfg.fpn_norm or None, train=self.train,
                   precision=self.precision)
    self.rpn_head = heads.RPNHead(len(cfg.anchor_ratios), cfg.rpn_num_convs, cfg.fpn_channels,
                                  precision=self.precision)
    self.box_head = heads.BoxHead(
        num_conv=cfg.box_head_num_conv, num_fc=cfg.box_head_num_fc,
        norm=cfg.box_head_norm or None, train=self.train, precision=self.precision)
    self.box_predictor = heads.BoxPredictor(cfg.num_cls_outputs, cfg.num_reg_classes,
                                            precision=self.precision)
    self.mask_head = heads.MaskHead(cfg.num_reg_classes, norm=cfg.mask_head_norm or None,
                                    train=self.train, precision=self.precision)
    if cfg.mask_scoring:
      self.maskiou_head = heads.MaskIoUHead(cfg.num_classes, precision=self.precision)

  # ---- stages, usable one by one (parity tests compare each) ----

  def features(self, images: jax.Array) -> Dict[str, jax.Array]:
    """images [N, Hp, Wp, 3] float32 normalized and padded -> dict p2..p6 [N, Hp/s, Wp/s, 256]."""
    return self.fpn(self.backbone(images))

  def rpn_outputs(self, feats: Dict[str, jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per level: logits [N, H*W*A] and deltas [N, H*W*A, 4] in anchor order."""
    logits, deltas = [], []
    for name in LEVELS:
      lg, dl = self.rpn_head(feats[name])
      n = lg.shape[0]
      logits.append(lg.reshape(n, -1))
      deltas.append(dl.reshape(n, -1, 4))
    return logits, deltas

  def proposals(self, feats, image_hw: jax.Array):
    """Test-time proposals: [N, P, 4] boxes (resized-image pixels), [N, P] scores, [N, P] valid."""
    cfg = self.cfg
    padded_hw = (feats["p2"].shape[1] * 4, feats["p2"].shape[2] * 4)
    anchors = image_anchors(cfg, padded_hw)
    logits, deltas = self.rpn_outputs(feats)
    fn = lambda lg, dl, hw: rpn_lib.select_proposals(
        lg, dl, anchors, hw, convention=cfg.conv, pre_nms_topk=cfg.rpn_pre_nms_topk_test,
        post_nms_topk=cfg.rpn_post_nms_topk_test, nms_thresh=cfg.rpn_nms_thresh,
        coordinate_trick=cfg.coordinate_trick)
    return jax.vmap(fn)(logits, deltas, image_hw)

  def pool(self, feats, boxes: jax.Array, valid: jax.Array, output_size: int) -> jax.Array:
    """RoIAlign of [N, R, 4] boxes on P2..P5 -> [N * R, s, s, 256] (image-major)."""
    cfg, conv = self.cfg, self.cfg.conv
    n, r = boxes.shape[:2]
    batch_idx = jnp.repeat(jnp.arange(n, dtype=jnp.int32), r)
    return poolers.multilevel_roi_align(
        [feats[k] for k in LEVELS[:4]], boxes.reshape(n * r, 4), batch_idx,
        level_rule=conv.level_map, output_size=output_size,
        sampling_ratio=conv.roi_align_sampling_ratio, aligned=conv.roi_align_aligned,
        strides=tuple(cfg.anchor_strides[:4]), max_grid=cfg.roi_align_max_grid,
        valid=valid.reshape(-1))

  def box_branch(self, feats, boxes: jax.Array, valid: jax.Array):
    """Class logits [N, R, K_cls] and deltas [N, R, K_reg, 4] for [N, R, 4] boxes."""
    n, r = boxes.shape[:2]
    x = self.box_head(self.pool(feats, boxes, valid, 7))
    logits, deltas = self.box_predictor(x)
    return logits.reshape(n, r, -1), deltas.reshape(n, r, -1, 4)

  def mask_branch(self, feats, boxes: jax.Array, labels: jax.Array, valid: jax.Array):
    """Mask logits [N, D, 28, 28] of each box's class (+ MaskIoU [N, D] for Mask Scoring)."""
    cfg = self.cfg
    n, d = boxes.shape[:2]
    roi_feats = self.pool(feats, boxes, valid, 14)
    all_logits = self.mask_head(roi_feats)  # [N*D, 28, 28, K_mask]
    channel = labels.reshape(-1)  # bg_last: label c -> channel c; tv: category index -> channel
    logits = jnp.take_along_axis(all_logits, channel[:, None, None, None], axis=-1)[..., 0]
    mask_iou = None
    if cfg.mask_scoring:
      iou = self.maskiou_head(roi_feats, logits)  # [N*D, 80]
      mask_iou = jnp.take_along_axis(iou, channel[:, None], axis=-1)[:, 0].reshape(n, d)
    return logits.reshape(n, d, 28, 28), mask_iou

  def __call__(self, images: jax.Array, image_hw: jax.Array, orig_hw: jax.Array,
               scale_factor: jax.Array) -> Dict[str, jax.Array]:
    """Inference.

    Args:
      images: [N, Hp, Wp, 3] float32, normalized and zero-padded at the bottom/right.
      image_hw: [N, 2] int32 resized, unpadded sizes.
      orig_hw: [N, 2] int32 original image sizes.
      scale_factor: [N, 2] float32 (new_w / w, new_h / h).
    Returns dict of [N, D, ...] arrays, D = detections_per_image: boxes [N, D, 4] float32 xyxy in
      original-image pixels, scores [N, D], labels [N, D] int32 (class index of the layout),
      valid [N, D] bool, paste_boxes [N, D, 4], mask_probs [N, D, 28, 28] float32 (sigmoid of the
      label's channel) and, for Mask Scoring R-CNN, mask_scores [N, D] (MaskIoU x score).
    """
    cfg = self.cfg
    feats = self.features(images)
    props, _, props_valid = self.proposals(feats, image_hw)
    logits, deltas = self.box_branch(feats, props, props_valid)
    det_fn = lambda lg, dl, p, v, hw, ohw, sf: postprocess.detect(
        lg, dl, p, v, hw, ohw, sf, convention=cfg.conv,
        bbox_reg_weights=tuple(cfg.bbox_reg_weights), score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh, max_detections=cfg.detections_per_image,
        max_candidates=cfg.max_candidates, coordinate_trick=cfg.coordinate_trick)
    dets = jax.vmap(det_fn)(logits, deltas, props, props_valid, image_hw, orig_hw, scale_factor)
    mask_logits, mask_iou = self.mask_branch(feats, dets["mask_rois"], dets["labels"],
                                             dets["valid"])
    out = dict(boxes=dets["boxes"], scores=dets["scores"], labels=dets["labels"],
               valid=dets["valid"], paste_boxes=dets["paste_boxes"],
               mask_probs=jax.nn.sigmoid(mask_logits))
    if cfg.mask_scoring:
      out["mask_scores"] = jnp.where(dets["valid"], mask_iou * dets["scores"], 0.0)
    return out
