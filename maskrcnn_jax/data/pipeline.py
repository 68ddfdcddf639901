"""Host transforms: one dataset image -> a fixed-shape numpy example, for training and evaluation.

Training (`train_example`), per the recipe's convention:
  decode (`CocoDataset.read_image`, the convention's decoder) -> pick the short side (single scale,
  'choice' from a list, or a uniform integer 'range') -> resize + normalize + pad with
  `transforms.preprocess` (the convention's exact test-time kernels and order, parity_spec 3.2-3.3,
  which are also what the references train with) -> horizontal flip with probability `flip_prob`
  -> instances clipped, scaled, flipped, padded to `max_instances`.

  The random draws come from `example_rng(seed, epoch, index)` in a fixed order (short side, then
  flip), so an example is a pure function of (image, seed, epoch, index).

  The flip is applied to the normalized, resized image (mmdet flips after `Resize`, before
  `Normalize`; detectron2 after `ResizeShortestEdge`; normalization is per pixel, so this is the
  same array). torchvision's reference flips before the model's resize; resize kernels are mirror
  symmetric up to float rounding, so the difference is at the ulp level.

  Boxes: clipped to the original image (all three references clip: mmdet `Resize`
  `bbox_clip_border`, detectron2 `transform_instance_annotations`, torchvision
  `ConvertCocoPolysToMask`), multiplied by the per-axis float32 `scale_factor` (mmdet `Resize`), and
  flipped as x -> w - x (w = resized unpadded width; mmdet `RandomFlip.bbox_flip`, detectron2
  `HFlipTransform`, torchvision `RandomHorizontalFlip`).

  Mask targets: **not** full-image bitmaps. Each instance's full-resolution (original-image) bitmap
  is cropped to its clipped gt box and resampled to `gt_mask_size` x `gt_mask_size` (`crop_mask`).
  The training step computes the 28 x 28 mask targets by RoIAlign of this crop, mapping a proposal
  box p (resized pixels) into crop coordinates u = (p - g_x1) * S / (g_x2 - g_x1) (same for y). This
  bounds the memory per instance (S^2 bytes instead of H * W) and is a deliberate difference from
  mmdet, which RoIAligns the full (nearest-rescaled) bitmap (parity_spec 4.1): a proposal that
  extends past its gt box samples zeros outside the crop, which is what the full bitmap holds there
  for the matched instance, so the difference is only the resampling of the bitmap to S x S
  (exact up to the pixel grid when the box is at most S pixels wide in the original image). Its
  effect on the targets is to be quantified by the training issue.

Evaluation (`eval_example`): `transforms.preprocess` with the test sizes, plus the image id,
original size and scale factor.

Config fields read from `config.data` (defaults in `DATA_DEFAULTS` when absent):
  train_short (tuple of ints), train_short_mode ('choice' | 'range'), train_max_size,
  train_buckets (tuple of (H, W); empty = one square bucket of the largest possible size),
  test_short, test_max_size, test_buckets, size_divisibility, max_instances, gt_mask_size,
  flip_prob, train_filter_empty, num_workers.
and from `config.model`: pixel_mean, pixel_std, to_rgb, input_scale; `config.convention`.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from maskrcnn_jax.data import coco as coco_lib
from maskrcnn_jax.data import transforms

logger = logging.getLogger(__name__)

DATA_DEFAULTS = dict(
    train_short=(800,),
    train_short_mode="choice",
    train_max_size=1333,
    train_buckets=(),
    test_short=800,
    test_max_size=1333,
    test_buckets=(),
    size_divisibility=32,
    max_instances=100,
    gt_mask_size=112,
    flip_prob=0.5,
    train_filter_empty=True,
    num_workers=2,
)


def data_option(config, name: str):
  """config.data.<name>, or `DATA_DEFAULTS[name]` when the config does not have it."""
  data = getattr(config, "data", None)
  if data is not None and name in data:
    return data[name]
  return DATA_DEFAULTS[name]


def _pixel_kwargs(config) -> Dict[str, Any]:
  m = config.model
  return dict(pixel_mean=tuple(m.pixel_mean), pixel_std=tuple(m.pixel_std), to_rgb=bool(m.to_rgb),
              input_scale=float(m.input_scale))


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The numpy generator of one training example: a pure function of (seed, epoch, index)."""
  return np.random.default_rng((int(seed), int(epoch), int(index)))


# -------------------------------------------------------------------------------------------------
# sizes and buckets
# -------------------------------------------------------------------------------------------------

def sample_short_side(rng: np.random.Generator, shorts: Sequence[int], mode: str) -> int:
  """The training short side.

  Args:
    rng: the example's generator (one draw).
    shorts: 'choice': the candidates (detectron2 `ResizeShortestEdge(sample_style='choice')`,
      torchvision `GeneralizedRCNNTransform.torch_choice`); 'range': (low, high), an integer drawn
      uniformly from [low, high] inclusive (mmdet `Resize(multiscale_mode='range')`:
      `np.random.randint(min, max + 1)`; detectron2 sample_style='range' likewise).
    mode: 'choice' | 'range'.

  Returns:
    int short side. A single candidate draws nothing.
  """
  shorts = [int(s) for s in np.atleast_1d(np.asarray(shorts))]
  if not shorts:
    raise ValueError("train_short is empty")
  if mode == "choice":
    return shorts[0] if len(shorts) == 1 else shorts[int(rng.integers(len(shorts)))]
  if mode == "range":
    if len(shorts) != 2 or shorts[0] > shorts[1]:
      raise ValueError(f"train_short_mode 'range' needs (low, high), got {tuple(shorts)}")
    return int(rng.integers(shorts[0], shorts[1] + 1))
  raise ValueError(f"train_short_mode must be 'choice' or 'range', got {mode!r}")


def _round_up(x: int, div: int) -> int:
  div = max(int(div), 1)
  return int(math.ceil(x / div) * div)


def max_train_size(config) -> Tuple[int, int]:
  """The square bucket that holds every possible training image: both sides <= the larger of
  train_max_size and the largest short side, rounded up to size_divisibility."""
  side = max(int(data_option(config, "train_max_size")),
             max(int(s) for s in np.atleast_1d(data_option(config, "train_short"))))
  side = _round_up(side, data_option(config, "size_divisibility"))
  return side, side


def choose_bucket(hw: Sequence[int], buckets: Sequence[Sequence[int]],
                  fallback: Optional[Sequence[int]] = None) -> Optional[Tuple[int, int]]:
  """The smallest-area bucket (H, W) with H >= hw[0] and W >= hw[1]; `fallback` if none fits."""
  fits = [(int(b[0]) * int(b[1]), int(b[0]), int(b[1])) for b in buckets
          if int(b[0]) >= hw[0] and int(b[1]) >= hw[1]]
  if fits:
    _, h, w = min(fits)
    return h, w
  return None if fallback is None else (int(fallback[0]), int(fallback[1]))


# -------------------------------------------------------------------------------------------------
# masks
# -------------------------------------------------------------------------------------------------

def crop_mask(mask: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
  """Crops a bitmap to a box and resamples it to size x size.

  Cell (i, j) of the output covers [x1 + j bw / S, x1 + (j + 1) bw / S) x (same for y) of the box,
  bw = x2 - x1. It is 1 iff at least half of its G_y x G_x sample points, spread evenly over the
  cell at (k + 0.5) / G, fall on mask pixels; pixel c covers [c, c + 1) (sample x -> column
  floor(x), clamped to the image). G = ceil(box side / S) per axis (at least 1), so a box of at most
  S pixels is sampled once per cell at its centre (the nearest pixel; exact up to the pixel grid)
  and a larger one is area-averaged.

  Args:
    mask: [H, W] bool (or 0/1) bitmap, original-image pixels.
    box: (x1, y1, x2, y2) float, same pixels.
    size: S.

  Returns:
    [S, S] uint8 in {0, 1}. A box of zero width or height samples one column / row.
  """
  mask = np.asarray(mask)
  h, w = mask.shape
  x1, y1, x2, y2 = (float(v) for v in box)
  bw, bh = max(x2 - x1, 0.0), max(y2 - y1, 0.0)
  gx = max(1, int(math.ceil(bw / size)))
  gy = max(1, int(math.ceil(bh / size)))
  xs = x1 + (np.arange(size * gx, dtype=np.float64) + 0.5) * (bw / (size * gx))
  ys = y1 + (np.arange(size * gy, dtype=np.float64) + 0.5) * (bh / (size * gy))
  ix = np.clip(np.floor(xs).astype(np.int64), 0, w - 1)
  iy = np.clip(np.floor(ys).astype(np.int64), 0, h - 1)
  samples = mask[iy[:, None], ix[None, :]].astype(np.float32)
  if gx == 1 and gy == 1:
    return (samples >= 0.5).astype(np.uint8)
  frac = samples.reshape(size, gy, size, gx).mean(axis=(1, 3))
  return (frac >= 0.5).astype(np.uint8)


# -------------------------------------------------------------------------------------------------
# examples
# -------------------------------------------------------------------------------------------------

def _instances(dataset: coco_lib.CocoDataset, image_id: int, orig_hw: Tuple[int, int],
               max_instances: int):
  """Kept annotations ordered non-crowd first (stable), truncated to max_instances."""
  ann = dataset.annotations(image_id)
  order = np.argsort(ann["crowd"], kind="stable")
  truncated = max(len(order) - max_instances, 0)
  order = order[:max_instances]
  masks = dataset.instance_masks(image_id, orig_hw)[order] if len(order) else \
      np.zeros((0,) + tuple(orig_hw), bool)
  return ann["boxes"][order], ann["labels"][order], ann["crowd"][order], masks, truncated


def train_example(dataset: coco_lib.CocoDataset, image_id: int, config, *,
                  rng: np.random.Generator) -> Dict[str, np.ndarray]:
  """One training example (module docstring).

  Args:
    dataset: the dataset; its convention selects decoder, resize kernel and normalization order.
    image_id: the image.
    config: the recipe config (`config.data`, `config.model` pixel fields).
    rng: the example's generator (`example_rng(seed, epoch, index)`).

  Returns:
    dict of numpy arrays, with M = max_instances, S = gt_mask_size, (Hb, Wb) the bucket:
      image: [Hb, Wb, 3] float32, normalized, zero padded at bottom/right;
      image_hw: [2] int32, resized unpadded (h, w);
      gt_boxes: [M, 4] float32, (x1, y1, x2, y2) in resized-image pixels (0 where not valid);
      gt_labels: [M] int32, contiguous labels (0 where not valid);
      gt_valid: [M] bool, a real instance (crowd ones included);
      gt_crowd: [M] bool, iscrowd (to be ignored by the matcher, as all three references do);
      gt_masks: [M, S, S] uint8 in {0, 1}: the instance bitmap cropped to its gt box (`crop_mask`),
        flipped with the image;
      image_id: [] int64; flipped: [] bool;
      truncated: [] int32, instances dropped beyond max_instances.

  Raises:
    transforms.ImageReadError / coco.DatasetError: an unreadable image or bad annotation (the
      loader skips and counts these).
  """
  image = dataset.read_image(image_id)
  orig_h, orig_w = image.shape[:2]
  conv = dataset.convention
  short = sample_short_side(rng, data_option(config, "train_short"),
                            data_option(config, "train_short_mode"))
  flip = bool(rng.random() < float(data_option(config, "flip_prob")))
  max_size = int(data_option(config, "train_max_size"))
  div = int(data_option(config, "size_divisibility"))
  new_h, new_w = transforms.test_resize_size(orig_h, orig_w, rule=conv.resize, short=short,
                                             max_size=max_size)
  buckets = data_option(config, "train_buckets")
  bucket = choose_bucket((new_h, new_w), buckets or (), fallback=max_train_size(config))
  pre = transforms.preprocess(image, convention=conv, **_pixel_kwargs(config), short=short,
                              max_size=max_size, size_divisibility=div, pad_to=bucket)
  out_image = pre["image"]
  if flip:
    out_image[:new_h, :new_w] = out_image[:new_h, :new_w, :][:, ::-1]

  m = int(data_option(config, "max_instances"))
  s = int(data_option(config, "gt_mask_size"))
  boxes, labels, crowd, masks, truncated = _instances(dataset, image_id, (orig_h, orig_w), m)
  if truncated:
    logger.warning("image id %s has %d instances more than max_instances=%d; dropped",
                   image_id, truncated, m)
  k = len(boxes)
  clipped = np.stack([np.clip(boxes[:, 0], 0, orig_w), np.clip(boxes[:, 1], 0, orig_h),
                      np.clip(boxes[:, 2], 0, orig_w), np.clip(boxes[:, 3], 0, orig_h)],
                     1).astype(np.float32) if k else np.zeros((0, 4), np.float32)
  crops = np.zeros((m, s, s), np.uint8)
  for i in range(k):
    crops[i] = crop_mask(masks[i], clipped[i], s)
  sf = pre["scale_factor"]  # float32 (new_w / W, new_h / H)
  scaled = clipped * np.concatenate([sf, sf]).astype(np.float32)
  scaled = np.minimum(scaled, np.array([new_w, new_h, new_w, new_h], np.float32))
  if flip:
    scaled = np.stack([np.float32(new_w) - scaled[:, 2], scaled[:, 1],
                       np.float32(new_w) - scaled[:, 0], scaled[:, 3]], 1)
    crops[:k] = crops[:k, :, ::-1]

  gt_boxes = np.zeros((m, 4), np.float32)
  gt_boxes[:k] = scaled
  gt_labels = np.zeros((m,), np.int32)
  gt_labels[:k] = labels
  gt_valid = np.zeros((m,), bool)
  gt_valid[:k] = True
  gt_crowd = np.zeros((m,), bool)
  gt_crowd[:k] = crowd
  return dict(
      image=out_image,
      image_hw=np.array([new_h, new_w], np.int32),
      gt_boxes=gt_boxes,
      gt_labels=gt_labels,
      gt_valid=gt_valid,
      gt_crowd=gt_crowd,
      gt_masks=crops,
      image_id=np.array(image_id, np.int64),
      flipped=np.array(flip),
      truncated=np.array(truncated, np.int32),
  )


def eval_example(dataset: coco_lib.CocoDataset, image_id: int, config, *,
                 pad_to: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
  """One evaluation example: `transforms.preprocess` at the test size, exactly.

  Args:
    dataset, image_id, config: as `train_example`.
    pad_to: optional (H, W) to pad to; default: the smallest of config.data.test_buckets that fits,
      else the resized size rounded up to size_divisibility.

  Returns:
    dict with image [Hp, Wp, 3] float32; image_hw [2] int32 (resized, unpadded); orig_hw [2] int32;
    scale_factor [2] float32 (new_w / W, new_h / H); image_id [] int64.
  """
  image = dataset.read_image(image_id)
  conv = dataset.convention
  short = int(data_option(config, "test_short"))
  max_size = int(data_option(config, "test_max_size"))
  if pad_to is None:
    buckets = data_option(config, "test_buckets")
    if buckets:
      new_hw = transforms.test_resize_size(*image.shape[:2], rule=conv.resize, short=short,
                                           max_size=max_size)
      pad_to = choose_bucket(new_hw, buckets)
  pre = transforms.preprocess(image, convention=conv, **_pixel_kwargs(config), short=short,
                              max_size=max_size,
                              size_divisibility=int(data_option(config, "size_divisibility")),
                              pad_to=pad_to)
  return dict(
      image=pre["image"],
      image_hw=np.array(pre["image_hw"], np.int32),
      orig_hw=np.array(pre["orig_hw"], np.int32),
      scale_factor=pre["scale_factor"],
      image_id=np.array(image_id, np.int64),
  )


def batch_examples(examples: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
  """Stacks examples into a batch.

  Args:
    examples: dicts with the same keys; 'image' may differ in (H, W) and is zero padded at the
      bottom/right to the largest (what the references' batch collation does:
      detectron2 `ImageList.from_tensors`, torchvision `batch_images`, mmcv `collate`); every other
      array must have the same shape across examples.

  Returns:
    dict of [B, ...] arrays.
  """
  if not examples:
    raise ValueError("batch_examples needs at least one example")
  out = {}
  for key in examples[0]:
    arrays = [np.asarray(e[key]) for e in examples]
    if key == "image":
      hmax = max(a.shape[0] for a in arrays)
      wmax = max(a.shape[1] for a in arrays)
      batch = np.zeros((len(arrays), hmax, wmax) + arrays[0].shape[2:], arrays[0].dtype)
      for i, a in enumerate(arrays):
        batch[i, :a.shape[0], :a.shape[1]] = a
      out[key] = batch
    else:
      out[key] = np.stack(arrays)
  return out
