"""Training targets, fixed shapes: RPN, R-CNN class/box, mask, MaskIoU (parity_spec 4.1, 3.14).

Every function works on one image (vmap over the batch) and takes its randomness as an `rng`.

Ground truth. `gt_boxes [M, 4]` (xyxy, resized-image pixels) padded to M rows with `gt_valid`.
Crowd regions take no part in training in any of the references: detectron2's dataset mapper and
torchvision's `references/detection/coco_utils.py` drop `iscrowd` annotations, and mmdet v2 moves
them to `gt_bboxes_ignore`, which the Mask R-CNN configs never use (`ignore_iof_thr=-1`). So a crowd
GT is simply not a GT here (`usable_gt`). Empty boxes (w or h <= 0) are dropped as well, as d2
`filter_empty_instances`, mmdet `_parse_ann_info` and torchvision's degenerate-box check do.

Ground-truth masks come as crops: `gt_masks [M, S, S]` holds instance m's binary mask inside its
own box `gt_boxes[m]`, resampled to S x S (crop pixel (i, j) covers the box cell
[x1 + j * w / S, x1 + (j + 1) * w / S] x [y1 + i * h / S, ...]; `data/pipeline.py:crop_mask`).
The references RoIAlign the full-image bitmap. `mask_targets` reproduces that RoIAlign sample for
sample (same sample points, grid, validity test and border clamps, per convention) and evaluates
the bitmap's bilinear value at each sample from the crop instead: bilinear interpolation of a
bitmap at y equals the mean of its piecewise-constant extension over the unit window [y, y + 1],
and the crop is a piecewise-constant map of the same shape (zero outside the box), so each crop
cell is weighted by its overlap with the window. This is exact when the crop is the bitmap (an
integer box and S = its side); otherwise the crop's cell size (box side / S) bounds the error of
a value by about half a cell of edge displacement. Against the golden mask targets
(mask_targets.npz, 9 proposals x 784 cells) with S = 112 the binary targets differ in 41 (d2) /
33 (mmdet) of 7056 cells, at most 22 for one proposal; with S = 224 in 14 / 12. The references
differ more among themselves (d2 polygon vs bitmask targets: up to 37 cells per proposal).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from maskrcnn_jax import conventions as conventions_lib
from maskrcnn_jax.ops import box_coder, boxes as boxes_lib, matcher, sampler

# parity_spec 4.1.
RPN_POS_IOU, RPN_NEG_IOU, RPN_MIN_POS_IOU = 0.7, 0.3, 0.3
ROI_IOU = 0.5


def usable_gt(gt_boxes, gt_valid, gt_crowd=None):
  """[M] bool: the GTs that take part in training (valid, not crowd, non-empty box).

  gt_boxes [M, 4] float32 xyxy pixels; gt_valid [M] bool; gt_crowd optional [M] bool.
  """
  ok = jnp.asarray(gt_valid, bool)
  if gt_crowd is not None:
    ok &= ~jnp.asarray(gt_crowd, bool)
  w = gt_boxes[..., 2] - gt_boxes[..., 0]
  h = gt_boxes[..., 3] - gt_boxes[..., 1]
  return ok & (w > 0) & (h > 0)


def _safe_encode(src, gt, ok, *, form, weights):
  """box_coder.encode where `ok`, zeros elsewhere (no inf / nan from unmatched rows)."""
  unit = jnp.asarray([0.0, 0.0, 1.0, 1.0], jnp.float32)
  src = jnp.where(ok[:, None], src, unit)
  gt = jnp.where(ok[:, None], gt, unit)
  return jnp.where(ok[:, None], box_coder.encode(src, gt, form=form, weights=weights), 0.0)


def rpn_match(anchors, gt_boxes, gt_valid, *, convention: conventions_lib.Convention,
              anchor_valid=None):
  """Matches every anchor of one image to the GTs (parity_spec 4.1, RPN rows).

  mmdet MaxIoUAssigner(pos 0.7, neg 0.3, min_pos_iou 0.3, low-quality with all ties, re-pointing
  to the last tied GT); detectron2 Matcher([0.3, 0.7], [0, -1, 1], low-quality on); torchvision's
  Matcher(0.7, 0.3, low-quality) decides the same as detectron2. No border filter (mmdet
  allowed_border = -1, d2 BOUNDARY_THRESH = -1); mmdet leaves out the anchors beyond the image's
  own padded shape (`anchor_valid`, `Convention.rpn_anchor_pad_divisor`), also from the
  low-quality step.

  Args:
    anchors: [A, 4] float32 xyxy padded-image pixels, all levels concatenated.
    gt_boxes: [M, 4] float32 xyxy.
    gt_valid: [M] bool, already `usable_gt` (crowd and padding excluded).
    convention: selects the matcher.
    anchor_valid: optional [A] bool, the anchors that take part (None: all).

  Returns:
    matches [A] int32 (GT index of each anchor, meaningful for foreground), labels [A] int32
    (1 fg, 0 bg, -1 ignore), as `matcher.match`; anchors outside `anchor_valid` are -1.
  """
  iou = boxes_lib.pairwise_iou(jnp.asarray(gt_boxes, jnp.float32),
                               jnp.asarray(anchors, jnp.float32))
  if anchor_valid is not None:
    # IoU -1 is below every threshold and every GT's best IoU: such an anchor is neither
    # matched nor a low-quality match, as if it were not there (mmdet removes it).
    iou = jnp.where(anchor_valid[None, :], iou, -1.0)
  form = convention.matcher
  kw = dict(min_pos_iou=RPN_MIN_POS_IOU) if form == "mmdet" else {}
  matches, labels = matcher.match(iou, gt_valid, form=form, high=RPN_POS_IOU, low=RPN_NEG_IOU,
                                  allow_low_quality=True, **kw)
  if anchor_valid is not None:
    labels = jnp.where(anchor_valid, labels, -1)
  return matches, labels


def rpn_sampled_targets(anchors, gt_boxes, matches, pos, *,
                        convention: conventions_lib.Convention):
  """[A, 4] float32 regression targets (dx, dy, dw, dh) of the sampled positive anchors `pos`
  [A] bool towards their matched GT (`matches` [A] int32); 0 elsewhere. The RPN coder has unit
  weights / stds in every reference."""
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  return _safe_encode(jnp.asarray(anchors, jnp.float32), gt_boxes[matches], pos,
                      form=convention.box_coder, weights=(1.0, 1.0, 1.0, 1.0))


def rpn_targets(anchors, gt_boxes, gt_valid, rng, *, convention: conventions_lib.Convention,
                num_samples: int = 256, positive_fraction: float = 0.5, anchor_valid=None):
  """Anchor labels and regression targets of one image: `rpn_match`, the sampler
  (`num_samples` with `positive_fraction` positives, no GT added), `rpn_sampled_targets`.

  Args:
    anchors: [A, 4] float32 xyxy padded-image pixels, all levels concatenated.
    gt_boxes: [M, 4] float32 xyxy.
    gt_valid: [M] bool, already `usable_gt` (crowd and padding excluded).
    rng: PRNG key of the sampler.
    convention: selects the matcher and the box-coder form.
    anchor_valid: optional [A] bool, the anchors that take part (`rpn_match`).

  Returns dict:
    pos [A] bool, neg [A] bool: the sampled positives / negatives;
    box_targets [A, 4] float32: (dx, dy, dw, dh) for positives, 0 elsewhere;
    matched_gt [A] int32: GT index of each anchor (meaningful for positives);
    labels [A] int32: matcher labels before sampling (1 fg, 0 bg, -1 ignore).
  """
  matches, labels = rpn_match(anchors, gt_boxes, gt_valid, convention=convention,
                              anchor_valid=anchor_valid)
  pos, neg = sampler.sample_labels(labels, jnp.ones(labels.shape, bool), rng,
                                   num_samples=num_samples, positive_fraction=positive_fraction)
  box_targets = rpn_sampled_targets(anchors, gt_boxes, matches, pos, convention=convention)
  return dict(pos=pos, neg=neg, box_targets=box_targets, matched_gt=matches, labels=labels)


def roi_candidates(proposals, proposals_valid, gt_boxes, gt_valid, *,
                   convention: conventions_lib.Convention):
  """The R-CNN candidates of one image (proposals, then the GT boxes) matched to the GTs.

  The GT boxes are added to the proposals, as all three references do (mmdet
  `add_gt_as_proposals`, which puts them first; d2 PROPOSAL_APPEND_GT and torchvision
  `add_gt_proposals`, which append them). Matching at IoU 0.5:
  * mmdet: MaxIoUAssigner(pos 0.5, neg 0.5, min_pos_iou 0.5, match_low_quality=True) on the
    proposals alone; the added GTs are then positives matched to themselves
    (`AssignResult.add_gt_`), so they do not enter the low-quality step.
  * detectron2 / torchvision: Matcher([0.5], [0, 1]) without low-quality matching over proposals
    and GTs together (a GT box matches itself unless an identical GT comes first).

  Args:
    proposals: [P, 4] float32 xyxy (resized-image pixels); stop-gradient'ed by the caller.
    proposals_valid: [P] bool.
    gt_boxes: [M, 4] float32 xyxy.
    gt_valid: [M] bool, already `usable_gt`.
    convention: matcher form.

  Returns dict of [P + M] rows (candidate p < P is proposal p, P + m is GT m):
    boxes [P + M, 4] float32 (invalid proposals zeroed); valid [P + M] bool;
    matches [P + M] int32 GT index; labels [P + M] int32 (1 fg, 0 bg, -1 unusable).
  """
  proposals = jnp.asarray(proposals, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  gt_valid = jnp.asarray(gt_valid, bool)
  p, m = proposals.shape[0], gt_boxes.shape[0]
  proposals_valid = jnp.asarray(proposals_valid, bool)
  proposals = jnp.where(proposals_valid[:, None], proposals, 0.0)
  cand = jnp.concatenate([proposals, gt_boxes], axis=0)          # [P + M, 4]
  cand_valid = jnp.concatenate([proposals_valid, gt_valid])
  form = convention.matcher
  iou = boxes_lib.pairwise_iou(gt_boxes, cand)                   # [M, P + M]
  is_gt = jnp.arange(p + m) >= p
  if form == "mmdet":
    # Assign on the proposals only (the added GTs are excluded: IoU -1 is below every threshold
    # and never a GT's best), then make the added GTs positives of themselves.
    iou = jnp.where(cand_valid[None, :] & ~is_gt[None, :], iou, -1.0)
    matches, labels = matcher.match(iou, gt_valid, form="mmdet", high=ROI_IOU, low=ROI_IOU,
                                    allow_low_quality=True, min_pos_iou=ROI_IOU)
    self_idx = jnp.arange(p + m, dtype=jnp.int32) - p
    matches = jnp.where(is_gt, self_idx, matches)
    labels = jnp.where(is_gt, 1, labels)
  else:
    iou = jnp.where(cand_valid[None, :], iou, -1.0)
    matches, labels = matcher.match(iou, gt_valid, form="detectron2", high=ROI_IOU, low=ROI_IOU,
                                    allow_low_quality=False)
  return dict(boxes=cand, valid=cand_valid, matches=matches, labels=labels)


def sample_rois(labels, valid, rng, *, num_samples: int, positive_fraction: float):
  """Draws the RoIs of one image from its candidates (`roi_candidates`).

  Args:
    labels: [N] int32 candidate labels; valid: [N] bool; rng: PRNG key of the sampler.
    num_samples, positive_fraction: static, the references' 512 and 0.25.

  Returns:
    index [num_samples] int32 into the candidates, valid [num_samples] bool: the sampled
    positives first, then the negatives, each in candidate order, then padding.
  """
  pos, neg = sampler.sample_labels(labels, valid, rng, num_samples=num_samples,
                                   positive_fraction=positive_fraction)
  rank = jnp.where(pos, 0, jnp.where(neg, 1, 2)).astype(jnp.int32)
  index = jnp.argsort(rank, stable=True)[:num_samples].astype(jnp.int32)
  return index, (pos | neg)[index]


def roi_rows(cand, index, index_valid, gt_boxes, gt_classes, *,
             convention: conventions_lib.Convention, bbox_reg_weights, background_class: int):
  """Class and box targets of the RoIs `cand[index]` of one image.

  The rows are reordered positives first (stable): `MaskRCNN.losses` runs the mask branch on the
  first int(num_samples * positive_fraction) rows. A row is positive when it is valid and its
  candidate's label is 1 (so an injected sample is classified by our own matcher).

  Args:
    cand: `roi_candidates` output.
    index: [R] int32 candidate index of each RoI; index_valid: [R] bool.
    gt_boxes: [M, 4] float32 xyxy.
    gt_classes: [M] int32 class index in the model's layout (bg_last: 0..K-1; bg_first: 1..).
    convention: box-coder form.
    bbox_reg_weights: 4 floats in the coder's form: stds (0.1, 0.1, 0.2, 0.2) for mmdet,
      weights (10, 10, 5, 5) for d2 / torchvision.
    background_class: the layout's background index (bg_last: K; bg_first: 0).

  Returns dict of [R] rows:
    rois [R, 4] float32; valid [R] bool (sampled); pos [R] bool;
    classes [R] int32 (GT class for positives, background_class otherwise);
    matched_gt [R] int32 (GT index, meaningful for positives);
    box_targets [R, 4] float32 (class-specific regression target of the GT class, 0 for
    non-positives).
  """
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  index = jnp.asarray(index, jnp.int32)
  index_valid = jnp.asarray(index_valid, bool)
  pos = index_valid & (cand["labels"][index] == 1)
  order = jnp.argsort(jnp.where(pos, 0, jnp.where(index_valid, 1, 2)), stable=True)
  index, r_valid, r_pos = index[order], index_valid[order], pos[order]
  rois = cand["boxes"][index]
  r_match = cand["matches"][index]
  classes = jnp.where(r_pos, jnp.asarray(gt_classes, jnp.int32)[r_match], background_class)
  box_targets = _safe_encode(rois, gt_boxes[r_match], r_pos, form=convention.box_coder,
                             weights=tuple(bbox_reg_weights))
  return dict(rois=jnp.where(r_valid[:, None], rois, 0.0), valid=r_valid, pos=r_pos,
              classes=classes.astype(jnp.int32), matched_gt=r_match, box_targets=box_targets)


def roi_targets(proposals, proposals_valid, gt_boxes, gt_classes, gt_valid, rng, *,
                convention: conventions_lib.Convention, bbox_reg_weights, background_class: int,
                num_samples: int = 512, positive_fraction: float = 0.25):
  """Samples the RoIs of one image and gives their class and box targets (parity_spec 4.1):
  `roi_candidates`, `sample_rois` (`num_samples` RoIs, `positive_fraction` positive), `roi_rows`.

  Args: those of the three steps (proposals [P, 4], proposals_valid [P], gt_boxes [M, 4],
    gt_classes [M], gt_valid [M], rng).

  Returns the `roi_rows` dict of [R = num_samples] rows; the sampled positives come first (rows
  0 .. #pos - 1, at most int(num_samples * positive_fraction)), then the negatives, then padding.
  """
  cand = roi_candidates(proposals, proposals_valid, gt_boxes, gt_valid, convention=convention)
  index, valid = sample_rois(cand["labels"], cand["valid"], rng, num_samples=num_samples,
                             positive_fraction=positive_fraction)
  return roi_rows(cand, index, valid, gt_boxes, gt_classes, convention=convention,
                  bbox_reg_weights=bbox_reg_weights, background_class=background_class)


# ---------------------------------------------------------------------------------------------
# Mask targets from box crops.


def mask_target_settings(convention: conventions_lib.Convention) -> dict:
  """How each reference builds its 28 x 28 mask targets (parity_spec 4.1, golden README 8).

  * mmdet `mask_target_single`: proposals clipped to the mask canvas, then
    `roi_align(mask, roi, 28, 1.0, 0, 'avg', aligned=True)` and `>= 0.5`.
  * detectron2 `BitMasks.crop_and_resize`: ROIAlign(28, 1.0, 0, aligned=True), no clipping,
    `>= 0.5` (its default polygon format rasterizes in the box instead; golden: 0-37 cells apart).
  * torchvision `project_masks_on_boxes`: `roi_align(mask, roi, 28, 1.0)` with the adaptive grid
    (sampling_ratio -1) and aligned=False; the soft values are the BCE targets.
  """
  return dict(aligned=convention.mask_target_aligned,
              clip_to_canvas=convention.mask_target_clip_to_canvas,
              binarize=convention.mask_target_binarize)


def _crop_axis_weights(lo, hi, g_lo, g_hi, canvas, crop_size, *, pooled, aligned, max_grid):
  """Per-bin interpolation weights on the crop along one axis.

  Follows RoIAlign with spatial_scale 1 and the adaptive grid on a full-canvas bitmap
  (`pallas_kernels/roi_align/reference.py`, parity_spec 3.11): sample coordinates in bitmap index
  space (pixel centres at integers), the validity test -1 <= y <= canvas, the clamps y < 0 -> 0 and
  y >= canvas - 1 -> canvas - 1. The bitmap's bilinear value at index coordinate y is then read
  from the crop: y is the continuous image coordinate y + 0.5, i.e. crop coordinate
  u = (y + 0.5 - g_lo) * S / (g_hi - g_lo) - 0.5 (crop pixel centres at integers), interpolated
  with the tent kernel max(0, 1 - |u - i|) over crop rows i = 0..S-1 (zero outside the crop).

  Args:
    lo, hi: [K] RoI extent (x1, x2 or y1, y2), image pixels.
    g_lo, g_hi: [K] extent of the crop's box.
    canvas: [] or [K] float32 bitmap size along the axis (border rules).
    crop_size: static S.
    pooled: static output size (28).
    aligned: static bool, half-pixel offset (mmdet / d2) or not (torchvision).
    max_grid: samples per bin taken per pass; a larger grid takes several passes (as
      `reference.roi_align` does), so every RoI inside the canvas is exact. A RoI reaching
      further than the canvas allows (ceil((canvas + 1) / pooled) samples) gets that many evenly
      spaced samples per bin.

  Returns:
    w: [K, pooled, S] float32, the sum over the bin's samples of their crop weights.
    grid: [K] float32 samples per bin along this axis (0 for empty RoIs).
  """
  f32 = jnp.float32
  offset = f32(0.5) if aligned else f32(0.0)
  start = lo - offset
  end = hi - offset
  roi = end - start
  if not aligned:
    roi = jnp.maximum(roi, f32(1.0))
  # IEEE divisions (XLA would multiply by a reciprocal: 49 / 7 -> 7.0000005, another grid).
  bin_size = boxes_lib.exact_div(roi, f32(pooled))
  canvas = jnp.broadcast_to(jnp.asarray(canvas, f32), lo.shape)
  # The largest grid of a RoI inside the canvas (see max_grid above).
  bound = jnp.ceil((canvas + f32(1)) / f32(pooled))
  grid = jnp.ceil(bin_size)
  grid = jnp.where(grid >= 1, jnp.minimum(grid, jnp.maximum(bound, f32(max_grid))), f32(0))
  ph = jnp.arange(pooled, dtype=f32)
  base = (start[:, None] + ph[None, :] * bin_size[:, None])[:, :, None]  # [K, P, 1]
  canvas = canvas[:, None, None]
  # Bilinear interpolation of a bitmap at index coordinate y equals the mean of its
  # piecewise-constant extension (pixel c covers [c, c + 1)) over the unit window [y, y + 1]:
  # (1 - frac) b[floor y] + frac b[floor y + 1]. The crop is such a piecewise-constant map over
  # its box (cell i covers [g_lo + i c, g_lo + (i + 1) c], c = box side / S, zero outside), so
  # the weight of cell i is its overlap with the window.
  cell = (g_hi - g_lo) / f32(crop_size)
  edges = g_lo[:, None] + jnp.arange(crop_size + 1, dtype=f32)[None, :] * cell[:, None]
  lo_e = edges[:, None, None, :-1]                                     # [K, 1, 1, S]
  hi_e = edges[:, None, None, 1:]

  def one_pass(p, w):
    g = (p * max_grid + jnp.arange(max_grid)).astype(f32)
    step = boxes_lib.exact_div((g[None, :] + f32(0.5)) * bin_size[:, None],
                               jnp.maximum(grid, 1)[:, None])          # [K, G]
    y = base + step[:, None, :]                                        # [K, P, G]
    valid = (y >= -1) & (y <= canvas) & (g[None, None, :] < grid[:, None, None])
    y = jnp.where(y <= 0, f32(0), y)
    y = jnp.where(y >= canvas - 1, canvas - 1, y)
    ov = jnp.minimum(hi_e, y[..., None] + f32(1)) - jnp.maximum(lo_e, y[..., None])
    ov = jnp.maximum(ov, f32(0))                                       # [K, P, G, S]
    return w + jnp.sum(jnp.where(valid[..., None], ov, f32(0)), axis=2)

  # Passes of max_grid samples until the largest grid is covered (mask targets carry no
  # gradient, so a loop with a data-dependent trip count is fine here).
  passes = jnp.ceil(jnp.max(grid, initial=0.0) / f32(max_grid)).astype(jnp.int32)
  w = jax.lax.fori_loop(0, jnp.maximum(passes, 1), one_pass,
                        jnp.zeros(base.shape[:2] + (crop_size,), f32))
  return w, grid


def mask_targets(rois, gt_boxes, gt_crops, canvas_hw, *, aligned: bool, clip_to_canvas: bool,
                 binarize: bool, output_size: int = 28, max_grid: int = 8):
  """28 x 28 mask targets of RoIs from their GT's box crop (RoIAlign of the GT mask emulated).

  For each RoI the references RoIAlign the full-image GT bitmap (spatial_scale 1, adaptive
  grid): out = mean over the bin's samples of the bitmap's bilinear value. Here the sample points,
  the validity test and the border clamps are exactly the references' and the bilinear value is
  read from the crop (`_crop_axis_weights`; module docstring). Everything is separable, so
  out = Wy @ crop @ Wx^T / count.

  Args:
    rois: [K, 4] float32 xyxy image pixels.
    gt_boxes: [K, 4] float32 xyxy, the box of each RoI's GT (the crop's extent).
    gt_crops: [K, S, S] uint8 / bool / float, binary (0 / 1) GT mask inside its box.
    canvas_hw: [2] int / float, size of the bitmap the reference would hold (mmdet: the padded
      image, its masks are padded with the image; d2 / torchvision: the resized image).
    aligned, clip_to_canvas, binarize: `mask_target_settings(convention)`.
    output_size: 28.
    max_grid: static bound of the adaptive grid per bin axis.

  Returns:
    [K, output_size, output_size] float32: 0 / 1 when `binarize` (>= 0.5), else the soft values.
  """
  f32 = jnp.float32
  rois = jnp.asarray(rois, f32)
  gt_boxes = jnp.asarray(gt_boxes, f32)
  crops = jnp.asarray(gt_crops).astype(f32)
  s = crops.shape[-1]
  canvas_hw = jnp.asarray(canvas_hw, f32)
  ch, cw = canvas_hw[0], canvas_hw[1]
  if clip_to_canvas:
    # mmdet mask_target_single: np.clip(proposals[:, [0, 2]], 0, maxw), [1, 3] to maxh.
    rois = jnp.stack([jnp.clip(rois[:, 0], 0, cw), jnp.clip(rois[:, 1], 0, ch),
                      jnp.clip(rois[:, 2], 0, cw), jnp.clip(rois[:, 3], 0, ch)], axis=1)
  kw = dict(pooled=output_size, aligned=aligned, max_grid=max_grid)
  wy, gy = _crop_axis_weights(rois[:, 1], rois[:, 3], gt_boxes[:, 1], gt_boxes[:, 3], ch, s, **kw)
  wx, gx = _crop_axis_weights(rois[:, 0], rois[:, 2], gt_boxes[:, 0], gt_boxes[:, 2], cw, s, **kw)
  out = jnp.einsum("kpi,kij,kqj->kpq", wy, crops, wx, precision=jax.lax.Precision.HIGHEST)
  out = out / jnp.maximum(gy * gx, 1)[:, None, None]
  if binarize:
    out = (out >= 0.5).astype(f32)
  return out


def mask_area_fraction(rois, gt_boxes, gt_crops, canvas_hw):
  """Fraction of each GT instance's mask area inside its RoI (mmdet MaskIoUHead._get_area_ratio).

  mmdet: bbox = proposal.astype(int32) (truncation), BitmapMasks.crop clips x to [0, W], y to
  [0, H], takes w = max(x2 - x1, 1), h likewise, and counts mask pixels of [y1, y1 + h) x
  [x1, x1 + w) over all mask pixels (+ 1e-7). Here the crop is a piecewise-constant map over its
  box's S x S cells and both areas are integrals of it: cells are weighted by their overlap with
  the rectangle [x1, min(x1 + w, W)] x [y1, min(y1 + h, H)].

  Args:
    rois: [K, 4] float32 xyxy. gt_boxes: [K, 4] float32 xyxy (crop extents).
    gt_crops: [K, S, S] binary. canvas_hw: [2] mask canvas size (H, W).

  Returns:
    [K] float32 in [0, 1]: area inside / (area + 1e-7).
  """
  f32 = jnp.float32
  rois = jnp.asarray(rois, f32)
  gt_boxes = jnp.asarray(gt_boxes, f32)
  crops = jnp.asarray(gt_crops).astype(f32)
  s = crops.shape[-1]
  canvas_hw = jnp.asarray(canvas_hw, f32)
  b = jnp.trunc(rois)  # astype(np.int32)

  def overlaps(lo, hi, size, g_lo, g_hi):
    lo = jnp.clip(lo, 0, size)
    hi = jnp.clip(hi, 0, size)
    hi = jnp.minimum(lo + jnp.maximum(hi - lo, 1), size)
    cell = (g_hi - g_lo) / s
    edges = g_lo[:, None] + jnp.arange(s + 1, dtype=f32)[None, :] * cell[:, None]
    ov = jnp.minimum(edges[:, 1:], hi[:, None]) - jnp.maximum(edges[:, :-1], lo[:, None])
    return jnp.maximum(ov, 0), cell

  oy, cell_h = overlaps(b[:, 1], b[:, 3], canvas_hw[0], gt_boxes[:, 1], gt_boxes[:, 3])
  ox, cell_w = overlaps(b[:, 0], b[:, 2], canvas_hw[1], gt_boxes[:, 0], gt_boxes[:, 2])
  inside = jnp.einsum("ki,kij,kj->k", oy, crops, ox, precision=jax.lax.Precision.HIGHEST)
  total = jnp.sum(crops, axis=(1, 2)) * cell_h * cell_w
  return inside / (total + f32(1e-7))


def maskiou_targets(mask_logits, targets, area_fraction, *, threshold: float = 0.5):
  """MaskIoU regression targets (mmdet MaskIoUHead.get_targets; parity_spec 3.14).

  IoU = overlap / (pred_area + gt_full_area - overlap) with pred = (mask_pred > mask_thr_binary),
  gt_full_area = target_area / (area_fraction + 1e-7). mmdet applies mask_thr_binary (0.5) to the
  raw mask head output, i.e. the logits (MaskScoringRoIHead passes `mask_pred` before any sigmoid),
  so the prediction is binarized at logit > 0.5 (probability > 0.62); reproduced here.

  Args:
    mask_logits: [K, 28, 28] float32, the GT class's mask logits (no gradient needed).
    targets: [K, 28, 28] float32 binary mask targets.
    area_fraction: [K] float32 from `mask_area_fraction`.

  Returns:
    [K] float32 IoU targets, 0 where undefined (0 / 0: mmdet gets NaN and drops it, as it
    drops every target <= 0).
  """
  pred = (mask_logits > threshold).astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  pred_area = jnp.sum(pred, axis=(-1, -2))
  overlap = jnp.sum(pred * targets, axis=(-1, -2))
  gt_full = jnp.sum(targets, axis=(-1, -2)) / (area_fraction + 1e-7)
  den = pred_area + gt_full - overlap
  ok = den > 0
  return jnp.where(ok, overlap / jnp.where(ok, den, 1.0), 0.0)
