"""The real Mask R-CNN through the trainer (slow: each compiles the full train step for minutes on
CPU). Run with MASKRCNN_JAX_SLOW_TESTS=1.

* end to end: 2 steps on a 64 px built-in dataset, checkpoint, final COCO evaluation -> metrics.json;
* 1 vs 8 devices: the same global batch gives the same loss and parameters (subprocess with
  --xla_force_host_platform_device_count=8);
* bfloat16 mixed precision: finite, float32 master weights;
* the mmdet fp16 recipe: two float16 steps with its static loss scale 512.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(os.environ.get("MASKRCNN_JAX_SLOW_TESTS") != "1",
                                reason="slow (set MASKRCNN_JAX_SLOW_TESTS=1)")


def _small_config(cache_dir, steps=2):
  from maskrcnn_jax import config_lib
  c = config_lib.load_config_file(os.path.join(REPO, "configs", "quickstart.py"))
  c.data.builtin = dict(num_train=8, num_val=4, image_size=64, seed=0, cache_dir=cache_dir)
  c.data.train_short, c.data.train_max_size = (64,), 64
  c.data.test_short, c.data.test_max_size = 64, 64
  c.schedule.update(length=steps, warmup_steps=1)
  c.train.update(global_batch=2, log_every=1, checkpoint_every=1)
  return c


def test_end_to_end_real_model(tmp_path):
  from maskrcnn_jax.training import trainer
  config = _small_config(str(tmp_path / "data"))
  result = trainer.train_and_evaluate(config, str(tmp_path / "w"))
  assert result["step"] == 2
  metrics = json.load(open(tmp_path / "w" / "metrics.json"))
  assert set(metrics) >= {"bbox", "segm"} and "AP" in metrics["segm"]
  assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["1", "2"]
  for k in ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask"):
    assert np.isfinite(result["history"][-1][k]), k


SCRIPT = textwrap.dedent("""
  import json, sys
  import jax, numpy as np
  sys.path.insert(0, {repo!r})
  sys.path.insert(0, {repo!r} + "/scripts")
  from benchmark_train import synthetic_batch
  from maskrcnn_jax import config_lib
  from maskrcnn_jax.modeling.build import build_model, init_variables
  from maskrcnn_jax.training import optimizer, sharding, train_state, trainer
  c = config_lib.load_config_file({repo!r} + "/configs/quickstart.py")
  c.model.num_classes = 5
  # SGD: Adam (the quickstart's) scales near-zero gradients to full-size updates, which would turn
  # summation-order noise into parameter differences this test must not see.
  c.optim.name = "sgd"
  model = build_model(c, train=True)
  variables = init_variables(model, jax.random.PRNGKey(0))
  batch = synthetic_batch(c, 8, (64, 64), 3)
  sched = optimizer.Schedule(peak_lr=0.01, total_steps=10)
  out = {{}}
  for n in (1, 8):
    mesh = sharding.make_mesh(n)
    tx = optimizer.build_optimizer(c, variables["params"], sched)
    st = train_state.place_state(
        train_state.create_train_state(variables, tx, jax.random.PRNGKey(1)), mesh)
    step = train_state.make_train_step(model, tx, sched, mesh, st, donate=False,
                                       loss_kwargs=dict(roi_batch_per_image=32),
                                       prepare_batch=trainer.prepare_batch_fn(c))
    losses = []
    for _ in range(2):
      st, m = step(st, sharding.shard_batch(batch, mesh))
      losses.append(float(m["loss"]))
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(st.params))]
    np.savez({out!r} + f"/p{{n}}.npz", *leaves)
    out[n] = losses
  print("RESULT", json.dumps(out))
""")


def test_one_vs_eight_devices_real_model(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
             " --xla_force_host_platform_device_count=8")
  p = subprocess.run([sys.executable, "-c", SCRIPT.format(repo=REPO, out=str(tmp_path))],
                     env=env, capture_output=True, text=True, timeout=3600)
  assert p.returncode == 0, p.stdout + p.stderr
  line = [l for l in p.stdout.splitlines() if l.startswith("RESULT")][-1]
  losses = json.loads(line[len("RESULT "):])
  np.testing.assert_allclose(losses["8"], losses["1"], rtol=1e-4)
  p1, p8 = np.load(tmp_path / "p1.npz"), np.load(tmp_path / "p8.npz")
  for k in p1.files:
    np.testing.assert_allclose(p8[k], p1[k], rtol=1e-3, atol=1e-5, err_msg=k)


def test_bfloat16_step_keeps_float32_master_weights(tmp_path):
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  from benchmark_train import synthetic_batch
  from maskrcnn_jax import config_lib
  from maskrcnn_jax.modeling.build import build_model, init_variables
  from maskrcnn_jax.training import optimizer, sharding, train_state, trainer
  c = config_lib.load_config_file(os.path.join(REPO, "configs", "quickstart.py"))
  c.model.num_classes = 5
  model = build_model(c, train=True)
  variables = init_variables(model, jax.random.PRNGKey(0))
  mesh = sharding.make_mesh(1)
  sched = optimizer.Schedule(peak_lr=0.01, total_steps=10)
  tx = optimizer.build_optimizer(c, variables["params"], sched)
  st = train_state.place_state(
      train_state.create_train_state(variables, tx, jax.random.PRNGKey(1)), mesh)
  step = train_state.make_train_step(model, tx, sched, mesh, st, compute_dtype=jnp.bfloat16,
                                     loss_kwargs=dict(roi_batch_per_image=32),
                                     prepare_batch=trainer.prepare_batch_fn(c))
  st, m = step(st, sharding.shard_batch(synthetic_batch(c, 2, (64, 64), 3), mesh))
  assert np.isfinite(float(m["loss"])) and float(m["finite"]) == 1.0
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(st.params))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(st.opt_state)
             if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating))


def test_mmdet_fp16_recipe_trains_in_float16(tmp_path):
  """configs/mmdet/mask_rcnn_r50_fpn_fp16_1x_coco.py (R-50-FPN, float16 compute, mmdet's static
  loss scale 512) at 64 px: two train steps of the real model, as the trainer builds them."""
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  from benchmark_train import time_train_step
  from maskrcnn_jax import config_lib
  c = config_lib.load_config_file(
      os.path.join(REPO, "configs", "mmdet", "mask_rcnn_r50_fpn_fp16_1x_coco.py"))
  assert c.model.dtype == "float16" and c.train.loss_scale == "512."
  c.train.roi_batch_per_image = 32
  result = time_train_step(c, 2, (64, 64), instances=3, steps=1, warmup=1)
  assert result["dtype"] == "float16" and np.isfinite(result["loss"])
