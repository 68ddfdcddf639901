"""Host training / evaluation transforms: shapes, flips, mask crops, multi-scale, determinism."""
from __future__ import annotations

import json

import cv2
import jax
import numpy as np
import pytest
from pycocotools import mask as mask_util

from maskrcnn_jax import config_lib
from maskrcnn_jax import conventions
from maskrcnn_jax.data import coco
from maskrcnn_jax.data import masks
from maskrcnn_jax.data import pipeline
from maskrcnn_jax.data import transforms
from maskrcnn_jax.ops import inputs

H, W = 40, 60
BRIGHT, DARK = 200, 50
# Instance A: an asymmetric 8 x 8 pattern at rows 5..12, columns 10..17 (bbox [10, 5, 8, 8]).
PATTERN = np.array([
    [1, 1, 1, 0, 0, 0, 0, 1],
    [1, 1, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0],
    [0, 1, 1, 1, 1, 1, 0, 0],
    [0, 0, 1, 1, 1, 1, 1, 0],
    [0, 0, 0, 1, 1, 1, 1, 1],
    [1, 0, 0, 0, 1, 1, 1, 1]], bool)
PIXEL = dict(mmdet=config_lib.PYTORCH_RGB, detectron2=config_lib.CAFFE_BGR,
             torchvision=config_lib.TORCHVISION_RGB01)


def _rle(mask):
  r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
  r["counts"] = r["counts"].decode("ascii")
  return r


@pytest.fixture(scope="module")
def dataset_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipe")
  a = np.zeros((H, W), bool)
  a[5:13, 10:18] = PATTERN
  crowd = np.zeros((H, W), bool)
  crowd[28:36, 40:58] = True
  image = np.full((H, W, 3), DARK, np.uint8)
  image[a] = BRIGHT
  image[20:30, 30:45] = 120  # instance B, a polygon box
  cv2.imwrite(str(root / "a.png"), image)
  anns = [
      dict(id=1, image_id=7, category_id=2, iscrowd=0, bbox=[10, 5, 8, 8], area=int(a.sum()),
           segmentation=_rle(a)),
      dict(id=2, image_id=7, category_id=1, iscrowd=1, bbox=[40, 28, 18, 8], area=144,
           segmentation=_rle(crowd)),
      dict(id=3, image_id=7, category_id=1, iscrowd=0, bbox=[30, 20, 15, 10], area=150,
           segmentation=[[30, 20, 45, 20, 45, 30, 30, 30]]),
  ]
  data = dict(images=[dict(id=7, file_name="a.png", height=H, width=W)], annotations=anns,
              categories=[dict(id=1, name="one"), dict(id=2, name="two")])
  (root / "ann.json").write_text(json.dumps(data))
  return str(root / "ann.json"), str(root)


def _config(convention="mmdet", short=(H,), mode="choice", max_size=1000, buckets=((96, 128),),
            flip_prob=0.5, mask_size=8):
  c = config_lib.mask_rcnn(convention=convention, pixel=PIXEL[convention])
  c.data.train_short = short
  c.data.train_short_mode = mode
  c.data.train_max_size = max_size
  c.data.train_buckets = buckets
  c.data.max_instances = 4
  c.data.gt_mask_size = mask_size
  c.data.flip_prob = flip_prob
  c.data.test_short = 2 * H
  c.data.test_max_size = 1000
  return c


def test_crop_mask_hand_made():
  mask = np.zeros((H, W), bool)
  mask[5:13, 10:18] = PATTERN
  box = (10.0, 5.0, 18.0, 13.0)
  np.testing.assert_array_equal(masks.crop_from_bitmap(mask, box, 8), PATTERN)
  np.testing.assert_array_equal(masks.crop_from_bitmap(mask, box, 16),
                                np.kron(PATTERN, np.ones((2, 2))))
  blocks = PATTERN.reshape(4, 2, 4, 2).mean((1, 3)) >= 0.5
  np.testing.assert_array_equal(masks.crop_from_bitmap(mask, box, 4), blocks)
  # A box larger than the instance: zeros around it; the half-pixel-shifted box of a 16-px crop.
  out = masks.crop_from_bitmap(mask, (8.0, 3.0, 20.0, 15.0), 12)
  np.testing.assert_array_equal(out[2:10, 2:10], PATTERN)
  assert out.sum() == PATTERN.sum() and out.dtype == np.uint8


@pytest.mark.parametrize("convention", ["mmdet", "detectron2", "torchvision"])
def test_train_example_shapes(dataset_files, convention):
  ds = coco.CocoDataset(*dataset_files, convention=convention)
  ex = pipeline.train_example(ds, 7, _config(convention), rng=pipeline.example_rng(0, 0, 0))
  # uint8 where normalization commutes with the resize; torchvision normalizes before resizing.
  image_dtype = np.float32 if convention == "torchvision" else np.uint8
  want = dict(image=((H, W, 3), image_dtype), image_hw=((2,), np.int32),
              gt_boxes=((4, 4), np.float32), gt_labels=((4,), np.int32), gt_valid=((4,), bool),
              gt_crowd=((4,), bool), gt_masks_bits=((4, 8, 1), np.uint8))
  for k, (shape, dtype) in want.items():
    assert ex[k].shape == shape and ex[k].dtype == dtype, k
  assert ex["image_hw"].tolist() == [H, W]
  assert ex["gt_valid"].tolist() == [True, True, True, False]
  assert ex["gt_crowd"].tolist() == [False, False, True, False]  # non-crowd first
  assert ex["gt_labels"][:3].tolist() == [1, 0, 0]
  assert int(ex["image_id"]) == 7
  assert np.all(ex["gt_boxes"][3] == 0) and np.all(ex["gt_masks_bits"][3] == 0)
  # The batch pads the image to its bucket.
  bucket = pipeline.image_bucket(_config(convention), ds.convention, (H, W))
  assert bucket == (96, 128)
  batch = pipeline.batch_examples([ex, ex], pad_to=bucket)
  assert batch["image"].shape == (2, 96, 128, 3) and batch["image"].dtype == image_dtype
  assert np.all(batch["image"][:, H:] == 0) and np.all(batch["image"][:, :, W:] == 0)


@pytest.mark.parametrize("convention", ["mmdet", "detectron2", "torchvision"])
@pytest.mark.parametrize("scale", [1, 2])
def test_flip_consistency(dataset_files, convention, scale):
  ds = coco.CocoDataset(*dataset_files, convention=convention)
  s = 8 * scale
  plain = pipeline.train_example(ds, 7, _config(convention, short=(H * scale,), flip_prob=0.0,
                                                mask_size=s), rng=pipeline.example_rng(0, 0, 0))
  flip = pipeline.train_example(ds, 7, _config(convention, short=(H * scale,), flip_prob=1.0,
                                               mask_size=s), rng=pipeline.example_rng(0, 0, 0))
  assert not plain["flipped"] and flip["flipped"]
  h, w = plain["image_hw"]
  assert (h, w) == (H * scale, W * scale) == plain["image"].shape[:2]
  np.testing.assert_array_equal(flip["image"], plain["image"][:, ::-1])
  b = plain["gt_boxes"][:3]
  np.testing.assert_array_equal(b[0], np.array([10, 5, 18, 13], np.float32) * scale)
  np.testing.assert_allclose(flip["gt_boxes"][:3], np.stack(
      [w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1))
  plain_masks = pipeline.unpack_masks(plain["gt_masks_bits"])
  np.testing.assert_array_equal(pipeline.unpack_masks(flip["gt_masks_bits"]),
                                plain_masks[:, :, ::-1])
  np.testing.assert_array_equal(plain_masks[0], np.kron(PATTERN, np.ones((scale, scale))))
  # Boxes, masks and pixels agree: pasting the crop at its box reproduces the bright pixels of
  # the (flipped, resized) image there. Bilinear 1x / 2x upsampling thresholded at the middle is
  # nearest-neighbour, so this is exact.
  cfg = _config(convention)
  c = 0
  mean, std = cfg.model.pixel_mean[c], cfg.model.pixel_std[c]
  scale_in = cfg.model.input_scale
  for ex in (plain, flip):
    x1, y1, x2, y2 = ex["gt_boxes"][0].astype(int)
    raw = ex["image"][y1:y2, x1:x2, c]
    if raw.dtype != np.uint8:  # torchvision: normalized on the host
      raw = (raw * std + mean) / scale_in
    np.testing.assert_array_equal(raw > (BRIGHT + DARK) / 2,
                                  pipeline.unpack_masks(ex["gt_masks_bits"])[0].astype(bool))


@pytest.mark.parametrize("convention", ["mmdet", "detectron2", "torchvision"])
@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_image_written_into_the_batch_row(dataset_files, convention, flip_prob):
  """train_example(image_out=row) (what the loader does: resize, flip in place) gives the image of
  train_example() in the row's corner and leaves the rest of the row zero."""
  ds = coco.CocoDataset(*dataset_files, convention=convention)
  cfg = _config(convention, short=(2 * H,), flip_prob=flip_prob)
  want = pipeline.train_example(ds, 7, cfg, rng=pipeline.example_rng(0, 0, 0))
  row = np.zeros((96, 128, 3), want["image"].dtype)
  got = pipeline.train_example(ds, 7, cfg, rng=pipeline.example_rng(0, 0, 0), image_out=row)
  assert np.shares_memory(got["image"], row)
  np.testing.assert_array_equal(row[:2 * H, :2 * W], want["image"])
  assert not row[2 * H:].any() and not row[:, 2 * W:].any()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_multiscale_sizes(dataset_files):
  ds = coco.CocoDataset(*dataset_files, convention="mmdet")
  cfg = _config(short=(30, 50), mode="range", buckets=((64, 96),))
  shorts = {int(pipeline.train_example(ds, 7, cfg, rng=pipeline.example_rng(1, 0, i))
                ["image_hw"][0]) for i in range(30)}
  assert min(shorts) >= 30 and max(shorts) <= 50 and len(shorts) > 8
  rng = np.random.default_rng(0)
  draws = {pipeline.sample_short_side(rng, (30, 50), "range") for _ in range(500)}
  assert draws == set(range(30, 51))
  draws = {pipeline.sample_short_side(rng, (32, 40, 48), "choice") for _ in range(100)}
  assert draws == {32, 40, 48}
  # max_size caps the long side: short 50 of 40x60 would be 50x75 > 64 -> 43x64 (mmdet rounding).
  capped = pipeline.train_example(ds, 7, _config(short=(50,), max_size=64, buckets=((64, 64),)),
                                  rng=pipeline.example_rng(0, 0, 0))
  assert capped["image_hw"].tolist() == [43, 64]
  with pytest.raises(ValueError, match="range"):
    pipeline.sample_short_side(rng, (30, 40, 50), "range")


def test_buckets():
  assert pipeline.choose_bucket((40, 60), ((64, 64), (48, 64), (96, 128))) == (48, 64)
  assert pipeline.choose_bucket((100, 60), ((64, 64),), fallback=(128, 128)) == (128, 128)
  cfg = _config(short=(640, 800), max_size=1333)
  assert pipeline.max_train_size(cfg) == (1344, 1344)
  # The default: a landscape and a portrait bucket (the references' aspect-ratio groups).
  cfg.data.train_buckets = ()
  assert pipeline.train_buckets(cfg) == ((800, 1344), (1344, 800))
  mm = conventions.MMDET
  assert pipeline.image_bucket(cfg, mm, (480, 640)) == (800, 1344)  # -> 800 x 1067 at most
  assert pipeline.image_bucket(cfg, mm, (640, 427)) == (1344, 800)
  assert pipeline.image_bucket(cfg, mm, (500, 500)) == (1344, 800)  # square: with the portraits
  assert pipeline.image_bucket(cfg, mm, (300, 1000)) == (800, 1344)  # capped long side: 400 x 1333
  # Explicit buckets: the smallest that holds the image at its largest short side, else the square.
  cfg.data.train_buckets = ((800, 1088), (800, 1344), (1344, 800))
  assert pipeline.image_bucket(cfg, mm, (480, 640)) == (800, 1088)
  assert pipeline.image_bucket(cfg, mm, (427, 640)) == (800, 1344)  # 800 x 1199
  cfg.data.train_buckets = ((800, 1344),)
  assert pipeline.image_bucket(cfg, mm, (640, 480)) == (1344, 1344)
  # One bucket when both sides round to the same size (square training images, e.g. quickstart).
  small = _config(short=(128,), max_size=128, buckets=())
  assert pipeline.train_buckets(small) == ((128, 128),)


def test_determinism(dataset_files):
  ds = coco.CocoDataset(*dataset_files, convention="mmdet")
  cfg = _config(short=(30, 50), mode="range", buckets=((64, 96),))
  a = pipeline.train_example(ds, 7, cfg, rng=pipeline.example_rng(5, 2, 3))
  b = pipeline.train_example(ds, 7, cfg, rng=pipeline.example_rng(5, 2, 3))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  outs = {(int(e["image_hw"][0]), bool(e["flipped"])) for e in (
      pipeline.train_example(ds, 7, cfg, rng=pipeline.example_rng(5, epoch, 3))
      for epoch in range(8))}
  assert len(outs) > 1


def test_evaluation_images_are_preprocess(dataset_files):
  """Evaluation's input path (evaluator.plan_batches + host.load_image with
  transforms.preprocess_kwargs): `transforms.preprocess` with the test sizes, padded to the batch's
  size (a multiple of size_divisibility)."""
  from maskrcnn_jax.evaluation import evaluator, host  # pylint: disable=g-import-not-at-top
  ds = coco.CocoDataset(*dataset_files, convention="detectron2")
  cfg = _config("detectron2")
  resized = transforms.test_resize_size(H, W, rule="detectron2", short=2 * H, max_size=1000)
  image = evaluator.EvalImage(7, ds.image_path(7), (H, W), resized)
  (batch,) = evaluator.plan_batches([image], 1, cfg.data.size_divisibility)
  assert batch.padded_hw == (96, 128)  # padded to a multiple of 32
  kwargs = transforms.preprocess_kwargs(cfg)
  ex = host.load_image(image.path, kwargs, batch.padded_hw, expected_hw=(H, W))
  want = transforms.preprocess(ds.read_image(7), convention="detectron2",
                               pixel_mean=cfg.model.pixel_mean, pixel_std=cfg.model.pixel_std,
                               to_rgb=cfg.model.to_rgb, short=2 * H, max_size=1000)
  np.testing.assert_array_equal(ex["image"], want["image"])
  assert tuple(ex["image_hw"]) == (2 * H, 2 * W) and tuple(ex["orig_hw"]) == (H, W)
  np.testing.assert_array_equal(ex["scale_factor"], want["scale_factor"])
  assert ex["image"].shape == (96, 128, 3)
  assert host.load_image(image.path, kwargs, (128, 128))["image"].shape == (128, 128, 3)


@pytest.mark.parametrize("convention,pixel", [("mmdet", config_lib.PYTORCH_RGB),
                                              ("mmdet", config_lib.CAFFE_BGR),
                                              ("detectron2", config_lib.D2_FAIR_BGR),
                                              ("detectron2", config_lib.PYTORCH_RGB)])
@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_uint8_images_normalized_in_the_step_equal_the_host_normalization(dataset_files, convention,
                                                                          pixel, flip_prob):
  """The train step's lookup normalization of the uint8 batch (ops/inputs.py) is bit-identical to
  `transforms.preprocess` (the inference path) of the same image, zero padding included."""
  ds = coco.CocoDataset(*dataset_files, convention=convention)
  cfg = _config(convention, short=(2 * H,), flip_prob=flip_prob, buckets=((96, 128),))
  cfg.model.update(pixel)
  ex = pipeline.train_example(ds, 7, cfg, rng=pipeline.example_rng(0, 0, 0))
  assert ex["image"].dtype == np.uint8
  batch = pipeline.batch_examples([ex], pad_to=(96, 128))
  table, source = pipeline.device_normalization(cfg)
  got = jax.jit(lambda b: inputs.model_inputs(b, table=table, source=tuple(source)))(batch)
  want = transforms.preprocess(ds.read_image(7), convention=convention, **pixel, short=2 * H,
                               max_size=1000, pad_to=(96, 128))["image"]
  if flip_prob:
    want[:2 * H, :2 * W] = want[:2 * H, :2 * W][:, ::-1]
  image = np.asarray(got["image"][0])
  assert image.dtype == np.float32 and image.shape == want.shape
  np.testing.assert_array_equal(image.view(np.uint32), want.view(np.uint32))
  np.testing.assert_array_equal(np.asarray(got["gt_masks"]),
                                pipeline.unpack_masks(batch["gt_masks_bits"]))
  assert "gt_masks_bits" not in got


def test_batch_examples_pads_images():
  a = dict(image=np.ones((32, 64, 3), np.float32), image_id=np.array(1))
  b = dict(image=np.ones((64, 32, 3), np.float32), image_id=np.array(2))
  batch = pipeline.batch_examples([a, b])
  assert batch["image"].shape == (2, 64, 64, 3) and batch["image_id"].tolist() == [1, 2]
  assert batch["image"][0, 32:].sum() == 0 and batch["image"][1, :, 32:].sum() == 0
  assert pipeline.batch_examples([a, b], pad_to=(96, 64))["image"].shape == (2, 96, 64, 3)
  with pytest.raises(ValueError, match="does not fit"):
    pipeline.batch_examples([a, b], pad_to=(64, 32))
