"""COCO bbox / segm AP of detection results: COCOeval, summaries, category checks.

Host-side (numpy + pycocotools / faster-coco-eval, no JAX import: the parallel backend's worker
processes import this module).

* The scorer is faster-coco-eval (`faster_coco_eval.COCOeval_faster`: pycocotools' algorithm with
  the per-image matching and the accumulation in C++, several times faster on COCO val) when it is
  installed, else pycocotools; `scorer='pycocotools'` forces the reference. Both give the same
  twelve statistics (tests/evaluation/test_scorers.py compares them on model outputs and on a
  synthetic set with crowd regions and images without annotations).

* `evaluate_results(gt, results)` runs COCOeval for 'bbox' and 'segm' on a list of COCO result dicts
  (`coco_format.detections_to_coco` entries) and returns
  `{'bbox': {'AP': ..., 'AP50': ..., ..., 'ARl': ...}, 'segm': {...}}` in percent, NaN where
  COCOeval reports -1 (no ground truth in that area range), as detectron2's `COCOEvaluator` does.
  Mask Scoring R-CNN entries carry 'mask_score', which scores the segm results (mmdet
  `_segm2json`); the bbox results keep the class score.
* The segm results are evaluated without their 'bbox' field, so that COCOeval's area ranges
  (small / medium / large) use the mask area; all three references do this (mmdet
  `CocoDataset.evaluate` pops 'bbox' since v2.12, detectron2 `_evaluate_predictions_on_coco`,
  torchvision's reference `prepare_for_coco_segmentation` never adds it).
* pycocotools only: `num_workers > 1` runs COCOeval's per-image evaluation (`computeIoU` +
  `evaluateImg`, the slow part) in worker processes over contiguous chunks of the sorted image ids and merges the
  per-image records in COCOeval's own order before `accumulate()`. Each record depends only on its
  (image, category, area range), so the numbers are identical to the serial run (tested).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import io
import json
import math
import multiprocessing
import os
import weakref
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn_jax import errors
from maskrcnn_jax.data import coco_categories
from maskrcnn_jax.evaluation import coco_format

# COCOeval.stats order (`COCOeval.summarize` for bbox / segm).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


class EvaluationError(errors.UserError, ValueError):
  """A dataset or result set that cannot be evaluated (empty, mismatched categories, ...)."""


class CategoryMismatchError(EvaluationError):
  """The annotation file's category ids are not the checkpoint's classes."""


# ------------------------------------------------------------------------------------------------
# Ground truth and categories
# ------------------------------------------------------------------------------------------------


def load_ground_truth(annotation_file: str) -> COCO:
  """Reads a COCO-format annotation json (quietly) as pycocotools' COCO.

  Raises:
    errors.InputNotFoundError: no such file.
    EvaluationError: not json, or without the 'images' / 'annotations' / 'categories' lists.
  """
  if not os.path.isfile(annotation_file):
    raise errors.InputNotFoundError(f"annotation file not found: {annotation_file}")
  try:
    with open(annotation_file, "r", encoding="utf-8") as f:
      dataset = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise EvaluationError(f"{annotation_file}: not valid json: {e}") from e
  if not isinstance(dataset, dict) or not all(
      isinstance(dataset.get(k), list) for k in ("images", "annotations", "categories")):
    raise EvaluationError(f"{annotation_file}: not a COCO instances file (needs the lists "
                          "'images', 'annotations' and 'categories')")
  gt = COCO()
  gt.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints
    gt.createIndex()
  return gt


def model_category_ids(config) -> Tuple[np.ndarray, str]:
  """The checkpoint's label -> category id table and its class layout.

  Same rule as `inference.category_ids` (without importing JAX): bg_last layouts (mmdet,
  detectron2) map label i to `config.category_ids[i]`, default the 80 COCO ids; torchvision
  (bg_first) labels already are COCO category ids 1..num_classes (0 = background).

  Returns:
    (table [L] int64, layout 'bg_last' | 'bg_first').
  """
  from maskrcnn_jax import conventions  # pylint: disable=g-import-not-at-top
  conv = conventions.get(config.convention)
  num_classes = int(config.model.num_classes)
  if conv.class_layout == "bg_first":
    return np.arange(num_classes + 1, dtype=np.int64), "bg_first"
  ids = config.get("category_ids", None)
  table = np.asarray(list(ids) if ids else coco_categories.COCO_CATEGORY_IDS, np.int64)
  if len(table) != num_classes:
    source = "config.category_ids" if ids else "the 80 COCO category ids (config.category_ids unset)"
    raise CategoryMismatchError(
        f"the model has {num_classes} classes (config.model.num_classes) but {source} lists "
        f"{len(table)}; set config.category_ids to the dataset category id of each class, in label "
        "order")
  return table, "bg_last"


def check_categories(gt_category_ids: Iterable[int], config,
                     annotation_file: str = "the annotation file") -> np.ndarray:
  """Checks that the dataset's categories are the checkpoint's classes; returns the label table.

  bg_last (mmdet / detectron2): the json's category ids must be exactly the set the model's labels
  map to (`model_category_ids`). bg_first (torchvision): every json category id must be a label of
  the model (1..num_classes).

  Raises:
    CategoryMismatchError naming the ids that are missing / extra.
  """
  table, layout = model_category_ids(config)
  ids = sorted({int(c) for c in gt_category_ids})
  if not ids:
    raise CategoryMismatchError(f"{annotation_file} defines no categories")
  if layout == "bg_first":
    bad = [c for c in ids if not 1 <= c < len(table)]
    if bad:
      raise CategoryMismatchError(
          f"{annotation_file} has category ids {_short(bad)} that the checkpoint's classes do not "
          f"cover: the torchvision layout predicts category ids 1..{len(table) - 1} directly "
          f"(config.model.num_classes = {len(table) - 1})")
    return table
  expected = set(int(c) for c in table)
  missing = sorted(expected - set(ids))
  extra = sorted(set(ids) - expected)
  if missing or extra:
    source = "config.category_ids" if config.get("category_ids", None) else (
        "the 80 COCO category ids (config.category_ids unset)")
    parts = []
    if extra:
      parts.append(f"in the json but not a class of the checkpoint: {_short(extra)}")
    if missing:
      parts.append(f"classes of the checkpoint absent from the json: {_short(missing)}")
    raise CategoryMismatchError(
        f"the category ids of {annotation_file} do not match the checkpoint's classes ({source}, "
        f"{len(table)} classes; the json has {len(ids)}): " + "; ".join(parts) +
        ". Set config.category_ids (label order) to evaluate a checkpoint trained on this dataset")
  return table


def _short(values: Sequence[int], n: int = 12) -> str:
  values = list(values)
  text = ", ".join(str(v) for v in values[:n])
  return f"[{text}{', ...' if len(values) > n else ''}] ({len(values)})"


# ------------------------------------------------------------------------------------------------
# COCOeval
# ------------------------------------------------------------------------------------------------


def results_to_coco(gt: COCO, results: List[Dict[str, Any]]) -> COCO:
  """`gt.loadRes(results)` (quiet) that also accepts an empty list (loadRes indexes results[0]).

  `results` is modified in place by pycocotools (area, id, iscrowd are added); pass copies.
  """
  if results:
    with contextlib.redirect_stdout(io.StringIO()):
      return gt.loadRes(results)
  res = COCO()
  res.dataset["images"] = list(gt.dataset.get("images", []))
  res.dataset["categories"] = copy.deepcopy(gt.dataset.get("categories", []))
  res.dataset["annotations"] = []
  with contextlib.redirect_stdout(io.StringIO()):
    res.createIndex()
  return res


def split_results(results: Sequence[Dict[str, Any]]
                  ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
  """(bbox results, segm results) ready for loadRes: fresh dicts, segm without 'bbox'.

  The segm entries score with 'mask_score' where present (`coco_format.split_bbox_segm`).
  """
  bbox, segm = coco_format.split_bbox_segm(results)
  for s in segm:
    s.pop("bbox", None)
  return bbox, segm


def _eval_chunk(args) -> List[Optional[Dict[str, Any]]]:
  """Worker: COCOeval's per-image evaluation of one chunk of image ids (see `_evaluate`)."""
  iou_type, params, gts, dts = args
  e = COCOeval(iouType=iou_type)
  e.params = params
  e._gts = defaultdict(list, gts)  # pylint: disable=protected-access
  e._dts = defaultdict(list, dts)  # pylint: disable=protected-access
  cat_ids = params.catIds if params.useCats else [-1]
  e.ious = {(i, c): e.computeIoU(i, c) for i in params.imgIds for c in cat_ids}
  max_det = params.maxDets[-1]
  return [e.evaluateImg(i, c, a, max_det)
          for c in cat_ids for a in params.areaRng for i in params.imgIds]


def _evaluate(e: COCOeval, executor: Optional[concurrent.futures.Executor],
              num_chunks: int) -> None:
  """`e.evaluate()`, with the per-image work on `executor` when given (identical records)."""
  if executor is None or num_chunks <= 1:
    e.evaluate()
    return
  # The preamble of COCOeval.evaluate (pycocotools 2.0.x), then _prepare on this process.
  p = e.params
  p.imgIds = list(np.unique(p.imgIds))
  if p.useCats:
    p.catIds = list(np.unique(p.catIds))
  p.maxDets = sorted(p.maxDets)
  e.params = p
  e._prepare()  # pylint: disable=protected-access
  img_ids = p.imgIds
  chunks = [list(c) for c in np.array_split(np.asarray(img_ids, dtype=object),
                                            min(num_chunks, len(img_ids))) if len(c)]
  chunk_of = {}
  for ci, chunk in enumerate(chunks):
    for i in chunk:
      chunk_of[i] = ci
  gts = [dict() for _ in chunks]
  dts = [dict() for _ in chunks]
  for store, parts in ((e._gts, gts), (e._dts, dts)):  # pylint: disable=protected-access
    for key, anns in store.items():
      ci = chunk_of.get(key[0])
      if ci is not None:
        parts[ci][key] = anns
  jobs = []
  for ci, chunk in enumerate(chunks):
    params = copy.deepcopy(p)
    params.imgIds = chunk
    jobs.append(executor.submit(_eval_chunk, (p.iouType, params, gts[ci], dts[ci])))
  parts = [j.result() for j in jobs]
  cat_ids = p.catIds if p.useCats else [-1]
  num_areas, num_imgs = len(p.areaRng), len(img_ids)
  eval_imgs: List[Optional[Dict[str, Any]]] = [None] * (len(cat_ids) * num_areas * num_imgs)
  offset = 0
  for chunk, part in zip(chunks, parts):
    n = len(chunk)
    for k in range(len(cat_ids)):
      for a in range(num_areas):
        src = (k * num_areas + a) * n
        dst = (k * num_areas + a) * num_imgs + offset
        eval_imgs[dst:dst + n] = part[src:src + n]
    offset += n
  e.ious = {}
  e.evalImgs = eval_imgs
  e._paramsEval = copy.deepcopy(p)  # pylint: disable=protected-access


def _stats_to_metrics(stats: Sequence[float]) -> Dict[str, float]:
  # detectron2 `_derive_coco_results`: percent, NaN for COCOeval's -1 (nothing to evaluate).
  return {name: (float(v) * 100.0 if v >= 0 else float("nan"))
          for name, v in zip(STAT_NAMES, stats)}


def _per_class_ap(e: COCOeval, names: Mapping[int, str]) -> Dict[str, float]:
  # detectron2 `_derive_coco_results`: precision [T, R, K, A, M], area 'all', maxDets 100.
  precision = e.eval["precision"]
  out = {}
  for k, cat in enumerate(e.params.catIds):
    p = precision[:, :, k, 0, -1]
    p = p[p > -1]
    out[names.get(cat, str(cat))] = float(np.mean(p)) * 100.0 if p.size else float("nan")
  return out


SCORERS = ("auto", "faster_coco_eval", "pycocotools")


def faster_coco_eval_available() -> bool:
  try:
    import faster_coco_eval  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def resolve_scorer(scorer: str = "auto") -> str:
  """'faster_coco_eval' or 'pycocotools' for a `scorer` setting ('auto': the first if installed).

  Raises:
    EvaluationError: an unknown name, or 'faster_coco_eval' when it is not installed.
  """
  if scorer not in SCORERS:
    raise EvaluationError(f"unknown scorer {scorer!r}; expected one of {SCORERS}")
  if scorer == "auto":
    return "faster_coco_eval" if faster_coco_eval_available() else "pycocotools"
  if scorer == "faster_coco_eval" and not faster_coco_eval_available():
    raise EvaluationError("scorer 'faster_coco_eval' requested but the faster-coco-eval package is "
                          "not installed (pip install faster-coco-eval)")
  return scorer


_FASTER_GT: "weakref.WeakKeyDictionary[COCO, Any]" = weakref.WeakKeyDictionary()


def _faster_ground_truth(gt: COCO):
  """A faster_coco_eval COCO of `gt`'s dataset (cached per gt object).

  faster-coco-eval stores per-annotation state ('ignore', 'rle') in the annotation dicts, so it
  gets its own shallow copies and the pycocotools object stays untouched.
  """
  from faster_coco_eval import COCO as FasterCOCO  # pylint: disable=g-import-not-at-top
  cached = _FASTER_GT.get(gt)
  if cached is None:
    data = dict(gt.dataset)
    data["annotations"] = [dict(a) for a in gt.dataset.get("annotations", [])]
    if "categories" not in data:
      data["categories"] = []
    cached = FasterCOCO(data, print_function=lambda *_: None)
    _FASTER_GT[gt] = cached
  return cached


def _run_faster(gt: COCO, dets: List[Dict[str, Any]], iou_type: str, img_ids: Sequence[int]):
  """faster-coco-eval's evaluate + accumulate + summarize; returns (evaluator, summary text)."""
  from faster_coco_eval import COCOeval_faster  # pylint: disable=g-import-not-at-top
  fgt = _faster_ground_truth(gt)
  lines: List[str] = []
  dt = fgt.loadRes(dets)
  dt.print_function = lambda *_: None
  e = COCOeval_faster(fgt, dt, iouType=iou_type, print_function=lines.append)
  e.params.imgIds = list(img_ids)
  e.evaluate()
  e.accumulate()
  e.summarize()
  e.stats = np.asarray(e.stats)[:len(STAT_NAMES)]
  summary = "\n".join(line for line in lines if line.lstrip().startswith("Average"))
  return e, summary


def _run_pycocotools(gt: COCO, dets: List[Dict[str, Any]], iou_type: str,
                     img_ids: Sequence[int], executor, num_chunks: int):
  """pycocotools' COCOeval (per-image stage on `executor` when given); (evaluator, summary)."""
  dt = results_to_coco(gt, dets)
  e = COCOeval(gt, dt, iouType=iou_type)
  e.params.imgIds = list(img_ids)
  with contextlib.redirect_stdout(io.StringIO()):
    _evaluate(e, executor, num_chunks)
    e.accumulate()
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    e.summarize()
  return e, buf.getvalue().rstrip()


def evaluate_results(gt: COCO, results: Sequence[Dict[str, Any]], *,
                     iou_types: Sequence[str] = IOU_TYPES,
                     image_ids: Optional[Sequence[int]] = None,
                     per_class: bool = False, num_workers: int = 0,
                     executor: Optional[concurrent.futures.Executor] = None,
                     log: Optional[Callable[[str], None]] = print,
                     scorer: str = "auto") -> Dict[str, Dict[str, float]]:
  """COCOeval of `results` against `gt` for each iou type.

  Args:
    gt: the ground truth (`load_ground_truth`).
    results: COCO result dicts ('image_id', 'category_id', 'bbox' [x, y, w, h], 'score', optional
      'segmentation' RLE and 'mask_score'); not modified.
    iou_types: subset of ('bbox', 'segm').
    image_ids: the images that were evaluated (default: all images of `gt`); images without
      results count as having no detections.
    per_class: also return per-category AP as 'AP-<category name>' (detectron2's keys) and log a
      per-class table.
    num_workers: pycocotools only: > 1 evaluates images in that many worker processes (identical
      numbers); ignored when `executor` is given.
    executor: pycocotools only: an existing process pool to use for the per-image evaluation.
    log: where the 12-line COCOeval summaries and the tables go (None: silent).
    scorer: 'auto' (faster-coco-eval if installed, else pycocotools), 'faster_coco_eval' or
      'pycocotools' (`resolve_scorer`).

  Returns:
    {iou_type: {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs',
    'ARm', 'ARl' (+ 'AP-<name>')}} in percent; NaN where COCOeval reports -1. No results give 0
    wherever the ground truth has instances.

  Raises:
    EvaluationError: an empty image set, an unknown iou type or scorer, or segm requested for
      results without 'segmentation'.
  """
  log = log or (lambda _: None)
  unknown = [t for t in iou_types if t not in IOU_TYPES]
  if unknown:
    raise EvaluationError(f"unknown iou types {unknown}; expected a subset of {IOU_TYPES}")
  scorer = resolve_scorer(scorer)
  img_ids = sorted(int(i) for i in (gt.getImgIds() if image_ids is None else image_ids))
  if not img_ids:
    raise EvaluationError("no images to evaluate")
  bbox, segm = split_results(results)
  if "segm" in iou_types and len(segm) != len(bbox):
    raise EvaluationError(f"segm evaluation needs a 'segmentation' in every result; "
                          f"{len(bbox) - len(segm)} of {len(bbox)} have none")
  names = {c["id"]: c["name"] for c in gt.dataset.get("categories", [])}
  own_pool = None
  if scorer == "pycocotools" and executor is None and num_workers > 1:
    own_pool = executor = concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=multiprocessing.get_context("spawn"))
  num_chunks = 4 * (getattr(executor, "_max_workers", 0) or num_workers or 1)
  metrics = {}
  try:
    for iou_type in iou_types:
      dets = bbox if iou_type == "bbox" else segm
      if scorer == "faster_coco_eval":
        e, summary = _run_faster(gt, dets, iou_type, img_ids)
      else:
        e, summary = _run_pycocotools(gt, dets, iou_type, img_ids, executor, num_chunks)
      log(f"COCOeval {iou_type} ({scorer}, {len(dets)} detections, {len(img_ids)} images):\n"
          + summary)
      m = _stats_to_metrics(e.stats)
      if per_class:
        per = _per_class_ap(e, names)
        log(per_class_table(per, iou_type))
        m.update({f"AP-{k}": v for k, v in per.items()})
      metrics[iou_type] = m
  finally:
    if own_pool is not None:
      own_pool.shutdown()
  log(format_table(metrics))
  return metrics


def format_table(metrics: Mapping[str, Mapping[str, float]],
                 names: Sequence[str] = STAT_NAMES[:6]) -> str:
  """A compact markdown table: one row per iou type, columns AP AP50 AP75 APs APm APl."""
  head = "| type | " + " | ".join(f"{n:>5}" for n in names) + " |"
  rule = "|------|" + "|".join("-------" for _ in names) + "|"
  rows = [head, rule]
  for iou_type, m in metrics.items():
    rows.append(f"| {iou_type:<4} | " + " | ".join(_fmt(m.get(n)) for n in names) + " |")
  return "\n".join(rows)


def per_class_table(per_class: Mapping[str, float], iou_type: str, columns: int = 3) -> str:
  """Per-category AP as a markdown table with `columns` (name, AP) pairs per row."""
  items = list(per_class.items())
  head = "| " + " | ".join(["category", f"{iou_type} AP"] * columns) + " |"
  rule = "|" + "|".join(["---"] * (2 * columns)) + "|"
  rows = [head, rule]
  for i in range(0, len(items), columns):
    cells = []
    for name, ap in items[i:i + columns]:
      cells += [name, _fmt(ap).strip()]
    cells += [""] * (2 * columns - len(cells))
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def _fmt(v: Optional[float]) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "  nan"
  return f"{v:5.2f}" if v < 100 else f"{v:5.1f}"


def metrics_to_json(metrics: Mapping[str, Mapping[str, float]]) -> Dict[str, Dict[str, Any]]:
  """The metrics with NaN written as null (strict JSON)."""
  return {t: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
          for t, m in metrics.items()}
