"""Evaluation speed. Two modes:

  python scripts/benchmark_eval.py [--num-images 5000] [--dets 100] [--batch 8] [--json OUT.json]

(`--mode val_scale`, the default) times the host-side stages of a COCO-val-scale evaluation without
a model: a synthetic 5,000-image set (evaluation/synthetic.py: COCO photo sizes, ~7.3 instances per
image, COCO's object sizes, crowd regions) with 100 detections per image and soft 28x28 masks.
Each stage is timed on its own, in this one process:
  * paste on the host (ops/paste.py, what the host workers do) vs on the device (ops/paste_device.py
    on `--batch` images at a time, plan + device + transfer of the tiles);
  * RLE (host.window_rle) of the host-pasted windows, and unpacking + RLE of the device tiles; the
    two give identical RLE strings (checked for every detection);
  * the result dicts (coco_format.detections_to_coco);
  * scoring, bbox + segm: pycocotools vs faster-coco-eval (identical statistics checked).
Per-core rates and the projection to a whole val evaluation on 8 accelerators + 16 host cores are
printed. `--num-images` measures a fraction of the set.

  python scripts/benchmark_eval.py --mode model [--num_images 4] [--batch_size_per_device 1]
      [--num_workers 2] [--recipe mmdet/mask_rcnn_r50_fpn_1x_coco] [--json OUT.json]

times the whole evaluation with a model, as follows.

Model: the recipe's R-50-FPN with deterministic seeded weights (`tests/synthetic_weights.py` on the key
list in tests/fixtures/checkpoint_keys, converted by the real converter's `convert_state_dict`),
with a few entries rescaled so that random weights behave like a trained detector at test time:
small residual branches (features stay O(1)), small box regressors (proposals ~ anchors), and ten
classes whose logit bias lifts them over the 0.05 score threshold, so every image yields the full
100 detections with 28x28 masks, as a trained COCO model does. Nothing here measures accuracy.

Data: scikit-image's sample photographs, resized to 480x640 (a typical COCO size; 800x1088 padded
model input at 800/1333), written as PNG with a COCO json of 7 instances per image (COCO's mean).

Measured (one process, all local devices):
  * compile: the first batch of the padded size (reported, excluded from throughput).
  * device only: the jitted forward on a preloaded batch, repeated (lower bound of the device time).
  * whole evaluation: `evaluator.run_inference` (decode + preprocess threads, device, paste + RLE
    worker processes, overlapped) + `coco_eval.evaluate_results` (bbox and segm COCOeval).
  * host share = 1 - device-only time / whole-evaluation wall time: the part of the wall clock that
    is host work not hidden behind the device.
Speed is never asserted in tests; record the figures and the device in the docs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEYS = {
    "mmdet/mask_rcnn_r50_fpn_1x_coco": "mmdet_mask_rcnn_r50_fpn_1x_coco.tsv",
    "mmdet/ms_rcnn_r50_caffe_fpn_1x_coco": "mmdet_ms_rcnn_r50_caffe_fpn_1x_coco.tsv",
    "detectron2/mask_rcnn_R_50_FPN_3x": "detectron2_mask_rcnn_R_50_FPN_3x.tsv",
}


def seeded_variables(config, recipe: str, seed: int = 0):
  """Converted seeded weights that give ~100 detections per image (see the module docstring)."""
  from tests import synthetic_weights as synthetic
  from maskrcnn_jax.checkpoints.conversion import convert_state_dict
  keys = synthetic.read_key_tsv(ROOT / "tests/fixtures/checkpoint_keys" / KEYS[recipe])
  names = {k[0]: k for k in keys}
  scales, overrides = {}, {}
  for name, shape, _ in keys:
    leaf = name.rsplit(".", 1)[-1]
    # The last norm of each residual branch: mmdet/tv 'bn3', detectron2 'conv3.norm'.
    if leaf == "weight" and (name.endswith("bn3.weight") or name.endswith("conv3.norm.weight")):
      overrides[name] = np.full(shape, 0.1, np.float32)
    if leaf == "weight" and any(s in name for s in ("rpn_reg", "anchor_deltas", "fc_reg",
                                                     "bbox_pred", "fc_cls", "cls_score")):
      scales[name] = 1e-3
  cls_bias = [n for n in names if n.endswith(("fc_cls.bias", "cls_score.bias"))]
  for name in cls_bias:
    b = np.zeros(names[name][1], np.float32)
    b[:10] = 5.0  # bg_last layouts: the first ten foreground classes
    overrides[name] = b
  state = synthetic.seeded_state_dict(keys, seed=seed, scales=scales, overrides=overrides)
  variables, _ = convert_state_dict(config, state, source=f"seeded:{seed}")
  return variables


def make_dataset(root: str, num_images: int, seed: int = 0, size=(480, 640)):
  """PNG photographs at `size` (480x640) + a COCO json with 7 instances each; returns (json,
  image dir)."""
  import cv2
  import skimage.data
  from maskrcnn_jax.data import coco_categories
  photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
            skimage.data.rocket(), skimage.data.immunohistochemistry(), skimage.data.colorwheel()]
  rng = np.random.default_rng(seed)
  img_dir = os.path.join(root, "images")
  os.makedirs(img_dir, exist_ok=True)
  images, anns = [], []
  for i in range(num_images):
    rgb = photos[i % len(photos)][..., :3]
    rgb = cv2.resize(np.ascontiguousarray(rgb), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    if (i // len(photos)) % 2:
      rgb = rgb[:, ::-1]
    name = f"{i:06d}.png"
    cv2.imwrite(os.path.join(img_dir, name), np.ascontiguousarray(rgb[..., ::-1]))
    images.append({"id": i + 1, "file_name": name, "height": size[0], "width": size[1]})
    for _ in range(7):
      w, h = rng.uniform(0.04, 0.47) * size[1], rng.uniform(0.04, 0.62) * size[0]
      x, y = rng.uniform(0, size[1] - w), rng.uniform(0, size[0] - h)
      poly = [x, y, x + w, y, x + w, y + h, x, y + h]
      anns.append({"id": len(anns) + 1, "image_id": i + 1,
                   "category_id": int(rng.choice(coco_categories.COCO_CATEGORY_IDS[:10])),
                   "segmentation": [[float(v) for v in poly]], "area": float(w * h),
                   "bbox": [float(x), float(y), float(w), float(h)], "iscrowd": 0})
  cats = [{"id": c, "name": n} for c, n in zip(coco_categories.COCO_CATEGORY_IDS,
                                                coco_categories.COCO_CLASS_NAMES)]
  ann_file = os.path.join(root, "annotations.json")
  with open(ann_file, "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": cats}, f)
  return ann_file, img_dir


def device_only_seconds(config, variables, images, batch_size_per_device, repeats):
  """Median seconds of the jitted sharded forward on one preloaded global batch."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from maskrcnn_jax.data import transforms
  from maskrcnn_jax.evaluation import evaluator, host
  from maskrcnn_jax.modeling.mask_rcnn import ModelConfig
  mesh = evaluator.make_mesh()
  gb = batch_size_per_device * mesh.devices.size
  plan = evaluator.plan_batches([evaluator.EvalImage(im.image_id, im.path, im.hw, im.padded_hw)
                                 for im in images[:gb]], gb, int(config.data.size_divisibility))
  batch = plan[0]
  kwargs = transforms.preprocess_kwargs(config)
  loaded = [host.load_image(im.path, kwargs, batch.padded_hw) if im is not None else
            host.load_image(images[0].path, kwargs, batch.padded_hw) for im in batch.images]
  data = NamedSharding(mesh, P("data"))
  inputs = [jax.device_put(np.stack([np.asarray(x[k]) for x in loaded]).astype(
      np.float32 if k in ("image", "scale_factor") else np.int32), data)
            for k in ("image", "image_hw", "orig_hw", "scale_factor")]
  forward = evaluator._sharded_forward(  # pylint: disable=protected-access
      ModelConfig.from_config(config), None, mesh)
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  out = forward(variables, *inputs)
  jax.block_until_ready(out)
  valid = np.asarray(out["valid"]).sum(1)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(forward(variables, *inputs))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), gb, valid


def val_scale(args):
  """The host-side stages at val scale (module docstring, first mode)."""
  import jax
  from maskrcnn_jax import conventions
  from maskrcnn_jax.data import coco_categories
  from maskrcnn_jax.evaluation import coco_eval, coco_format, host, synthetic
  from maskrcnn_jax.ops import paste, paste_device, paste_plan

  n_img, n_det = args.num_images or 5000, args.dets
  conv = conventions.get(args.convention)
  table = np.asarray(coco_categories.COCO_CATEGORY_IDS)
  device = jax.devices()[0]
  print(f"val scale: {n_img} images x {n_det} detections, convention {conv.name} "
        f"({conv.paste}); device {device.device_kind} ({jax.default_backend()}); "
        f"host cpus {os.cpu_count()}; jax {jax.__version__}", flush=True)
  t0 = time.perf_counter()
  gt_dict = synthetic.make_ground_truth(n_img, seed=args.seed)
  print(f"ground truth: {len(gt_dict['annotations'])} instances "
        f"({sum(a['iscrowd'] for a in gt_dict['annotations'])} crowd), "
        f"{time.perf_counter() - t0:.1f} s", flush=True)
  t = dict(paste_host=0.0, paste_device=0.0, rle=0.0, unpack_rle=0.0, entries=0.0)
  results, n_dets, tile_bytes, windows_px, compile_s = [], 0, 0, 0, None
  jobs = []

  def run_batch(jobs):
    nonlocal n_dets, tile_bytes, windows_px, compile_s
    # Device: one plan and dispatch for the batch, as the evaluator does per device.
    probs = np.stack([j["mask_probs"] for j in jobs])
    boxes = np.stack([j["paste_boxes"] for j in jobs])
    hws = np.concatenate([np.tile(j["orig_hw"], (n_det, 1)) for j in jobs])
    s0 = time.perf_counter()
    plan = paste_plan.plan_tiles(np.arange(len(hws)), boxes.reshape(-1, 4), hws,
                                 method=conv.paste, mask_size=probs.shape[-1])
    chunks = paste_device.dispatch(plan, jax.device_put(probs, device),
                                   jax.device_put(boxes, device),
                                   **paste.convention_args(conv),
                                   chunk_tiles=args.chunk_tiles, device=device)
    tiles = paste_device.gather_packed(plan, chunks)
    dt = time.perf_counter() - s0
    if compile_s is None:
      compile_s = dt  # the first batch compiles; timed again below
      s0 = time.perf_counter()
      tiles = paste_device.gather_packed(plan, paste_device.dispatch(
          plan, jax.device_put(probs, device), jax.device_put(boxes, device),
          **paste.convention_args(conv), chunk_tiles=args.chunk_tiles, device=device))
      dt = time.perf_counter() - s0
    t["paste_device"] += dt
    tile_bytes += tiles.nbytes
    windows_px += int(np.prod(plan.windows[:, 2:], axis=1).sum())
    for k, job in enumerate(jobs):
      hw = job["orig_hw"]
      s0 = time.perf_counter()
      host_windows = [host.paste_window(p, b, hw, conv)
                      for p, b in zip(job["mask_probs"], job["paste_boxes"])]
      t["paste_host"] += time.perf_counter() - s0
      s0 = time.perf_counter()
      rles = [host.window_rle(w, y0, x0, hw) for y0, x0, w in host_windows]
      t["rle"] += time.perf_counter() - s0
      s0 = time.perf_counter()
      lo = k * n_det
      dev_rles = []
      for i in range(lo, lo + n_det):
        win = paste_plan.unpack_window(tiles[plan.first[i]:plan.first[i + 1]], plan.grid[i],
                                       plan.windows[i, 2:])
        dev_rles.append(host.window_rle(win, int(plan.windows[i, 0]), int(plan.windows[i, 1]),
                                        hw))
      t["unpack_rle"] += time.perf_counter() - s0
      if dev_rles != rles:
        raise AssertionError(f"image {job['image_id']}: device and host masks differ")
      s0 = time.perf_counter()
      entries = coco_format.detections_to_coco(job["image_id"], job["boxes"], job["scores"],
                                               job["labels"], None, category_ids=table)
      for e, r in zip(entries, dev_rles):
        e["segmentation"] = r
      t["entries"] += time.perf_counter() - s0
      results.extend(entries)
      n_dets += len(entries)

  t_start = time.perf_counter()
  for job in synthetic.iter_detections(gt_dict, dets_per_image=n_det, seed=args.seed):
    jobs.append(job)
    if len(jobs) == args.batch:
      run_batch(jobs)
      jobs = []
    done = len(results) // n_det
    if done and done % 500 == 0 and not jobs:
      print(f"  {done}/{n_img} images ({time.perf_counter() - t_start:.0f} s)", flush=True)
  if jobs:
    run_batch(jobs)

  with tempfile.TemporaryDirectory() as tmp:
    ann = os.path.join(tmp, "val.json")
    with open(ann, "w") as f:
      json.dump(gt_dict, f)
    gt = coco_eval.load_ground_truth(ann)
    scores = {}
    for scorer in ("pycocotools", "faster_coco_eval"):
      s0 = time.perf_counter()
      scores[scorer] = coco_eval.evaluate_results(gt, results, log=None, scorer=scorer)
      t["score_" + scorer] = time.perf_counter() - s0
      print(f"scoring ({scorer}): {t['score_' + scorer]:.1f} s", flush=True)
  ref, fast = scores["pycocotools"], scores["faster_coco_eval"]
  same = all(abs(ref[k][m] - fast[k][m]) <= 1e-10 or (np.isnan(ref[k][m]) and np.isnan(fast[k][m]))
             for k in ref for m in ref[k])

  per_det = {k: v / n_dets * 1e3 for k, v in t.items() if not k.startswith("score")}
  print(f"\n{n_img} images, {n_dets} detections; device paste compile (first batch) "
        f"{compile_s:.1f} s; tiles moved {tile_bytes / n_dets:.0f} B/detection "
        f"(window {windows_px / n_dets:.0f} px/detection)")
  print("stage                          total s   ms/detection (1 core)")
  for k, label in (("paste_host", "paste, host (ops/paste.py)"),
                   ("paste_device", f"paste, device ({jax.default_backend()})"),
                   ("rle", "RLE of host windows"), ("unpack_rle", "unpack tiles + RLE"),
                   ("entries", "result dicts")):
    print(f"{label:<30} {t[k]:8.1f}   {per_det[k]:.3f}")
  for scorer in ("pycocotools", "faster_coco_eval"):
    print(f"{'scoring, ' + scorer:<30} {t['score_' + scorer]:8.1f}   "
          f"({t['score_' + scorer] / n_img * 1e3:.1f} ms/image)")
  print(f"identical statistics from both scorers: {same}; segm AP "
        f"{scores['faster_coco_eval']['segm']['AP']:.2f}, bbox AP "
        f"{scores['faster_coco_eval']['bbox']['AP']:.2f}")
  host_per_image = (t["unpack_rle"] + t["entries"]) / n_img
  full = 5000
  print(f"\nprojection to {full} images x {n_det} detections: host work after a device paste "
        f"(unpack + RLE + result dicts) {host_per_image * full:.0f} core-s = "
        f"{host_per_image * full / 16:.1f} s on 16 cores; with the host paste "
        f"{(t['paste_host'] + t['rle'] + t['entries']) / n_img * full / 16:.1f} s on 16 cores; "
        f"scoring {t['score_faster_coco_eval'] / n_img * full:.0f} s (faster-coco-eval) / "
        f"{t['score_pycocotools'] / n_img * full:.0f} s (pycocotools) at this machine's speed, "
        "if linear in the image count")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(images=n_img, detections=n_dets, seconds=t, ms_per_detection=per_det,
                     compile_s=compile_s, tile_bytes=tile_bytes, identical_scores=bool(same),
                     metrics=scores["faster_coco_eval"]), f, indent=2)


def measure_eval(config, variables, *, num_images, batch_size_per_device=1, num_workers=2,
                 num_loader_threads=4, repeats=3, image_size=(480, 640), log=print):
  """Times a whole evaluation (inference + paste + RLE + COCOeval) of `num_images` generated
  images; returns (figures dict, results, host stats). See the module docstring."""
  import concurrent.futures
  import multiprocessing
  import jax
  from maskrcnn_jax.evaluation import coco_eval, evaluator

  with tempfile.TemporaryDirectory() as tmp:
    ann_file, img_dir = make_dataset(tmp, num_images, size=image_size)
    gt, images, table = evaluator.load_val_set(config, ann_file, img_dir)
    quiet = lambda m: None  # noqa: E731
    pool = None
    if num_workers > 0:
      pool = concurrent.futures.ProcessPoolExecutor(
          num_workers, mp_context=multiprocessing.get_context("spawn"))
    kw = dict(batch_size_per_device=batch_size_per_device, num_workers=num_workers,
              num_loader_threads=num_loader_threads, executor=pool, log=quiet)
    gb = batch_size_per_device * jax.device_count()

    t0 = time.perf_counter()
    evaluator.run_inference(config, variables, images[:gb], table, **kw)
    t_compile = time.perf_counter() - t0
    log(f"first batch (compile + warm-up of the pool): {t_compile:.1f} s")

    t_dev, gb, valid = device_only_seconds(config, variables, images, batch_size_per_device,
                                           repeats)
    num_batches = -(-len(images) // gb)
    log(f"device only: {t_dev * 1e3:.1f} ms per batch of {gb} "
        f"({gb / t_dev:.2f} img/s); detections per image {valid.tolist()}")

    t0 = time.perf_counter()
    results, stats = evaluator.run_inference(config, variables, images, table, **kw)
    t_inf = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = coco_eval.evaluate_results(gt, results, executor=pool if num_workers > 1
                                         else None, log=quiet)
    t_coco = time.perf_counter() - t0
    if pool is not None:
      pool.shutdown()

  n = len(images)
  total = t_inf + t_coco
  device_total = t_dev * num_batches
  figures = dict(
      images=n, batch_size_per_device=batch_size_per_device,
      num_workers=num_workers, detections=len(results), compile_s=t_compile,
      device_only_s=device_total, inference_wall_s=t_inf, cocoeval_s=t_coco, total_s=total,
      images_per_s=n / total, inference_images_per_s=n / t_inf,
      device_only_images_per_s=n / device_total,
      host_share=max(0.0, 1.0 - device_total / total),
      load_cpu_s=stats.load_cpu, paste_encode_cpu_s=stats.paste_cpu,
      wait_load_s=stats.wait_load, wait_device_s=stats.wait_device, wait_paste_s=stats.wait_paste,
      bbox_AP=metrics["bbox"]["AP"], segm_AP=metrics["segm"]["AP"])
  return figures, results, stats


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mode", default="val_scale", choices=("val_scale", "model"))
  parser.add_argument("--recipe", default="mmdet/mask_rcnn_r50_fpn_1x_coco", choices=sorted(KEYS))
  parser.add_argument("--num_images", "--num-images", type=int, default=None,
                      help="val_scale: 5000 (COCO val); model: 4")
  parser.add_argument("--dets", type=int, default=100, help="val_scale: detections per image")
  parser.add_argument("--batch", type=int, default=8, help="val_scale: images per device paste")
  parser.add_argument("--chunk_tiles", type=int, default=4096)
  parser.add_argument("--convention", default="detectron2",
                      choices=("mmdet", "detectron2", "torchvision"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch_size_per_device", type=int, default=1)
  parser.add_argument("--num_workers", type=int, default=2)
  parser.add_argument("--num_loader_threads", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", default="", help="also write the figures here")
  args = parser.parse_args()
  if args.mode == "val_scale":
    val_scale(args)
    return
  args.num_images = args.num_images or 4

  import jax
  from maskrcnn_jax import config_lib

  config = config_lib.load_config_file(str(ROOT / "configs" / f"{args.recipe}.py"))
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})"
  print(f"device: {device}; jax {jax.__version__}; host cpus: {os.cpu_count()}", flush=True)
  t0 = time.perf_counter()
  variables = seeded_variables(config, args.recipe)
  print(f"seeded + converted weights: {time.perf_counter() - t0:.1f} s", flush=True)

  figures, results, stats = measure_eval(
      config, variables, num_images=args.num_images,
      batch_size_per_device=args.batch_size_per_device, num_workers=args.num_workers,
      num_loader_threads=args.num_loader_threads, repeats=args.repeats)
  figures.update(device=device, recipe=args.recipe)
  n, t_inf, t_coco = figures["images"], figures["inference_wall_s"], figures["cocoeval_s"]
  total, device_total = figures["total_s"], figures["device_only_s"]
  print(f"\n{n} images, {len(results)} detections ({len(results) / n:.0f} per image)")
  print(f"whole evaluation: {total:.2f} s = {n / total:.2f} img/s "
        f"(inference + paste + RLE {t_inf:.2f} s = {n / t_inf:.2f} img/s, COCOeval {t_coco:.2f} s)")
  print(f"device only: {device_total:.2f} s ({n / device_total:.2f} img/s)")
  print(f"host share of the wall clock: {figures['host_share'] * 100:.0f}%")
  print(f"host CPU seconds per image: decode+preprocess {stats.load_cpu / n * 1e3:.0f} ms, "
        f"paste+RLE {stats.paste_cpu / n * 1e3:.0f} ms (over {args.num_workers} workers), "
        f"COCOeval {t_coco / n * 1e3:.0f} ms")
  print(f"main thread blocked: on loading {stats.wait_load:.2f} s, on the device "
        f"{stats.wait_device:.2f} s, on paste workers {stats.wait_paste:.2f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(figures, f, indent=2)


if __name__ == "__main__":
  main()
