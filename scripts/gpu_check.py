"""Every GPU check in one run (scripts/gpu_check.sh calls this): one JSON and one Markdown table.

  python scripts/gpu_check.py --out gpu_check/            # on the GPU: R-50-FPN, real shapes
  python scripts/gpu_check.py --dry --out /tmp/gpu_check  # any machine: tiny shapes, end to end

Sections, in priority order (each is skipped, and says so, when the remaining --budget-s would
not cover its estimated cost, so the whole run stays inside the budget; 450 s by default):

1. kernels: RoIAlign correctness of every kernel implementation on this machine (natively: the
   Triton 'pallas' and Mosaic GPU 'mosaic' kernels, atomic and deterministic backward; dry: their
   interpreted forms) against the pure-JAX reference computed in float32 from the same inputs:
   relative error ||out - ref|| / ||ref|| of the forward and of the gradient w.r.t. the features,
   float32 and bfloat16 features, random FPN pyramid and proposals (fresh per dtype), NaN fails.
2. kernel speed: forward and forward+backward median times of each implementation at the
   training shapes (2 images x 512 RoIs, 7x7 and 14x14, 256 channels, P2-P5, mmdet RoIAlign
   settings), float32 and bfloat16; ratio = reference / implementation (scripts/benchmark_roi_align.py
   does the timing).
3. train: the recipe's jitted train step (scripts/benchmark_train.py) in bfloat16 and float32 at
   batch 2 at the recipe's largest training size, each in its own process so that the device's
   peak memory (`memory_stats()['peak_bytes_in_use']`) is that step's: images/s, step ms, peak
   GB (the mmdetection zoo's Mem column for R-50-FPN pytorch 1x: 4.4 GB, FP16: 3.6 GB).
4. inference: batch-1 latency and batched images/s of the jitted model (detections included,
   no paste) at the recipe's test size.
5. evaluation: images/s of a whole evaluation (inference + mask paste + RLE + COCOeval,
   scripts/benchmark_eval.py) on generated images.
6. largest batch: per dtype, the batch that the batch-2 peak memory predicts fits (per-image
   bytes = (peak - state bytes) / 2, 90 % of the device limit), run once (three quarters of it
   after an out-of-memory error): images/s and peak memory.

The device, JAX version and every figure go to <out>/gpu_check.json; <out>/gpu_check.md holds the
table. --dry uses a tiny Mask R-CNN (the quickstart model at 64 px, few RoIs), the Mosaic GPU kernel
bodies in the Pallas interpreter, float32 kernel timings and a bfloat16 train step only, so that
the script itself is tested on CPU (tests/test_gpu_check.py); its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

RECIPE = "mmdet/mask_rcnn_r50_fpn_1x_coco"
MMDET_ZOO_MEM_GB = {"float32": 4.4, "float16": 3.6}  # R-50-FPN pytorch 1x, 2 images per GPU
# Estimated seconds per section on one H100 (compilation dominates), for the budget.
COST_S = {"kernels": 60, "kernel_speed": 90, "train": 100, "inference": 60, "evaluation": 60,
          "largest_batch": 110}
DRY_COST_S = {"kernels": 20, "kernel_speed": 10, "train": 40, "inference": 20, "evaluation": 20,
              "largest_batch": 0}


def dry_config():
  """The quickstart model at 64 px with a few RoIs: the smallest real Mask R-CNN to compile."""
  from maskrcnn_jax import config_lib
  c = config_lib.load_config_file(str(ROOT / "configs/quickstart.py"))
  c.data.train_short, c.data.train_max_size = (64,), 64
  c.data.test_short, c.data.test_max_size = 64, 64
  c.data.max_instances = 4
  c.data.gt_mask_size = 16
  c.model.rpn_pre_nms_topk_train, c.model.rpn_post_nms_topk_train = 50, 20
  c.model.rpn_pre_nms_topk_test, c.model.rpn_post_nms_topk_test = 50, 20
  c.model.max_candidates = 50
  c.model.detections_per_image = 5
  c.model.mask_head_num_conv = 1
  c.train.roi_batch_per_image = 8
  c.train.rpn_batch_per_image = 32
  return c


def load_config(args):
  if args.dry:
    return dry_config()
  from maskrcnn_jax import config_lib
  return config_lib.load_config_file(str(ROOT / "configs" / f"{args.recipe}.py"))


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if not np.all(np.isfinite(x)):
    return float("nan")
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def kernel_impls(dry):
  import pallas_kernels.roi_align as roi_align_lib
  available = roi_align_lib.available_impls()
  # Dry: the Mosaic GPU bodies in the interpreter only (the golden tests cover the rest; every
  # interpreted compilation costs seconds on CPU).
  wanted = ("mosaic_interpret",) if dry else ("pallas", "mosaic")
  return [i for i in wanted if i in available]


def kernel_shapes(dry):
  """(hw, channels, images, RoIs per image) of the kernel sections."""
  return ((64, 96), 8, 2, 12) if dry else ((800, 1344), 256, 2, 512)


def section_kernels(args, report):
  import jax.numpy as jnp
  from benchmark_roi_align import op_functions, pyramid, random_boxes
  hw, channels, n, per_image = kernel_shapes(args.dry)
  tol = {"float32": 1e-5, "bfloat16": 1e-2}
  for dtype_name in ("float32", "bfloat16"):
    rng = np.random.default_rng(len(dtype_name))  # fresh inputs per dtype
    boxes, bidx = random_boxes(rng, n, per_image, hw)
    feats = pyramid(rng, n, hw, channels, jnp.dtype(dtype_name))
    feats32 = [f.astype(jnp.float32) for f in feats]
    cot = jnp.asarray(rng.standard_normal((len(boxes), 7, 7, channels)), jnp.float32)
    fwd_ref, fwd_bwd_ref = op_functions("reference", False, conv="mmdet", output_size=7)
    out_ref, grad_ref = fwd_ref(feats32, boxes, bidx), fwd_bwd_ref(feats32, boxes, bidx, cot)
    for impl in kernel_impls(args.dry):
      for det in (False,) if args.dry else (False, True):
        label = impl + ("-det" if det else "")
        try:
          fwd, fwd_bwd = op_functions(impl, det, conv="mmdet", output_size=7)
          e_out = rel_err(fwd(feats, boxes, bidx), out_ref)
          grads = fwd_bwd(feats, boxes, bidx, cot)
          e_grad = max(rel_err(g, r) for g, r in zip(grads, grad_ref))
          ok = e_out <= tol[dtype_name] and e_grad <= tol[dtype_name]
          report.add("kernels", f"{label} {dtype_name}", dict(
              fwd_rel_err=e_out, grad_rel_err=e_grad, tolerance=tol[dtype_name], ok=ok),
              f"fwd {e_out:.2e}, grad {e_grad:.2e} (tol {tol[dtype_name]:g}): "
              + ("PASS" if ok else "FAIL"))
        except Exception as e:  # a lowering or compile failure is a result too
          report.add("kernels", f"{label} {dtype_name}", dict(ok=False, error=repr(e)[:500]),
                     f"FAILED {type(e).__name__}: {str(e)[:160]}")


def section_kernel_speed(args, report):
  import jax.numpy as jnp
  from benchmark_roi_align import median_time, op_functions, pyramid, random_boxes
  hw, channels, n, per_image = kernel_shapes(args.dry)
  reps = 2 if args.dry else 20
  rng = np.random.default_rng(7)
  boxes, bidx = random_boxes(rng, n, per_image, hw)
  for dtype_name in ("float32",) if args.dry else ("float32", "bfloat16"):
    feats = pyramid(rng, n, hw, channels, jnp.dtype(dtype_name))
    for out_size in (7,) if args.dry else (7, 14):
      cot = jnp.asarray(rng.standard_normal((len(boxes), out_size, out_size, channels)),
                        jnp.float32)
      base = None
      dets = (False,) if args.dry else (False, True)
      for impl, det in [("reference", False)] + [(i, d) for i in kernel_impls(args.dry)
                                                 for d in dets]:
        label = impl + ("-det" if det else "")
        name = f"{n}x{per_image} RoIs {out_size}x{out_size} {dtype_name} {label}"
        try:
          fwd, fwd_bwd = op_functions(impl, det, conv="mmdet", output_size=out_size)
          t_f = median_time(fwd, (feats, boxes, bidx), reps)[0]
          t_fb = median_time(fwd_bwd, (feats, boxes, bidx, cot), reps)[0]
        except Exception as e:
          report.add("kernel_speed", name, dict(error=repr(e)[:500]),
                     f"FAILED {type(e).__name__}: {str(e)[:160]}")
          continue
        if impl == "reference":
          base = (t_f, t_fb)
        ratio = (base[0] / t_f, base[1] / t_fb) if base else (float("nan"),) * 2
        report.add("kernel_speed", name, dict(fwd_ms=t_f * 1e3, fwd_bwd_ms=t_fb * 1e3,
                                              fwd_speedup=ratio[0], fwd_bwd_speedup=ratio[1]),
                   f"fwd {t_f * 1e3:.3f} ms ({ratio[0]:.2f}x), fwd+bwd {t_fb * 1e3:.3f} ms "
                   f"({ratio[1]:.2f}x)")


def train_one(args):
  """Child process: one train-step measurement; prints one JSON line."""
  import jax
  from benchmark_train import time_train_step
  from maskrcnn_jax.data import pipeline
  c = load_config(args)
  c.model.dtype = args.dtype
  hw = pipeline.train_buckets(c)[0]  # the landscape bucket the loader pads most COCO images to
  try:
    result = time_train_step(c, args.batch, hw, steps=2 if args.dry else 10,
                             warmup=0 if args.dry else 2)
  except Exception as e:
    result = dict(error=f"{type(e).__name__}: {str(e)[:400]}",
                  oom="RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower())
  stats = jax.devices()[0].memory_stats() or {}
  if stats:  # (the CPU backend keeps none)
    result.update(peak_bytes=stats.get("peak_bytes_in_use"), bytes_limit=stats.get("bytes_limit"),
                  state_bytes=_state_bytes(c))
  print("GPU_CHECK_RESULT " + json.dumps(result), flush=True)


def _state_bytes(c):
  """Bytes of params + SGD/AdamW state + BN statistics (float32), from the abstract model."""
  import jax
  from maskrcnn_jax.modeling.build import build_model, init_variables
  model = build_model(c, train=True)
  shapes = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0)))
  params = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes["params"]))
  other = sum(np.prod(x.shape) * x.dtype.itemsize
              for x in jax.tree.leaves(shapes.get("batch_stats", {})))
  moments = 2 if c.optim.get("name", "sgd") == "adamw" else 1
  return int(params * (1 + moments) + other)


def run_train(args, dtype, batch, timeout):
  cmd = [sys.executable, str(Path(__file__).resolve()), "--train-one", "--dtype", dtype,
         "--batch", str(batch), "--recipe", args.recipe] + (["--dry"] if args.dry else [])
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1))
  except subprocess.TimeoutExpired:
    return dict(error=f"timed out after {timeout:.0f} s")
  for line in proc.stdout.splitlines():
    if line.startswith("GPU_CHECK_RESULT "):
      return json.loads(line[len("GPU_CHECK_RESULT "):])
  return dict(error=f"exit {proc.returncode}: {proc.stderr[-400:]}")


def _gb(b):
  return None if b is None else b / 1e9


def _train_row(report, section, dtype, batch, r):
  name = f"{dtype} batch {batch}"
  if "error" in r:
    report.add(section, name, r, f"FAILED {r['error'][:160]}")
    return
  peak = _gb(r.get("peak_bytes"))
  zoo = MMDET_ZOO_MEM_GB.get(dtype if dtype != "bfloat16" else "float16")
  report.add(section, name, r, f"{r['images_per_s']:.2f} img/s, step "
             f"{r['step_s_median'] * 1e3:.1f} ms, peak "
             + (f"{peak:.2f} GB" if peak is not None else "n/a (no device memory stats)")
             + (f" (mmdet zoo Mem {zoo} GB{' FP16' if dtype != 'float32' else ''})"
                if zoo and section == "train" else ""))


def section_train(args, report, budget):
  # Dry: bfloat16 only (the mixed-precision path; each compilation of the model costs a minute).
  for dtype in ("bfloat16",) if args.dry else ("bfloat16", "float32"):
    r = run_train(args, dtype, 2, budget.left())
    report.train_b2[dtype] = r
    _train_row(report, "train", dtype, 2, r)


def largest_batch_estimate(r, fraction=0.9):
  """The batch that the batch-2 peak memory predicts fits (module docstring), or None."""
  peak, limit, state = r.get("peak_bytes"), r.get("bytes_limit"), r.get("state_bytes")
  if not peak or not limit or state is None:
    return None
  per_image = max((peak - state) / 2, 1)
  return max(int((fraction * limit - state) // per_image), 2)


def section_largest_batch(args, report, budget):
  for dtype in ("bfloat16", "float32"):
    batch = largest_batch_estimate(report.train_b2.get(dtype, {}))
    if batch is None:
      report.add("largest_batch", dtype, {}, "skipped: no batch-2 peak memory to extrapolate from")
      continue
    r = run_train(args, dtype, batch, budget.left())
    if r.get("oom"):
      batch = max(2, batch * 3 // 4)
      r = run_train(args, dtype, batch, budget.left())
    _train_row(report, "largest_batch", dtype, batch, r)


def _variables(args, config, model):
  import jax
  if args.dry:
    from maskrcnn_jax.modeling.build import init_variables
    return init_variables(model, jax.random.PRNGKey(0))
  from benchmark_eval import seeded_variables
  return seeded_variables(config, args.recipe)


def section_inference(args, report):
  import jax
  import jax.numpy as jnp
  from benchmark_roi_align import median_time
  from maskrcnn_jax.modeling.build import build_model
  config = load_config(args)
  model = build_model(config)
  variables = jax.device_put(_variables(args, config, model))
  size = int(config.data.test_short), int(config.data.test_max_size)
  div = int(config.data.get("size_divisibility", 32) or 1)
  h, w = -(-size[0] // div) * div, -(-max(size) // div) * div  # a landscape test image, padded
  infer = jax.jit(lambda v, im, ihw, sc: model.apply(v, im, ihw, ihw, sc))
  rng = np.random.default_rng(0)
  for batch in ((1,) if args.dry else (1, 8)):  # dry: one compilation
    images = jnp.asarray(rng.standard_normal((batch, h, w, 3)), jnp.float32)
    ihw = jnp.tile(jnp.asarray([[h, w]], jnp.int32), (batch, 1))
    t = median_time(infer, (variables, images, ihw, jnp.ones((batch, 2), jnp.float32)),
                    2 if args.dry else 10)[0]
    what = "latency" if batch == 1 else "batched"
    report.add("inference", f"batch {batch} at {h}x{w}", dict(batch=batch, ms=t * 1e3,
                                                              images_per_s=batch / t),
               f"{what}: {t * 1e3:.1f} ms per batch, {batch / t:.2f} img/s")


def section_evaluation(args, report):
  import jax
  from benchmark_eval import measure_eval
  from maskrcnn_jax.modeling.build import build_model
  config = load_config(args)
  variables = jax.device_get(_variables(args, config, build_model(config)))
  kw = (dict(num_images=2, batch_size_per_device=1, num_workers=0, repeats=1,
             image_size=(48, 64)) if args.dry else
        dict(num_images=32, batch_size_per_device=4, num_workers=min(8, os.cpu_count() or 1),
             repeats=3))
  figures, _, _ = measure_eval(config, variables, log=lambda m: None, **kw)
  report.add("evaluation", f"{figures['images']} images, batch {kw['batch_size_per_device']}",
             figures, f"{figures['images_per_s']:.2f} img/s whole evaluation (paste + RLE + "
             f"COCOeval included), device only {figures['device_only_images_per_s']:.2f} img/s")


class Budget:
  def __init__(self, seconds):
    self.end = time.monotonic() + seconds

  def left(self):
    return self.end - time.monotonic()


class Report:
  def __init__(self):
    self.rows = []
    self.train_b2 = {}

  def add(self, section, name, data, text):
    self.rows.append(dict(section=section, name=name, data=data, text=text))
    print(f"[{section}] {name}: {text}", flush=True)

  def markdown(self, header):
    lines = [header, "", "| section | check | result |", "| --- | --- | --- |"]
    lines += [f"| {r['section']} | {r['name']} | {r['text']} |" for r in self.rows]
    return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="gpu_check")
  parser.add_argument("--dry", action="store_true", help="tiny shapes, interpreted kernels, CPU")
  parser.add_argument("--recipe", default=RECIPE)
  parser.add_argument("--budget-s", type=float, default=450.0)
  parser.add_argument("--sections", default="kernels,kernel_speed,train,inference,evaluation,"
                      "largest_batch")
  parser.add_argument("--train-one", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.train_one:
    return train_one(args)

  import jax
  import jaxlib
  device = jax.devices()[0]
  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu and not args.dry:
    print("no GPU here (jax.default_backend() = %r): run with --dry to check the script"
          % jax.default_backend(), file=sys.stderr)
    return 2
  budget = Budget(args.budget_s)
  costs = DRY_COST_S if args.dry else COST_S
  report = Report()
  t0 = time.monotonic()
  sections = dict(kernels=lambda: section_kernels(args, report),
                  kernel_speed=lambda: section_kernel_speed(args, report),
                  train=lambda: section_train(args, report, budget),
                  inference=lambda: section_inference(args, report),
                  evaluation=lambda: section_evaluation(args, report),
                  largest_batch=lambda: section_largest_batch(args, report, budget))
  timings = {}
  for name in args.sections.split(","):
    if args.dry and name == "largest_batch":
      report.add(name, "-", {}, "skipped in dry mode (no device memory to extrapolate)")
      continue
    if budget.left() < costs[name]:
      report.add(name, "-", {}, f"skipped: {budget.left():.0f} s of the budget left, "
                 f"~{costs[name]} s needed")
      continue
    t = time.monotonic()
    try:
      sections[name]()
    except Exception as e:
      traceback.print_exc()
      report.add(name, "-", dict(error=repr(e)[:500]), f"FAILED {type(e).__name__}: {e}"[:200])
    timings[name] = round(time.monotonic() - t, 1)
  meta = dict(device=f"{device.platform} {getattr(device, 'device_kind', '')}",
              num_devices=jax.device_count(), jax=jax.__version__, jaxlib=jaxlib.__version__,
              dry=args.dry, recipe="dry (quickstart model at 64 px)" if args.dry else args.recipe,
              section_seconds=timings, total_seconds=round(time.monotonic() - t0, 1))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
    json.dump(dict(meta=meta, results=report.rows), f, indent=1, default=float)
  header = (f"GPU check: {meta['device']} x{meta['num_devices']}, jax {meta['jax']}, "
            f"{meta['recipe']}, {meta['total_seconds']} s" + (" (DRY: figures mean nothing)"
                                                              if args.dry else ""))
  md = report.markdown(header)
  with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
    f.write(md)
  print("\n" + md)
  failed = [r for r in report.rows if "FAIL" in r["text"]]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
