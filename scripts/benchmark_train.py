"""Training throughput (images/s) of a recipe at its real training image size on the current devices.

  python scripts/benchmark_train.py --config configs/mmdet/mask_rcnn_r50_fpn_1x_coco.py
  python scripts/benchmark_train.py --config configs/quickstart.py --steps 5
  python scripts/benchmark_train.py --config configs/detectron2/mask_rcnn_R_50_FPN_1x.py \
      --batch_per_device 2 --config.model.dtype=bfloat16

Measures the jitted, mesh-sharded train step alone (the one `maskrcnn_jax.train` runs: uint8 image
normalization, forward, targets, losses, backward, SGD update) on synthetic batches in the loader's
format, so the number is the device's, not the data loader's. The image size is the recipe's first
training bucket (800 x 1344, the landscape one, for short 800 / max 1333) unless --height/--width
are given; each image holds `--instances` random boxes with random masks.
Prints compile time, per-step times and images/s, and appends a JSON line to --json if given.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np


def synthetic_batch(config, batch: int, hw, instances: int, seed: int = 0):
  """A fixed-shape training batch like the loader's: boxes inside the image, random crops."""
  from maskrcnn_jax.data import pipeline
  rng = np.random.default_rng(seed)
  h, w = hw
  m = int(pipeline.data_option(config, "max_instances"))
  s = int(pipeline.data_option(config, "gt_mask_size"))
  k = min(instances, m)
  image = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
  if pipeline.device_normalization(config) is None:  # torchvision: float32 from the host
    image = rng.standard_normal((batch, h, w, 3)).astype(np.float32)
  xy = rng.uniform(0, 0.7, (batch, m, 2)) * np.array([w, h])
  wh = rng.uniform(0.05, 0.3, (batch, m, 2)) * np.array([w, h])
  boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], -1).astype(np.float32)
  valid = np.zeros((batch, m), bool)
  valid[:, :k] = True
  yy, xx = np.mgrid[:s, :s]
  ellipse = (((yy - s / 2 + 0.5) / (s / 2)) ** 2 + ((xx - s / 2 + 0.5) / (s / 2)) ** 2) <= 1
  return dict(
      image=image, image_hw=np.tile(np.array([[h, w]], np.int32), (batch, 1)),
      gt_boxes=np.where(valid[..., None], boxes, 0).astype(np.float32),
      gt_labels=rng.integers(0, int(config.model.num_classes), (batch, m)).astype(np.int32),
      gt_valid=valid, gt_crowd=np.zeros((batch, m), bool),
      gt_masks_bits=np.broadcast_to(np.packbits(ellipse, axis=-1), (batch, m, s, (s + 7) // 8))
      .copy())


def time_train_step(c, global_batch: int, hw, *, instances: int = 7, steps: int = 10,
                    warmup: int = 2, mesh=None):
  """Compiles and times the recipe's jitted train step on a synthetic batch.

  Returns dict(compile_s, step_s_median, step_s_min, images_per_s, loss, global_batch, image_hw,
  dtype); raises whatever the step raises (an out-of-memory error included).
  """
  import jax
  import jax.numpy as jnp
  from maskrcnn_jax.modeling.build import build_model, init_variables
  from maskrcnn_jax.training import loss_scale as loss_scale_lib
  from maskrcnn_jax.training import optimizer, sharding, train_state, trainer

  mesh = sharding.make_mesh(-1) if mesh is None else mesh
  loss_scale = loss_scale_lib.from_config(c)  # float16: the run's loss scaling
  model = build_model(c, train=True)
  variables = init_variables(model, jax.random.PRNGKey(0))
  schedule = optimizer.make_schedule(c, global_batch=global_batch, steps_per_epoch=1000)
  tx = optimizer.build_optimizer(c, variables["params"], schedule)
  state = train_state.place_state(
      train_state.create_train_state(variables, tx, jax.random.PRNGKey(1),
                                     loss_scale=loss_scale), mesh)
  # The sampler settings the trainer passes (train.rpn/roi_batch_per_image; the references' 256 /
  # 512 when unset): at small image sizes the RoI heads dominate the step.
  loss_kwargs = trainer.sampler_kwargs(c.train)
  step_fn = train_state.make_train_step(
      model, tx, schedule, mesh, state, compute_dtype=jnp.dtype(c.model.get("dtype", "float32")),
      loss_kwargs=loss_kwargs, loss_scale=loss_scale, prepare_batch=trainer.prepare_batch_fn(c))
  batch = sharding.shard_batch(synthetic_batch(c, global_batch, hw, instances), mesh)

  t0 = time.perf_counter()
  state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  times = np.asarray(times)
  return dict(global_batch=global_batch, image_hw=list(hw),
              dtype=str(c.model.get("dtype", "float32")), compile_s=round(compile_s, 2),
              step_s_median=round(float(np.median(times)), 4),
              step_s_min=round(float(times.min()), 4),
              images_per_s=round(float(global_batch / np.median(times)), 3),
              loss=float(metrics["loss"]))


def main():
  config = config_flags.DEFINE_config_file("config", None, "Recipe config file.",
                                           lock_config=False)
  batch_per_device = flags.DEFINE_integer("batch_per_device", 2, "Images per device per step.")
  steps = flags.DEFINE_integer("steps", 10, "Timed steps.")
  warmup = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  height = flags.DEFINE_integer("height", 0, "Image height (default: the recipe's bucket).")
  width = flags.DEFINE_integer("width", 0, "Image width (default: the recipe's bucket).")
  instances = flags.DEFINE_integer("instances", 7, "Instances per image (COCO mean ~7).")
  json_out = flags.DEFINE_string("json", None, "Append the result as a JSON line here.")
  flags.mark_flags_as_required(["config"])

  def run(argv):
    del argv
    import jax
    from maskrcnn_jax.data import pipeline
    from maskrcnn_jax.training import sharding

    c = config.value
    mesh = sharding.make_mesh(-1)
    n_dev = mesh.devices.size
    global_batch = batch_per_device.value * n_dev
    hw = (height.value, width.value) if height.value and width.value else \
        pipeline.train_buckets(c)[0]
    timing = time_train_step(c, global_batch, hw, instances=instances.value, steps=steps.value,
                             warmup=warmup.value, mesh=mesh)
    device = jax.devices()[0]
    result = dict(
        config=os.path.basename(sys.argv[sys.argv.index("--config") + 1])
        if "--config" in sys.argv else "", upstream=c.get("upstream", ""),
        device=f"{device.platform}:{getattr(device, 'device_kind', '')}", num_devices=n_dev,
        **timing)
    print(f"{result['upstream'] or result['config']}: {result['device']} x{n_dev}, batch "
          f"{global_batch} of {hw[0]}x{hw[1]}, {result['dtype']}: compile "
          f"{timing['compile_s']:.1f} s, step {timing['step_s_median'] * 1e3:.1f} ms (median of "
          f"{steps.value}), {timing['images_per_s']:.2f} img/s")
    if json_out.value:
      with open(json_out.value, "a") as f:
        f.write(json.dumps(result) + "\n")

  app.run(run)


if __name__ == "__main__":
  main()
