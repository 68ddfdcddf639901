"""RoIAlign: Pallas kernels vs the pure-JAX reference, at the model's shapes, forward and fwd+bwd.

  python scripts/benchmark_roi_align.py                      # on a GPU: ops, then whole model
  python scripts/benchmark_roi_align.py --no-model --reps 50 --json roi_align.jsonl
  python scripts/benchmark_roi_align.py --smoke              # any machine: tiny shapes, checks
                                                             # the script (reference vs interpret)

Op cases (multi-level FPN pooling exactly as the model calls it: `multilevel_roi_align` on
P2..P5 (strides 4..32, 256 channels), level assignment included; random proposals with
log-uniform sizes inside the image):

* infer_box:  1 image 800x1344, 1000 RoIs, 7x7   (box head at test time)
* infer_mask: 1 image 800x1344, 100 RoIs, 14x14  (mask head at test time)
* train_box:  N images 800x1344, 512 RoIs each, 7x7, N in --train-images (2, 8, 16)
* train_mask: N images, 128 RoIs each (the positives, <= 25% of 512), 14x14

each for the conventions' RoIAlign settings (mmdet / detectron2: aligned, adaptive grid capped at
8; torchvision: unaligned, sampling_ratio 2) and --dtypes. Per case: the median time of the
forward and of forward+backward (gradient w.r.t. the features) of each impl, and the ratio
reference / pallas (> 1: the kernels are faster); 'pallas-det' is the deterministic backward.
Timing: jitted, compiled and warmed up first, then --reps calls each waited for
(block_until_ready), median; the inputs differ between cases but not between calls.

Whole model (--model, GPU only): the jitted inference step (1 image 800x1344, R-50-FPN mmdet
config, random weights) and train step (--train-batch images) with each impl ('auto' resolved to
it with `pallas_kernels.roi_align.auto_impl` while tracing). Without a GPU: "no GPU: skipped".

Fill the results table of pallas_kernels/README.md from the last lines (device, JAX version), and
only then add the device to AUTO_PALLAS_DEVICE_KINDS where fwd+bwd measured faster.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONVENTIONS = {  # name: (level rule, sampling_ratio, aligned, max_grid)
    "mmdet": ("mmdet", 0, True, 8),
    "torchvision": ("torchvision", 2, False, None),
}


def random_boxes(rng, n_images, per_image, hw):
  """[n * per_image, 4] boxes (x1, y1, x2, y2) inside the image, log-uniform sizes 8..hw px."""
  h, w = hw
  k = n_images * per_image
  size = np.exp(rng.uniform(np.log(8), np.log(min(h, w)), k))
  aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), k))
  bw, bh = size * np.sqrt(aspect), size / np.sqrt(aspect)
  cx, cy = rng.uniform(0, w, k), rng.uniform(0, h, k)
  boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
  boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
  bidx = np.repeat(np.arange(n_images, dtype=np.int32), per_image)
  return boxes, bidx


def pyramid(rng, n_images, hw, channels, dtype):
  import jax.numpy as jnp
  return [jnp.asarray(rng.standard_normal((n_images, -(-hw[0] // s), -(-hw[1] // s), channels),
                                          np.float32), dtype) for s in (4, 8, 16, 32)]


def median_time(fn, args, reps, warmup=2):
  import jax
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times), compile_s


def op_functions(impl, deterministic, *, conv, output_size):
  import jax
  from maskrcnn_jax.ops import poolers
  rule, sr, aligned, max_grid = CONVENTIONS[conv]

  def fwd(feats, boxes, bidx):
    return poolers.multilevel_roi_align(
        feats, boxes, bidx, level_rule=rule, output_size=output_size, sampling_ratio=sr,
        aligned=aligned, max_grid=max_grid, impl=impl, deterministic=deterministic)

  def fwd_bwd(feats, boxes, bidx, cot):
    out, vjp = jax.vjp(lambda f: fwd(f, boxes, bidx), feats)
    return vjp(cot.astype(out.dtype))[0]

  return jax.jit(fwd), jax.jit(fwd_bwd)


def op_cases(args):
  hw = tuple(args.hw)
  cases = [("infer_box", 1, 1000, 7), ("infer_mask", 1, 100, 14)]
  for n in args.train_images:
    cases.append((f"train_box_x{n}", n, 512, 7))
    cases.append((f"train_mask_x{n}", n, 128, 14))
  if args.smoke:
    hw = (64, 96)
    cases = [("smoke_box", 2, 12, 7)]
  return hw, cases


def run_ops(args, impls, out_rows):
  import jax.numpy as jnp
  hw, cases = op_cases(args)
  channels = 8 if args.smoke else 256
  rng = np.random.default_rng(0)
  header = (f"{'case':<18}{'conv':<12}{'dtype':<9}{'impl':<13}{'fwd ms':>9}{'fwd+bwd ms':>12}"
            f"{'fwd x':>8}{'f+b x':>8}")
  lines = []
  for name, n, per_image, out_size in cases:
    boxes, bidx = random_boxes(rng, n, per_image, hw)
    for dtype_name in args.dtypes:
      dtype = jnp.dtype(dtype_name)
      feats = pyramid(rng, n, hw, channels, dtype)
      cot = jnp.asarray(rng.standard_normal((len(boxes), out_size, out_size, channels)),
                        jnp.float32)
      for conv in args.conventions:
        base = None
        variants = []
        for impl in impls:
          variants.append((impl, False))
          if impl in ("pallas", "interpret") and not args.no_deterministic:
            variants.append((impl, True))
        for impl, det in variants:
          fwd, fwd_bwd = op_functions(impl, det, conv=conv, output_size=out_size)
          label = impl + ("-det" if det else "")
          try:
            t_f, c_f = median_time(fwd, (feats, boxes, bidx), args.reps) if not det else (
                float("nan"), 0.0)
            t_fb, c_fb = median_time(fwd_bwd, (feats, boxes, bidx, cot), args.reps)
          except Exception as e:  # report and go on (e.g. a lowering failure on a new JAX)
            print(f"{name} {conv} {dtype_name} {label}: FAILED {type(e).__name__}: {e}",
                  flush=True)
            continue
          if impl == "reference":
            base = (t_f, t_fb)
          ratio = ((base[0] / t_f if t_f == t_f else float("nan"), base[1] / t_fb)
                   if base else (float("nan"), float("nan")))
          row = dict(case=name, images=n, rois=len(boxes), output=out_size, conv=conv,
                     dtype=dtype_name, impl=label, fwd_ms=t_f * 1e3, fwd_bwd_ms=t_fb * 1e3,
                     fwd_speedup=ratio[0], fwd_bwd_speedup=ratio[1],
                     compile_s=round(c_f + c_fb, 2))
          out_rows.append(row)
          line = (f"{name:<18}{conv:<12}{dtype_name:<9}{label:<13}{row['fwd_ms']:>9.3f}"
                  f"{row['fwd_bwd_ms']:>12.3f}{ratio[0]:>8.2f}{ratio[1]:>8.2f}")
          lines.append(line)
          print(line, flush=True)
      del feats
  print()
  print("ratio = reference time / impl time (> 1: faster than the reference)")
  print(header)
  for line in lines:
    print(line)


def run_model(args, impls, out_rows):
  import jax
  import jax.numpy as jnp
  import pallas_kernels.roi_align as roi_align_lib
  from maskrcnn_jax import config_lib
  from maskrcnn_jax.modeling.build import build_model, init_variables
  from maskrcnn_jax.training import optimizer, sharding, train_state, trainer
  sys.path.insert(0, str(ROOT / "scripts"))
  try:
    from benchmark_train import synthetic_batch
  except ImportError as e:
    print(f"whole model: scripts/benchmark_train.py unavailable ({e}): skipped")
    return

  config = config_lib.load_config_file(str(ROOT / args.config))
  hw = tuple(args.hw)
  rng = np.random.default_rng(0)
  lines = []
  for impl in impls:
    if impl == "interpret":
      continue  # the interpreter at these shapes would take hours
    with roi_align_lib.auto_impl(impl):
      # Inference step: 1 image.
      model = build_model(config)
      variables = init_variables(model, jax.random.PRNGKey(0))
      images = jnp.asarray(rng.standard_normal((1, hw[0], hw[1], 3)), jnp.float32)
      image_hw = jnp.asarray([hw], jnp.int32)
      scale = jnp.ones((1, 2), jnp.float32)
      infer = jax.jit(lambda v, im, ihw, sc: model.apply(v, im, ihw, ihw, sc))
      t_inf, c_inf = median_time(infer, (variables, images, image_hw, scale), args.reps)
      # Train step.
      tmodel = build_model(config, train=True)
      tvars = init_variables(tmodel, jax.random.PRNGKey(0))
      mesh = sharding.make_mesh(1)
      schedule = optimizer.make_schedule(config, global_batch=args.train_batch,
                                         steps_per_epoch=1000)
      tx = optimizer.build_optimizer(config, tvars["params"], schedule)
      state = train_state.place_state(
          train_state.create_train_state(tvars, tx, jax.random.PRNGKey(1)), mesh)
      step = train_state.make_train_step(tmodel, tx, schedule, mesh, state, donate=False,
                                         prepare_batch=trainer.prepare_batch_fn(config))
      batch = sharding.shard_batch(synthetic_batch(config, args.train_batch, hw, 7), mesh)
      t_train, c_train = median_time(lambda s, b: step(s, b)[1]["loss"], (state, batch),
                                     max(3, args.reps // 4))
    row = dict(case="model", impl=impl, infer_ms=t_inf * 1e3, train_step_ms=t_train * 1e3,
               train_batch=args.train_batch, hw=list(hw),
               compile_s=round(c_inf + c_train, 1))
    out_rows.append(row)
    lines.append(f"{impl:<12}{row['infer_ms']:>14.2f}{row['train_step_ms']:>16.2f}")
    print(lines[-1], flush=True)
  print()
  print(f"R-50-FPN ({args.config}), inference 1 x {hw[0]}x{hw[1]}, train step "
        f"{args.train_batch} x {hw[0]}x{hw[1]}")
  print(f"{'impl':<12}{'infer ms':>14}{'train step ms':>16}")
  for line in lines:
    print(line)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--impls", default="reference,pallas",
                      help="comma-separated: reference, pallas, interpret")
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--hw", type=int, nargs=2, default=(800, 1344))
  parser.add_argument("--train-images", type=int, nargs="+", default=(2, 8, 16))
  parser.add_argument("--dtypes", nargs="+", default=("float32", "bfloat16"))
  parser.add_argument("--conventions", nargs="+", default=tuple(CONVENTIONS))
  parser.add_argument("--no-deterministic", action="store_true",
                      help="skip the deterministic backward of the kernels")
  parser.add_argument("--no-model", action="store_true", help="skip the whole-model steps")
  parser.add_argument("--config", default="configs/mmdet/mask_rcnn_r50_fpn_1x_coco.py")
  parser.add_argument("--train-batch", type=int, default=2)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes, reference vs interpret, 1 rep: checks the script")
  parser.add_argument("--json", default="", help="append one JSON line per result here")
  args = parser.parse_args()

  import jax
  on_gpu = jax.default_backend() == "gpu"
  device = jax.devices()[0]
  import jaxlib
  print(f"device: {device.platform} {getattr(device, 'device_kind', '')}, jax {jax.__version__}, "
        f"jaxlib {jaxlib.__version__}", flush=True)
  impls = [i for i in args.impls.split(",") if i]
  if args.smoke:
    impls, args.reps, args.dtypes = ["reference", "interpret"], 1, ("float32",)
  elif not on_gpu:
    print("no GPU: skipped (impl='pallas' needs one; --smoke runs tiny shapes with the "
          "interpreter)")
    print("whole model: no GPU: skipped")
    return
  rows = []
  run_ops(args, impls, rows)
  if not on_gpu:
    print("whole model: no GPU: skipped")
  elif not args.no_model:
    run_model(args, impls, rows)
  if args.json:
    meta = dict(device=f"{device.platform}:{getattr(device, 'device_kind', '')}",
                jax=jax.__version__)
    with open(args.json, "a") as f:
      for row in rows:
        f.write(json.dumps({**meta, **row}) + "\n")


if __name__ == "__main__":
  main()
