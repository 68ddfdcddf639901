"""The built-in 'shapes' dataset: generated deterministically on first use, no download.

Five classes of filled shapes, `CLASSES` = circle, square, triangle, star, ring (ids 1..5), drawn on
textured backgrounds (linear gradients, sinusoidal stripes, smooth colour noise, checkerboards) with
pixel noise. Each image holds 1 to 5 shapes of circumradius `[0.08, 0.24] * image_size` (about 10 to
31 px at 128 px), random colour, rotation and position (shapes may be cut by the image border).
Later shapes occlude earlier ones; a placement is re-drawn when it would leave an earlier shape with
less than 35 % (or 30 px) visible. The stored masks are the **visible** parts, as compressed RLE of
the binarized (coverage >= 0.5, 4x4 supersampled) masks; 'bbox' and 'area' are pycocotools'
`toBbox` / `area` of that RLE, so they agree with the masks exactly. Ring holes show what is behind.

Files (one folder per argument set, see `dataset_dir`):

  <dir>/annotations/instances_{train,val}.json   COCO instances json (RLE segmentations)
  <dir>/{train,val}/000001.png ...                RGB PNG (read by `CocoDataset` like any dataset)
  <dir>/meta.json                                 the generation arguments; written last

Generation writes into a temporary sibling folder and renames it into place, so a killed generation
leaves no partial dataset; concurrent generators (several hosts on a shared disk) race harmlessly,
their outputs being byte-identical. Each image draws from its own `np.random.default_rng((seed,
split, index))` stream: the same arguments give the same bytes (for the same numpy / OpenCV /
zlib builds).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple, Union

import cv2
import numpy as np
from pycocotools import mask as mask_util

from maskrcnn_jax import errors

logger = logging.getLogger(__name__)

CLASSES = ("circle", "square", "triangle", "star", "ring")
VERSION = "shapes_v1"
DEFAULTS = dict(num_train=600, num_val=100, image_size=128, seed=0)
ENV_VAR = "MASKRCNN_JAX_DATA"

_SS = 4  # supersampling factor per axis for anti-aliased edges and coverage-based masks
_SHIFT = 4  # cv2 fractional bits for sub-pixel vertex positions
_MIN_VISIBLE_FRACTION = 0.35
_MIN_VISIBLE_PIXELS = 30


def default_root() -> str:
  """$MASKRCNN_JAX_DATA if set, else ~/.cache/maskrcnn_jax."""
  return os.environ.get(ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "maskrcnn_jax")


def dataset_dir(cache_dir: Optional[Union[str, os.PathLike]] = None, *, num_train: int,
                num_val: int, image_size: int, seed: int) -> str:
  """The folder of one argument set: `<root>/shapes_v1` for the defaults (`DEFAULTS`), else
  `<root>/shapes_v1-<num_train>x<num_val>-<image_size>px-seed<seed>`; root = cache_dir or
  `default_root()`."""
  root = os.fspath(cache_dir) if cache_dir is not None else default_root()
  args = dict(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
  if args == DEFAULTS:
    return os.path.join(root, VERSION)
  return os.path.join(root, f"{VERSION}-{num_train}x{num_val}-{image_size}px-seed{seed}")


def categories() -> List[Dict[str, Any]]:
  return [dict(id=i + 1, name=n, supercategory="shape") for i, n in enumerate(CLASSES)]


def _result(root: str) -> Dict[str, Any]:
  ann = os.path.join(root, "annotations")
  return dict(
      train=(os.path.join(ann, "instances_train.json"), os.path.join(root, "train")),
      val=(os.path.join(ann, "instances_val.json"), os.path.join(root, "val")),
      categories=categories(), root=root)


def ensure_builtin_dataset(cache_dir: Optional[Union[str, os.PathLike]] = None, *,
                           num_train: int = DEFAULTS["num_train"],
                           num_val: int = DEFAULTS["num_val"],
                           image_size: int = DEFAULTS["image_size"],
                           seed: int = DEFAULTS["seed"]) -> Dict[str, Any]:
  """Returns the built-in dataset's paths, generating it first if it is not in the cache.

  Args:
    cache_dir: root folder of the cache (default `default_root()`); the dataset lives in
      `dataset_dir(cache_dir, ...)`.
    num_train, num_val: images per split.
    image_size: side of the square images, pixels (>= 32).
    seed: generation seed.

  Returns:
    dict(train=(json_path, image_dir), val=(json_path, image_dir),
         categories=[{'id', 'name', 'supercategory'}], root=dataset folder).
  """
  if image_size < 32:
    raise errors.ConfigError(f"image_size must be >= 32, got {image_size}")
  if num_train < 0 or num_val < 0:
    raise errors.ConfigError("num_train and num_val must be >= 0")
  args = dict(version=VERSION, num_train=int(num_train), num_val=int(num_val),
              image_size=int(image_size), seed=int(seed))
  root = dataset_dir(cache_dir, num_train=args["num_train"], num_val=args["num_val"],
                     image_size=args["image_size"], seed=args["seed"])
  meta_path = os.path.join(root, "meta.json")
  if os.path.isfile(meta_path):
    with open(meta_path, "r", encoding="utf-8") as f:
      meta = json.load(f)
    if meta.get("args") != args:
      raise errors.UserError(
          f"{root} holds a dataset made with {meta.get('args')}, not {args}; "
          "delete the folder to regenerate it")
    return _result(root)
  if os.path.exists(root):
    raise errors.UserError(
        f"{root} exists but has no meta.json (not a complete built-in dataset); "
        "delete it to regenerate")

  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  _remove_stale_temporaries(parent, os.path.basename(root))
  start = time.time()
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
  try:
    _generate(tmp, args)
    try:
      os.rename(tmp, root)
    except OSError:
      if not os.path.isfile(meta_path):  # not a concurrent generator winning the race
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  logger.info("generated the built-in dataset %s (%d train + %d val images of %dpx) in %.1f s",
              root, num_train, num_val, image_size, time.time() - start)
  return _result(root)


def from_config(config) -> Dict[str, Any]:
  """`ensure_builtin_dataset` with the arguments in config.data.builtin (the train and evaluate
  CLIs' built-in data set): a dict of num_train, num_val, image_size, seed (absent = `DEFAULTS`)
  and optionally cache_dir ('' = `default_root()`); the same dict as `ensure_builtin_dataset`."""
  kwargs = dict(config.data.get("builtin", None) or {})
  cache_dir = kwargs.pop("cache_dir", None) or None
  return ensure_builtin_dataset(cache_dir, **kwargs)


def _remove_stale_temporaries(parent: str, name: str, max_age_s: float = 3600.0) -> None:
  """Deletes temporaries of killed generations (older than max_age_s; a live one takes < 1 min)."""
  now = time.time()
  for entry in os.listdir(parent):
    path = os.path.join(parent, entry)
    if entry.startswith(f".{name}.tmp-") and os.path.isdir(path):
      try:
        if now - os.path.getmtime(path) > max_age_s:
          shutil.rmtree(path, ignore_errors=True)
      except OSError:
        pass


# -------------------------------------------------------------------------------------------------
# generation
# -------------------------------------------------------------------------------------------------

def _generate(out: str, args: Dict[str, Any]) -> None:
  os.makedirs(os.path.join(out, "annotations"))
  digests = {}
  for split_index, (split, count) in enumerate((("train", args["num_train"]),
                                                ("val", args["num_val"]))):
    os.makedirs(os.path.join(out, split))
    images, annotations = [], []
    for index in range(count):
      image_id = index + 1
      rng = np.random.default_rng((args["seed"], split_index, index))
      image, instances = render_image(rng, args["image_size"])
      name = f"{image_id:06d}.png"
      ok, buf = cv2.imencode(".png", image[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 3])
      assert ok
      with open(os.path.join(out, split, name), "wb") as f:
        f.write(buf.tobytes())
      images.append(dict(id=image_id, file_name=name, height=int(image.shape[0]),
                         width=int(image.shape[1])))
      for label, mask in instances:
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append(dict(
            id=len(annotations) + 1, image_id=image_id, category_id=label + 1, iscrowd=0,
            bbox=[float(v) for v in mask_util.toBbox(rle)], area=int(mask_util.area(rle)),
            segmentation=dict(size=[int(v) for v in rle["size"]],
                              counts=rle["counts"].decode("ascii"))))
    data = dict(
        info=dict(description=f"maskrcnn_jax built-in {VERSION} {split}", version=VERSION,
                  year=2024, contributor="maskrcnn_jax", url="", date_created=""),
        licenses=[], images=images, annotations=annotations, categories=categories())
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w",
              encoding="utf-8") as f:
      f.write(text)
    digests[split] = hashlib.sha256(text.encode("utf-8")).hexdigest()
  with open(os.path.join(out, "meta.json"), "w", encoding="utf-8") as f:
    json.dump(dict(args=args, json_sha256=digests, classes=list(CLASSES)), f, sort_keys=True,
              indent=1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """[size, size, 3] float32 RGB texture in [0, 255]."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
  kind = int(rng.integers(4))
  theta = rng.uniform(0, 2 * math.pi)
  proj = xx * math.cos(theta) + yy * math.sin(theta)
  if kind == 0:  # linear gradient
    t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
  elif kind == 1:  # sinusoidal stripes
    period = rng.uniform(5, 24)
    t = 0.5 + 0.5 * np.sin(2 * math.pi * proj / period + rng.uniform(0, 2 * math.pi))
  elif kind == 2:  # smooth colour noise
    g = int(rng.integers(3, 9))
    grid = rng.uniform(0, 255, (g, g, 3)).astype(np.float32)
    return np.clip(cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC), 0, 255)
  else:  # checkerboard, possibly rotated
    cell = rng.uniform(6, 20)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
  t = t[..., None]
  return (c0 * (1 - t) + c1 * t).astype(np.float32)


def _star(r: float, n: int = 5, inner: float = 0.45) -> np.ndarray:
  angles = np.arange(2 * n) * math.pi / n
  radii = np.where(np.arange(2 * n) % 2 == 0, r, r * inner)
  return np.stack([radii * np.sin(angles), -radii * np.cos(angles)], 1)


def _regular(r: float, n: int) -> np.ndarray:
  angles = np.arange(n) * 2 * math.pi / n
  return np.stack([r * np.sin(angles), -r * np.cos(angles)], 1)


def _shape_coverage(cls: int, cx: float, cy: float, r: float, rot: float, hole: float,
                    size: int) -> np.ndarray:
  """[size, size] float32 coverage in [0, 1] of one shape (4x4 supersampled)."""
  big = size * _SS
  canvas = np.zeros((big, big), np.uint8)
  scale = _SS * (1 << _SHIFT)
  # Pixel centres: pixel k covers [k, k + 1); supersample j of pixel k is at k + (j + 0.5) / SS,
  # i.e. at (j' + 0.5) / SS for supersampled index j'. cv2 draws pixel j' at integer j', so shift
  # the continuous coordinate by -0.5 / SS.
  to_fixed = lambda v: int(round((v * _SS - 0.5) * (1 << _SHIFT)))  # noqa: E731
  name = CLASSES[cls]
  if name in ("circle", "ring"):
    cv2.circle(canvas, (to_fixed(cx), to_fixed(cy)), int(round(r * scale)), 255, -1,
               cv2.LINE_8, _SHIFT)
    if name == "ring":
      cv2.circle(canvas, (to_fixed(cx), to_fixed(cy)), int(round(r * hole * scale)), 0, -1,
                 cv2.LINE_8, _SHIFT)
  else:
    pts = {"square": lambda: _regular(r, 4), "triangle": lambda: _regular(r, 3),
           "star": lambda: _star(r)}[name]()
    c, s = math.cos(rot), math.sin(rot)
    pts = pts @ np.array([[c, s], [-s, c]], np.float64)
    pts = pts + np.array([cx, cy])
    fixed = np.array([[to_fixed(x), to_fixed(y)] for x, y in pts], np.int32)
    cv2.fillPoly(canvas, [fixed], 255, cv2.LINE_8, _SHIFT)
  return canvas.reshape(size, _SS, size, _SS).astype(np.float32).mean((1, 3)) / 255.0


def render_image(rng: np.random.Generator,
                 size: int) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
  """Draws one image.

  Args:
    rng: the image's own generator.
    size: image side in pixels.

  Returns:
    image: [size, size, 3] uint8 RGB;
    instances: list of (label in [0, 5), visible mask [size, size] bool), in drawing order.
  """
  canvas = _background(rng, size)
  bg_mean = canvas.reshape(-1, 3).mean(0)
  target = int(rng.integers(1, 6))
  labels: List[int] = []
  full: List[np.ndarray] = []
  visible: List[np.ndarray] = []
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  for _ in range(target):
    for _attempt in range(20):
      cls = int(rng.integers(len(CLASSES)))
      r = rng.uniform(0.08, 0.24) * size
      if CLASSES[cls] == "ring":
        r = max(r, 0.11 * size)
      cx, cy = rng.uniform(-0.2 * r, size + 0.2 * r, 2)
      rot = rng.uniform(0, 2 * math.pi)
      hole = rng.uniform(0.45, 0.6)
      cov = _shape_coverage(cls, cx, cy, r, rot, hole, size)
      mask = cov >= 0.5
      if mask.sum() < max(_MIN_VISIBLE_PIXELS, 0.5 * (0.25 * math.pi * r * r)):
        continue  # mostly outside the image
      new_vis = [v & ~mask for v in visible]
      if any(nv.sum() < max(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * f.sum())
             for nv, f in zip(new_vis, full)):
        continue  # would hide an earlier shape too much
      break
    else:
      break  # no valid placement: stop adding shapes
    for _c in range(10):  # a colour that stands out from the background on average
      color = rng.uniform(0, 255, 3)
      if np.abs(color - bg_mean).sum() > 120:
        break
    # Mild shading inside the shape, so that colour is not uniform.
    shade_dir = rng.uniform(0, 2 * math.pi)
    along = (xx - cx) * math.cos(shade_dir) + (yy - cy) * math.sin(shade_dir)
    shade = rng.uniform(-25, 25) * along / max(r, 1.0)
    fill = np.clip(color[None, None, :] + shade[..., None], 0, 255)
    canvas = canvas * (1 - cov[..., None]) + fill * cov[..., None]
    visible = new_vis + [mask.copy()]
    full.append(mask)
    labels.append(cls)
  noise = rng.normal(0, 4.0, canvas.shape)
  image = np.clip(np.round(canvas + noise), 0, 255).astype(np.uint8)
  return image, list(zip(labels, visible))
