"""faster-coco-eval (the default scorer) and pycocotools give the same COCO statistics.

Real result sets: detections with soft 28x28 masks (evaluation/synthetic.py) pasted and
RLE-encoded by the evaluation's own host path, scored by both, bbox and segm, all twelve
statistics and per-class AP. Two ground truths: the quickstart's built-in shapes val split, and a
COCO-val-like synthetic set with crowd regions and images without annotations. (The model-output
evaluation of tests/evaluation/test_evaluator.py compares both scorers too.) The C++ accumulation
of faster-coco-eval sums in another order, so a statistic may differ in the last bits of its
double: the tolerance is 1e-10 (percent).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from maskrcnn_jax.data import coco_categories
from maskrcnn_jax.data import builtin
from maskrcnn_jax.evaluation import coco_eval, host, synthetic


def _results(gt_dict, category_ids, dets_per_image, convention="detectron2"):
  out = []
  for job in synthetic.iter_detections(gt_dict, dets_per_image=dets_per_image,
                                       category_ids=category_ids):
    job.update(convention=convention, category_ids=np.asarray(category_ids))
    out += host.paste_and_encode(job)[1]
  return out


def _compare(gt, results):
  ref = coco_eval.evaluate_results(gt, results, per_class=True, log=None, scorer="pycocotools")
  fast = coco_eval.evaluate_results(gt, results, per_class=True, log=None,
                                    scorer="faster_coco_eval")
  assert ref.keys() == fast.keys() == {"bbox", "segm"}
  for t in ref:
    assert ref[t].keys() == fast[t].keys()
    for k, v in ref[t].items():
      w = fast[t][k]
      assert (math.isnan(v) and math.isnan(w)) or abs(v - w) <= 1e-10, (t, k, v, w)
  return ref


def test_builtin_shapes_val(tmp_path):
  paths = builtin.ensure_builtin_dataset(str(tmp_path), num_train=0, num_val=24, image_size=128)
  ann_file = paths["val"][0]
  gt_dict = json.load(open(ann_file))
  cats = [c["id"] for c in gt_dict["categories"]]
  gt = coco_eval.load_ground_truth(ann_file)
  metrics = _compare(gt, _results(gt_dict, cats, dets_per_image=20))
  assert 0 < metrics["segm"]["AP"] < 100 and 0 < metrics["bbox"]["AP"] < 100


def test_coco_like_val_with_crowd_and_empty_images(tmp_path):
  gt_dict = synthetic.make_ground_truth(60, seed=3, crowd_fraction=0.05, empty_fraction=0.05)
  crowd = [a for a in gt_dict["annotations"] if a["iscrowd"]]
  with_anns = {a["image_id"] for a in gt_dict["annotations"]}
  assert crowd and any(im["id"] not in with_anns for im in gt_dict["images"])
  ann_file = tmp_path / "val.json"
  ann_file.write_text(json.dumps(gt_dict))
  gt = coco_eval.load_ground_truth(str(ann_file))
  results = _results(gt_dict, coco_categories.COCO_CATEGORY_IDS, dets_per_image=40)
  # Detections on crowd regions exist (COCOeval ignores their matches).
  crowd_images = {a["image_id"] for a in crowd}
  assert any(r["image_id"] in crowd_images for r in results)
  metrics = _compare(gt, results)
  for t in ("bbox", "segm"):
    assert all(0 < metrics[t][k] < 100 for k in ("AP", "APs", "APm", "APl"))


def test_scorer_names():
  assert coco_eval.resolve_scorer("auto") == "faster_coco_eval"  # a dependency of the package
  assert coco_eval.resolve_scorer("pycocotools") == "pycocotools"
  with pytest.raises(coco_eval.EvaluationError, match="unknown scorer"):
    coco_eval.resolve_scorer("rust")
