"""Host transforms: one dataset image -> a fixed-shape numpy example, for training and evaluation.

Training (`train_example`) runs one function per stage, for the recipe's convention:

  `sample_geometry`  the random draws, from `example_rng(seed, epoch, index)` in a fixed order
                     (short side: single scale, 'choice' from a list or a uniform integer 'range';
                     then the flip), and the resized size (the convention's test-time rule,
                     parity_spec 3.2, which is also what the references train with);
  `dataset.read_image`  decode (the convention's decoder, parity_spec 3.1);
  `resize_uint8`     the convention's uint8 resize kernel (mmdet cv2, detectron2 PIL);
  `flip_image`       horizontal flip with probability `flip_prob`;
  `instance_targets` boxes clipped, scaled and flipped; mask crops (`masks.crop_segmentation`,
                     bit-packed); everything padded to `max_instances`.

  An example is a pure function of (image, seed, epoch, index). Its image is not padded: the
  loader has it resized (and flipped in place) straight into its zeroed row of the batch array
  (`image_out`), whose shape is the bucket of the batch (`image_bucket`; the loader batches images
  of one bucket); `batch_examples` pads standalone examples the same way.

  The image leaves the host as **uint8** in the decoder's channel order: normalization is per pixel
  and per channel, so the jitted train step normalizes it by table lookup
  (`device_normalization` + `ops.inputs.normalize_image`), bit-identical to the host's float32
  `transforms.normalize_resized`, and the padding becomes 0 after normalizing as in the references.
  A uint8 image is a quarter of the float32 bytes. torchvision normalizes *before* resizing
  (parity_spec 3.3, `Convention.normalize_before_resize`): its resized values are not a function of
  uint8 pixels, so for that convention the host still emits the float32 normalized image
  (`transforms.preprocess`), exactly as before.

  The flip is applied to the resized image (mmdet flips after `Resize`, before `Normalize`;
  detectron2 after `ResizeShortestEdge`; normalization is per pixel, so this is the same array).
  torchvision's reference flips before the model's resize; resize kernels are mirror symmetric up to
  float rounding, so the difference is at the ulp level.

  Boxes: clipped to the original image (all three references clip: mmdet `Resize`
  `bbox_clip_border`, detectron2 `transform_instance_annotations`, torchvision
  `ConvertCocoPolysToMask`), multiplied by the per-axis float32 `scale_factor` (mmdet `Resize`), and
  flipped as x -> w - x (w = resized unpadded width; mmdet `RandomFlip.bbox_flip`, detectron2
  `HFlipTransform`, torchvision `RandomHorizontalFlip`).

  Mask targets: **not** full-image bitmaps. Each instance's full-resolution (original-image) bitmap
  is cropped to its clipped gt box and resampled to `gt_mask_size` x `gt_mask_size`
  (`masks.crop_from_bitmap` states the rule; `masks.crop_segmentation` computes it from the json
  segmentation inside the box only, bit-identical to cropping pycocotools' full-image bitmap).
  The training step computes the 28 x 28 mask targets by RoIAlign of this crop, mapping a proposal
  box p (resized pixels) into crop coordinates u = (p - g_x1) * S / (g_x2 - g_x1) (same for y). This
  bounds the memory per instance (S^2 bits instead of H * W bytes) and is a deliberate difference
  from mmdet, which RoIAligns the full (nearest-rescaled) bitmap (parity_spec 4.1): a proposal that
  extends past its gt box samples zeros outside the crop, which is what the full bitmap holds there
  for the matched instance, so the difference is only the resampling of the bitmap to S x S
  (exact up to the pixel grid when the box is at most S pixels wide in the original image;
  tests/training/test_targets.py bounds it against the references' targets).

  Buckets (`train_buckets`, `image_bucket`): every image is padded to a bucket chosen from its
  original size alone (at the largest short side it can draw), and the loader batches images of one
  bucket together (data/loader.py), so a recipe compiles one train step per bucket. The default is
  one landscape and one portrait bucket (the references' aspect-ratio grouping: detectron2
  `AspectRatioGroupedDataset`, mmdet `GroupSampler`), each the largest resized size of that
  orientation rounded up to `size_divisibility`: 800 x 1344 and 1344 x 800 for short 800 / max
  1333, where one square bucket would be 1344 x 1344.

Evaluation does not come through here: it reads its images with `evaluation.host.load_image`
(`transforms.preprocess` with `transforms.preprocess_kwargs`).

Config fields read from `config.data` (`config_lib.defaults()` when absent):
  train_short (tuple of ints), train_short_mode ('choice' | 'range'), train_max_size,
  train_buckets (tuple of (H, W); empty = the landscape / portrait pair), size_divisibility,
  max_instances, gt_mask_size, flip_prob, train_filter_empty, num_workers.
and from `config.model`: pixel_mean, pixel_std, to_rgb, input_scale; `config.convention`.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from maskrcnn_jax import config_lib
from maskrcnn_jax import conventions as conventions_lib
from maskrcnn_jax import errors
from maskrcnn_jax.data import coco as coco_lib
from maskrcnn_jax.data import masks as masks_lib
from maskrcnn_jax.data import transforms

logger = logging.getLogger(__name__)

def data_option(config, name: str):
  """config.data.<name>, or its default (`config_lib.defaults().data`) when the config lacks it."""
  data = getattr(config, "data", None)
  if data is not None and name in data:
    return data[name]
  return config_lib.defaults().data[name]


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The numpy generator of one training example: a pure function of (seed, epoch, index)."""
  return np.random.default_rng((int(seed), int(epoch), int(index)))


def device_normalization(config) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  """(table [256, 3] float32, source [3] int32) for `ops.inputs.model_inputs`, or None where the
  training images are float32 already (torchvision: normalize before resize)."""
  conv = conventions_lib.get(config.convention)
  if conv.normalize_before_resize:
    return None
  return transforms.normalization_table(convention=conv, **transforms.pixel_kwargs(config))


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
    raise errors.ConfigError("train_short is empty")
  if mode == "choice":
    return shorts[0] if len(shorts) == 1 else shorts[int(rng.integers(len(shorts)))]
  if mode == "range":
    if len(shorts) != 2 or shorts[0] > shorts[1]:
      raise errors.ConfigError(f"train_short_mode 'range' needs (low, high), got {tuple(shorts)}")
    return int(rng.integers(shorts[0], shorts[1] + 1))
  raise errors.ConfigError(f"train_short_mode must be 'choice' or 'range', got {mode!r}")


def _round_up(x: int, div: int) -> int:
  div = max(int(div), 1)
  return int(math.ceil(x / div) * div)


def _largest_short(config) -> int:
  return max(int(s) for s in np.atleast_1d(data_option(config, "train_short")))


def max_train_size(config) -> Tuple[int, int]:
  """The square bucket that holds every possible training image: both sides <= the larger of
  train_max_size and the largest short side, rounded up to size_divisibility."""
  side = max(int(data_option(config, "train_max_size")), _largest_short(config))
  side = _round_up(side, data_option(config, "size_divisibility"))
  return side, side


def train_buckets(config) -> Tuple[Tuple[int, int], ...]:
  """The training buckets (H, W): config.data.train_buckets, or by default the landscape /
  portrait pair (S, L) and (L, S): S = the largest short side, L = the largest long side
  (max(train_max_size, S): every resize rule keeps the short side <= S and the long side <= L),
  both rounded up to size_divisibility. One bucket when S == L."""
  given = data_option(config, "train_buckets")
  if given:
    return tuple((int(b[0]), int(b[1])) for b in given)
  div = data_option(config, "size_divisibility")
  short = _round_up(_largest_short(config), div)
  long = _round_up(max(int(data_option(config, "train_max_size")), _largest_short(config)), div)
  return ((short, long),) if short == long else ((short, long), (long, short))


def choose_bucket(hw: Sequence[int], buckets: Sequence[Sequence[int]],
                  fallback: Optional[Sequence[int]] = None) -> Optional[Tuple[int, int]]:
  """The smallest-area bucket (H, W) with H >= hw[0] and W >= hw[1], the taller one of equal
  areas (a square image goes with the portrait ones, as in detectron2's `AspectRatioGroupedDataset`
  (`w > h` is landscape) and mmdet's group flag (`w / h > 1`)); `fallback` if none fits."""
  fits = [(int(b[0]) * int(b[1]), -int(b[0]), int(b[1])) for b in buckets
          if int(b[0]) >= hw[0] and int(b[1]) >= hw[1]]
  if fits:
    _, h, w = min(fits)
    return -h, w
  return None if fallback is None else (int(fallback[0]), int(fallback[1]))


def image_bucket(config, convention: conventions_lib.Convention,
                 orig_hw: Sequence[int]) -> Tuple[int, int]:
  """The bucket (H, W) of an image of original size orig_hw: the smallest of `train_buckets` that
  holds its resized size at the largest short side (the resized size grows with the short side
  under every rule), else the square `max_train_size`."""
  hw = transforms.test_resize_size(int(orig_hw[0]), int(orig_hw[1]), rule=convention.resize,
                                   short=_largest_short(config),
                                   max_size=int(data_option(config, "train_max_size")))
  return choose_bucket(hw, train_buckets(config), fallback=max_train_size(config))


# -------------------------------------------------------------------------------------------------
# training stages
# -------------------------------------------------------------------------------------------------

def sample_geometry(rng: np.random.Generator, orig_hw: Sequence[int], config,
                    convention: conventions_lib.Convention) -> Tuple[int, bool, Tuple[int, int]]:
  """The example's random draws and resized size.

  Args:
    rng: the example's generator: the short side is drawn first, then the flip.
    orig_hw: (H, W) of the decoded image.
    config, convention: the recipe.

  Returns:
    (short side int, flip bool, (new_h, new_w) ints: the convention's resize rule).
  """
  short = sample_short_side(rng, data_option(config, "train_short"),
                            data_option(config, "train_short_mode"))
  flip = bool(rng.random() < float(data_option(config, "flip_prob")))
  new_hw = transforms.test_resize_size(int(orig_hw[0]), int(orig_hw[1]), rule=convention.resize,
                                       short=short,
                                       max_size=int(data_option(config, "train_max_size")))
  return short, flip, new_hw


def resize_uint8(image: np.ndarray, new_hw: Sequence[int], convention: conventions_lib.Convention,
                 out: Optional[np.ndarray] = None) -> np.ndarray:
  """[H, W, 3] uint8 -> [new_h, new_w, 3] uint8 with the convention's kernel (mmdet: cv2
  INTER_LINEAR, detectron2: PIL BILINEAR; `transforms.resize_image`), written into `out` (a
  [new_h, new_w, 3] view, e.g. of the batch array) when given."""
  if out is not None and convention.resize == "mmdet":
    return cv2.resize(image, (int(new_hw[1]), int(new_hw[0])), dst=out,
                      interpolation=cv2.INTER_LINEAR)
  resized = transforms.resize_image(image, new_hw, rule=convention.resize)
  return resized if out is None else _copy_into(resized, out)


def flip_image(image: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
  """[h, w, C] -> the same, mirrored left-right: a new array, or written into `out`."""
  if image.dtype == np.uint8:
    return cv2.flip(image, 1) if out is None else cv2.flip(image, 1, dst=out)
  return np.ascontiguousarray(image[:, ::-1]) if out is None else _copy_into(image[:, ::-1], out)


def _copy_into(image: np.ndarray, out: np.ndarray) -> np.ndarray:
  out[...] = image
  return out


def normalized_float_image(image: np.ndarray, short: int, config,
                           convention: conventions_lib.Convention) -> np.ndarray:
  """torchvision's order, normalize then resize the float image (parity_spec 3.3; exactly
  `transforms.preprocess`): [H, W, 3] uint8 -> [new_h, new_w, 3] float32."""
  pre = transforms.preprocess(image, convention=convention, **transforms.pixel_kwargs(config), short=short,
                              max_size=int(data_option(config, "train_max_size")),
                              size_divisibility=1)
  return pre["image"]


def instance_targets(dataset: coco_lib.CocoDataset, image_id: int, orig_hw: Sequence[int],
                     new_hw: Sequence[int], flip: bool, config) -> Dict[str, np.ndarray]:
  """Boxes, labels, flags and mask crops of one image's kept annotations, padded to M.

  Instances are ordered non-crowd first (stable) and truncated to M = max_instances (logged).

  Returns:
    dict, S = gt_mask_size:
      gt_boxes: [M, 4] float32, (x1, y1, x2, y2) in resized-image pixels (0 where not valid): the
        box clipped to the original image, times the float32 scale factor (new_w / W, new_h / H),
        capped at the resized size, flipped as x -> new_w - x;
      gt_labels: [M] int32, contiguous labels (0 where not valid);
      gt_valid: [M] bool, a real instance (crowd ones included);
      gt_crowd: [M] bool, iscrowd (ignored by the matcher, as all three references do);
      gt_masks_bits: [M, S, ceil(S / 8)] uint8, `np.packbits` (last axis) of the [M, S, S] {0, 1}
        crops of each instance's bitmap to its clipped box (`masks.crop_segmentation`), flipped
        with the image; zeros where not valid;
      truncated: [] int32, instances dropped beyond M.
  """
  m = int(data_option(config, "max_instances"))
  s = int(data_option(config, "gt_mask_size"))
  orig_h, orig_w = int(orig_hw[0]), int(orig_hw[1])
  new_h, new_w = int(new_hw[0]), int(new_hw[1])
  ann = dataset.annotations(image_id)
  order = np.argsort(ann["crowd"], kind="stable")
  truncated = max(len(order) - m, 0)
  if truncated:
    logger.warning("image id %s has %d instances more than max_instances=%d; dropped",
                   image_id, truncated, m)
  order = order[:m]
  k = len(order)
  boxes = ann["boxes"][order]
  clipped = np.stack([np.clip(boxes[:, 0], 0, orig_w), np.clip(boxes[:, 1], 0, orig_h),
                      np.clip(boxes[:, 2], 0, orig_w), np.clip(boxes[:, 3], 0, orig_h)],
                     1).astype(np.float32) if k else np.zeros((0, 4), np.float32)
  crops = np.zeros((k, s, s), np.uint8)
  for i, j in enumerate(order):
    crops[i] = masks_lib.crop_segmentation(ann["segmentations"][j], clipped[i], orig_hw, s)
  # mmdet/datasets/pipelines/transforms.py:Resize._resize_img: np.array([w_scale, h_scale, ...],
  # dtype=np.float32) with w_scale = new_w / w in Python floats.
  sf = np.array([new_w / orig_w, new_h / orig_h], np.float32)
  scaled = clipped * np.concatenate([sf, sf])
  scaled = np.minimum(scaled, np.array([new_w, new_h, new_w, new_h], np.float32))
  if flip:
    scaled = np.stack([np.float32(new_w) - scaled[:, 2], scaled[:, 1],
                       np.float32(new_w) - scaled[:, 0], scaled[:, 3]], 1)
    crops = crops[:, :, ::-1]
  out = dict(gt_boxes=np.zeros((m, 4), np.float32), gt_labels=np.zeros((m,), np.int32),
             gt_valid=np.zeros((m,), bool), gt_crowd=np.zeros((m,), bool),
             gt_masks_bits=np.zeros((m, s, (s + 7) // 8), np.uint8),
             truncated=np.array(truncated, np.int32))
  out["gt_boxes"][:k] = scaled
  out["gt_labels"][:k] = ann["labels"][order]
  out["gt_valid"][:k] = True
  out["gt_crowd"][:k] = ann["crowd"][order]
  out["gt_masks_bits"][:k] = np.packbits(crops, axis=-1)
  return out


def unpack_masks(bits: np.ndarray) -> np.ndarray:
  """[..., S, ceil(S / 8)] packed crops -> [..., S, S] uint8 {0, 1} (host twin of
  `ops.inputs.unpack_masks`)."""
  return np.unpackbits(bits, axis=-1, count=bits.shape[-2])


def train_example(dataset: coco_lib.CocoDataset, image_id: int, config, *,
                  rng: np.random.Generator,
                  image_out: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
  """One training example (module docstring).

  Args:
    dataset: the dataset; its convention selects decoder, resize kernel and normalization order.
    image_id: the image.
    config: the recipe config (`config.data`, `config.model` pixel fields).
    rng: the example's generator (`example_rng(seed, epoch, index)`).
    image_out: optional [Hb, Wb, 3] zeros (the image's row of the batch array, uint8, or float32
      for torchvision): the image is written into its top-left corner, saving a copy, and the
      returned 'image' is that view.

  Returns:
    dict of numpy arrays, with M = max_instances, S = gt_mask_size:
      image: [h, w, 3] resized, flipped, not padded: uint8 in the decoder's channel order (mmdet,
        detectron2: normalized on the device, `device_normalization`), or float32 normalized
        (torchvision);
      image_hw: [2] int32, (h, w);
      gt_boxes, gt_labels, gt_valid, gt_crowd, gt_masks_bits, truncated: `instance_targets`;
      image_id: [] int64; flipped: [] bool.

  Raises:
    transforms.ImageReadError / coco.DatasetError: an unreadable image or bad annotation (the
      loader skips and counts these).
  """
  conv = dataset.convention
  image = dataset.read_image(image_id)
  orig_hw = image.shape[:2]
  short, flip, new_hw = sample_geometry(rng, orig_hw, config, conv)
  out = None if image_out is None else image_out[:new_hw[0], :new_hw[1]]
  if conv.normalize_before_resize:
    resized = normalized_float_image(image, short, config, conv)
    if out is not None and not flip:
      resized = _copy_into(resized, out)
  else:
    resized = resize_uint8(image, new_hw, conv, out=out)
  # cv2.flip mirrors in place when resized is `out` (it swaps symmetric pairs).
  out_image = flip_image(resized, out=out) if flip else resized
  targets = instance_targets(dataset, image_id, orig_hw, new_hw, flip, config)
  return dict(image=out_image, image_hw=np.array(new_hw, np.int32),
              image_id=np.array(image_id, np.int64), flipped=np.array(flip), **targets)


def batch_examples(examples: List[Dict[str, np.ndarray]],
                   pad_to: Optional[Sequence[int]] = None,
                   zeros: Callable[..., np.ndarray] = np.zeros) -> Dict[str, np.ndarray]:
  """Stacks examples into a batch.

  Args:
    examples: dicts with the same keys; 'image' may differ in (H, W) and is zero padded at the
      bottom/right (what the references' batch collation does: detectron2
      `ImageList.from_tensors`, torchvision `batch_images`, mmcv `collate`); every other array must
      have the same shape across examples.
    pad_to: (H, W) of the batch's images (the bucket); default: the largest of the examples.
    zeros: (shape, dtype) -> a zero-filled array, for the batch arrays (e.g. in shared memory).

  Returns:
    dict of [B, ...] arrays; every example is copied once, into them.
  """
  if not examples:
    raise ValueError("batch_examples needs at least one example")
  out = {}
  for key in examples[0]:
    arrays = [np.asarray(e[key]) for e in examples]
    shape = arrays[0].shape
    if key == "image":
      shape = (max(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays)) + shape[2:]
      if pad_to is not None:
        if shape[0] > pad_to[0] or shape[1] > pad_to[1]:
          raise ValueError(f"an image of {shape[0]}x{shape[1]} does not fit the batch's bucket "
                           f"{pad_to[0]}x{pad_to[1]}")
        shape = (int(pad_to[0]), int(pad_to[1])) + shape[2:]
    elif any(a.shape != shape for a in arrays):
      raise ValueError(f"examples disagree on the shape of {key!r}: "
                       f"{sorted({a.shape for a in arrays})}")
    batch = zeros((len(arrays),) + shape, arrays[0].dtype)
    for i, a in enumerate(arrays):
      batch[(i,) + tuple(slice(0, n) for n in a.shape)] = a
    out[key] = batch
  return out
