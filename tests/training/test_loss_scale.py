"""float16 loss scaling (training/loss_scale.py): the GradScaler rule, skipped steps in the train
step, and exact resume of the scale from a checkpoint (TinyDetector on the built-in data)."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from maskrcnn_jax.training import loss_scale as loss_scale_lib
from maskrcnn_jax.training import sharding, train_state, trainer
from tests.training import tiny


def test_dynamic_rule_backoff_and_growth():
  ls = loss_scale_lib.LossScale(init_scale=512.0, growth_interval=3)
  s = ls.init()
  s = ls.update(s, jnp.asarray(False))  # overflow: halved, tracker reset, counted
  assert float(s.scale) == 256.0 and int(s.good_steps) == 0 and int(s.skipped) == 1
  for expected_good in (1, 2):
    s = ls.update(s, jnp.asarray(True))
    assert float(s.scale) == 256.0 and int(s.good_steps) == expected_good
  s = ls.update(s, jnp.asarray(True))  # the 3rd good step in a row: doubled, tracker reset
  assert float(s.scale) == 512.0 and int(s.good_steps) == 0 and int(s.skipped) == 1
  s = ls.update(ls.update(s, jnp.asarray(True)), jnp.asarray(False))  # an overflow resets growth
  assert float(s.scale) == 256.0 and int(s.good_steps) == 0 and int(s.skipped) == 2


def test_static_scale_skips_but_keeps_the_scale():
  ls = loss_scale_lib.LossScale(init_scale=512.0, dynamic=False)
  s = ls.update(ls.init(), jnp.asarray(False))
  for _ in range(5):
    s = ls.update(s, jnp.asarray(True))
  assert float(s.scale) == 512.0 and int(s.skipped) == 1
  grads = {"w": jnp.asarray([512.0, -1024.0], jnp.float16)}
  np.testing.assert_array_equal(ls.unscale(s, grads)["w"], [1.0, -2.0])
  assert ls.unscale(s, grads)["w"].dtype == jnp.float32


def _cfg(dtype, loss_scale="none"):
  c = ml_collections.ConfigDict({"model": {"dtype": dtype}, "train": {"loss_scale": loss_scale}})
  return c


def test_from_config():
  assert loss_scale_lib.from_config(_cfg("float32")) is None
  assert loss_scale_lib.from_config(_cfg("bfloat16")) is None
  assert loss_scale_lib.from_config(_cfg("float16")) == loss_scale_lib.LossScale()
  assert loss_scale_lib.from_config(_cfg("float16", "512.")) == loss_scale_lib.LossScale(
      init_scale=512.0, dynamic=False)
  assert loss_scale_lib.from_config(_cfg("float16", "dynamic")).dynamic
  assert loss_scale_lib.from_config(
      _cfg("float16", {"init_scale": 8.0, "growth_interval": 5})).growth_interval == 5
  with pytest.raises(ValueError, match="loss_scale"):
    loss_scale_lib.from_config(_cfg("float16", "large"))
  with pytest.raises(ValueError, match="unknown keys"):
    loss_scale_lib.from_config(_cfg("float16", {"scale": 8.0}))


def _tiny_step(cache_dir, ls):
  from maskrcnn_jax.data import coco as coco_lib, loader as loader_lib
  config = tiny.tiny_config(cache_dir, steps=4, batch=2)
  trainer.resolve_data(config)
  data = coco_lib.CocoDataset(config.data.train_json, config.data.train_images,
                              convention=config.convention)
  loader = loader_lib.TrainLoader(data, config, seed=0, global_batch=2)
  batch = trainer._take_train_keys(next(loader))  # pylint: disable=protected-access
  loader.close()
  model = tiny.TinyDetector(num_classes=5)
  variables = model.init(jax.random.PRNGKey(0), {k: jnp.asarray(v) for k, v in batch.items()},
                         jax.random.PRNGKey(1), method=model.losses)
  tx = optax.sgd(0.01)
  mesh = sharding.make_mesh(1)
  state = train_state.place_state(
      train_state.create_train_state(dict(variables), tx, jax.random.PRNGKey(2), loss_scale=ls),
      mesh)
  step = train_state.make_train_step(model, tx, lambda s: 0.01, mesh, state,
                                     compute_dtype=jnp.float16, donate=False, loss_scale=ls)
  return state, step, sharding.shard_batch(batch, mesh), mesh


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def test_float16_step_overflow_is_skipped_and_the_scale_halved(cache_dir):
  ls = loss_scale_lib.LossScale(init_scale=2.0 ** 15, growth_interval=2)
  state, step, batch, mesh = _tiny_step(cache_dir, ls)
  # A scale of 2**15 on losses of O(1) keeps float16 finite: the step applies.
  s1, m1 = step(state, batch)
  assert float(m1["finite"]) == 1 and float(m1["skipped_steps"]) == 0
  assert float(m1["loss_scale"]) == 2.0 ** 15 and int(s1.step) == 1
  assert not np.array_equal(s1.params["bbox_pred"]["kernel"], state.params["bbox_pred"]["kernel"])
  # Images of 1e5 overflow float16 (max 65504) in the first conv: the step is skipped, the state
  # keeps its values, the step counter moves on, the scale is halved and the skip counted; the
  # trainer is not stopped (finite = 1).
  huge = dict(batch, image=sharding.shard_batch({"x": np.asarray(batch["image"]) * 0 + 1e5},
                                                mesh)["x"])
  s2, m2 = step(s1, huge)
  assert not np.isfinite(float(m2["grad_norm"]))
  assert float(m2["finite"]) == 1 and float(m2["skipped_steps"]) == 1
  assert int(s2.step) == 2 and float(s2.loss_scale.scale) == 2.0 ** 14
  for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s1.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(s2.opt_state), jax.tree.leaves(s1.opt_state)):
    np.testing.assert_array_equal(a, b)
  # Two good steps in a row (growth_interval 2): the scale doubles again.
  s4, m4 = step(*step(s2, batch)[:1], batch)
  assert float(s4.loss_scale.scale) == 2.0 ** 15 and int(s4.loss_scale.skipped) == 1
  # The unscaled gradients: the same update as float16 without scaling would give (up to float16
  # rounding), i.e. the scale is divided out.
  plain = train_state.make_train_step(tiny.TinyDetector(num_classes=5), optax.sgd(0.01),
                                      lambda s: 0.01, mesh, state.replace(loss_scale=None),
                                      compute_dtype=jnp.float16, donate=False)
  p1, _ = plain(state.replace(loss_scale=None), batch)
  np.testing.assert_allclose(s1.params["bbox_pred"]["kernel"], p1.params["bbox_pred"]["kernel"],
                             rtol=2e-3, atol=1e-5)


def test_float16_resume_restores_the_scale_exactly(tmp_path, cache_dir):
  config = tiny.tiny_config(cache_dir, steps=6)
  config.model.dtype = "float16"
  # Grows every 2 good steps and starts high enough to overflow at first: the scale moves. (The
  # dict form replaces the string field.)
  del config.train["loss_scale"]
  config.train.loss_scale = ml_collections.ConfigDict(dict(init_scale=2.0 ** 24,
                                                           growth_interval=2))
  run = lambda d, **kw: trainer.train_and_evaluate(config, str(d), model=tiny.TinyDetector(
      num_classes=5), **kw)
  full = run(tmp_path / "full")
  first = run(tmp_path / "split", stop_after=3)
  assert first["step"] == 3
  second = run(tmp_path / "split")
  assert second["step"] == 6
  a, b = jax.device_get(full["state"].loss_scale), jax.device_get(second["state"].loss_scale)
  assert (float(a.scale), int(a.good_steps), int(a.skipped)) == (
      float(b.scale), int(b.good_steps), int(b.skipped))
  assert int(a.skipped) >= 1  # the start overflowed: scaling was exercised
  assert tiny.workdir_losses(str(tmp_path / "full")) == tiny.workdir_losses(
      str(tmp_path / "split"))
  for x, y in zip(jax.tree.leaves(full["state"].params), jax.tree.leaves(second["state"].params)):
    np.testing.assert_array_equal(x, y)
  # The scale and the skipped count are logged per step.
  with open(tmp_path / "full" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f if "train/loss_scale" in line]
  assert len(rows) == 6 and rows[-1]["train/skipped_steps"] == int(a.skipped)
  assert os.path.isdir(tmp_path / "full" / "checkpoints")


def test_collapsed_dynamic_scale_stops_the_run(cache_dir):
  """An overflow that takes the dynamic scale below min_scale reports the step as non-finite,
  which the trainer turns into NonFiniteLossError."""
  ls = loss_scale_lib.LossScale(init_scale=2.0 ** -14)
  state, step, batch, mesh = _tiny_step(cache_dir, ls)
  huge = dict(batch, image=sharding.shard_batch({"x": np.asarray(batch["image"]) * 0 + 1e5},
                                                mesh)["x"])
  new, metrics = step(state, huge)
  assert float(new.loss_scale.scale) == 2.0 ** -15 and float(metrics["finite"]) == 0
