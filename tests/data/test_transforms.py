"""Test-time decode / resize / normalize / pad (parity_spec 3.1-3.3).

Against golden resize.npz (README section 6) where it has data; formula checks elsewhere.
"""
from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest
from PIL import Image

from maskrcnn_jax.data import transforms
from maskrcnn_jax.ops import resample
from tests import golden

RULES = {"mm": "mmdet", "d2": "detectron2", "tv": "torchvision"}
TV_MEAN, TV_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MM_MEAN, MM_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
D2_MEAN, D2_STD = (103.53, 116.28, 123.675), (1.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def g():
  return golden.load("resize")


@pytest.mark.parametrize("prefix", sorted(RULES))
def test_resize_sizes_all_inputs(g, prefix):
  want = g[f"{prefix}_out_hw"]
  got = np.array([transforms.test_resize_size(h, w, rule=RULES[prefix]) for h, w in g["input_hw"]])
  bad = np.nonzero((got != want).any(1))[0]
  rows = [(tuple(g['input_hw'][i]), tuple(got[i]), tuple(want[i])) for i in bad]
  assert bad.size == 0, f"{prefix}: (input, got, want) {rows}"


def test_tv_floors_where_others_round(g):
  # README: torchvision is 1 px smaller on 14 of the 35 inputs.
  tv = np.array([transforms.test_resize_size(h, w, rule="torchvision") for h, w in g["input_hw"]])
  mm = np.array([transforms.test_resize_size(h, w, rule="mmdet") for h, w in g["input_hw"]])
  assert int((tv != mm).any(1).sum()) == 14


def test_mmdet_preprocess_sizes_and_scale_factor(g):
  for (h, w), want_hw, want_sf in zip(g["input_hw"], g["mm_out_hw"], g["mm_scale_factor_wh"]):
    if h * w > 2_000_000:  # the 3000x4500 / 4000x6000 inputs: the size rule is checked above
      continue
    out = transforms.preprocess(np.zeros((h, w, 3), np.uint8), convention="mmdet",
                                pixel_mean=MM_MEAN, pixel_std=MM_STD, to_rgb=True)
    assert out["image_hw"] == tuple(want_hw)
    assert out["orig_hw"] == (h, w)
    assert out["scale_factor"].dtype == np.float32
    np.testing.assert_array_equal(out["scale_factor"], want_sf.astype(np.float32))
    hp, wp = out["image"].shape[:2]
    assert hp % 32 == 0 and wp % 32 == 0
    assert hp - 32 < want_hw[0] <= hp and wp - 32 < want_hw[1] <= wp


@pytest.mark.parametrize("prefix", ["mm", "d2"])
@pytest.mark.parametrize("short", [64, 160])
def test_uint8_pixels_exact(g, prefix, short):
  img = g["coffee_small_bgr"]
  hw = transforms.test_resize_size(*img.shape[:2], rule=RULES[prefix], short=short)
  want = g[f"{prefix}_pix{short}"]
  assert hw == want.shape[:2]
  got = transforms.resize_image(img, hw, rule=RULES[prefix])
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("prefix", ["mm", "d2"])
def test_uint8_pixels_800_hash(g, prefix):
  img = g["coffee_small_bgr"]
  hw = transforms.test_resize_size(*img.shape[:2], rule=RULES[prefix])
  assert hw == tuple(g[f"{prefix}_pix800_hw"])
  out = transforms.resize_image(img, hw, rule=RULES[prefix])
  np.testing.assert_array_equal(out[::8, ::8], g[f"{prefix}_pix800_stride8"])
  np.testing.assert_array_equal(out[:32, :32], g[f"{prefix}_pix800_crop_top_left_32"])
  np.testing.assert_array_equal(out[-32:, -32:], g[f"{prefix}_pix800_crop_bottom_right_32"])
  np.testing.assert_array_equal(out.reshape(-1, 3).sum(0, dtype=np.int64),
                                g[f"{prefix}_pix800_channel_sums"])
  assert hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest() == str(
      g[f"{prefix}_pix800_sha256"])


def test_cv2_and_pil_differ_when_downscaling(g):
  # README: PIL antialiases on downscale, cv2 does not: mixing the kernels up would show here.
  assert np.abs(g["mm_pix64"].astype(int) - g["d2_pix64"].astype(int)).max() > 50


def test_torchvision_normalize_then_resize_bitwise(g):
  rgb = np.ascontiguousarray(g["coffee_small_bgr"][..., ::-1])
  out = transforms.preprocess(rgb, convention="torchvision", pixel_mean=TV_MEAN, pixel_std=TV_STD,
                              to_rgb=True, input_scale=1 / 255, short=64, max_size=1333)
  assert out["image_hw"] == tuple(g["tv_pix64_image_size_hw"])
  want = g["tv_pix64_tensors"][0].transpose(1, 2, 0)
  # 64x96 is already a multiple of 32: no padding (README).
  assert out["image"].shape == want.shape
  np.testing.assert_array_equal(out["image"], want)


def test_torch_kernels_agree_within_an_ulp():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 37, 53)).astype(np.float32)
  a = resample.torch_upsample_bilinear(x, (62, 90), kernel="channels_last")
  b = resample.torch_upsample_bilinear(x, (62, 90), kernel="generic")
  assert not np.array_equal(a, b)  # the summation orders differ ...
  np.testing.assert_allclose(a, b, rtol=0, atol=4e-7 * np.abs(x).max())  # ... by rounding only
  assert resample.torch_bilinear_kernel(3, (800, 1066), num_threads=1) == "channels_last"
  assert resample.torch_bilinear_kernel(3, (800, 1066), num_threads=8) == "generic"
  assert resample.torch_bilinear_kernel(1, (60, 60), num_threads=8) == "channels_last"


def test_torch_bilinear_same_size_is_identity():
  x = np.random.default_rng(1).normal(size=(3, 11, 13)).astype(np.float32)
  for kernel in ("channels_last", "generic"):
    np.testing.assert_array_equal(resample.torch_upsample_bilinear(x, (11, 13), kernel=kernel), x)


def test_fma_f32_is_correctly_rounded():
  # A case where float64 evaluation double-rounds wrongly: 1 + 2^-23 + 2^-24 - 2^-60 rounds down.
  a = np.float32(2.0**-24 * (1 + 2.0**-18))
  b = np.float32(1 - 2.0**-18)
  c = np.float32(1 + 2.0**-23)
  assert np.float32(np.float64(a) * np.float64(b) + np.float64(c)) != c
  assert resample.fma_f32(np.array([a]), np.array([b]), np.array([c]))[0] == c
  x = np.random.default_rng(2).normal(size=(3, 1000)).astype(np.float32)
  np.testing.assert_allclose(resample.fma_f32(*x), x[0] * x[1] + x[2], rtol=1e-6, atol=1e-6)


def _random_image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_mmdet_normalize_is_mmcv_imnormalize():
  img = _random_image(50, 70)
  out = transforms.preprocess(img, convention="mmdet", pixel_mean=MM_MEAN, pixel_std=MM_STD,
                              to_rgb=True)
  h, w = out["image_hw"]
  resized = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
  # mmcv imnormalize_: BGR->RGB, float32 subtract, then multiply by the float64 1/std (cv2 does the
  # product in double and rounds to float32).
  x = resized[..., ::-1].astype(np.float32) - np.float32(MM_MEAN)
  want = (x.astype(np.float64) * (1.0 / np.array(MM_STD))).astype(np.float32)
  np.testing.assert_array_equal(out["image"][:h, :w], want)
  assert not out["image"][h:].any() and not out["image"][:, w:].any()


def test_detectron2_normalize_and_pad():
  img = _random_image(50, 70, seed=1)
  std = (57.375, 57.12, 58.395)
  out = transforms.preprocess(img, convention="detectron2", pixel_mean=D2_MEAN, pixel_std=std)
  h, w = out["image_hw"]
  assert (h, w) == (800, 1120)
  resized = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))
  want = (resized.astype(np.float32) - np.float32(D2_MEAN)) / np.float32(std)  # BGR kept
  np.testing.assert_array_equal(out["image"][:h, :w], want)
  assert out["image"].shape == (800, 1120, 3) and out["image"].dtype == np.float32


def test_pad_to_bucket_and_errors():
  img = _random_image(60, 80, seed=2)
  kw = dict(convention="detectron2", pixel_mean=D2_MEAN, pixel_std=D2_STD)
  base = transforms.preprocess(img, **kw)
  out = transforms.preprocess(img, pad_to=(1024, 1344), **kw)
  assert out["image"].shape == (1024, 1344, 3)
  h, w = out["image_hw"]
  np.testing.assert_array_equal(out["image"][:h, :w], base["image"][:h, :w])
  assert not out["image"][h:].any() and not out["image"][:, w:].any()
  with pytest.raises(ValueError, match="does not fit"):
    transforms.preprocess(img, pad_to=(768, 1344), **kw)
  with pytest.raises(ValueError, match="multiple"):
    transforms.preprocess(img, pad_to=(1000, 1344), **kw)
  with pytest.raises(ValueError):
    transforms.preprocess(img[..., 0], **kw)


def test_channel_flip_follows_decoder_order():
  img = _random_image(40, 40, seed=3)
  kw = dict(pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0), short=40, max_size=1333)
  # mmdet decodes BGR: to_rgb=True reverses, to_rgb=False keeps.
  a = transforms.preprocess(img, convention="mmdet", to_rgb=True, **kw)["image"]
  b = transforms.preprocess(img, convention="mmdet", to_rgb=False, **kw)["image"]
  np.testing.assert_array_equal(a[:40, :40], img[..., ::-1])
  np.testing.assert_array_equal(b[:40, :40], img)
  # torchvision decodes RGB: to_rgb=True keeps it.
  c = transforms.preprocess(img, convention="torchvision", to_rgb=True, **kw)["image"]
  np.testing.assert_array_equal(c[:40, :40], img.astype(np.float32))


def test_input_scale_divides_like_to_tensor():
  img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, 2)
  out = transforms.preprocess(img, convention="torchvision", pixel_mean=(0, 0, 0),
                              pixel_std=(1, 1, 1), to_rgb=True, input_scale=1 / 255, short=16)
  want = img.astype(np.float32) / np.float32(255)
  np.testing.assert_array_equal(out["image"][:16, :16], want)


# ------------------------------------------------------------------------------------------------
# read_image
# ------------------------------------------------------------------------------------------------

def _write_png(path, rgb):
  Image.fromarray(rgb).save(path)


def test_read_image_channel_orders(tmp_path):
  rgb = _random_image(9, 7, seed=4)
  path = tmp_path / "a.png"
  _write_png(path, rgb)
  np.testing.assert_array_equal(transforms.read_image(path, convention="torchvision"), rgb)
  np.testing.assert_array_equal(transforms.read_image(path, convention="detectron2"),
                                rgb[..., ::-1])
  np.testing.assert_array_equal(transforms.read_image(path, convention="mmdet"), rgb[..., ::-1])
  assert transforms.decoder_is_rgb("torchvision") and not transforms.decoder_is_rgb("mmdet")


def test_read_image_grayscale_becomes_3_channels(tmp_path):
  gray = np.arange(35, dtype=np.uint8).reshape(5, 7)
  path = tmp_path / "g.png"
  Image.fromarray(gray).save(path)
  for conv in ("mmdet", "detectron2", "torchvision"):
    out = transforms.read_image(path, convention=conv)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 1], gray)


def test_read_image_exif_orientation(tmp_path):
  rgb = np.zeros((20, 40, 3), np.uint8)
  rgb[:5] = (255, 0, 0)  # red band at the top
  exif = Image.Exif()
  exif[274] = 6  # rotate 90 degrees clockwise to display
  path = tmp_path / "exif6.jpg"
  Image.fromarray(rgb).save(path, exif=exif.tobytes(), quality=95)
  tv = transforms.read_image(path, convention="torchvision")  # no EXIF handling
  d2 = transforms.read_image(path, convention="detectron2")  # _apply_exif_orientation
  mm = transforms.read_image(path, convention="mmdet")  # OpenCV applies EXIF with IMREAD_COLOR
  assert tv.shape == (20, 40, 3)
  assert d2.shape == (40, 20, 3) and mm.shape == (40, 20, 3)
  # After a clockwise rotation the top band is on the right; BGR: red is channel 2.
  assert d2[:, -3:, 2].mean() > 200 and d2[:, :3, 2].mean() < 50
  assert mm[:, -3:, 2].mean() > 200 and mm[:, :3, 2].mean() < 50


@pytest.mark.parametrize("conv", ["mmdet", "detectron2", "torchvision"])
def test_read_image_errors_name_the_file(tmp_path, conv):
  missing = tmp_path / "missing.jpg"
  with pytest.raises(transforms.ImageReadError, match="missing.jpg"):
    transforms.read_image(missing, convention=conv)
  junk = tmp_path / "junk.jpg"
  junk.write_bytes(b"this is not an image")
  with pytest.raises(transforms.ImageReadError, match="junk.jpg"):
    transforms.read_image(junk, convention=conv)
  empty = tmp_path / "empty.png"
  empty.write_bytes(b"")
  with pytest.raises(transforms.ImageReadError, match="empty.png"):
    transforms.read_image(empty, convention=conv)


def test_read_image_truncated_file(tmp_path):
  path = tmp_path / "t.png"
  _write_png(path, _random_image(64, 64, seed=5))
  data = path.read_bytes()
  cut = tmp_path / "cut.png"
  cut.write_bytes(data[: len(data) // 2])
  for conv in ("detectron2", "torchvision", "mmdet"):
    with pytest.raises(transforms.ImageReadError, match="cut.png"):
      transforms.read_image(cut, convention=conv)
