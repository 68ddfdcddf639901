"""COCO results formatting (parity_spec 3.15): RLE round trips, xywh boxes, category mapping."""
from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn_jax.evaluation import coco_format


def _masks(n=4, h=23, w=31, seed=0):
  rng = np.random.default_rng(seed)
  masks = rng.random((n, h, w)) > 0.6
  masks[0] = False  # empty
  if n > 1:
    masks[1] = True  # full
  return masks


def test_encode_mask_round_trip():
  for m in _masks():
    rle = coco_format.encode_mask(m)
    assert rle["size"] == [23, 31] and isinstance(rle["counts"], str)
    json.dumps(rle)
    raw = {"size": rle["size"], "counts": rle["counts"].encode()}
    np.testing.assert_array_equal(mask_util.decode(raw).astype(bool), m)
    np.testing.assert_array_equal(coco_format.decode_mask(rle), m)
    # Same bytes as the references' call (mmdet _segm2json / d2 instances_to_coco_json).
    ref = mask_util.encode(np.array(m[:, :, None], order="F", dtype="uint8"))[0]
    assert rle["counts"] == ref["counts"].decode("utf-8")
    assert float(mask_util.area(ref)) == m.sum()


def test_encode_mask_rejects_wrong_rank():
  with pytest.raises(ValueError):
    coco_format.encode_mask(np.zeros((2, 3, 4), bool))


def test_xyxy_to_xywh():
  boxes = np.float32([[1.5, 2.25, 10.1, 20.7], [0.0, 0.0, 0.0, 0.0]])
  out = coco_format.xyxy_to_xywh(boxes)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out[:, :2], boxes[:, :2])
  np.testing.assert_array_equal(out[:, 2], boxes[:, 2] - boxes[:, 0])  # no +1
  np.testing.assert_array_equal(out[:, 3], boxes[:, 3] - boxes[:, 1])
  out64 = coco_format.xyxy_to_xywh(boxes, float64_subtract=True)  # mmdet: Python float subtraction
  assert out64.dtype == np.float64
  assert out64[0, 2] == float(boxes[0, 2]) - float(boxes[0, 0])
  np.testing.assert_allclose(out64, out, rtol=0, atol=1e-5)


def test_detections_to_coco_fields():
  masks = _masks(3, 10, 12)
  boxes = np.float32([[0, 0, 5, 5], [1, 2, 11, 9], [3.5, 4.5, 6.25, 8.75]])
  res = coco_format.detections_to_coco(
      42, boxes, np.float32([0.9, 0.5, 0.07]), np.array([0, 2, 79]), masks,
      category_ids=list(range(1, 80)) + [90], mask_scores=np.float32([0.8, 0.4, 0.01]))
  assert len(res) == 3
  assert [r["image_id"] for r in res] == [42, 42, 42]
  assert [r["category_id"] for r in res] == [1, 3, 90]
  assert res[2]["bbox"] == [3.5, 4.5, 2.75, 4.25]
  assert res[0]["score"] == pytest.approx(0.9) and res[0]["mask_score"] == pytest.approx(0.8)
  np.testing.assert_array_equal(coco_format.decode_mask(res[1]["segmentation"]), masks[1])
  json.dumps(res)
  bbox, segm = coco_format.split_bbox_segm(res)
  assert all("segmentation" not in b and "mask_score" not in b for b in bbox)
  assert [s["score"] for s in segm] == [r["mask_score"] for r in res]
  assert [b["score"] for b in bbox] == [r["score"] for r in res]


def test_detections_to_coco_file_name_labels_as_ids_and_no_masks():
  res = coco_format.detections_to_coco("img.jpg", np.float32([[0, 0, 1, 1]]), np.float32([0.3]),
                                       np.array([17]))
  assert res == [{"file_name": "img.jpg", "category_id": 17, "bbox": [0.0, 0.0, 1.0, 1.0],
                  "score": pytest.approx(0.3)}]
  assert coco_format.detections_to_coco(1, np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)) == []
  with pytest.raises(ValueError):
    coco_format.detections_to_coco(1, np.zeros((2, 4)), np.zeros(1), np.zeros(2, int))


def test_perfect_detections_score_ap_1():
  # Ground truth and results through pycocotools: identical masks / boxes must give AP 1.
  h, w = 64, 80
  gt_masks = np.zeros((2, h, w), bool)
  gt_masks[0, 5:30, 10:40] = True
  gt_masks[1, 35:60, 45:75] = True
  boxes = np.float32([[10, 5, 40, 30], [45, 35, 75, 60]])
  anns = []
  for i, (m, b) in enumerate(zip(gt_masks, boxes)):
    rle = coco_format.encode_mask(m)
    anns.append(dict(id=i + 1, image_id=7, category_id=[1, 3][i], segmentation=rle,
                     area=float(m.sum()), bbox=[float(v) for v in coco_format.xyxy_to_xywh(b)],
                     iscrowd=0))
  gt = COCO()
  gt.dataset = dict(images=[dict(id=7, height=h, width=w)], annotations=anns,
                    categories=[dict(id=1, name="a"), dict(id=3, name="b")])
  gt.createIndex()
  res = coco_format.detections_to_coco(7, boxes, np.float32([0.9, 0.8]), np.array([0, 1]),
                                       list(gt_masks), category_ids=[1, 3])
  bbox, segm = coco_format.split_bbox_segm(res)
  for iou_type, dets in (("bbox", bbox), ("segm", segm)):
    ev = COCOeval(gt, gt.loadRes(dets), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
