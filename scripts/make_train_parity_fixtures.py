#!/usr/bin/env python
"""Generate tests/fixtures/train_parity_<framework>.npz: one training step of a real reference run.

NOT run by CI (CI has no torch). Runs in the reference venvs of the inference fixtures
(tests/fixtures/README.md): /work/tvenv (torchvision 0.28, detectron2 0.6 from source) and
/work/mmenv (mmdetection 3.3, mmcv 2.1 CPU ops)::

    /work/tvenv/bin/python scripts/make_train_parity_fixtures.py --framework torchvision
    /work/tvenv/bin/python scripts/make_train_parity_fixtures.py --framework detectron2
    /work/mmenv/bin/python scripts/make_train_parity_fixtures.py --framework mmdet_r50
    /work/mmenv/bin/python scripts/make_train_parity_fixtures.py --framework mmdet_ms_r50_caffe
    ... --verify-only      # re-run and require the stored losses, samples and gradients exactly

What it does (tests/fixtures/README.md, "train_parity_*.npz", describes the keys):
  1. Builds the framework's R50-FPN model as its inference fixture's generator does and loads the
     same calibrated weights, regenerated from that fixture (tests/fixtures/parity_*.npz: seed,
     scales, 1-D tensors) with tests/synthetic_weights.py; no weights are stored.
  2. Feeds the model, in training mode, a batch built by hand from
     tests/fixtures/train_parity_coco.json (hand-drawn polygons on the parity photographs in
     tests/fixtures/images): the image at its own size (each framework's resize is then the
     identity, so the preprocessing is its normalization and padding alone), the json boxes, the
     polygons rasterized by pycocotools (frPyObjects + merge + decode, what every framework's
     loader does) and the labels (COCO contiguous 0..79; torchvision the category id).
  3. Records, through wrappers around the framework's own sampling functions, everything random:
     the sampled anchors (and the GT each positive matched), the proposals of the R-CNN stage,
     the sampled RoIs (reference order, positive flags, matched GT, class), plus the mask targets
     and mask logits of the positive RoIs (and MaskIoU targets / predictions for Mask Scoring
     R-CNN); then the training losses and, after backward() of their sum, the gradients of a few
     named layers (a res4 conv, the P2 FPN output conv, the box predictor, the mask predictor;
     tensors over GRAD_FULL_MAX entries keep every GRAD_STRIDE-th entry of the flat torch layout,
     plus the full norm).
  detectron2 runs twice: with BitMasks (INPUT.MASK_FORMAT 'bitmask', what maskrcnn_jax's d2
  convention emulates) and with its default PolygonMasks (targets rasterized in each box); the
  samples are identical (same torch seed), and the polygon run adds its loss_mask and mask targets.

  4. Runs the same step again in float64 on the float32 run's proposals (so on the same samples,
     which is checked) and records its losses and gradients: the float32 gradients of the deep
     layers carry the reference's own rounding, of the order of 1e-3 for a res4 conv, and the
     test measures it against these.

Every run is on CPU, one thread, torch.manual_seed(0) before the forward.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_util

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
ANNOTATIONS = FIXTURES / "train_parity_coco.json"
OUR_LOSSES = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask", "loss_mask_iou")
GRAD_FULL_MAX = 65536
GRAD_STRIDE = 11
TORCH_SEED = 0

_RES4_TV_MM = "layer3.0.conv1.weight"
_BOX_TV = ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
           "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias")
_BOX_MM = ("roi_head.bbox_head.fc_cls.weight", "roi_head.bbox_head.fc_cls.bias",
           "roi_head.bbox_head.fc_reg.weight", "roi_head.bbox_head.fc_reg.bias")
_MASK_MM = ("roi_head.mask_head.conv_logits.weight", "roi_head.mask_head.conv_logits.bias")
FRAMEWORKS = {
    "torchvision": dict(
        images=("astronaut",), inference="parity_torchvision.npz",
        keys="torchvision_maskrcnn_resnet50_fpn_v1.tsv",
        # reference loss name -> ours
        losses=dict(loss_objectness="loss_rpn_cls", loss_rpn_box_reg="loss_rpn_box",
                    loss_classifier="loss_cls", loss_box_reg="loss_box", loss_mask="loss_mask"),
        grads=("backbone.body." + _RES4_TV_MM, "backbone.fpn.layer_blocks.0.0.weight") + _BOX_TV
        + ("roi_heads.mask_predictor.mask_fcn_logits.weight",
           "roi_heads.mask_predictor.mask_fcn_logits.bias")),
    "detectron2": dict(
        images=("astronaut", "coffee"), inference="parity_detectron2.npz",
        keys="detectron2_mask_rcnn_R_50_FPN_3x.tsv",
        losses=dict(loss_rpn_cls="loss_rpn_cls", loss_rpn_loc="loss_rpn_box", loss_cls="loss_cls",
                    loss_box_reg="loss_box", loss_mask="loss_mask"),
        grads=("backbone.bottom_up.res4.0.conv1.weight", "backbone.fpn_output2.weight") + _BOX_TV
        + ("roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias")),
    "mmdet_r50": dict(
        images=("astronaut",), inference="parity_mmdet_r50.npz",
        keys="mmdet_mask_rcnn_r50_fpn_1x_coco.tsv", mmdet_model="r50",
        losses=dict(loss_rpn_cls="loss_rpn_cls", loss_rpn_bbox="loss_rpn_box", loss_cls="loss_cls",
                    loss_bbox="loss_box", loss_mask="loss_mask"),
        grads=("backbone." + _RES4_TV_MM, "neck.fpn_convs.0.conv.weight") + _BOX_MM + _MASK_MM),
    "mmdet_ms_r50_caffe": dict(
        images=("coffee",), inference="parity_mmdet_ms_r50_caffe.npz",
        keys="mmdet_ms_rcnn_r50_caffe_fpn_1x_coco.tsv", mmdet_model="ms_r50_caffe",
        losses=dict(loss_rpn_cls="loss_rpn_cls", loss_rpn_bbox="loss_rpn_box", loss_cls="loss_cls",
                    loss_bbox="loss_box", loss_mask="loss_mask", loss_mask_iou="loss_mask_iou"),
        grads=("backbone." + _RES4_TV_MM, "neck.fpn_convs.0.conv.weight") + _BOX_MM + _MASK_MM
        + ("roi_head.mask_iou_head.fc_mask_iou.weight", "roi_head.mask_iou_head.fc_mask_iou.bias")),
}


# ----------------------------------------------------------------------------- helpers
def load_script(name: str):
  """A sibling generator script (scripts/<name>.py), loaded as a file: its model builders and
  fixture writer are reused (each imports its own framework, so only the matching venv can)."""
  spec = importlib.util.spec_from_file_location(f"_{name}", REPO / "scripts" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@functools.lru_cache(maxsize=None)
def helpers(framework: str):
  """The inference generator of `framework`: make_parity_fixtures(_d2 | _mmdet)."""
  if framework == "torchvision":
    return load_script("make_parity_fixtures")
  if framework == "detectron2":
    return load_script("make_parity_fixtures_d2")
  return load_script("make_parity_fixtures_mmdet")


def reference_state_dict(framework: str):
  """The inference fixture's calibrated weights, regenerated (numpy, state-dict order)."""
  spec = FRAMEWORKS[framework]
  synthetic = helpers(framework).load_synthetic() if framework != "detectron2" else \
      helpers(framework).TV.load_synthetic()
  keys = synthetic.read_key_tsv(str(FIXTURES / "checkpoint_keys" / spec["keys"]))
  fx = np.load(FIXTURES / spec["inference"])
  return OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v)))
                     for k, v in synthetic.state_dict_from_fixture(fx, keys).items())


def load_batch(names):
  """[(name, rgb uint8 [H, W, 3], dict(boxes [M, 4] xyxy float32, category_ids [M], labels [M]
  contiguous 0..79, polygons (list of M flat lists), masks [M, H, W] uint8))] from the json."""
  data = json.loads(ANNOTATIONS.read_text())
  cat_ids = sorted(c["id"] for c in data["categories"])
  contiguous = {c: i for i, c in enumerate(cat_ids)}
  out = []
  for name in names:
    info = next(i for i in data["images"] if i["file_name"] == f"{name}.png")
    h, w = info["height"], info["width"]
    rgb = np.asarray(Image.open(FIXTURES / "images" / info["file_name"]).convert("RGB"))
    assert rgb.shape[:2] == (h, w), (name, rgb.shape)
    anns = [a for a in data["annotations"] if a["image_id"] == info["id"]]
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                       a["bbox"][1] + a["bbox"][3]] for a in anns], np.float32)
    rles = [mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w)) for a in anns]
    masks = np.stack([mask_util.decode(r) for r in rles]).astype(np.uint8)
    out.append((name, np.ascontiguousarray(rgb), dict(
        boxes=boxes, category_ids=np.array([a["category_id"] for a in anns], np.int64),
        labels=np.array([contiguous[a["category_id"]] for a in anns], np.int64),
        polygons=[a["segmentation"] for a in anns], masks=masks)))
  return out


def snapshot(x):
  """Tensors cloned inside lists / tuples (the frameworks update some returned lists in place)."""
  if isinstance(x, torch.Tensor):
    return x.detach().clone()
  if isinstance(x, (list, tuple)):
    return type(x)(snapshot(v) for v in x)
  return x


class Tap:
  """Wraps a callable: every call's result (and, with `keep_args`, its arguments) goes to `sink`,
  tensors in (nested) lists and tuples cloned."""

  def __init__(self, fn, sink: list, keep_args: bool = False):
    self.fn, self.sink, self.keep_args = fn, sink, keep_args

  def __call__(self, *args, **kwargs):
    saved = snapshot(args) if self.keep_args else None
    out = self.fn(*args, **kwargs)
    self.sink.append((saved, kwargs, snapshot(out)) if self.keep_args else snapshot(out))
    return out

  def __getattr__(self, name):
    return getattr(self.fn, name)


def float32_iou(fn, unwrap=lambda x: x, wrap=lambda t: t):
  """`fn(boxes1, boxes2, ...)` (an IoU function) on float32 casts of the boxes, result float32.

  The float64 re-run (`record`) matches anchors and proposals with it, so every IoU threshold,
  low-quality tie and hence every random draw is the float32 run's (`unwrap` / `wrap` go from a
  framework's box object to its tensor and back)."""
  def iou(b1, b2, *args, **kwargs):
    return fn(wrap(unwrap(b1).float()), wrap(unwrap(b2).float()), *args, **kwargs).float()
  return iou


def np32(t) -> np.ndarray:
  return t.detach().cpu().numpy().astype(np.float32)


def npi(t) -> np.ndarray:
  return t.detach().cpu().numpy().astype(np.int32)


def named_grads(model, names) -> dict:
  params = dict(model.named_parameters())
  missing = [n for n in names if n not in params or params[n].grad is None]
  assert not missing, f"no gradient for {missing}"
  return {n: params[n].grad.detach().numpy().copy() for n in names}


# ----------------------------------------------------------------------------- torchvision
def run_torchvision(batch, dtype=torch.float32, proposals=None):
  """One torchvision 0.28 training step; returns the recorded run (see `assemble`).

  dtype: the model's and inputs' dtype. proposals: per image [P, 4] numpy, replacing the RPN's
  as the R-CNN stage's input (the float64 re-run gets the float32 run's; see `record`).
  """
  import torchvision.models.detection.roi_heads as tv_roi_heads
  tv = helpers("torchvision")
  assert len(batch) == 1, "torchvision resizes every image to one min_size: one image per batch"
  name, rgb, ann = batch[0]
  model = tv.build_model()                       # COCO_V1 build path, FrozenBN eps 0 (eval)
  model.load_state_dict(reference_state_dict("torchvision"))
  model.to(dtype).train()
  h, w = rgb.shape[:2]
  # Resize to the image's own size: torchvision's bilinear interpolate is then the identity.
  model.transform.min_size = (min(h, w),)
  model.transform.max_size = max(1333, h, w)
  rec = dict(transform=[], anchors=[], rpn_match=[], rpn_sample=[], select=[], assign=[],
             subsample=[], mask=[])
  model.transform.register_forward_hook(lambda m, i, o: rec["transform"].append(o))
  model.rpn.anchor_generator.register_forward_hook(lambda m, i, o: rec["anchors"].append(o))
  model.rpn.proposal_matcher = Tap(model.rpn.proposal_matcher, rec["rpn_match"])
  model.rpn.fg_bg_sampler = Tap(model.rpn.fg_bg_sampler, rec["rpn_sample"])
  rh = model.roi_heads
  rh.select_training_samples = Tap(rh.select_training_samples, rec["select"], keep_args=True)
  if proposals is not None:
    rh.select_training_samples = lambda props, targets, _f=rh.select_training_samples: _f(
        [torch.from_numpy(p).to(dtype) for p in proposals], targets)
  rh.assign_targets_to_proposals = Tap(rh.assign_targets_to_proposals, rec["assign"])
  rh.subsample = Tap(rh.subsample, rec["subsample"])
  orig_mask_loss = tv_roi_heads.maskrcnn_loss

  def mask_loss(mask_logits, proposals, gt_masks, gt_labels, matched_idxs):
    m = mask_logits.shape[-1]
    labels = torch.cat([gl[i] for gl, i in zip(gt_labels, matched_idxs)])
    targets = [tv_roi_heads.project_masks_on_boxes(gm, p, i, m)
               for gm, p, i in zip(gt_masks, proposals, matched_idxs)]
    rec["mask"].append(dict(rois=[np32(p) for p in proposals], gt=[npi(i) for i in matched_idxs],
                            targets=[np32(t) for t in targets],
                            logits=np32(mask_logits[torch.arange(len(labels)), labels])))
    return orig_mask_loss(mask_logits, proposals, gt_masks, gt_labels, matched_idxs)

  tv_roi_heads.maskrcnn_loss = mask_loss
  tv_boxes = importlib.import_module("torchvision.ops.boxes")
  orig_iou = tv_boxes.box_iou
  if dtype != torch.float32:
    # The RPN matches through its `box_similarity`, the RoI heads through box_ops.box_iou.
    model.rpn.box_similarity = float32_iou(model.rpn.box_similarity)
    tv_boxes.box_iou = float32_iou(orig_iou)
  image = (torch.from_numpy(rgb.copy()).permute(2, 0, 1).to(torch.float32) / 255.0).to(dtype)
  target = dict(boxes=torch.from_numpy(ann["boxes"]).to(dtype),
                labels=torch.from_numpy(ann["category_ids"]),
                masks=torch.from_numpy(ann["masks"]))
  try:
    torch.manual_seed(TORCH_SEED)
    losses = model([image], [target])
  finally:
    tv_roi_heads.maskrcnn_loss = orig_mask_loss
    tv_boxes.box_iou = orig_iou
  sum(losses.values()).backward()

  images, _ = rec["transform"][0]
  assert tuple(images.image_sizes[0]) == (h, w), "the resize was not the identity"
  anchors = np32(rec["anchors"][0][0])
  pos, neg = rec["rpn_sample"][0]
  matched = npi(rec["rpn_match"][0])
  props = rec["select"][0][0][0][0]          # the proposals argument, before the GTs are added
  matched_c, labels_c = rec["assign"][0]
  sampled = npi(rec["subsample"][0][0])
  labels_s = npi(labels_c[0])[sampled]
  mk = rec["mask"][0]
  image_rec = dict(
      rpn_pos=np.flatnonzero(pos[0].numpy()).astype(np.int32),
      rpn_neg=np.flatnonzero(neg[0].numpy()).astype(np.int32),
      rpn_matched=matched, proposals=np32(props),
      roi_index=sampled, roi_pos=labels_s > 0, roi_matched=npi(matched_c[0])[sampled],
      roi_labels=labels_s, mask_rois=mk["rois"][0], mask_gt=mk["gt"][0],
      mask_targets=mk["targets"][0], mask_logits=mk["logits"])
  return dict(input=images.tensors.detach().permute(0, 2, 3, 1).numpy(),
              image_hw=np.array([[h, w]], np.int32), anchors=anchors, images=[image_rec],
              losses={FRAMEWORKS["torchvision"]["losses"][k]: float(v.detach())
                      for k, v in losses.items()},
              grads=named_grads(model, FRAMEWORKS["torchvision"]["grads"]),
              labels_fed=[ann["category_ids"]])


# ----------------------------------------------------------------------------- detectron2
def run_detectron2(batch, mask_format: str, dtype=torch.float32, proposals=None):
  """One detectron2 training step with BitMasks ('bitmask') or PolygonMasks ('polygon');
  dtype and proposals as in `run_torchvision`."""
  import detectron2.modeling.roi_heads.mask_head as d2_mask_head
  from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
  from detectron2.utils.events import EventStorage
  d2 = helpers("detectron2")
  cfg = d2.build_cfg(d2.MODELS["R_50_FPN_3x"])
  model = d2.build_model(cfg)
  model.load_state_dict(reference_state_dict("detectron2"))
  model.to(dtype).train()
  rec = dict(pre=[], anchors=[], rpn_match=[], rpn_labels=[], props=[], roi_match=[], sample=[],
             mask=[])
  model.preprocess_image = Tap(model.preprocess_image, rec["pre"])
  pg, rh = model.proposal_generator, model.roi_heads
  pg.anchor_generator.register_forward_hook(lambda m, i, o: rec["anchors"].append(o))
  pg.anchor_matcher = Tap(pg.anchor_matcher, rec["rpn_match"])
  pg.label_and_sample_anchors = Tap(pg.label_and_sample_anchors, rec["rpn_labels"])
  rh.label_and_sample_proposals = Tap(rh.label_and_sample_proposals, rec["props"], keep_args=True)
  if proposals is not None:
    def label_and_sample(props, targets, _f=rh.label_and_sample_proposals):
      for inst, forced in zip(props, proposals):
        inst.proposal_boxes = Boxes(torch.from_numpy(forced).to(dtype))
      return _f(props, targets)
    rh.label_and_sample_proposals = label_and_sample
  rh.proposal_matcher = Tap(rh.proposal_matcher, rec["roi_match"])
  rh._sample_proposals = Tap(rh._sample_proposals, rec["sample"])
  orig_mask_loss = d2_mask_head.mask_rcnn_loss

  def mask_loss(pred_mask_logits, instances, vis_period=0):
    side = pred_mask_logits.size(2)
    rows = []
    for inst in instances:
      if len(inst):
        rows.append(dict(rois=np32(inst.proposal_boxes.tensor), classes=inst.gt_classes,
                         targets=np32(inst.gt_masks.crop_and_resize(inst.proposal_boxes.tensor,
                                                                    side).float())))
    classes = torch.cat([r["classes"] for r in rows])
    logits = np32(pred_mask_logits[torch.arange(len(classes)), classes])
    rec["mask"].append((rows, logits))
    return orig_mask_loss(pred_mask_logits, instances, vis_period)

  inputs = []
  for name, rgb, ann in batch:
    h, w = rgb.shape[:2]
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.from_numpy(ann["boxes"]).to(dtype))
    inst.gt_classes = torch.from_numpy(ann["labels"])
    if mask_format == "bitmask":
      inst.gt_masks = BitMasks(torch.from_numpy(ann["masks"]).bool())
    else:
      inst.gt_masks = PolygonMasks([[np.asarray(p, np.float64) for p in polys]
                                    for polys in ann["polygons"]])
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])       # read_image(format='BGR')
    inputs.append({"image": torch.as_tensor(bgr.astype("float32").transpose(2, 0, 1)).to(dtype),
                   "height": h, "width": w, "instances": inst})
  d2_mask_head.mask_rcnn_loss = mask_loss
  users = [importlib.import_module(m) for m in ("detectron2.modeling.proposal_generator.rpn",
                                                "detectron2.modeling.roi_heads.roi_heads")]
  orig_iou = users[0].pairwise_iou
  proposal_utils = importlib.import_module("detectron2.modeling.proposal_generator.proposal_utils")
  orig_nms = proposal_utils.batched_nms
  if dtype != torch.float32:
    for m in users:
      m.pairwise_iou = float32_iou(orig_iou, lambda b: b.tensor, Boxes)
    # d2's Boxes are float32 whatever the model's dtype (structures/boxes.py), so the RPN's NMS
    # gets float64 scores with float32 boxes; its proposals are replaced by `proposals` anyway.
    proposal_utils.batched_nms = lambda b, sc, idx, t: orig_nms(b, sc.to(b.dtype), idx, t)
  try:
    with EventStorage(0):
      torch.manual_seed(TORCH_SEED)
      losses = model(inputs)
  finally:
    d2_mask_head.mask_rcnn_loss = orig_mask_loss
    for m in users:
      m.pairwise_iou = orig_iou
    proposal_utils.batched_nms = orig_nms
  sum(losses.values()).backward()

  images = rec["pre"][0]
  anchors = np32(torch.cat([b.tensor for b in rec["anchors"][0]]))
  gt_labels, _ = rec["rpn_labels"][0]
  proposals = rec["props"][0][0][0]         # the proposals argument, before the GTs are added
  mask_rows, mask_logits = rec["mask"][0]
  out_images, row0 = [], 0
  for i, (name, rgb, ann) in enumerate(batch):
    lab = gt_labels[i].numpy()
    matched_c, _ = rec["roi_match"][i]
    sampled, classes = rec["sample"][i]
    sampled, classes = npi(sampled), npi(classes)
    pos = classes < cfg.MODEL.ROI_HEADS.NUM_CLASSES
    mr = mask_rows[i]
    n_pos = len(mr["rois"])
    assert n_pos == int(pos.sum())
    out_images.append(dict(
        rpn_pos=np.flatnonzero(lab == 1).astype(np.int32),
        rpn_neg=np.flatnonzero(lab == 0).astype(np.int32),
        rpn_matched=npi(rec["rpn_match"][i][0]), proposals=np32(proposals[i].proposal_boxes.tensor),
        roi_index=sampled, roi_pos=pos, roi_matched=npi(matched_c)[sampled], roi_labels=classes,
        mask_rois=mr["rois"], mask_gt=npi(matched_c)[sampled][pos], mask_targets=mr["targets"],
        mask_logits=mask_logits[row0:row0 + n_pos]))
    row0 += n_pos
  return dict(input=images.tensor.detach().permute(0, 2, 3, 1).numpy(),
              image_hw=np.array([list(s) for s in images.image_sizes], np.int32),
              anchors=anchors, images=out_images,
              losses={FRAMEWORKS["detectron2"]["losses"][k]: float(v.detach())
                      for k, v in losses.items()},
              grads=named_grads(model, FRAMEWORKS["detectron2"]["grads"]),
              labels_fed=[a["labels"] for _, _, a in batch])


# ----------------------------------------------------------------------------- mmdetection
def run_mmdet(batch, framework: str, dtype=torch.float32, proposals=None):
  """One mmdetection 3.3 training step (`model.loss` after the data preprocessor in training mode);
  dtype and proposals as in `run_torchvision`."""
  from mmdet.structures import DetDataSample
  from mmdet.structures.bbox import HorizontalBoxes
  from mmdet.structures.mask import BitmapMasks
  from mmengine.structures import InstanceData
  mm = helpers(framework)
  spec = FRAMEWORKS[framework]
  assert len(batch) == 1, ("mmdet 3 pads the masks to the batch shape and invalidates anchors "
                           "outside each image's pad shape; v2 (maskrcnn_jax's mmdet convention) "
                           "does neither: one image per batch keeps the two the same")
  model = mm.build_model(spec["mmdet_model"])
  model.load_state_dict(reference_state_dict(framework))
  model.to(dtype).train()                        # norm_eval: BN layers stay in eval mode
  rec = dict(rpn_sample=[], props=[], roi_sample=[], mask=[], maskiou=[])
  model.rpn_head.sampler.sample = Tap(model.rpn_head.sampler.sample, rec["rpn_sample"],
                                      keep_args=True)
  rh = model.roi_head
  orig_roi_loss = rh.loss

  def roi_loss(x, rpn_results_list, batch_data_samples):
    if proposals is not None:
      for r, forced in zip(rpn_results_list, proposals):
        r.bboxes = torch.from_numpy(forced).to(dtype)
    rec["props"].append([np32(r.bboxes) for r in rpn_results_list])
    return orig_roi_loss(x, rpn_results_list, batch_data_samples)

  rh.loss = roi_loss
  rh.bbox_sampler.sample = Tap(rh.bbox_sampler.sample, rec["roi_sample"])
  orig_mask = rh.mask_head.loss_and_target

  def mask_loss_and_target(mask_preds, sampling_results, batch_gt_instances, rcnn_train_cfg):
    out = orig_mask(mask_preds, sampling_results, batch_gt_instances, rcnn_train_cfg)
    labels = torch.cat([r.pos_gt_labels for r in sampling_results])
    rec["mask"].append((np32(out["mask_targets"]),
                        np32(mask_preds[torch.arange(len(labels)), labels])))
    return out

  rh.mask_head.loss_and_target = mask_loss_and_target
  if hasattr(rh, "mask_iou_head"):
    orig_iou = rh.mask_iou_head.loss_and_target

    def iou_loss_and_target(mask_iou_pred, mask_preds, mask_targets, sampling_results,
                            batch_gt_instances, rcnn_train_cfg):
      targets = rh.mask_iou_head.get_targets(sampling_results, batch_gt_instances, mask_preds,
                                             mask_targets, rcnn_train_cfg)
      rec["maskiou"].append((np32(mask_iou_pred), np32(targets)))
      return orig_iou(mask_iou_pred, mask_preds, mask_targets, sampling_results,
                      batch_gt_instances, rcnn_train_cfg)

    rh.mask_iou_head.loss_and_target = iou_loss_and_target

  name, rgb, ann = batch[0]
  h, w = rgb.shape[:2]
  bgr = np.ascontiguousarray(rgb[:, :, ::-1])            # cv2 decoder order
  sample = DetDataSample(metainfo=dict(img_id=0, img_path=f"{name}.png", ori_shape=(h, w),
                                       img_shape=(h, w), scale_factor=(1.0, 1.0), flip=False,
                                       flip_direction=None))
  gt = InstanceData()
  gt.bboxes = HorizontalBoxes(torch.from_numpy(ann["boxes"]))
  gt.labels = torch.from_numpy(ann["labels"])
  gt.masks = BitmapMasks(ann["masks"], h, w)
  sample.gt_instances = gt
  data = model.data_preprocessor(
      {"inputs": [torch.from_numpy(bgr.transpose(2, 0, 1).copy())], "data_samples": [sample]}, True)
  inputs = data["inputs"].to(dtype)    # the preprocessor casts to float32
  for ds in data["data_samples"]:
    ds.gt_instances.bboxes = ds.gt_instances.bboxes.to(dtype)
  mmcv_nms = importlib.import_module("mmcv.ops.nms")     # the module (mmcv.ops.nms is the function)
  orig_nms = mmcv_nms.ext_module.nms
  if dtype != torch.float32:
    for assigner in (model.rpn_head.assigner, rh.bbox_assigner):
      assigner.iou_calculator = float32_iou(assigner.iou_calculator,
                                            lambda b: getattr(b, "tensor", b))
    # mmcv's CPU NMS kernel is float32 only; the RPN's own proposals it selects are replaced by
    # `proposals` anyway.
    mmcv_nms.ext_module.nms = lambda boxes, scores, **kw: orig_nms(boxes.float(), scores.float(),
                                                                   **kw)
  try:
    torch.manual_seed(TORCH_SEED)
    losses = model.loss(inputs, data["data_samples"])
  finally:
    mmcv_nms.ext_module.nms = orig_nms
  total, _ = model.parse_losses(losses)
  total.backward()

  (_, _, rpn_s) = rec["rpn_sample"][0]
  anchors = np32(rec["rpn_sample"][0][0][1].priors)
  props = rec["props"][0][0]
  s = rec["roi_sample"][0]
  num_gt = int(s.num_gts)
  # mmdet puts the GTs before the proposals; the fixture uses proposals ++ GTs (d2 / tv / ours).
  cand = torch.cat([s.pos_inds, s.neg_inds]).numpy()
  index = np.where(cand < num_gt, len(props) + cand, cand - num_gt).astype(np.int32)
  n_pos = len(s.pos_inds)
  pos = np.arange(len(index)) < n_pos
  matched = np.zeros(len(index), np.int32)
  matched[:n_pos] = npi(s.pos_assigned_gt_inds)
  labels = np.full(len(index), model.roi_head.bbox_head.num_classes, np.int32)
  labels[:n_pos] = npi(s.pos_gt_labels)
  mask_targets, mask_logits = rec["mask"][0]
  rpn_matched = np.zeros(len(anchors), np.int32)
  rpn_matched[rpn_s.pos_inds.numpy()] = npi(rpn_s.pos_assigned_gt_inds)
  image_rec = dict(
      rpn_pos=npi(rpn_s.pos_inds), rpn_neg=npi(rpn_s.neg_inds), rpn_matched=rpn_matched,
      proposals=props, roi_index=index, roi_pos=pos, roi_matched=matched, roi_labels=labels,
      mask_rois=np32(s.pos_priors), mask_gt=npi(s.pos_assigned_gt_inds),
      mask_targets=mask_targets, mask_logits=mask_logits)
  if rec["maskiou"]:
    image_rec["maskiou_pred"], image_rec["maskiou_targets"] = rec["maskiou"][0]
  named = {}
  for k, v in losses.items():
    if k in spec["losses"]:
      named[spec["losses"][k]] = float((sum(v) if isinstance(v, (list, tuple)) else v).detach())
  assert set(named) == set(spec["losses"].values()), (sorted(losses), sorted(named))
  return dict(input=inputs.detach().permute(0, 2, 3, 1).numpy(),
              image_hw=np.array([[h, w]], np.int32), anchors=anchors, images=[image_rec],
              losses=named, grads=named_grads(model, spec["grads"]), labels_fed=[ann["labels"]])


# ----------------------------------------------------------------------------- fixture
def sample_positions(rng, shape, n):
  total = int(np.prod(shape))
  flat = np.sort(rng.choice(total, size=min(n, total), replace=False))
  return np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int32)


def assemble(framework: str, batch, run: dict, versions: dict) -> OrderedDict:
  """The fixture's arrays (tests/fixtures/README.md, "train_parity_*.npz")."""
  a = OrderedDict()
  a["framework"] = np.array(framework)
  a["versions"] = np.array(json.dumps(versions))
  a["image_names"] = np.array([n for n, _, _ in batch])
  a["inference_fixture"] = np.array(FRAMEWORKS[framework]["inference"])
  a["torch_seed"] = np.array(TORCH_SEED, np.int64)
  a["padded_hw"] = np.array(run["input"].shape[1:3], np.int32)
  a["num_anchors"] = np.array(len(run["anchors"]), np.int32)
  for i, ((name, rgb, ann), r) in enumerate(zip(batch, run["images"])):
    p = f"{i}/"
    x = run["input"][i]
    pos = sample_positions(np.random.default_rng([i, 7]), x.shape, 4096)
    a[p + "image_hw"] = run["image_hw"][i]
    a[p + "image_sha256"] = np.array(hashlib.sha256(rgb.tobytes()).hexdigest())
    a[p + "input/sample_yxc"] = pos
    a[p + "input/sample_values"] = x[pos[:, 0], pos[:, 1], pos[:, 2]].astype(np.float32)
    a[p + "input/channel_sums"] = x.astype(np.float64).sum((0, 1))
    a[p + "gt/boxes"] = ann["boxes"]
    a[p + "gt/labels_fed"] = np.asarray(run["labels_fed"][i], np.int32)
    a[p + "gt/mask_areas"] = ann["masks"].reshape(len(ann["masks"]), -1).sum(1).astype(np.int32)
    a[p + "rpn/pos_index"] = r["rpn_pos"]
    a[p + "rpn/neg_index"] = r["rpn_neg"]
    a[p + "rpn/pos_matched_gt"] = r["rpn_matched"][r["rpn_pos"]].astype(np.int32)
    a[p + "rpn/pos_anchors"] = run["anchors"][r["rpn_pos"]]
    a[p + "proposals"] = r["proposals"]
    for k in ("index", "pos", "matched", "labels"):
      a[p + f"rois/{k}"] = r[f"roi_{k}"].astype(bool if k == "pos" else np.int32)
    a[p + "mask/rois"] = r["mask_rois"]
    a[p + "mask/matched_gt"] = r["mask_gt"].astype(np.int32)
    binary = np.array_equal(r["mask_targets"], r["mask_targets"].round())
    a[p + "mask/targets"] = r["mask_targets"].astype(np.uint8 if binary else np.float32)
    a[p + "mask/logits"] = r["mask_logits"]
    if "maskiou_pred" in r:
      a[p + "maskiou/pred"] = r["maskiou_pred"]
      a[p + "maskiou/targets"] = r["maskiou_targets"]
  for k in OUR_LOSSES:
    if k in run["losses"]:
      a["loss/" + k] = np.array(run["losses"][k], np.float64)
  a["grad_names"] = np.array(list(run["grads"]))
  a["grad_full_max"] = np.array(GRAD_FULL_MAX, np.int64)
  a["grad_stride"] = np.array(GRAD_STRIDE, np.int64)
  for k, g in run["grads"].items():
    flat = g.reshape(-1)
    a[f"grad/{k}/shape"] = np.array(g.shape, np.int64)
    a[f"grad/{k}/norm"] = np.array(np.linalg.norm(flat.astype(np.float64)))
    a[f"grad/{k}/values"] = (flat if flat.size <= GRAD_FULL_MAX else flat[::GRAD_STRIDE]
                             ).astype(np.float32)
  return a


def check_batch_equal(x: dict, y: dict) -> None:
  """Two runs of one framework drew the same samples (the d2 polygon run vs the bitmask run)."""
  for i, (ri, si) in enumerate(zip(x["images"], y["images"])):
    for k in ("rpn_pos", "rpn_neg", "proposals", "roi_index", "roi_pos", "roi_matched",
              "mask_rois"):
      assert np.array_equal(ri[k], si[k]), f"image {i}: {k} differs between the two runs"


def versions_of(framework: str) -> dict:
  from importlib.metadata import version
  pkgs = {"torchvision": ("torch", "torchvision", "pycocotools", "numpy"),
          "detectron2": ("torch", "torchvision", "detectron2", "pycocotools", "numpy")}.get(
              framework, ("torch", "mmdet", "mmcv", "mmengine", "pycocotools", "numpy"))
  out = {p: version(p) for p in pkgs}
  out["python"] = sys.version.split()[0]
  if framework == "detectron2":
    out["detectron2_commit"] = helpers("detectron2")._d2_commit()
  return out


def record(framework: str) -> OrderedDict:
  """Runs the reference (float32, then float64 on the same samples) and assembles the fixture."""
  batch = load_batch(FRAMEWORKS[framework]["images"])
  if framework == "torchvision":
    fn = run_torchvision
  elif framework == "detectron2":
    fn = functools.partial(run_detectron2, mask_format="bitmask")
  else:
    fn = functools.partial(run_mmdet, framework=framework)
  t0 = time.time()
  run = fn(batch)
  # The float32 gradients of the deep layers carry the reference's own rounding (a res4 conv's
  # differs from float64 by a few 1e-3): the same step in float64, on the float32 run's
  # proposals and hence the same samples, measures it (tests/test_parity_training.py).
  run64 = fn(batch, dtype=torch.float64, proposals=[r["proposals"] for r in run["images"]])
  check_batch_equal(run, run64)
  if framework == "detectron2":
    poly = run_detectron2(batch, "polygon")
    check_batch_equal(run, poly)
    for k, v in poly["losses"].items():
      if k != "loss_mask":
        assert v == run["losses"][k], f"{k} differs between the bitmask and polygon runs"
  print(f"[{framework}] reference runs {time.time() - t0:.0f}s", flush=True)
  arrs = assemble(framework, batch, run, versions_of(framework))
  for k, v in run64["losses"].items():
    arrs["loss64/" + k] = np.array(v, np.float64)
  for k, g in run64["grads"].items():
    flat = g.reshape(-1)
    arrs[f"grad64/{k}/norm"] = np.array(np.linalg.norm(flat))
    arrs[f"grad64/{k}/values"] = (flat if flat.size <= GRAD_FULL_MAX else flat[::GRAD_STRIDE]
                                  ).astype(np.float32)
  if framework == "detectron2":
    arrs["polygon/loss/loss_mask"] = np.array(poly["losses"]["loss_mask"], np.float64)
    for i, r in enumerate(poly["images"]):
      arrs[f"polygon/{i}/mask/targets"] = r["mask_targets"].astype(np.uint8)
  return arrs


def report(arrs) -> None:
  for k in arrs:
    if k.startswith(("loss/", "loss64/")) or k == "polygon/loss/loss_mask":
      print(f"  {k} = {float(arrs[k]):.7g}")
  for i in range(len(arrs["image_names"])):
    p = f"{i}/"
    print(f"  image {i} {arrs['image_names'][i]}: rpn pos {len(arrs[p + 'rpn/pos_index'])} neg "
          f"{len(arrs[p + 'rpn/neg_index'])}; proposals {len(arrs[p + 'proposals'])}; RoIs "
          f"{len(arrs[p + 'rois/index'])}, {int(arrs[p + 'rois/pos'].sum())} positive "
          f"({int((arrs[p + 'rois/index'] >= len(arrs[p + 'proposals'])).sum())} GT boxes)")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--framework", choices=list(FRAMEWORKS), required=True)
  ap.add_argument("--out", type=Path, default=None)
  ap.add_argument("--verify-only", action="store_true",
                  help="re-run and require the stored fixture's samples, losses and gradients")
  args = ap.parse_args()
  out = args.out or FIXTURES / f"train_parity_{args.framework}.npz"
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  arrs = record(args.framework)
  report(arrs)
  if args.verify_only:
    fx = np.load(out)
    for k in arrs:
      if k != "versions":
        assert np.array_equal(fx[k], arrs[k]), f"{k} differs from {out.name}"
    print(f"verify OK: {out.name} reproduced ({len(arrs)} arrays)")
    return
  h = helpers(args.framework)
  (h.TV.write_npz if args.framework == "detectron2" else h.write_npz)(out, arrs)
  print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB, {len(arrs)} arrays)")


if __name__ == "__main__":
  main()
