"""Host data pipeline throughput: images/s of `TrainLoader` on COCO-like synthetic data.

  python scripts/benchmark_data.py                       # 1x recipe, 1 and 2 workers
  python scripts/benchmark_data.py --workers 0,1,2,4 --images 400
  python scripts/benchmark_data.py --config configs/mmdet/mask_rcnn_r50_fpn_mstrain-poly_3x_coco.py
  python scripts/benchmark_data.py --profile             # per-stage times of `train_example`

The data is generated once into --data_dir (default: a temporary folder): `--images` JPEGs (quality
90) at a mix of common COCO sizes (640 x 480, 480 x 640, 640 x 427, 427 x 640, 640 x 360, 500 x 375,
640 x 640), smooth textures with edges (JPEG sizes and decode times like photographs), 7 instances per
image (COCO's mean is 7.3) as polygons of 12-40 vertices, sizes log-uniform from 12 px to most of the
image, and a crowd RLE on every tenth image.

For each worker count the loader (`maskrcnn_jax.data.loader.TrainLoader`, the one `maskrcnn_jax.train`
uses, with the recipe's batch per process) runs `--warmup` batches (worker start-up) and then
`--batches` timed ones; images/s = timed images / wall-clock seconds. It also prints the bytes of one
example as the device receives it and the pixels the device convolves per image (padded bucket
area) next to those of the unpadded resized image, and the per-host rate 8 GPUs need.

--profile times each stage of `pipeline.train_example` (one process, no loader) with
`pipeline.TIMINGS`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import cv2
import numpy as np
from pycocotools import mask as mask_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# (width, height, weight): landscape / portrait / square sizes that are common in COCO train2017.
SIZES = ((640, 480, 36), (480, 640, 14), (640, 427, 20), (427, 640, 8), (640, 360, 6),
         (500, 375, 6), (640, 640, 10))
INSTANCES = 7
GPU_RATE = 230  # images/s per GPU of MLPerf-class Mask R-CNN training (the figure)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A photograph-like [h, w, 3] uint8: smooth colour fields, a few sharp edges, sensor noise."""
  small = rng.uniform(0, 255, (max(h // 40, 2), max(w // 40, 2), 3)).astype(np.float32)
  img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
  for _ in range(6):
    pts = rng.uniform(0, 1, (int(rng.integers(3, 7)), 2)) * (w, h)
    cv2.fillPoly(img, [pts.astype(np.int32)], rng.uniform(0, 255, 3).tolist())
  img += rng.normal(0, 14, img.shape).astype(np.float32)
  return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(rng: np.random.Generator, w: int, h: int):
  """A star-shaped polygon of 12-40 vertices, size log-uniform in [12, 0.8 * min(w, h)] px."""
  size = math.exp(rng.uniform(math.log(12), math.log(0.8 * min(w, h))))
  cx, cy = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
  n = int(rng.integers(12, 41))
  ang = np.sort(rng.uniform(0, 2 * np.pi, n))
  rad = size / 2 * rng.uniform(0.5, 1.0, n)
  xy = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
  xy = np.clip(xy, 0, [w - 0.01, h - 0.01])
  return [float(round(v, 2)) for v in xy.reshape(-1)]


def make_dataset(root: str, num_images: int, seed: int = 0) -> str:
  """Writes root/ann.json and root/images/*.jpg (see the module docstring); returns the json path."""
  ann_path = os.path.join(root, "ann.json")
  if os.path.exists(ann_path):
    return ann_path
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  rng = np.random.default_rng(seed)
  weights = np.array([s[2] for s in SIZES], np.float64)
  images, anns = [], []
  for i in range(num_images):
    w, h, _ = SIZES[int(rng.choice(len(SIZES), p=weights / weights.sum()))]
    name = f"{i:06d}.jpg"
    cv2.imwrite(os.path.join(root, "images", name), _texture(rng, h, w),
                [cv2.IMWRITE_JPEG_QUALITY, 90])
    images.append(dict(id=i + 1, file_name=name, height=h, width=w))
    for _ in range(INSTANCES):
      poly = _polygon(rng, w, h)
      rle = mask_util.merge(mask_util.frPyObjects([poly], h, w))
      x, y, bw, bh = (float(v) for v in mask_util.toBbox(rle))
      anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=int(rng.integers(1, 81)),
                       iscrowd=0, bbox=[x, y, bw, bh], area=float(mask_util.area(rle)),
                       segmentation=[poly]))
    if i % 10 == 0:  # a crowd region as compressed RLE, as COCO stores them
      m = np.zeros((h, w), np.uint8)
      x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
      cv2.ellipse(m, (x0 + w // 6, y0 + h // 6), (w // 6, h // 8), 0, 0, 360, 1, -1)
      rle = mask_util.encode(np.asfortranarray(m))
      x, y, bw, bh = (float(v) for v in mask_util.toBbox(rle))
      anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=1, iscrowd=1,
                       bbox=[x, y, bw, bh], area=float(mask_util.area(rle)),
                       segmentation=dict(size=[h, w], counts=rle["counts"].decode("ascii"))))
  cats = [dict(id=c, name=f"class{c}") for c in range(1, 81)]
  with open(ann_path + ".tmp", "w") as f:
    json.dump(dict(images=images, annotations=anns, categories=cats), f)
  os.replace(ann_path + ".tmp", ann_path)
  return ann_path


def _load_config(path: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location("recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def profile_stages(dataset, config, num_images: int) -> dict:
  """CPU milliseconds per image of each stage of `pipeline.train_example` (as `BatchMaker` runs
  it: resized, or flipped, straight into a zeroed bucket-sized row; then the rest of the batch)."""
  from maskrcnn_jax.data import pipeline
  conv = dataset.convention
  ids = dataset.train_image_ids()[:num_images]
  names = ("decode", "geometry", "row", "resize", "flip", "targets", "batch")
  times = dict.fromkeys(names, 0.0)
  clock = time.process_time
  for index, image_id in enumerate(ids):
    rng = pipeline.example_rng(0, 0, index)
    t = [clock()]
    image = dataset.read_image(image_id)
    t.append(clock())
    _, flip, new_hw = pipeline.sample_geometry(rng, image.shape[:2], config, conv)
    t.append(clock())
    row = np.zeros(pipeline.image_bucket(config, conv, image.shape[:2]) + (3,), np.uint8)
    out = row[:new_hw[0], :new_hw[1]]
    t.append(clock())
    resized = pipeline.resize_uint8(image, new_hw, conv, out=out)
    t.append(clock())
    if flip:
      pipeline.flip_image(resized, out=out)
    t.append(clock())
    targets = pipeline.instance_targets(dataset, image_id, image.shape[:2], new_hw, flip, config)
    t.append(clock())
    pipeline.batch_examples([dict(image_hw=np.array(new_hw, np.int32), **targets)])
    t.append(clock())
    for k, a, b in zip(names, t[:-1], t[1:]):
      times[k] += b - a
  return {k: v / len(ids) * 1e3 for k, v in times.items()}


def pixel_costs(dataset, config) -> dict:
  """Mean pixels per training image that the device convolves (the padded bucket) for three bucket
  choices, next to the unpadded resized image, at the largest short side."""
  from maskrcnn_jax.data import pipeline, transforms
  conv = dataset.convention
  short = max(int(s) for s in np.atleast_1d(config.data.train_short))
  square = pipeline.max_train_size(config)
  long_side = square[1]
  sizes = [(int(dataset.image_info(i)["height"]), int(dataset.image_info(i)["width"]))
           for i in dataset.train_image_ids()]
  resized = [transforms.test_resize_size(h, w, rule=conv.resize, short=short,
                                         max_size=int(config.data.train_max_size))
             for h, w in sizes]
  default = pipeline.train_buckets(config)
  s32 = default[0][0]
  fine = tuple(sorted({(s32, v) for v in (s32 + 288, s32 + 416, long_side)}
                      | {(v, s32) for v in (s32 + 288, s32 + 416, long_side)}))
  out = dict(unpadded=float(np.mean([h * w for h, w in resized])))
  for name, buckets in (("square", (square,)), ("aspect", default), ("aspect_fine", fine)):
    areas = [b[0] * b[1] for b in (pipeline.choose_bucket(hw, buckets, fallback=square)
                                   for hw in resized)]
    out[name] = float(np.mean(areas))
    out[name + "_buckets"] = [list(b) for b in buckets]
  return out


def _children_cpu_seconds() -> float:
  """CPU seconds (user + system) used so far by the live child processes (Linux /proc; the grain
  workers are children of this process)."""
  total = 0.0
  tick = os.sysconf("SC_CLK_TCK")
  for task in os.listdir("/proc/self/task"):
    try:
      with open(f"/proc/self/task/{task}/children") as f:
        pids = f.read().split()
    except OSError:
      continue
    for pid in pids:
      try:
        with open(f"/proc/{pid}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
      except (OSError, IndexError, ValueError):
        pass
  return total


def measure_loader(dataset, config, *, workers: int, batch: int, warmup: int,
                   batches: int) -> dict:
  """Images/s of `TrainLoader` with `workers` processes (0: synchronous) after `warmup` batches,
  and the CPU time per image in the timed batches (this process plus its workers): the images/s
  one core gives, whatever else the machine runs."""
  from maskrcnn_jax.data import loader
  with loader.TrainLoader(dataset, config, seed=0, global_batch=batch,
                          num_workers=workers, prefetch=2) as run:
    t0 = time.perf_counter()
    for _ in range(warmup):
      first = next(run)
    nbytes = sum(int(np.asarray(v).nbytes) for v in first.values()) / batch
    image_bytes = int(np.asarray(first["image"]).nbytes) / batch
    del first
    t1 = time.perf_counter()
    cpu1 = time.process_time() + _children_cpu_seconds()
    for _ in range(batches):
      next(run)
    t2 = time.perf_counter()
    cpu2 = time.process_time() + _children_cpu_seconds()
  images = batch * batches
  return dict(workers=workers, images_per_s=images / (t2 - t1), startup_s=t1 - t0,
              cpu_ms_per_image=(cpu2 - cpu1) / images * 1e3, bytes_per_example=nbytes,
              image_bytes_per_example=image_bytes)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=os.path.join(REPO, "configs/mmdet/mask_rcnn_r50_fpn_1x_coco.py"))
  p.add_argument("--data_dir", default="", help="where the synthetic data is (made if missing)")
  p.add_argument("--images", type=int, default=320, help="synthetic dataset size")
  p.add_argument("--workers", default="1,2", help="comma-separated worker counts (0 = synchronous)")
  p.add_argument("--batch", type=int, default=16,
                 help="images per batch of the process (16: 8 GPUs x 2 images)")
  p.add_argument("--warmup", type=int, default=2, help="untimed batches per measurement")
  p.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
  p.add_argument("--profile", action="store_true", help="per-stage times of train_example")
  p.add_argument("--json", default="", help="append the results as a JSON line here")
  args = p.parse_args(argv)

  from maskrcnn_jax.data import coco
  config = _load_config(args.config)
  data_dir = args.data_dir or os.path.join(tempfile.gettempdir(),
                                           f"maskrcnn_jax_coco_like_{args.images}")
  ann = make_dataset(data_dir, args.images)
  dataset = coco.CocoDataset(ann, os.path.join(data_dir, "images"), convention=config.convention)
  name = config.get("upstream", "") or os.path.basename(args.config)
  print(f"{name}: {len(dataset.image_ids)} synthetic COCO-like images in {data_dir}, "
        f"{os.cpu_count()} CPU cores visible")
  result = dict(config=name, images=len(dataset.image_ids), cpu_count=os.cpu_count())

  if args.profile:
    import cv2
    cv2.setNumThreads(1)  # as in a worker process
    stages = profile_stages(dataset, config, min(args.images, 200))
    total = sum(stages.values())
    print("per-image stages (ms, one process): " + ", ".join(
        f"{k} {v:.2f}" for k, v in stages.items()) + f"; total {total:.2f} = "
        f"{1e3 / total:.0f} images/s")
    result["stages_ms"] = stages

  px = pixel_costs(dataset, config)
  print(f"pixels per image convolved at the largest scale: unpadded {px['unpadded'] / 1e6:.3f} M; "
        f"square bucket {px['square_buckets'][0]} {px['square'] / 1e6:.3f} M; aspect buckets "
        f"{px['aspect_buckets']} {px['aspect'] / 1e6:.3f} M "
        f"({px['aspect'] / px['square']:.2f} of the square); 6 buckets {px['aspect_fine_buckets']} "
        f"{px['aspect_fine'] / 1e6:.3f} M ({px['aspect_fine'] / px['square']:.2f})")
  result["pixels"] = px

  runs = []
  for w in (int(v) for v in args.workers.split(",")):
    r = measure_loader(dataset, config, workers=w, batch=args.batch, warmup=args.warmup,
                       batches=args.batches)
    runs.append(r)
    print(f"workers {w}: {r['images_per_s']:.1f} images/s ({args.batches} batches of "
          f"{args.batch}; start-up + {args.warmup} batches {r['startup_s']:.1f} s); CPU "
          f"{r['cpu_ms_per_image']:.2f} ms per image = {1e3 / r['cpu_ms_per_image']:.0f} images/s "
          f"per core; {r['bytes_per_example'] / 1e6:.2f} MB per example, of which image "
          f"{r['image_bytes_per_example'] / 1e6:.2f} MB")
  result["loader"] = runs
  need = 8 * GPU_RATE
  for r in runs:
    if r["workers"] > 0:
      per_core = 1e3 / r["cpu_ms_per_image"]
      print(f"8 GPUs at {GPU_RATE} images/s need {need} images/s per host: {need / per_core:.1f} "
            f"cores at the {per_core:.0f} images/s per core measured with {r['workers']} "
            f"worker(s)")
  if args.json:
    with open(args.json, "a") as f:
      f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  main()
