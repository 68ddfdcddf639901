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

from maskrcnn_jax import config_lib
from maskrcnn_jax import conventions as conventions_lib
from maskrcnn_jax import errors
from maskrcnn_jax.modeling import heads, roi_heads as roi_heads_lib, rpn as rpn_lib
from maskrcnn_jax.modeling.fpn import FPN
from maskrcnn_jax.modeling.resnet import Res5Head, ResNet
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


# ---- training helpers (used by MaskRCNN.losses) ----

# The samplers' defaults (parity_spec 4.1: RPN 256 anchors per image, half positive; R-CNN 512
# RoIs per image, 25 %), config_lib.train_config's values: `MaskRCNN.losses` keyword defaults.
_TRAIN_DEFAULTS = config_lib.defaults().train
RPN_BATCH_PER_IMAGE = int(_TRAIN_DEFAULTS.rpn_batch_per_image)
RPN_POSITIVE_FRACTION = float(_TRAIN_DEFAULTS.rpn_positive_fraction)
ROI_BATCH_PER_IMAGE = int(_TRAIN_DEFAULTS.roi_batch_per_image)
ROI_POSITIVE_FRACTION = float(_TRAIN_DEFAULTS.roi_positive_fraction)


class MaskRCNN(nn.Module):
  """Backbone + FPN + RPN + RoI heads (box, mask, MaskIoU): the wiring of the stages.

  The stages: `features` (backbone, FPN), `rpn` (modeling/rpn.py: `RPN`), `roi_heads`
  (modeling/roi_heads.py: `StandardROIHeads`, or `Res5ROIHeads` for C4). Every layer with
  variables is created here, under the names converted and trained checkpoints use (backbone,
  fpn, rpn_head, box_head / roi_res5, box_predictor, mask_head, maskiou_head), and handed to the
  stage that runs it; `rpn` and `roi_heads` own no variables.
  """
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
    self.rpn = rpn_lib.RPN(cfg, head=self.rpn_head)
    self.box_predictor = heads.BoxPredictor(cfg.num_cls_outputs, cfg.num_reg_classes,
                                            precision=self.precision)
    self.mask_head = heads.MaskHead(cfg.num_reg_classes, num_conv=cfg.mask_head_num_conv,
                                    conv_dim=cfg.mask_head_conv_dim,
                                    norm=cfg.mask_head_norm or None,
                                    train=self.train, precision=self.precision)
    maskiou_head = None
    if cfg.mask_scoring:
      self.maskiou_head = maskiou_head = heads.MaskIoUHead(cfg.num_classes,
                                                           precision=self.precision)
    if cfg.arch == "C4":
      # detectron2 Res5ROIHeads: res5 (the backbone's norm) shared by the box and mask branches.
      self.roi_res5 = Res5Head(
          groups=cfg.groups, width_per_group=cfg.width_per_group,
          stride_in_1x1=cfg.stride_in_1x1, norm=cfg.norm, norm_eps=cfg.norm_eps,
          res2_out_channels=cfg.res2_out_channels, train=self.train, precision=self.precision)
      self.roi_heads = roi_heads_lib.Res5ROIHeads(
          cfg=cfg, res5=self.roi_res5, box_predictor=self.box_predictor,
          mask_head=self.mask_head, maskiou_head=maskiou_head)
    else:
      self.box_head = heads.BoxHead(
          num_conv=cfg.box_head_num_conv, conv_dim=cfg.box_head_conv_dim,
          num_fc=cfg.box_head_num_fc, fc_dim=cfg.box_head_fc_dim,
          norm=cfg.box_head_norm or None, train=self.train, precision=self.precision)
      self.roi_heads = roi_heads_lib.StandardROIHeads(
          cfg=cfg, box_head=self.box_head, box_predictor=self.box_predictor,
          mask_head=self.mask_head, maskiou_head=maskiou_head)

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
    feats = self.features(images)
    props, _, props_valid = self.rpn(feats, image_hw)
    return self.roi_heads(feats, props, props_valid, image_hw, orig_hw, scale_factor)

  # ---- training ----
  # `losses` runs the stages of detectron2's decomposition one after the other: the RPN's
  # losses (anchor matching + sampling), the training proposals, the RoI heads'
  # `label_and_sample_proposals` (R-CNN matching + sampling) and their losses (box, mask and
  # MaskIoU branches). The two random steps can be replaced by given samples (`samples`): the
  # training-parity tests inject what a reference framework drew, and everything else is
  # computed here.

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
              classes=roi_heads_lib.train_class_index(cfg, batch["gt_labels"], category_ids))
    rng_rpn, rng_roi = jax.random.split(rng)

    feats = self.features(images)
    logits, deltas = self.rpn.outputs(feats)
    anchors = self.rpn.anchors(feats)
    terms, rpn_pos = self.rpn.losses(logits, deltas, anchors, gt, rng_rpn, samples,
                                     num_samples=rpn_batch_per_image,
                                     positive_fraction=rpn_positive_fraction,
                                     anchor_valid=self.rpn.anchor_valid(feats, image_hw))

    # Proposals (no gradient) and R-CNN sampling.
    if "proposals" in samples:
      props = jnp.asarray(samples["proposals"], jnp.float32)
      props_valid = jnp.asarray(samples["proposals_valid"], bool)
    else:
      props, _, props_valid = self.rpn.training_proposals(logits, deltas, anchors, image_hw)
    roi_t = self.roi_heads.label_and_sample_proposals(
        props, props_valid, gt, rng_roi, samples, num_samples=roi_batch_per_image,
        positive_fraction=roi_positive_fraction)
    terms.update(self.roi_heads.losses(
        feats, roi_t, gt, batch,
        num_mask_rows=(int(roi_batch_per_image * roi_positive_fraction)
                       if mask_rows_per_image is None else int(mask_rows_per_image))))

    total = sum(v for k, v in terms.items() if k.startswith("loss_"))
    terms["num_pos_anchors"] = jnp.sum(rpn_pos) / n
    return total, terms


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
