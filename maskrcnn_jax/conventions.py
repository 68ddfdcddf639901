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
  # 3.2 resize: 'mmdet' (cv2 INTER_LINEAR on uint8, int(x+0.5) sizes), 'detectron2' (PIL BILINEAR on
  # uint8, int(x+0.5) sizes), 'torchvision' (bilinear on the normalized float image, floor sizes).
  resize: str
  # 3.3 order: torchvision normalizes before resizing; the others resize the uint8 image first.
  normalize_before_resize: bool
  # 3.7 anchors: torchvision rounds the cell anchors (half-even) and derives the stride per level
  # from padded_size // feature_size (P6 can get stride 61).
  anchor_round: bool
  anchor_dynamic_stride: bool
  # 3.8 box coder: 'mmdet' (multiply by stds, symmetric dw/dh clamp) or 'detectron2' (divide by
  # weights, upper clamp only; torchvision is identical).
  box_coder: str
  # 3.9 RPN: rank proposals by 'sigmoid' (mmdet) or 'logits' (d2, tv) before per-level top-k.
  rpn_rank_on: str
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
  # 3.13 mask RoIs: mmdet feeds det_boxes_original * scale_factor (a float32 round trip).
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
  # 3.10 score-tie order of NMS: 'stable' (tv/d2) or 'stable' too for mmdet (torch's unstable
  # order cannot be reproduced; parity_spec 3.9 recommends a stable sort).
  # 2.10 class layout: 'bg_last' (mmdet v2, d2: 81-way, bg = 80) or 'bg_first' (tv: 91-way, bg = 0).
  class_layout: str
  # 3.5 BatchNorm eps when no checkpoint decides it (training from scratch); a converted
  # checkpoint records its own (checkpoints/provenance.py: torchvision COCO_V1 ran with 0.0).
  bn_eps: float = 1e-5


MMDET = Convention(
    name="mmdet",
    resize="mmdet",
    normalize_before_resize=False,
    anchor_round=False,
    anchor_dynamic_stride=False,
    box_coder="mmdet",
    rpn_rank_on="sigmoid",
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
)

DETECTRON2 = Convention(
    name="detectron2",
    resize="detectron2",
    normalize_before_resize=False,
    anchor_round=False,
    anchor_dynamic_stride=False,
    box_coder="detectron2",
    rpn_rank_on="logits",
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
)

TORCHVISION = Convention(
    name="torchvision",
    resize="torchvision",
    normalize_before_resize=True,
    anchor_round=True,
    anchor_dynamic_stride=True,
    box_coder="detectron2",
    rpn_rank_on="logits",
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
)

_ALL = {c.name: c for c in (MMDET, DETECTRON2, TORCHVISION)}


def get(name: str) -> Convention:
  """Returns the convention called `name`; raises ValueError naming the valid choices."""
  try:
    return _ALL[name]
  except KeyError:
    raise errors.ConfigError(
        f"unknown convention {name!r}; expected one of {sorted(_ALL)}") from None
