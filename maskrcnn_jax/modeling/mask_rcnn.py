"""Mask R-CNN (He et al. 2017) and Mask Scoring R-CNN (Huang et al. 2019): the wiring.

Three architectures (`ModelConfig.arch`, detectron2's names):
  FPN: ResNet + FPN P2..P6, RPN on every level, 2-FC box head / 4-conv mask head on RoIAlign of
    P2..P5 (7x7 / 14x14), 28x28 masks.
  C4: ResNet up to res4 (stride 16); RPN on res4 with all anchor sizes at one level; RoIAlign 14x14
    of res4, then res5 (stride 2) as the RoI head shared by boxes (mean over 7x7 -> predictor)
    and masks (deconv -> 14x14 masks): detectron2 `Res5ROIHeads` + `MaskRCNNConvUpsampleHead`
    with NUM_CONV 0 (ResNet paper, appendix A).
  DC5: ResNet with res5 dilated (dilation 2, stride 1: stride 16); RPN, 2-FC box head (7x7) and
    4-conv mask head (14x14 -> 28x28) on res5 (detectron2 Base-RCNN-DilatedC5.yaml).

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

from maskrcnn_jax import config_lib
from maskrcnn_jax import conventions as conventions_lib
from maskrcnn_jax import errors
from maskrcnn_jax.modeling import heads, rpn as rpn_lib
from maskrcnn_jax.modeling.fpn import FPN
from maskrcnn_jax.modeling.resnet import Res5Head, ResNet
from maskrcnn_jax.ops import anchors as anchors_lib, poolers, postprocess
from maskrcnn_jax.ops import targets as targets_lib

LEVELS = ("p2", "p3", "p4", "p5", "p6")
ARCHS = ("FPN", "C4", "DC5")


# config.model keys that are not model hyper-parameters.
_HOST_KEYS = (
    "pixel_mean", "pixel_std", "to_rgb", "input_scale",  # host-side preprocessing
    "dtype",  # compute dtype: the trainer casts the image (training/train_state.py)
    "backbone_init",  # the ImageNet file training starts from (training/checkpointing.py)
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The static hyper-parameters of the model (hashable; read from config.model).

  No field has a default here: `from_config` takes the ones a config lacks from
  `config_lib.defaults()`, the one place defaults are written (config_lib.mask_rcnn documents them).
  """
  convention: str
  arch: str  # 'FPN' | 'C4' | 'DC5' (module docstring)
  depth: int
  groups: int
  width_per_group: int
  stride_in_1x1: bool
  # detectron2 RESNETS.STEM_OUT_CHANNELS / RES2_OUT_CHANNELS (narrow models: configs/quickstart.py).
  stem_out_channels: int
  res2_out_channels: int
  norm: str
  # None (the recipes' default): the convention's `bn_eps`; a converted checkpoint records its
  # own (checkpoints/provenance.py), which predict / evaluate / config.init fill in first.
  norm_eps: Optional[float]
  freeze_at: int
  fpn_norm: str
  fpn_channels: int
  anchor_sizes: Tuple[int, ...]
  anchor_ratios: Tuple[float, ...]
  anchor_strides: Tuple[int, ...]
  rpn_num_convs: int
  rpn_pre_nms_topk_test: int
  rpn_post_nms_topk_test: int
  rpn_pre_nms_topk_train: int
  rpn_post_nms_topk_train: int
  rpn_nms_thresh: float
  num_classes: int
  box_head_num_conv: int
  box_head_num_fc: int
  box_head_norm: str
  box_head_conv_dim: int
  box_head_fc_dim: int
  mask_head_norm: str
  mask_head_num_conv: int
  mask_head_conv_dim: int
  bbox_reg_weights: Tuple[float, ...]
  score_thresh: float
  nms_thresh: float
  detections_per_image: int
  max_candidates: int
  mask_scoring: bool
  roi_align_max_grid: int
  # FPN level of a RoI: P4 at sqrt(area) = this (detectron2 / torchvision ROIPooler
  # canonical_box_size; mmdet finest_scale = a quarter of it).
  roi_canonical_box_size: float
  # Batched NMS: the coordinate-offset trick up to this many boxes per call; -1 = the
  # convention's rule (conventions.Convention.nms_trick_max_boxes).
  nms_trick_max_boxes: int
  # config.kernels.roi_align: 'auto' | 'reference' | 'pallas' | 'interpret' (pallas_kernels/README.md).
  roi_align_impl: str

  def __post_init__(self):
    if self.norm_eps is None:  # no checkpoint decided it: the convention's default
      object.__setattr__(self, "norm_eps", conventions_lib.get(self.convention).bn_eps)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "ModelConfig":
    """Reads config.model, config.convention and config.kernels.roi_align.

    A field the config lacks takes its `config_lib.defaults()` value; unknown model.* keys are an
    error (typos).
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    defaults = config_lib.defaults()
    values: Dict[str, Any] = {}
    for source in (defaults.model, config.model):
      for key, value in source.items():
        if key in _HOST_KEYS:
          continue
        if key not in fields:
          raise errors.ConfigError(
              f"unknown config key model.{key}; valid keys: {sorted(fields)}")
        values[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    values["convention"] = config.convention
    conventions_lib.get(values["convention"])  # validates the name
    if values["arch"] not in ARCHS:
      raise errors.ConfigError(f"model.arch must be one of {ARCHS}, got {values['arch']!r}")
    if values["arch"] != "FPN" and values["mask_scoring"]:
      raise errors.ConfigError(
          "model.mask_scoring (the MaskIoU head) is implemented for arch 'FPN' only")
    if float(values["roi_canonical_box_size"]) <= 0:
      raise errors.ConfigError(
          "model.roi_canonical_box_size must be > 0, got "
          f"{values['roi_canonical_box_size']!r}")
    kernels = config.get("kernels", None)
    roi_align = kernels.get("roi_align", None) if kernels is not None else None
    values["roi_align_impl"] = str(roi_align or defaults.kernels.roi_align)
    return cls(**values)

  @property
  def conv(self) -> conventions_lib.Convention:
    return conventions_lib.get(self.convention)

  @property
  def trick_max_boxes(self) -> int:
    """The batched NMS rule in force (`nms_trick_max_boxes`, else the convention's)."""
    if self.nms_trick_max_boxes == -1:
      return self.conv.nms_trick_max_boxes
    return int(self.nms_trick_max_boxes)

  @property
  def feature_names(self) -> Tuple[str, ...]:
    """The feature maps the RPN runs on (and the RoI heads pool from, P6 excepted)."""
    return {"FPN": LEVELS, "C4": ("c4",), "DC5": ("c5",)}[self.arch]

  @property
  def feature_strides(self) -> Tuple[int, ...]:
    """Stride of each of `feature_names` (FPN: `anchor_strides`; C4 / DC5: 16)."""
    return tuple(self.anchor_strides) if self.arch == "FPN" else (16,)

  @property
  def feature_channels(self) -> int:
    """Channels of the RPN input: fpn_channels, or res4 / res5 (dilated) output channels."""
    return {"FPN": self.fpn_channels, "C4": self.res2_out_channels * 4,
            "DC5": self.res2_out_channels * 8}[self.arch]

  @property
  def num_anchors(self) -> int:
    """Anchors per location: the ratios (FPN, one size per level) or sizes x ratios (C4 / DC5)."""
    if self.arch == "FPN":
      return len(self.anchor_ratios)
    return len(self.anchor_ratios) * len(self.anchor_sizes)

  @property
  def box_pool_size(self) -> int:
    """RoIAlign output of the box branch: 7, or 14 for C4 (res5 halves it)."""
    return 14 if self.arch == "C4" else 7

  @property
  def mask_size(self) -> int:
    """Side of the predicted masks and mask targets: 28, or 14 for C4 (7x7 res5 output, deconv)."""
    return 14 if self.arch == "C4" else 28

  @property
  def num_cls_outputs(self) -> int:
    """81 (background last) for mmdet/d2; 91 (background first, COCO ids) for torchvision."""
    return self.num_classes + 1

  @property
  def num_reg_classes(self) -> int:
    return self.num_classes if self.conv.class_layout == "bg_last" else self.num_classes + 1


def image_anchors(cfg: ModelConfig, padded_hw: tuple[int, int]) -> list[np.ndarray]:
  """Anchors of every RPN level for a padded input size; numpy constants, [H_l*W_l*A, 4] each."""
  h, w = padded_hw
  if cfg.arch != "FPN":
    # One level at stride 16 with every size (detectron2 DefaultAnchorGenerator with
    # SIZES [[32, 64, 128, 256, 512]]): A = sizes x ratios, size-major in detectron2's
    # `generate_cell_anchors` loop (for size: for ratio).
    stride = cfg.feature_strides[0]
    cell = anchors_lib.cell_anchors(
        tuple(cfg.anchor_sizes), tuple(cfg.anchor_ratios), round_to_int=cfg.conv.anchor_round,
        size_major=cfg.conv.name == "detectron2")
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


# ---- training helpers (used by MaskRCNN.losses) ----

# The samplers' defaults (parity_spec 4.1: RPN 256 anchors per image, half positive; R-CNN 512
# RoIs per image, 25 %), config_lib.train_config's values: `MaskRCNN.losses` keyword defaults.
_TRAIN_DEFAULTS = config_lib.defaults().train
RPN_BATCH_PER_IMAGE = int(_TRAIN_DEFAULTS.rpn_batch_per_image)
RPN_POSITIVE_FRACTION = float(_TRAIN_DEFAULTS.rpn_positive_fraction)
ROI_BATCH_PER_IMAGE = int(_TRAIN_DEFAULTS.roi_batch_per_image)
ROI_POSITIVE_FRACTION = float(_TRAIN_DEFAULTS.roi_positive_fraction)


def train_class_index(cfg: ModelConfig, labels: jax.Array,
                      category_ids: Optional[Tuple[int, ...]] = None) -> jax.Array:
  """Contiguous dataset labels (0..K-1, as in the batch) -> the model's class index.

  bg_last layouts (mmdet v2, detectron2): the label itself (background = num_classes).
  bg_first (torchvision, background = 0): `category_ids[label]` when a table is given (COCO with
  the 91-way torchvision head: the 80 COCO category ids, `config_lib.COCO_CATEGORY_IDS`, so the
  class index is the category id as torchvision trains it), else label + 1 (a custom dataset with
  num_classes = K). The same index selects the regression slot and the mask channel.
  """
  labels = jnp.asarray(labels, jnp.int32)
  if cfg.conv.class_layout == "bg_last":
    return labels
  if category_ids is not None:
    return jnp.asarray(np.asarray(category_ids, np.int32))[labels]
  return labels + 1


def background_class(cfg: ModelConfig) -> int:
  """The classifier's background index: num_classes (bg_last) or 0 (bg_first)."""
  return cfg.num_classes if cfg.conv.class_layout == "bg_last" else 0


def mask_canvas_hw(cfg: ModelConfig, image_hw: jax.Array) -> jax.Array:
  """[N, 2] size of the bitmap each reference RoIAligns for mask targets.

  mmdet v2 pads the gt masks with the image (`Pad(size_divisor=32)` pads `mask_fields`), so its
  clip bound (`mask_target_single`) is the 32-padded size; detectron2 and torchvision keep the
  masks at the resized image size.
  """
  image_hw = jnp.asarray(image_hw, jnp.int32)
  if cfg.conv.name == "mmdet":
    return (image_hw + 31) // 32 * 32
  return image_hw


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
        freeze_at=cfg.freeze_at, res5_dilation=2 if cfg.arch == "DC5" else 1,
        stem_out_channels=cfg.stem_out_channels, res2_out_channels=cfg.res2_out_channels,
        last_stage=4 if cfg.arch == "C4" else 5, train=self.train, precision=self.precision)
    if cfg.arch == "FPN":
      self.fpn = FPN(cfg.fpn_channels, norm=cfg.fpn_norm or None, train=self.train,
                     precision=self.precision)
    self.rpn_head = heads.RPNHead(cfg.num_anchors, cfg.rpn_num_convs, cfg.feature_channels,
                                  precision=self.precision)
    if cfg.arch == "C4":
      # detectron2 Res5ROIHeads: res5 (the backbone's norm) shared by the box and mask branches.
      self.roi_res5 = Res5Head(
          groups=cfg.groups, width_per_group=cfg.width_per_group,
          stride_in_1x1=cfg.stride_in_1x1, norm=cfg.norm, norm_eps=cfg.norm_eps,
          res2_out_channels=cfg.res2_out_channels, train=self.train, precision=self.precision)
    else:
      self.box_head = heads.BoxHead(
          num_conv=cfg.box_head_num_conv, conv_dim=cfg.box_head_conv_dim,
          num_fc=cfg.box_head_num_fc, fc_dim=cfg.box_head_fc_dim,
          norm=cfg.box_head_norm or None, train=self.train, precision=self.precision)
    self.box_predictor = heads.BoxPredictor(cfg.num_cls_outputs, cfg.num_reg_classes,
                                            precision=self.precision)
    self.mask_head = heads.MaskHead(cfg.num_reg_classes, num_conv=cfg.mask_head_num_conv,
                                    conv_dim=cfg.mask_head_conv_dim,
                                    norm=cfg.mask_head_norm or None,
                                    train=self.train, precision=self.precision)
    if cfg.mask_scoring:
      self.maskiou_head = heads.MaskIoUHead(cfg.num_classes, precision=self.precision)

  # ---- stages, usable one by one (parity tests compare each) ----

  def features(self, images: jax.Array) -> Dict[str, jax.Array]:
    """images [N, Hp, Wp, 3] float32 normalized and padded -> the RPN / RoI feature maps.

    FPN: dict p2..p6 [N, Hp/s, Wp/s, fpn_channels], s = 4..64. C4: {'c4': [N, Hp/16, Wp/16,
    1024]}; DC5: {'c5': [N, Hp/16, Wp/16, 2048]} (channels for the default widths).
    """
    c = self.backbone(images)
    if self.cfg.arch == "FPN":
      return self.fpn(c)
    name = self.cfg.feature_names[0]
    return {name: c[name]}

  def rpn_outputs(self, feats: Dict[str, jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per level: logits [N, H*W*A] and deltas [N, H*W*A, 4] in anchor order."""
    logits, deltas = [], []
    for name in self.cfg.feature_names:
      lg, dl = self.rpn_head(feats[name])
      n = lg.shape[0]
      logits.append(lg.reshape(n, -1))
      deltas.append(dl.reshape(n, -1, 4))
    return logits, deltas

  def _padded_hw(self, feats) -> tuple[int, int]:
    first = feats[self.cfg.feature_names[0]]
    stride = self.cfg.feature_strides[0]
    return (first.shape[1] * stride, first.shape[2] * stride)

  def proposals(self, feats, image_hw: jax.Array):
    """Test-time proposals: [N, P, 4] boxes (resized-image pixels), [N, P] scores, [N, P] valid."""
    cfg = self.cfg
    anchors = image_anchors(cfg, self._padded_hw(feats))
    logits, deltas = self.rpn_outputs(feats)
    fn = lambda lg, dl, hw: rpn_lib.select_proposals(
        lg, dl, anchors, hw, convention=cfg.conv, pre_nms_topk=cfg.rpn_pre_nms_topk_test,
        post_nms_topk=cfg.rpn_post_nms_topk_test, nms_thresh=cfg.rpn_nms_thresh,
        nms_trick_max_boxes=cfg.trick_max_boxes)
    return jax.vmap(fn)(logits, deltas, image_hw)

  def pool(self, feats, boxes: jax.Array, valid: jax.Array, output_size: int) -> jax.Array:
    """RoIAlign of [N, R, 4] boxes -> [N * R, s, s, C] (image-major).

    FPN: on P2..P5 with the convention's level rule; C4 / DC5: on the single stride-16 map
    (detectron2's ROIPooler with one level).
    """
    cfg, conv = self.cfg, self.cfg.conv
    n, r = boxes.shape[:2]
    batch_idx = jnp.repeat(jnp.arange(n, dtype=jnp.int32), r)
    if cfg.arch == "FPN":
      maps, strides = [feats[k] for k in LEVELS[:4]], tuple(cfg.anchor_strides[:4])
    else:
      maps, strides = [feats[cfg.feature_names[0]]], cfg.feature_strides
    return poolers.multilevel_roi_align(
        maps, boxes.reshape(n * r, 4), batch_idx, level_rule=conv.level_map,
        output_size=output_size, sampling_ratio=conv.roi_align_sampling_ratio,
        aligned=conv.roi_align_aligned, strides=strides, max_grid=cfg.roi_align_max_grid,
        valid=valid.reshape(-1), impl=cfg.roi_align_impl,
        canonical_box_size=cfg.roi_canonical_box_size)

  def res5_features(self, feats, boxes: jax.Array, valid: jax.Array) -> jax.Array:
    """C4 only: res5 on the 14x14 RoIAlign of res4 -> [N * R, 7, 7, 2048] (`_shared_roi_transform`
    of detectron2's Res5ROIHeads)."""
    return self.roi_res5(self.pool(feats, boxes, valid, self.cfg.box_pool_size),
                         valid.reshape(-1))

  def box_branch(self, feats, boxes: jax.Array, valid: jax.Array, res5: Optional[jax.Array] = None):
    """Class logits [N, R, K_cls] and deltas [N, R, K_reg, 4] for [N, R, 4] boxes.

    C4: the box predictor reads the mean over the 7x7 res5 output (`res5`: precomputed
    `res5_features`, else computed here).
    """
    n, r = boxes.shape[:2]
    if self.cfg.arch == "C4":
      if res5 is None:
        res5 = self.res5_features(feats, boxes, valid)
      x = jnp.mean(res5, axis=(1, 2))
    else:
      x = self.box_head(self.pool(feats, boxes, valid, self.cfg.box_pool_size),
                        valid.reshape(-1))
    logits, deltas = self.box_predictor(x)
    return logits.reshape(n, r, -1), deltas.reshape(n, r, -1, 4)

  def mask_branch(self, feats, boxes: jax.Array, labels: jax.Array, valid: jax.Array,
                  res5: Optional[jax.Array] = None):
    """Mask logits [N, D, M, M] of each box's class (+ MaskIoU [N, D] for Mask Scoring).

    M = `cfg.mask_size` (28; 14 for C4, whose mask head reads the res5 output `res5`
    [N * D, 7, 7, C] when given, as detectron2 reuses the box features of the foreground RoIs).
    """
    cfg = self.cfg
    n, d = boxes.shape[:2]
    if cfg.arch == "C4":
      roi_feats = res5 if res5 is not None else self.res5_features(feats, boxes, valid)
    else:
      roi_feats = self.pool(feats, boxes, valid, 14)
    all_logits = self.mask_head(roi_feats, valid.reshape(-1))  # [N*D, M, M, K_mask]
    channel = labels.reshape(-1)  # bg_last: label c -> channel c; tv: category index -> channel
    logits = jnp.take_along_axis(all_logits, channel[:, None, None, None], axis=-1)[..., 0]
    mask_iou = None
    if cfg.mask_scoring:
      iou = self.maskiou_head(roi_feats, logits)  # [N*D, 80]
      mask_iou = jnp.take_along_axis(iou, channel[:, None], axis=-1)[:, 0].reshape(n, d)
    return logits.reshape(n, d, cfg.mask_size, cfg.mask_size), mask_iou

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
      valid [N, D] bool, paste_boxes [N, D, 4], mask_probs [N, D, M, M] float32 (M = 28, or 14
      for C4; sigmoid of the label's channel) and, for Mask Scoring R-CNN, mask_scores [N, D] (MaskIoU x score).
    """
    cfg = self.cfg
    feats = self.features(images)
    props, _, props_valid = self.proposals(feats, image_hw)
    logits, deltas = self.box_branch(feats, props, props_valid)
    det_fn = lambda lg, dl, p, v, hw, ohw, sf: postprocess.detect(
        lg, dl, p, v, hw, ohw, sf, convention=cfg.conv,
        bbox_reg_weights=tuple(cfg.bbox_reg_weights), score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh, max_detections=cfg.detections_per_image,
        max_candidates=cfg.max_candidates, nms_trick_max_boxes=cfg.trick_max_boxes)
    dets = jax.vmap(det_fn)(logits, deltas, props, props_valid, image_hw, orig_hw, scale_factor)
    mask_logits, mask_iou = self.mask_branch(feats, dets["mask_rois"], dets["labels"],
                                             dets["valid"])
    out = dict(boxes=dets["boxes"], scores=dets["scores"], labels=dets["labels"],
               valid=dets["valid"], paste_boxes=dets["paste_boxes"],
               mask_probs=jax.nn.sigmoid(mask_logits))
    if cfg.mask_scoring:
      out["mask_scores"] = jnp.where(dets["valid"], mask_iou * dets["scores"], 0.0)
    return out

  # ---- training ----
  # `losses` runs the stages of detectron2's decomposition one after the other: `rpn_losses`
  # (anchor matching + sampling, RPN losses), the training proposals, `label_and_sample_proposals`
  # (R-CNN matching + sampling) and `roi_heads_losses` (box, mask and MaskIoU branches). The two
  # random steps can be replaced by given samples (`samples`): the training-parity tests inject
  # what a reference framework drew, and everything else is computed here.

  def losses(self, batch: Dict[str, jax.Array], rng: jax.Array, *,
             category_ids: Optional[Tuple[int, ...]] = None,
             samples: Optional[Dict[str, jax.Array]] = None,
             rpn_batch_per_image: int = RPN_BATCH_PER_IMAGE,
             roi_batch_per_image: int = ROI_BATCH_PER_IMAGE,
             rpn_positive_fraction: float = RPN_POSITIVE_FRACTION,
             roi_positive_fraction: float = ROI_POSITIVE_FRACTION,
             mask_rows_per_image: Optional[int] = None,
             ) -> tuple[jax.Array, Dict[str, jax.Array]]:
    """Train-mode forward: targets, sampling and the convention's losses (parity_spec 4).

    Build the module with `train=True` for trainable norms ('bn' updates batch statistics: call
    `model.apply(variables, batch, rng, method=MaskRCNN.losses, mutable=['batch_stats'])`);
    'frozen_bn' / 'gn' need no mutable collection.

    Args:
      batch: dict of fixed-shape arrays (B images, M = max instances, S = crop size):
        image [B, H, W, 3] float32 normalized + zero padded; image_hw [B, 2] int32 resized
        unpadded size; gt_boxes [B, M, 4] float32 xyxy resized pixels; gt_labels [B, M] int32
        contiguous 0..K-1 (mapped with `train_class_index`); gt_valid [B, M] bool; gt_crowd
        [B, M] bool (optional; crowd GTs are left out, as all three references do);
        gt_masks [B, M, S, S] uint8 in {0, 1}, each instance's mask cropped to a box and
        resampled to S x S; gt_mask_boxes [B, M, 4] float32 xyxy (optional, default gt_boxes):
        the box each crop covers. The mask targets are exact when a crop is the bitmap itself:
        an integer box of S x S pixels holding the whole instance (tests/test_parity_training.py).
      rng: PRNG key for the RPN and R-CNN samplers (unused by a step whose samples are given).
      category_ids: bg_first layouts only: the label -> class index table (see
        `train_class_index`); static.
      samples: optional dict replacing the random steps by given ones (A = all anchors of the
        padded size in `image_anchors` order, P = proposals per image, R = RoIs per image):
        * rpn_pos, rpn_neg [B, A] bool: the sampled positive / negative anchors;
        * proposals [B, P, 4] float32 xyxy (resized pixels), proposals_valid [B, P] bool: the
          proposals of the R-CNN stage (the GT boxes are appended here), in place of ours;
        * roi_index [B, R] int32, roi_valid [B, R] bool (needs `proposals`): the sampled RoIs
          as indices into proposals ++ gt_boxes (P + M candidates), at most
          int(roi_batch_per_image * roi_positive_fraction) of them positive and R <=
          roi_batch_per_image.
        Matching, box encoding, mask targets and losses are computed as always; a given sample
        is positive or negative by our own matcher.
      rpn_batch_per_image, roi_batch_per_image: sampler sizes (static; the references' 256 and
        512 by default).
      rpn_positive_fraction, roi_positive_fraction: the samplers' foreground shares (static;
        0.5 and 0.25 as in every reference: detectron2 MODEL.RPN.POSITIVE_FRACTION /
        MODEL.ROI_HEADS.POSITIVE_FRACTION, mmdet `sampler.pos_fraction`).
      mask_rows_per_image: static number of RoI rows per image the mask branch runs on (the
        positives come first); None: int(roi_batch_per_image * roi_positive_fraction), the most
        the sampler draws. Given samples may use a bound of their positive count instead (the
        mask head's work on empty rows is saved); positives beyond it would be left out.

    Returns:
      (total, terms): total float32 scalar = the sum of the terms whose key starts with "loss_"
      (loss_rpn_cls, loss_rpn_box, loss_cls, loss_box, loss_mask, and loss_mask_iou for Mask
      Scoring R-CNN); terms also holds statistics without gradient: num_pos_anchors,
      num_fg_rois (means per image), cls_accuracy, fg_cls_accuracy.
    """
    samples = _check_samples(samples)
    cfg = self.cfg
    images = batch["image"]
    n = images.shape[0]
    image_hw = jnp.asarray(batch["image_hw"], jnp.int32)
    gt_boxes = jnp.asarray(batch["gt_boxes"], jnp.float32)
    gt = dict(boxes=gt_boxes,
              valid=targets_lib.usable_gt(gt_boxes, batch["gt_valid"], batch.get("gt_crowd")),
              classes=train_class_index(cfg, batch["gt_labels"], category_ids))
    rng_rpn, rng_roi = jax.random.split(rng)

    feats = self.features(images)
    logits, deltas = self.rpn_outputs(feats)
    anchors = image_anchors(cfg, self._padded_hw(feats))
    terms, rpn_pos = self.rpn_losses(logits, deltas, anchors, gt, rng_rpn, samples,
                                     num_samples=rpn_batch_per_image,
                                     positive_fraction=rpn_positive_fraction)

    # Proposals (no gradient) and R-CNN sampling.
    if "proposals" in samples:
      props = jnp.asarray(samples["proposals"], jnp.float32)
      props_valid = jnp.asarray(samples["proposals_valid"], bool)
    else:
      fn = lambda lg, dl, hw: rpn_lib.train_proposals(
          lg, dl, anchors, hw, convention=cfg.conv, pre_nms_topk=cfg.rpn_pre_nms_topk_train,
          post_nms_topk=cfg.rpn_post_nms_topk_train, nms_thresh=cfg.rpn_nms_thresh,
          nms_trick_max_boxes=cfg.trick_max_boxes)
      props, _, props_valid = jax.vmap(fn)(logits, deltas, image_hw)
    roi_t = self.label_and_sample_proposals(props, props_valid, gt, rng_roi, samples,
                                            num_samples=roi_batch_per_image,
                                            positive_fraction=roi_positive_fraction)
    cls_logits, roi_terms = self.roi_heads_losses(
        feats, roi_t, gt, batch,
        num_mask_rows=(int(roi_batch_per_image * roi_positive_fraction)
                       if mask_rows_per_image is None else int(mask_rows_per_image)))
    terms.update(roi_terms)

    total = sum(v for k, v in terms.items() if k.startswith("loss_"))
    # Statistics (d2 logs fast_rcnn/cls_accuracy and fg_cls_accuracy).
    pred = jnp.argmax(jax.lax.stop_gradient(cls_logits), axis=-1)
    correct = (pred == roi_t["classes"]).astype(jnp.float32)
    valid_f, pos_f = roi_t["valid"].astype(jnp.float32), roi_t["pos"].astype(jnp.float32)
    terms["num_pos_anchors"] = jnp.sum(rpn_pos) / n
    terms["num_fg_rois"] = jnp.sum(pos_f) / n
    terms["cls_accuracy"] = jnp.sum(correct * valid_f) / jnp.maximum(jnp.sum(valid_f), 1.0)
    terms["fg_cls_accuracy"] = jnp.sum(correct * pos_f) / jnp.maximum(jnp.sum(pos_f), 1.0)
    return total, terms

  def rpn_losses(self, logits, deltas, anchors, gt, rng, samples, *, num_samples: int,
                 positive_fraction: float):
    """RPN stage of `losses`: anchor matching, sampling (or `samples['rpn_pos' / 'rpn_neg']`)
    and the RPN losses (detectron2 `RPN.losses`).

    Args: logits / deltas per level ([B, A_l], [B, A_l, 4], `rpn_outputs`); anchors per level
      ([A_l, 4] numpy, `image_anchors`); gt dict (boxes [B, M, 4], valid [B, M], classes); rng;
      samples (see `losses`); the sampler's num_samples / positive_fraction per image.
    Returns: (dict(loss_rpn_cls, loss_rpn_box), pos [B, A] bool sampled positives).
    """
    from maskrcnn_jax.training import losses as losses_lib  # training imports modeling

    conv = self.cfg.conv
    n = logits[0].shape[0]
    all_anchors = jnp.asarray(np.concatenate(anchors, axis=0))
    if "rpn_pos" in samples:
      pos = jnp.asarray(samples["rpn_pos"], bool)
      neg = jnp.asarray(samples["rpn_neg"], bool)
      if pos.shape != (n, all_anchors.shape[0]) or neg.shape != pos.shape:
        raise ValueError(f"samples['rpn_pos'] / ['rpn_neg'] must be [{n}, {all_anchors.shape[0]}]"
                         f" (all anchors), got {pos.shape} / {neg.shape}")
      matches = jax.vmap(lambda g, v: targets_lib.rpn_match(all_anchors, g, v, convention=conv)[0])(
          gt["boxes"], gt["valid"])
      box_targets = jax.vmap(lambda g, m, p: targets_lib.rpn_sampled_targets(
          all_anchors, g, m, p, convention=conv))(gt["boxes"], matches, pos)
    else:
      rpn_t = jax.vmap(
          lambda g, v, r: targets_lib.rpn_targets(
              all_anchors, g, v, r, convention=conv, num_samples=num_samples,
              positive_fraction=positive_fraction))(gt["boxes"], gt["valid"],
                                                    jax.random.split(rng, n))
      pos, neg, box_targets = rpn_t["pos"], rpn_t["neg"], rpn_t["box_targets"]
    terms = losses_lib.rpn_losses(
        jnp.concatenate(logits, axis=1), jnp.concatenate(deltas, axis=1), pos, neg, box_targets,
        convention=conv, num_samples_per_image=num_samples)
    return terms, pos

  def label_and_sample_proposals(self, proposals, proposals_valid, gt, rng, samples, *,
                                 num_samples: int, positive_fraction: float):
    """R-CNN sampling stage of `losses` (detectron2 `ROIHeads.label_and_sample_proposals`).

    proposals [B, P, 4], proposals_valid [B, P]; gt as in `rpn_losses`; `samples['roi_index' /
    'roi_valid']` replace the sampler. Returns the `targets.roi_rows` dict of [B, R] rows
    (positives first), without gradient.
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

  def roi_heads_losses(self, feats, roi_t, gt, batch, *, num_mask_rows: int):
    """Box, mask and MaskIoU branches of `losses` on sampled RoIs (detectron2 `_forward_box`,
    `_forward_mask`).

    Args: feats (`features`); roi_t (`label_and_sample_proposals`, positives in the first
      `num_mask_rows` rows); gt as in `rpn_losses`; batch (gt_masks, optional gt_mask_boxes,
      image_hw; see `losses`).
    Returns: (class logits [B, R, K_cls], dict(loss_cls, loss_box, loss_mask[, loss_mask_iou])).
    """
    from maskrcnn_jax.training import losses as losses_lib  # training imports modeling

    cfg, conv = self.cfg, self.cfg.conv
    n = roi_t["rois"].shape[0]
    image_hw = jnp.asarray(batch["image_hw"], jnp.int32)
    # C4: res5 runs once on the sampled RoIs; the mask branch reuses the rows of the positives.
    res5 = (self.res5_features(feats, roi_t["rois"], roi_t["valid"]) if cfg.arch == "C4"
            else None)
    cls_logits, box_deltas = self.box_branch(feats, roi_t["rois"], roi_t["valid"], res5)
    terms = losses_lib.rcnn_losses(
        cls_logits, box_deltas, roi_t["classes"], roi_t["valid"], roi_t["pos"],
        roi_t["box_targets"], roi_t["classes"], convention=conv)

    # Masks on the positive rows (the first num_mask_rows rows hold every positive).
    p = num_mask_rows
    m_rois, m_pos = roi_t["rois"][:, :p], roi_t["pos"][:, :p]
    m_gt = roi_t["matched_gt"][:, :p]
    m_channel = jnp.where(m_pos, roi_t["classes"][:, :p], 0)
    m_res5 = None
    if res5 is not None:
      r = roi_t["rois"].shape[1]
      m_res5 = res5.reshape((n, r) + res5.shape[1:])[:, :p].reshape((n * p,) + res5.shape[1:])
    mask_logits, mask_iou = self.mask_branch(feats, m_rois, m_channel, m_pos, m_res5)
    crop_boxes = jnp.asarray(batch.get("gt_mask_boxes", gt["boxes"]), jnp.float32)
    m_crop_boxes = jnp.take_along_axis(crop_boxes, m_gt[..., None], axis=1)
    crops = jax.vmap(lambda c, i: c[i])(jnp.asarray(batch["gt_masks"]), m_gt)
    canvas = mask_canvas_hw(cfg, image_hw)
    settings = targets_lib.mask_target_settings(conv)
    m_targets = jax.vmap(lambda r, g, c, hw: targets_lib.mask_targets(
        r, g, c, hw, max_grid=cfg.roi_align_max_grid, output_size=cfg.mask_size, **settings))(
            m_rois, m_crop_boxes, crops, canvas)
    terms["loss_mask"] = losses_lib.mask_loss(mask_logits, m_targets, m_pos)
    if cfg.mask_scoring:
      frac = jax.vmap(targets_lib.mask_area_fraction)(m_rois, m_crop_boxes, crops, canvas)
      iou_t = targets_lib.maskiou_targets(jax.lax.stop_gradient(mask_logits), m_targets, frac)
      terms["loss_mask_iou"] = losses_lib.maskiou_loss(mask_iou, iou_t, m_pos)
    return cls_logits, terms


SAMPLE_GROUPS = (("rpn_pos", "rpn_neg"), ("proposals", "proposals_valid"),
                 ("roi_index", "roi_valid"))


def _check_samples(samples) -> Dict[str, Any]:
  """`MaskRCNN.losses`' samples: known keys, in complete groups, roi_index only with proposals."""
  samples = dict(samples or {})
  known = {k for g in SAMPLE_GROUPS for k in g}
  unknown = sorted(set(samples) - known)
  if unknown:
    raise ValueError(f"unknown samples {unknown}; expected groups {SAMPLE_GROUPS}")
  for group in SAMPLE_GROUPS:
    given = [k for k in group if k in samples]
    if given and len(given) != len(group):
      raise ValueError(f"samples {given} given without {sorted(set(group) - set(given))}")
  if "roi_index" in samples and "proposals" not in samples:
    raise ValueError("samples['roi_index'] indexes proposals ++ gt_boxes: give samples['proposals']"
                     " too")
  return samples
