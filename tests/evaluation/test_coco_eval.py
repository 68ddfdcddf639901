"""COCOeval wrapper and host-side result encoding, without the model (fast).

Perfect predictions (ground truth fed back through the results -> COCOeval path) give AP 100, no
predictions give 0, crowd regions and images without annotations evaluate, Mask Scoring results
score segm with the mask score, categories are checked against the checkpoint's classes, the
parallel COCOeval backend gives identical numbers, and the window RLE / paste equal the full-image
reference path.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from maskrcnn_jax import config_lib, conventions
from maskrcnn_jax.data import coco_categories
from maskrcnn_jax.evaluation import coco_eval, coco_format, host
from tests.evaluation import tiny


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  data = tiny.make_dataset(str(root))
  gt = coco_eval.load_ground_truth(str(root / "annotations.json"))
  return root, data, gt


def _perfect(gt, score=1.0):
  """Each non-crowd ground-truth instance as a detection (bbox and RLE mask)."""
  out = []
  for ann in gt.dataset["annotations"]:
    if ann["iscrowd"]:
      continue
    out.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                "bbox": list(ann["bbox"]), "score": score,
                "segmentation": coco_format.encode_mask(gt.annToMask(ann))})
  return out


def _same(a, b, tol=0.0):
  assert a.keys() == b.keys()
  for t in a:
    assert a[t].keys() == b[t].keys()
    for k in a[t]:
      x, y = a[t][k], b[t][k]
      assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= tol, (t, k, x, y)


def test_dataset_has_crowd_and_empty_images(dataset):
  _, data, gt = dataset
  assert any(a["iscrowd"] for a in data["annotations"])
  with_anns = {a["image_id"] for a in data["annotations"]}
  assert any(im["id"] not in with_anns for im in data["images"])


def test_perfect_predictions_give_ap_100(dataset):
  _, _, gt = dataset
  results = _perfect(gt)
  before = copy.deepcopy(results)
  logs = []
  metrics = coco_eval.evaluate_results(gt, results, per_class=True, log=logs.append)
  assert results == before  # not modified by pycocotools
  for t in ("bbox", "segm"):
    for k in ("AP", "AP50", "AP75", "AR100"):
      assert metrics[t][k] == pytest.approx(100.0), (t, k)
    for name in ("red", "green", "blue"):
      assert metrics[t][f"AP-{name}"] == pytest.approx(100.0)
  text = "\n".join(logs)
  assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in text
  assert "| bbox | 100.0 |" in text and "| segm | 100.0 |" in text


def test_no_predictions_give_zero(dataset):
  _, _, gt = dataset
  metrics = coco_eval.evaluate_results(gt, [], log=None)
  for t in ("bbox", "segm"):
    assert metrics[t]["AP"] == 0.0 and metrics[t]["AP50"] == 0.0 and metrics[t]["AR100"] == 0.0
    # No large objects in 80x60 images: COCOeval's -1 becomes NaN (null in metrics.json).
    assert math.isnan(metrics[t]["APl"])
  assert coco_eval.metrics_to_json(metrics)["bbox"]["APl"] is None


def test_detection_on_crowd_region_is_ignored(dataset):
  _, data, gt = dataset
  crowd = next(a for a in data["annotations"] if a["iscrowd"])
  results = _perfect(gt)
  # A confident detection inside the crowd region: matched to the crowd (ignored), not a FP.
  x, y, w, h = crowd["bbox"]
  results.append({"image_id": crowd["image_id"], "category_id": crowd["category_id"],
                  "bbox": [x, y, w, h], "score": 1.0,
                  "segmentation": coco_format.encode_mask(gt.annToMask(crowd))})
  metrics = coco_eval.evaluate_results(gt, results, log=None)
  assert metrics["bbox"]["AP"] == pytest.approx(100.0)
  assert metrics["segm"]["AP"] == pytest.approx(100.0)


def test_mask_scoring_segm_uses_mask_score(dataset):
  _, _, gt = dataset
  perfect = _perfect(gt)
  results = []
  for r in perfect:
    # The perfect mask has a low box score but a high mask score; a wrong mask (the box's
    # complement) has a high box score but a low mask score. Both carry the perfect box.
    good = coco_format.decode_mask(r["segmentation"])
    bad = coco_format.encode_mask(~good)
    results.append(dict(r, score=0.3, mask_score=0.9))
    results.append(dict(r, segmentation=bad, score=0.8, mask_score=0.1))
  metrics = coco_eval.evaluate_results(gt, results, log=None)
  # segm ranked by mask_score: each perfect mask comes first -> AP 100.
  assert metrics["segm"]["AP"] == pytest.approx(100.0)
  # Without the mask score the wrong masks rank first and the segm AP drops.
  plain = [{k: v for k, v in r.items() if k != "mask_score"} for r in results]
  assert coco_eval.evaluate_results(gt, plain, log=None, iou_types=("segm",))["segm"]["AP"] < 90
  # bbox keeps the class score (mmdet): the duplicates are FPs after the TP -> still 100.
  assert metrics["bbox"]["AP"] == pytest.approx(100.0)


def test_segm_area_ranges_use_mask_area(dataset):
  _, _, gt = dataset
  results = _perfect(gt)
  _, segm = coco_eval.split_results(results)
  assert all("bbox" not in s for s in segm)
  assert all("bbox" in r for r in results)


def test_parallel_backend_gives_identical_numbers(dataset):
  _, _, gt = dataset
  rng = np.random.default_rng(1)
  results = []
  for r in _perfect(gt):
    for j in range(3):
      x, y, w, h = r["bbox"]
      jit = rng.normal(0, 0.15, 4) * [w, h, w, h]
      box = [x + jit[0], y + jit[1], max(w + jit[2], 1), max(h + jit[3], 1)]
      hh, ww = r["segmentation"]["size"]
      m = np.zeros((hh, ww), bool)
      x0, y0 = int(max(box[0], 0)), int(max(box[1], 0))
      m[y0:int(box[1] + box[3]), x0:int(box[0] + box[2])] = True
      results.append(dict(r, bbox=[float(v) for v in box], score=float(rng.random()),
                          category_id=int(rng.choice([1, 2, 3])) if j == 2 else
                          r["category_id"], segmentation=coco_format.encode_mask(m)))
  serial = coco_eval.evaluate_results(gt, results, per_class=True, log=None,
                                      scorer="pycocotools")
  parallel = coco_eval.evaluate_results(gt, results, per_class=True, num_workers=2, log=None,
                                        scorer="pycocotools")
  _same(serial, parallel)
  # faster-coco-eval (the default scorer) on the same results: the same numbers (its C++
  # accumulation sums in another order: the last digit of a double may differ).
  _same(serial, coco_eval.evaluate_results(gt, results, per_class=True, log=None,
                                           scorer="faster_coco_eval"), tol=1e-10)
  assert 0 < serial["bbox"]["AP"] < 100


def test_empty_image_set_is_an_error(dataset):
  _, _, gt = dataset
  with pytest.raises(coco_eval.EvaluationError, match="no images"):
    coco_eval.evaluate_results(gt, [], image_ids=[], log=None)


def _config(convention="mmdet", **kw):
  recipe = {"mmdet": "mmdet/mask_rcnn_r50_fpn_1x_coco", "detectron2":
            "detectron2/mask_rcnn_R_50_FPN_1x", "torchvision": "torchvision/maskrcnn_resnet50_fpn"}
  config = config_lib.load_config_file(str(tiny.ROOT / "configs" / f"{recipe[convention]}.py"))
  for k, v in kw.items():
    setattr(config, k, v)
  return config


def test_category_check_coco_default():
  table = coco_eval.check_categories(coco_categories.COCO_CATEGORY_IDS, _config("mmdet"))
  np.testing.assert_array_equal(table, coco_categories.COCO_CATEGORY_IDS)
  with pytest.raises(coco_eval.CategoryMismatchError) as e:
    coco_eval.check_categories([1, 2, 3], _config("detectron2"), "val.json")
  msg = str(e.value)
  assert "val.json" in msg and "80 COCO category ids" in msg and "absent from the json" in msg
  ids = list(coco_categories.COCO_CATEGORY_IDS[:-1]) + [91]
  with pytest.raises(coco_eval.CategoryMismatchError, match=r"not a class of the checkpoint: \[91\]"):
    coco_eval.check_categories(ids, _config("mmdet"))


def test_category_check_custom_ids():
  config = tiny.tiny_config()
  np.testing.assert_array_equal(coco_eval.check_categories([3, 1, 2], config), [1, 2, 3])
  with pytest.raises(coco_eval.CategoryMismatchError, match="config.category_ids"):
    coco_eval.check_categories([1, 2, 4], config)
  config.category_ids = [1, 2]
  with pytest.raises(coco_eval.CategoryMismatchError, match="3 classes"):
    coco_eval.check_categories([1, 2], config)


def test_category_check_torchvision_layout():
  config = _config("torchvision")
  table = coco_eval.check_categories(coco_categories.COCO_CATEGORY_IDS, config)
  np.testing.assert_array_equal(table, np.arange(91))
  coco_eval.check_categories([1, 5, 90], config)  # any subset of the 90 ids
  with pytest.raises(coco_eval.CategoryMismatchError, match="1..90"):
    coco_eval.check_categories([1, 95], config)


def test_label_table_matches_inference():
  from maskrcnn_jax import inference  # pylint: disable=g-import-not-at-top
  for config in (_config("mmdet"), _config("detectron2"), _config("torchvision"),
                 tiny.tiny_config()):
    np.testing.assert_array_equal(coco_eval.model_category_ids(config)[0],
                                  inference.category_ids(config))


# ------------------------------------------------------------------------------------------------
# Host-side encoding (evaluation/host.py)
# ------------------------------------------------------------------------------------------------


def test_window_rle_equals_full_mask_encoding():
  rng = np.random.default_rng(0)
  for _ in range(400):
    h, w = (int(v) for v in rng.integers(1, 30, 2))
    wh = h if rng.random() < 0.25 else int(rng.integers(0, h + 1))
    ww = int(rng.integers(0, w + 1))
    y0, x0 = int(rng.integers(0, h - wh + 1)), int(rng.integers(0, w - ww + 1))
    window = rng.random((wh, ww)) < rng.choice([0.05, 0.5, 0.97, 1.0])
    full = np.zeros((h, w), bool)
    full[y0:y0 + wh, x0:x0 + ww] = window
    assert host.window_rle(window, y0, x0, (h, w)) == coco_format.encode_mask(full)
  with pytest.raises(ValueError, match="exceeds"):
    host.window_rle(np.ones((3, 3), bool), 8, 0, (10, 10))


@pytest.mark.parametrize("convention", ["mmdet", "detectron2", "torchvision"])
def test_paste_and_encode_equals_full_image_path(convention):
  from maskrcnn_jax import inference  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  hw = (47, 61)
  n = 6
  x1 = rng.uniform(-10, 50, n)
  y1 = rng.uniform(-10, 40, n)
  boxes = np.stack([x1, y1, x1 + rng.uniform(1, 40, n), y1 + rng.uniform(1, 30, n)],
                   1).astype(np.float32)
  probs = rng.random((n, 28, 28)).astype(np.float32)
  probs[0] = 0.5  # exact threshold values: >= (mmdet, d2) vs > (torchvision)
  scores = np.sort(rng.random(n).astype(np.float32))[::-1]
  labels = rng.integers(0, 3, n)
  table = np.array([1, 2, 3])
  job = dict(image_id=7, orig_hw=hw, convention=convention, category_ids=table, boxes=boxes,
             scores=scores, labels=labels, paste_boxes=boxes, mask_probs=probs,
             mask_scores=scores * 0.5)
  image_id, entries, seconds = host.paste_and_encode(job)
  assert image_id == 7 and seconds >= 0
  masks = inference.paste_masks(probs, boxes, hw, convention)
  expected = coco_format.detections_to_coco(
      7, boxes, scores, labels, masks, category_ids=table, mask_scores=scores * 0.5,
      float64_subtract=convention == "mmdet")
  assert entries == expected
  assert conventions.get(convention).name == convention


def test_host_load_image_matches_inference(tmp_path):
  from maskrcnn_jax import inference  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  path = str(tmp_path / "x.png")
  Image.fromarray(rng.integers(0, 255, (45, 70, 3), dtype=np.uint8)).save(path)
  for convention in ("mmdet", "detectron2", "torchvision"):
    config = _config(convention)
    config.data.test_short, config.data.test_max_size = 64, 100
    from maskrcnn_jax.data import transforms  # pylint: disable=g-import-not-at-top
    ref = inference.preprocess_image(transforms.read_image(path, convention=convention), config)
    got = host.load_image(path, transforms.preprocess_kwargs(config), ref["image"].shape[:2],
                          expected_hw=(45, 70))
    np.testing.assert_array_equal(got["image"], ref["image"])
    assert got["image_hw"] == ref["image_hw"] and got["orig_hw"] == ref["orig_hw"]
    np.testing.assert_array_equal(got["scale_factor"], ref["scale_factor"])
    with pytest.raises(host.ImageSizeMismatchError, match="x.png"):
      host.load_image(path, transforms.preprocess_kwargs(config), ref["image"].shape[:2],
                      expected_hw=(70, 45))
