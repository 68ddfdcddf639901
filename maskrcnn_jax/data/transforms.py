"""Host-side test-time image pipeline: decode, resize, normalize, pad (parity_spec 3.1-3.3).

Everything here is numpy (plus cv2 / Pillow, the reference frameworks' own image libraries) and runs
on the host before the jitted model. Each framework's pipeline is reproduced bit for bit:

* mmdet:       cv2 decode (BGR) -> `mmcv.imrescale` (cv2 INTER_LINEAR on uint8) ->
               `mmcv.imnormalize_` (cv2 subtract / multiply by 1/std) -> zero pad to a multiple
               of 32.
* detectron2:  PIL decode + EXIF transpose (BGR) -> `ResizeShortestEdge` (PIL BILINEAR on uint8) ->
               `(x - mean) / std` in float32 -> zero pad.
* torchvision: PIL `.convert('RGB')` -> `to_tensor` (x / 255) -> `(x - mean) / std` -> bilinear
               `F.interpolate` on the normalized float image -> zero pad.

The torch CPU bilinear kernel is reimplemented in numpy (`torch_upsample_bilinear`); it is bitwise
equal to torch 2.13 on x86-64 with FMA (checked against golden/resize.npz and
golden/mask_paste.npz).
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from PIL import Image

from maskrcnn_jax import conventions as conventions_lib
from maskrcnn_jax import errors
from maskrcnn_jax.ops.resample import torch_upsample_bilinear



class ImageReadError(errors.UserError, OSError):
  """An image file is missing, unreadable or cannot be decoded; the message names the file."""


def _convention(convention: Union[str, conventions_lib.Convention]) -> conventions_lib.Convention:
  if isinstance(convention, conventions_lib.Convention):
    return convention
  return conventions_lib.get(convention)


def decoder_is_rgb(convention: Union[str, conventions_lib.Convention]) -> bool:
  """True where `read_image` returns RGB (torchvision); False for BGR (mmdet, detectron2)."""
  return _convention(convention).channel_order == "rgb"


# ------------------------------------------------------------------------------------------------
# 3.1 decoding
# ------------------------------------------------------------------------------------------------

# detectron2/data/detection_utils.py:_apply_exif_orientation (EXIF tag 274).
_EXIF_ORIENTATION = 274
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
  try:
    exif = image.getexif()
  except Exception:  # pylint: disable=broad-except  (d2 swallows broken EXIF, issue #1885)
    return image
  method = _EXIF_TRANSPOSE.get(exif.get(_EXIF_ORIENTATION)) if exif is not None else None
  return image.transpose(method) if method is not None else image


def read_image(path: Union[str, os.PathLike], *,
               convention: Union[str, conventions_lib.Convention]) -> np.ndarray:
  """Decodes an image file the way the convention's reference pipeline does (parity_spec 3.1).

  * mmdet: `cv2.imdecode(bytes, IMREAD_COLOR)` (mmcv `imfrombytes(flag='color')`), BGR. OpenCV
    applies the EXIF orientation for this flag.
  * detectron2: PIL, EXIF transpose (`detection_utils._apply_exif_orientation`), `.convert('RGB')`,
    flipped to BGR (`detection_utils.read_image(format='BGR')`).
  * torchvision: PIL `.convert('RGB')`, no EXIF handling (`torchvision/datasets/coco.py`), RGB.

  Args:
    path: image file.
    convention: 'mmdet' | 'detectron2' | 'torchvision' (or a `Convention`; 'd2'/'tv' accepted).

  Returns:
    [H, W, 3] uint8, C-contiguous, BGR for mmdet/detectron2 and RGB for torchvision
    (`decoder_is_rgb`).

  Raises:
    ImageReadError: the file is missing, unreadable, or not a decodable image.
  """
  conv = _convention(convention)
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      if conv.decoder == "cv2":
        data = f.read()
      else:
        image = Image.open(f)
        if conv.decode_exif_transpose:
          image = _apply_exif_orientation(image)
        # .convert() forces the full decode while the file is open: truncated files raise here.
        out = np.asarray(image.convert("RGB"))
  except FileNotFoundError as e:
    raise ImageReadError(f"image file not found: {path}") from e
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    # PIL.UnidentifiedImageError and truncated-file errors are OSErrors.
    raise ImageReadError(f"cannot read or decode image {path}: {e}") from e
  if conv.decoder == "cv2":
    buf = np.frombuffer(data, np.uint8)
    try:
      out = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    except cv2.error as e:
      raise ImageReadError(f"cv2.imdecode failed on image {path}: {e}") from e
    if out is None:
      raise ImageReadError(f"cv2.imdecode could not decode image {path}")
  decoded_order = "bgr" if conv.decoder == "cv2" else "rgb"  # cv2 decodes BGR, PIL RGB
  if decoded_order != conv.channel_order:
    out = out[:, :, ::-1]
  if out.ndim != 3 or out.shape[2] != 3 or out.dtype != np.uint8 or 0 in out.shape:
    raise ImageReadError(f"decoded image {path} has unexpected shape {out.shape} / {out.dtype}")
  return np.ascontiguousarray(out)


# ------------------------------------------------------------------------------------------------
# 3.2 resize
# ------------------------------------------------------------------------------------------------

def test_resize_size(h: int, w: int, *, rule: str, short: int = 800,
                     max_size: int = 1333) -> Tuple[int, int]:
  """The resized (unpadded) size of an h x w image at test time (parity_spec 3.2).

  Args:
    h, w: input size in pixels.
    rule: 'mmdet' | 'detectron2' | 'torchvision' (`Convention.resize`; 'd2'/'tv' accepted).
    short: target short side. max_size: cap of the long side.

  Returns:
    (new_h, new_w) ints:
    * mmdet (`mmcv/image/geometric.py:rescale_size, _scale_size`): sf = min(long/max(h,w),
      short/min(h,w)) with long, short = max / min of (max_size, short); new = int(x * sf + 0.5).
    * detectron2 (`ResizeShortestEdge.get_output_shape`): short side to `short`, then both scaled by
      max_size / max if the long side exceeds it; int(x + 0.5).
    * torchvision (`transform.py:_resize_image_and_masks`, then
      `F.interpolate(recompute_scale_factor=True)`):
      s = min(short/min(h,w), max_size/max(h,w)) in float64; new = floor(x * s). The float64 scale
      matches golden/resize.npz for all 35 inputs (a float32 scale would be 1 px smaller on 14).
  """
  rule = conventions_lib.canonical_name(rule)
  h, w = int(h), int(w)
  if h <= 0 or w <= 0:
    raise ValueError(f"image size must be positive, got {(h, w)}")
  if rule == "mmdet":
    long_edge, short_edge = max(max_size, short), min(max_size, short)
    sf = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * float(sf) + 0.5), int(w * float(sf) + 0.5)
  if rule == "detectron2":
    size = short * 1.0
    scale = size / min(h, w)
    if h < w:
      newh, neww = size, scale * w
    else:
      newh, neww = scale * h, size
    if max(newh, neww) > max_size:
      scale = max_size * 1.0 / max(newh, neww)
      newh = newh * scale
      neww = neww * scale
    return int(newh + 0.5), int(neww + 0.5)
  if rule == "torchvision":
    s = min(float(short) / min(h, w), float(max_size) / max(h, w))
    return math.floor(float(h) * s), math.floor(float(w) * s)
  raise ValueError(f"unknown resize rule {rule!r}; expected 'mmdet', 'detectron2' or 'torchvision'")


test_resize_size.__test__ = False  # not a pytest test, even when imported into a test module


def resize_image(image: np.ndarray, out_hw: Sequence[int], *, rule: str,
                 torch_num_threads: int = 1) -> np.ndarray:
  """Resizes with the framework's own kernel (parity_spec 3.2).

  Args:
    image: mmdet / detectron2: [H, W, 3] uint8 (decoder order, BGR); torchvision: [3, H, W] float32,
      the normalized image (torchvision resizes after normalizing).
    out_hw: (new_h, new_w), e.g. from `test_resize_size`.
    rule: 'mmdet' (cv2.resize INTER_LINEAR, `mmcv.imresize`), 'detectron2' (PIL BILINEAR,
      `ResizeTransform.apply_image`; antialiases when downscaling) or 'torchvision'
      (`torch_upsample_bilinear`).
    torch_num_threads: torchvision only: the torch thread count whose CPU kernel to reproduce (1 is
      what golden/resize.npz was made with; >1 selects torch's generic kernel, <= 1 ulp different).

  Returns:
    mmdet / detectron2: [new_h, new_w, 3] uint8; torchvision: [3, new_h, new_w] float32.
  """
  rule = conventions_lib.canonical_name(rule)
  oh, ow = int(out_hw[0]), int(out_hw[1])
  if rule == "mmdet":
    return cv2.resize(np.ascontiguousarray(image), (ow, oh), interpolation=cv2.INTER_LINEAR)
  if rule == "detectron2":
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(
        (ow, oh), Image.Resampling.BILINEAR))
  if rule == "torchvision":
    return torch_upsample_bilinear(image, (oh, ow), num_threads=torch_num_threads)
  raise ValueError(f"unknown resize rule {rule!r}")


# ------------------------------------------------------------------------------------------------
# 3.3 normalize + pad
# ------------------------------------------------------------------------------------------------

def _to_unit(x: np.ndarray, input_scale: float) -> np.ndarray:
  """uint8 -> float32 times input_scale; 1/255 is done as `to_tensor` does it: x.float() / 255."""
  x = x.astype(np.float32)
  if input_scale == 1.0:
    return x
  inv = 1.0 / input_scale
  if abs(inv - round(inv)) < 1e-6 * inv:
    # torchvision/transforms/functional.py:to_tensor divides (`.div(255)`); x * float32(1/255)
    # differs from it on 126 of the 256 uint8 values.
    return x / np.float32(round(inv))
  return x * np.float32(input_scale)


def normalize_resized(resized: np.ndarray, *,
                      convention: Union[str, conventions_lib.Convention],
                      pixel_mean: Sequence[float], pixel_std: Sequence[float],
                      to_rgb: bool = False, input_scale: float = 1.0) -> np.ndarray:
  """Normalizes a resized uint8 image as mmdet / detectron2 do (parity_spec 3.3: resize first).

  Args:
    resized: [H, W, 3] uint8 in the decoder's channel order (BGR).
    convention, pixel_mean, pixel_std, to_rgb, input_scale: as `preprocess`.

  Returns:
    [H, W, 3] float32 in the network's channel order. Every output value is a function of one
    input value and its channel (`normalization_table`).
  """
  conv = _convention(convention)
  flip = bool(to_rgb) != decoder_is_rgb(conv)
  mean = np.asarray(pixel_mean, np.float64).reshape(1, -1)
  std = np.asarray(pixel_std, np.float64).reshape(1, -1)
  out = _to_unit(resized, input_scale)
  if conv.resize == "mmdet":
    # mmcv/image/photometric.py:imnormalize_: float32 copy, in-place cv2 BGR->RGB, cv2.subtract of
    # the float64 mean (applied as a float32 scalar), cv2.multiply by the float64 1/std (computed in
    # double, rounded to float32). Called through cv2 exactly as mmcv does.
    if flip:
      cv2.cvtColor(out, cv2.COLOR_BGR2RGB, out)
    cv2.subtract(out, mean, out)
    cv2.multiply(out, 1.0 / std, out)
    return out
  if conv.resize == "detectron2":
    # detectron2/modeling/meta_arch/rcnn.py:preprocess_image: (x - mean) / std, float32 tensors.
    if flip:
      out = out[:, :, ::-1]
    return (out - mean.astype(np.float32)) / std.astype(np.float32)
  raise ValueError(f"convention {conv.name!r} normalizes before resizing (parity_spec 3.3)")


def normalization_table(*, convention: Union[str, conventions_lib.Convention],
                        pixel_mean: Sequence[float], pixel_std: Sequence[float],
                        to_rgb: bool = False,
                        input_scale: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
  """`normalize_resized` as a lookup table, for normalizing uint8 images on the device.

  Normalization is per pixel and per channel, so for the conventions that resize the uint8 image
  first (mmdet, detectron2) it is a function of (channel, uint8 value): computing it for the 256
  values with the host code itself gives a table whose lookup is bit-identical to the host's
  float32 arithmetic on any backend (`ops.inputs.normalize_image`).

  Returns:
    table: [256, 3] float32, table[v, c] = output channel c of a pixel whose source channel is v.
    source: [3] int32, the input (decoder-order) channel that output channel c reads.

  Raises:
    ValueError: torchvision, which normalizes before resizing (parity_spec 3.3), so its resized
      values are not a function of uint8 inputs.
  """
  # A 16 x 16 image holding the 256 values in every channel (an image one pixel wide would not
  # do: cv2's in-place arithmetic takes another path for it).
  values = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
  table = normalize_resized(values, convention=convention, pixel_mean=pixel_mean,
                            pixel_std=pixel_std, to_rgb=to_rgb, input_scale=input_scale)
  flip = bool(to_rgb) != decoder_is_rgb(_convention(convention))
  source = np.array([2, 1, 0] if flip else [0, 1, 2], np.int32)
  return np.ascontiguousarray(table.reshape(256, 3), np.float32), source


def pixel_kwargs(config) -> Dict[str, Any]:
  """config.model's pixel statistics as `preprocess` / `normalize_resized` /
  `normalization_table` keyword arguments: pixel_mean, pixel_std (3-tuples of float), to_rgb
  (bool), input_scale (float); plain Python values, which pickle into worker processes."""
  m = config.model
  return dict(pixel_mean=tuple(float(v) for v in m.pixel_mean),
              pixel_std=tuple(float(v) for v in m.pixel_std), to_rgb=bool(m.to_rgb),
              input_scale=float(m.input_scale))


def preprocess_kwargs(config) -> Dict[str, Any]:
  """Every `preprocess` keyword argument of a config's test pipeline (predict, evaluate and
  training's evaluations): convention (str), `pixel_kwargs`, short / max_size
  (config.data.test_short / test_max_size) and size_divisibility (ints); plain Python values."""
  return dict(convention=str(config.convention), **pixel_kwargs(config),
              short=int(config.data.test_short), max_size=int(config.data.test_max_size),
              size_divisibility=int(config.data.size_divisibility))


def preprocess(image_uint8: np.ndarray, *, convention: Union[str, conventions_lib.Convention],
               pixel_mean: Sequence[float], pixel_std: Sequence[float], to_rgb: bool = False,
               input_scale: float = 1.0, short: int = 800, max_size: int = 1333,
               size_divisibility: int = 32, pad_to: Optional[Sequence[int]] = None,
               torch_num_threads: int = 1) -> Dict[str, Any]:
  """Test-time preprocessing of one decoded image: resize, normalize, pad (parity_spec 3.2-3.3).

  Args:
    image_uint8: [H, W, 3] uint8 in the convention's decoder channel order (`read_image`: BGR for
      mmdet/detectron2, RGB for torchvision).
    convention: 'mmdet' | 'detectron2' | 'torchvision' (or a `Convention`).
    pixel_mean, pixel_std: 3 floats in the network's channel order, in units of
      `uint8 * input_scale` (mmdet pytorch style (123.675, ...) RGB; torchvision (0.485, ...)).
    to_rgb: whether the network expects RGB. The channels are reversed iff this differs from the
      decoder order (mmdet pytorch style: BGR decoder, to_rgb=True -> reversed, as mmcv's
      `imnormalize_(to_rgb=True)`; torchvision: RGB decoder, to_rgb=True -> kept).
    input_scale: factor applied to the uint8 values before normalization: 1.0 (mmdet, d2) or 1/255
      (torchvision; computed as `x / 255` like `to_tensor`).
    short, max_size: test resize target (800, 1333).
    size_divisibility: pad bottom/right to a multiple of this (32; 0 or 1 = no padding).
    pad_to: optional static (H, W) bucket to pad to instead; must be >= the resized size and a
      multiple of size_divisibility.
    torch_num_threads: torchvision only, see `resize_image`.

  Returns:
    dict with
      image: [Hp, Wp, 3] float32 NHWC-without-batch, normalized, zero padded at bottom/right (the
        padding is applied after normalization, so padded pixels are 0).
      image_hw: (h, w) int, the resized unpadded size.
      orig_hw: (H, W) int, the input size.
      scale_factor: [2] float32 (new_w / W, new_h / H), per axis, as mmdet's `Resize` stores it
        (float64 division, cast to float32). Other frameworks derive their own ratios from
        image_hw / orig_hw.
  """
  conv = _convention(convention)
  image = np.asarray(image_uint8)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected an [H, W, 3] uint8 image, got {image.shape} {image.dtype}")
  if input_scale <= 0:
    raise ValueError(f"input_scale must be positive, got {input_scale}")
  orig_h, orig_w = image.shape[:2]
  new_h, new_w = test_resize_size(orig_h, orig_w, rule=conv.resize, short=short, max_size=max_size)
  flip = bool(to_rgb) != decoder_is_rgb(conv)
  mean = np.asarray(pixel_mean, np.float64).reshape(-1)
  std = np.asarray(pixel_std, np.float64).reshape(-1)
  if mean.shape != (3,) or std.shape != (3,):
    raise ValueError("pixel_mean and pixel_std must have 3 values")

  if conv.resize in ("mmdet", "detectron2"):
    out = normalize_resized(resize_image(image, (new_h, new_w), rule=conv.resize),
                            convention=conv, pixel_mean=pixel_mean, pixel_std=pixel_std,
                            to_rgb=to_rgb, input_scale=input_scale)
  elif conv.resize == "torchvision":
    # torchvision/models/detection/transform.py: normalize (float32) first, then resize.
    x = _to_unit(image, input_scale)
    if flip:
      x = x[:, :, ::-1]
    x = np.ascontiguousarray(x.transpose(2, 0, 1))
    x = (x - mean.astype(np.float32)[:, None, None]) / std.astype(np.float32)[:, None, None]
    out = resize_image(x, (new_h, new_w), rule="torchvision",
                       torch_num_threads=torch_num_threads).transpose(1, 2, 0)
  else:
    raise ValueError(f"unknown resize rule {conv.resize!r}")

  out = np.asarray(out, np.float32)
  div = max(int(size_divisibility), 1)
  pad_h = int(math.ceil(new_h / div) * div)
  pad_w = int(math.ceil(new_w / div) * div)
  if pad_to is not None:
    ph, pw = int(pad_to[0]), int(pad_to[1])
    if ph < new_h or pw < new_w:
      raise ValueError(f"resized image {new_h}x{new_w} (from {orig_h}x{orig_w}) does not fit the "
                       f"pad_to bucket {ph}x{pw}")
    if ph % div or pw % div:
      raise ValueError(f"pad_to {ph}x{pw} must be a multiple of size_divisibility {div}")
    pad_h, pad_w = ph, pw
  padded = np.zeros((pad_h, pad_w, 3), np.float32)
  padded[:new_h, :new_w] = out
  return dict(
      image=padded,
      image_hw=(new_h, new_w),
      orig_hw=(orig_h, orig_w),
      # mmdet/datasets/pipelines/transforms.py:Resize._resize_img: np.array([w_scale, h_scale, ...],
      # dtype=np.float32) with w_scale = new_w / w in Python floats.
      scale_factor=np.array([new_w / orig_w, new_h / orig_h], np.float32),
  )
