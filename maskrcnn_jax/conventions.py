"""The small numerical differences between mmdetection v2, detectron2 and torchvision, as data.

One model serves all three frameworks; each place where they differ reads one field of a
`Convention` (see ../shared/reference/parity_spec.md section 3.0 and section 5 item 3). A config
names its convention with `config.convention`; `get(name)` returns the frozen record.
"""
from __future__ import annotations

import dataclasses

from maskrcnn_jax import errors

# nms_trick_max_boxes of a framework that applies the coordinate-offset trick at every size.
NMS_TRICK_ALWAYS = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Convention:
  """Per-framework inference/training conventions. Field docs cite parity_spec sections."""

  name: str
  # 3.1 decoding: 'cv2' (mmcv.imfrombytes: cv2.imdecode, EXIF applied by the flag) or 'pil'
  # (PIL .convert('RGB')); detectron2 also transposes by EXIF; the channel order returned.
  decoder: str
  decode_exif_transpose: bool
  channel_order: str  # 'bgr' (mmdet, detectron2) | 'rgb' (torchvision)
  # 2.x annotation loading: which boxes are dropped as degenerate ('mmdet' | 'detectron2' |
  # 'torchvision'; data/coco.py:COCODataset._degenerate states each rule).
  degenerate_box_rule: str
  # 3.2 resize: 'mmdet' (cv2 INTER_LINEAR on uint8, int(x+0.5) sizes), 'detectron2' (PIL BILINEAR on
  # uint8, int(x+0.5) sizes), 'torchvision' (bilinear on the normalized float image, floor sizes).
  resize: str
  # 3.3 order: torchvision normalizes before resizing; the others resize the uint8 image first.
  normalize_before_resize: bool
  # 3.7 anchors: torchvision rounds the cell anchors (half-even) and derives the stride per level
  # from padded_size // feature_size (P6 can get stride 61).
  anchor_round: bool
  anchor_dynamic_stride: bool
  # Cell-anchor order with several sizes on one level (C4 / DC5): size-major (detectron2
  # `generate_cell_anchors`: for size, for ratio) or ratio-major (mmdet, torchvision).
  anchor_size_major: bool
  # 3.8 box coder: 'mmdet' (multiply by stds, symmetric dw/dh clamp) or 'detectron2' (divide by
  # weights, upper clamp only; torchvision is identical).
  box_coder: str
  # 3.9 RPN: rank proposals by 'sigmoid' (mmdet) or 'logits' (d2, tv) before per-level top-k.
  rpn_rank_on: str
  # 3.9 RPN: the score its NMS and the returned proposal scores use: 'logits' (d2) or 'sigmoid'
  # (mmdet; torchvision sigmoids before its NMS).
  rpn_nms_score: str
  # 3.9 RPN small-box filter: keep w > min and h > min ('positive', min 0) or w >= 1e-3 (tv).
  rpn_min_size: float
  rpn_min_size_inclusive: bool
  # 3.11 RoIAlign flavour.
  roi_align_aligned: bool
  roi_align_sampling_ratio: int
  # 3.11 level mapping: 'mmdet' | 'detectron2' | 'torchvision' (epsilon placement differs).
  level_map: str
  # 3.12 detection post-processing.
  det_nms_in_original_coords: bool  # mmdet rescales boxes before the class-wise NMS
  det_min_box_side: float  # tv drops boxes with a side < 1e-2 before NMS; 0 = no filter
  drop_empty_after_rescale: bool  # d2 detector_postprocess drops zero-width/height boxes
  # 3.13 mask RoIs: mmdet feeds det_boxes_original * scale_factor (a float32 round trip) and
  # pastes at that product divided again; only meaningful with det_nms_in_original_coords.
  mask_roi_round_trip: bool
  # 3.13 paste: 'grid_sample' (mmdet/d2) or 'tv_legacy'; threshold >= 0.5 or > 0.5.
  paste: str
  mask_threshold_inclusive: bool
  # 3.10 batched NMS (RPN per level, detections per class): the coordinate-offset trick (boxes +
  # idx * (max + 1), which rounds the coordinates) when the call has at most this many boxes,
  # exact per-group NMS above (ops/nms.py:trick_applies). torchvision's batched_nms, which
  # detectron2 calls, switches at boxes.numel() > 4000 on CPU (1000 boxes; 100,000 on CUDA,
  # i.e. 25000 boxes: set model.nms_trick_max_boxes=25000 to reproduce a CUDA run); mmcv's
  # batched_nms offsets at every size.
  nms_trick_max_boxes: int
  # 2.10 class layout: 'bg_last' (mmdet v2, d2: 81-way, bg = 80) or 'bg_first' (tv: 91-way, bg = 0).
  class_layout: str
  # COCO json results: mmdet converts xyxy -> xywh in float64 (`xyxy2xywh` on numpy), the others
  # subtract in float32 (evaluation/coco_format.py).
  coco_wh_float64: bool
  # 4.1 training targets: the matcher ('mmdet' MaxIoUAssigner or 'detectron2' Matcher, which
  # torchvision's equals) and how each builds its mask targets (ops/targets.py:mask_targets):
  # RoIAlign aligned or not, proposals clipped to the mask canvas, targets binarized at 0.5;
  # the canvas is the resized image padded to this multiple (mmdet pads the gt masks with the
  # image: 32; detectron2 / torchvision keep the resized size: 1).
  matcher: str
  mask_target_aligned: bool
  mask_target_clip_to_canvas: bool
  mask_target_binarize: bool
  mask_target_canvas_divisor: int
  # 4.2 losses: smooth-L1 beta of the box losses (0 = L1: mmdet L1Loss, detectron2
  # SMOOTH_L1_BETA 0; torchvision 1/9) and the RPN normalizer: 'sampled' (the number of sampled
  # anchors: mmdet avg_factor, torchvision) or 'batch' (detectron2: batch_size_per_image x images).
  box_loss_beta: float
  rpn_loss_normalizer: str
  # 4.1 RPN anchors that take part in training: mmdet marks an anchor location invalid when it
  # lies beyond the image's own padded shape (`AnchorGenerator.valid_flags` with the image's
  # pad_shape, the image padded to this multiple; allowed_border -1 adds nothing): such anchors
  # are neither matched nor sampled. 0: every anchor of the batch canvas (detectron2 and
  # torchvision, whose BOUNDARY_THRESH -1 keeps all).
  rpn_anchor_pad_divisor: int
  # 3.5 BatchNorm eps when no checkpoint decides it (training from scratch); a converted
  # checkpoint records its own (checkpoints/provenance.py: torchvision COCO_V1 ran with 0.0).
  bn_eps: float = 1e-5


MMDET = Convention(
    name="mmdet",
    decoder="cv2",
    decode_exif_transpose=False,
    channel_order="bgr",
    degenerate_box_rule="mmdet",
    resize="mmdet",
    normalize_before_resize=False,
    anchor_round=False,
    anchor_dynamic_stride=False,
    anchor_size_major=False,
    box_coder="mmdet",
    rpn_rank_on="sigmoid",
    rpn_nms_score="sigmoid",
    rpn_min_size=0.0,
    rpn_min_size_inclusive=False,
    roi_align_aligned=True,
    roi_align_sampling_ratio=0,
    level_map="mmdet",
    det_nms_in_original_coords=True,
    det_min_box_side=0.0,
    drop_empty_after_rescale=False,
    mask_roi_round_trip=True,
    paste="grid_sample",
    mask_threshold_inclusive=True,
    nms_trick_max_boxes=NMS_TRICK_ALWAYS,
    class_layout="bg_last",
    coco_wh_float64=True,
    matcher="mmdet",
    mask_target_aligned=True,
    mask_target_clip_to_canvas=True,
    mask_target_binarize=True,
    mask_target_canvas_divisor=32,
    box_loss_beta=0.0,
    rpn_loss_normalizer="sampled",
    rpn_anchor_pad_divisor=32,
)

DETECTRON2 = Convention(
    name="detectron2",
    decoder="pil",
    decode_exif_transpose=True,
    channel_order="bgr",
    degenerate_box_rule="detectron2",
    resize="detectron2",
    normalize_before_resize=False,
    anchor_round=False,
    anchor_dynamic_stride=False,
    anchor_size_major=True,
    box_coder="detectron2",
    rpn_rank_on="logits",
    rpn_nms_score="logits",
    rpn_min_size=0.0,
    rpn_min_size_inclusive=False,
    roi_align_aligned=True,
    roi_align_sampling_ratio=0,
    level_map="detectron2",
    det_nms_in_original_coords=False,
    det_min_box_side=0.0,
    drop_empty_after_rescale=True,
    mask_roi_round_trip=False,
    paste="grid_sample",
    mask_threshold_inclusive=True,
    nms_trick_max_boxes=1000,  # torchvision batched_nms on CPU (see the field)
    class_layout="bg_last",
    coco_wh_float64=False,
    matcher="detectron2",
    mask_target_aligned=True,
    mask_target_clip_to_canvas=False,
    mask_target_binarize=True,
    mask_target_canvas_divisor=1,
    box_loss_beta=0.0,
    rpn_loss_normalizer="batch",
    rpn_anchor_pad_divisor=0,
)

TORCHVISION = Convention(
    name="torchvision",
    decoder="pil",
    decode_exif_transpose=False,
    channel_order="rgb",
    degenerate_box_rule="torchvision",
    resize="torchvision",
    normalize_before_resize=True,
    anchor_round=True,
    anchor_dynamic_stride=True,
    anchor_size_major=False,
    box_coder="detectron2",
    rpn_rank_on="logits",
    rpn_nms_score="sigmoid",
    rpn_min_size=1e-3,
    rpn_min_size_inclusive=True,
    roi_align_aligned=False,
    roi_align_sampling_ratio=2,
    level_map="torchvision",
    det_nms_in_original_coords=False,
    det_min_box_side=1e-2,
    drop_empty_after_rescale=False,
    mask_roi_round_trip=False,
    paste="tv_legacy",
    mask_threshold_inclusive=False,
    nms_trick_max_boxes=1000,  # batched_nms on CPU (see the field)
    class_layout="bg_first",
    coco_wh_float64=False,
    matcher="detectron2",
    mask_target_aligned=False,
    mask_target_clip_to_canvas=False,
    mask_target_binarize=False,
    mask_target_canvas_divisor=1,
    box_loss_beta=1.0 / 9.0,
    rpn_loss_normalizer="sampled",
    rpn_anchor_pad_divisor=0,
)

_ALL = {c.name: c for c in (MMDET, DETECTRON2, TORCHVISION)}
# The other spellings users and checkpoint tools write (the one alias table of the project).
ALIASES = {"mmdetection": "mmdet", "mm": "mmdet", "d2": "detectron2", "tv": "torchvision"}


def canonical_name(name: str) -> str:
  """'d2' -> 'detectron2', 'tv' -> 'torchvision', 'mmdetection' / 'mm' -> 'mmdet'; other strings
  are returned unchanged (`get` validates)."""
  return ALIASES.get(name, name)


def get(name: str) -> Convention:
  """Returns the convention called `name` (or an alias); raises errors.ConfigError naming the
  valid choices."""
  try:
    return _ALL[canonical_name(name)]
  except KeyError:
    raise errors.ConfigError(
        f"unknown convention {name!r}; expected one of {sorted(_ALL)}") from None
