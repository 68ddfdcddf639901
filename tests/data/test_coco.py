"""CocoDataset: validation errors, polygons / RLE / crowd, degenerate boxes, bad images."""
from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

from maskrcnn_jax import config_lib
from maskrcnn_jax.data import coco
from maskrcnn_jax.data import loader
from maskrcnn_jax.data import transforms

H, W = 20, 30


def _uncompressed_rle(mask: np.ndarray) -> dict:
  """COCO's uncompressed RLE: run lengths of the column-major flattening, starting with zeros."""
  flat = mask.astype(np.uint8).flatten(order="F")
  counts, current, run = [], 0, 0
  for v in flat:
    if v == current:
      run += 1
    else:
      counts.append(run)
      current, run = v, 1
  counts.append(run)
  return {"size": list(mask.shape), "counts": counts}


def _masks():
  rle_mask = np.zeros((H, W), bool)
  rle_mask[2:9, 14:20] = True
  rle_mask[6:9, 20:26] = True  # an L shape
  crowd_mask = np.zeros((H, W), bool)
  crowd_mask[12:18, 3:27] = True
  return rle_mask, crowd_mask


def _write(tmp_path, data, images=(1, 3)):
  for image_id in images:
    name = f"img{image_id}.png"
    if image_id == 3:
      (tmp_path / name).write_bytes(b"this is not a png")
    else:
      img = np.full((H, W, 3), 40 * image_id, np.uint8)
      cv2.imwrite(str(tmp_path / name), img)
  path = tmp_path / "instances.json"
  path.write_text(json.dumps(data))
  return str(path)


def _data():
  rle_mask, crowd_mask = _masks()
  compressed = mask_util.encode(np.asfortranarray(crowd_mask.astype(np.uint8)))
  compressed["counts"] = compressed["counts"].decode("ascii")
  images = [dict(id=i, file_name=f"img{i}.png", height=H, width=W) for i in (3, 1, 2)]
  anns = [
      # polygon, category 7 -> label 1
      dict(id=10, image_id=1, category_id=7, iscrowd=0, bbox=[2, 3, 8, 6], area=48,
           segmentation=[[2, 3, 10, 3, 10, 9, 2, 9]]),
      # uncompressed RLE, category 3 -> label 0
      dict(id=11, image_id=1, category_id=3, iscrowd=0, bbox=[14, 2, 12, 7], area=60,
           segmentation=_uncompressed_rle(rle_mask)),
      # compressed RLE crowd region
      dict(id=12, image_id=1, category_id=3, iscrowd=1, bbox=[3, 12, 24, 6], area=144,
           segmentation=compressed),
      # degenerate: 0.5 px wide (mmdet drops w < 1; detectron2 keeps w > 1e-5)
      dict(id=13, image_id=1, category_id=7, iscrowd=0, bbox=[5, 5, 0.5, 4], area=2,
           segmentation=[[5, 5, 5.5, 5, 5.5, 9, 5, 9]]),
      # no geometry: dropped
      dict(id=14, image_id=1, category_id=7, iscrowd=0, bbox=[], area=0, segmentation=[]),
      # on the corrupt image
      dict(id=15, image_id=3, category_id=3, iscrowd=0, bbox=[1, 1, 10, 10], area=100,
           segmentation=[[1, 1, 11, 1, 11, 11, 1, 11]]),
  ]
  cats = [dict(id=7, name="seven"), dict(id=3, name="three")]
  return dict(images=images, annotations=anns, categories=cats)


@pytest.fixture
def ds_path(tmp_path):
  return _write(tmp_path, _data()), str(tmp_path)


def test_ids_labels_and_annotations(ds_path):
  ds = coco.CocoDataset(*ds_path, convention="mmdet")
  assert ds.image_ids == [1, 2, 3]
  assert ds.category_ids == [3, 7] and ds.category_names == ["three", "seven"]
  assert ds.label_to_category_id(1) == 7
  a = ds.annotations(1)
  assert a["ann_ids"].tolist() == [10, 11, 12]  # 13 degenerate, 14 no bbox
  np.testing.assert_array_equal(a["boxes"], np.array(
      [[2, 3, 10, 9], [14, 2, 26, 9], [3, 12, 27, 18]], np.float32))
  assert a["boxes"].dtype == np.float32 and a["labels"].dtype == np.int32
  assert a["labels"].tolist() == [1, 0, 0]
  assert a["crowd"].tolist() == [False, False, True]
  assert ds.stats["degenerate_box"] == 1 and ds.stats["missing_bbox"] == 1
  # The image without annotations is kept for evaluation, left out of training.
  assert ds.annotations(2)["boxes"].shape == (0, 4)
  assert ds.instance_masks(2).shape == (0, H, W)
  assert ds.train_image_ids() == [1, 3]
  assert ds.train_image_ids(filter_empty=False) == [1, 2, 3]
  assert ds.image_info(2)["file_name"] == "img2.png"


def test_instance_masks_polygon_and_rle(ds_path):
  ds = coco.CocoDataset(*ds_path, convention="mmdet")
  masks = ds.instance_masks(1)
  rle_mask, crowd_mask = _masks()
  assert masks.shape == (3, H, W) and masks.dtype == bool
  np.testing.assert_array_equal(masks[1], rle_mask)  # uncompressed RLE
  np.testing.assert_array_equal(masks[2], crowd_mask)  # compressed RLE
  # Polygon: what pycocotools rasterizes (mmdet `_poly2mask`); inside its box, non-empty.
  want = mask_util.decode(mask_util.merge(mask_util.frPyObjects([[2, 3, 10, 3, 10, 9, 2, 9]],
                                                                H, W))).astype(bool)
  np.testing.assert_array_equal(masks[0], want)
  ys, xs = np.nonzero(masks[0])
  assert masks[0].sum() >= 40 and xs.min() >= 2 and xs.max() <= 10 and ys.max() <= 9


def test_degenerate_rule_per_convention(ds_path):
  d2 = coco.CocoDataset(*ds_path, convention="detectron2")
  assert d2.annotations(1)["ann_ids"].tolist() == [10, 11, 12, 13]
  tv = coco.CocoDataset(*ds_path, convention="torchvision")
  assert tv.annotations(1)["ann_ids"].tolist() == [10, 11, 12, 13]


@pytest.mark.parametrize("drop, where", [
    (("categories",), "'categories'"),
    (("annotations", 1, "category_id"), "annotation id 11"),
    (("annotations", 0, "bbox"), "annotation id 10"),
    (("annotations", 2, "image_id"), "annotation id 12"),
    (("images", 1, "file_name"), "image id 1"),
])
def test_missing_field_raises_dataset_error(tmp_path, drop, where):
  data = _data()
  obj = data
  for k in drop[:-1]:
    obj = obj[k]
  del obj[drop[-1]]
  path = _write(tmp_path, data)
  with pytest.raises(coco.DatasetError) as e:
    coco.CocoDataset(path, str(tmp_path), convention="mmdet")
  msg = str(e.value)
  assert path in msg and where in msg and repr(drop[-1]) in msg


def test_malformed_and_unknown_references(tmp_path):
  data = _data()
  data["annotations"][0]["bbox"] = [1, 2, 3]
  path = _write(tmp_path, data)
  with pytest.raises(coco.DatasetError, match="annotation id 10.*malformed 'bbox'"):
    coco.CocoDataset(path, str(tmp_path), convention="mmdet")
  data = _data()
  data["annotations"][1]["category_id"] = 99
  path = _write(tmp_path, data)
  with pytest.raises(coco.DatasetError, match="annotation id 11.*unknown category id 99"):
    coco.CocoDataset(path, str(tmp_path), convention="mmdet")
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(coco.DatasetError, match="bad.json: not valid json"):
    coco.CocoDataset(str(tmp_path / "bad.json"), str(tmp_path), convention="mmdet")


def test_corrupt_image_is_reported_and_skipped_in_training(ds_path, caplog):
  ds = coco.CocoDataset(*ds_path, convention="mmdet")
  assert ds.read_image(1).shape == (H, W, 3)
  with pytest.raises(transforms.ImageReadError) as e:
    ds.read_image(3)
  assert "image id 3" in str(e.value) and "img3.png" in str(e.value)

  config = config_lib.mask_rcnn(convention="mmdet")
  config.data.train_short = (H,)
  config.data.train_max_size = 64
  config.data.train_buckets = ((32, 32),)
  config.data.max_instances = 4
  config.data.gt_mask_size = 8
  with caplog.at_level(logging.WARNING), loader.TrainLoader(
      ds, config, seed=0, global_batch=2, num_workers=0) as train:
    batch = next(train)
  # Image 3 is replaced deterministically by the next permutation position (image 1).
  assert batch["image_id"].tolist() == [1, 1]
  assert train.skipped == 1 and train.skipped_samples[0][0] == 3
  assert "image id 3 (img3.png)" in caplog.text and "1 skipped so far" in caplog.text
