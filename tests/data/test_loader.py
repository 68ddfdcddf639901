"""TrainLoader: resumable position, process shards, prefetch-independent content."""
from __future__ import annotations

import numpy as np
import pytest

from maskrcnn_jax import config_lib
from maskrcnn_jax.data import builtin
from maskrcnn_jax.data import coco
from maskrcnn_jax.data import loader


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
  paths = builtin.ensure_builtin_dataset(tmp_path_factory.mktemp("shapes"), num_train=20,
                                         num_val=5, image_size=48, seed=1)
  return coco.CocoDataset(*paths["train"], convention="mmdet")


def _config():
  c = config_lib.mask_rcnn(convention="mmdet")
  c.data.train_short = (40, 56)
  c.data.train_short_mode = "range"
  c.data.train_max_size = 64
  c.data.train_buckets = ((64, 64),)
  c.data.max_instances = 6
  c.data.gt_mask_size = 12
  return c


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_gives_the_same_batches(ds):
  cfg = _config()
  with loader.TrainLoader(ds, cfg, seed=3, global_batch=6, num_workers=2) as run:
    assert run.steps_per_epoch == 3
    first = [next(run) for _ in range(2)]
    state = run.state()
    assert state == dict(epoch=0, step_in_epoch=2)
    rest = [next(run) for _ in range(4)]  # crosses into epoch 1
    assert run.state() == dict(epoch=2, step_in_epoch=0)
  # A fresh loader (synchronous this time: prefetch must not matter) restored from the state.
  with loader.TrainLoader(ds, cfg, seed=3, global_batch=6, num_workers=0) as resumed:
    resumed.restore(state)
    for want in rest:
      _assert_same(next(resumed), want)
  with loader.TrainLoader(ds, cfg, seed=3, global_batch=6, num_workers=0) as again:
    _assert_same(next(again), first[0])
    again.set_position_from_step(4)
    _assert_same(next(again), rest[2])
  # Restoring in the middle of prefetching discards the prefetched batches.
  with loader.TrainLoader(ds, cfg, seed=3, global_batch=6, num_workers=2) as run:
    next(run)
    run.restore(dict(epoch=1, step_in_epoch=0))
    _assert_same(next(run), rest[1])
  with pytest.raises(ValueError):
    run.restore(dict(epoch=0, step_in_epoch=3))


def test_epochs_are_permutations(ds):
  with loader.TrainLoader(ds, _config(), seed=0, global_batch=5, num_workers=0) as run:
    assert run.steps_per_epoch == 4
    for epoch in range(2):
      ids = [i for s in range(4) for i in run.batch_image_ids(epoch, s)]
      assert sorted(ids) == sorted(run.image_ids)
    assert run.batch_image_ids(0, 0) != run.batch_image_ids(1, 0)


def test_process_shards_are_disjoint_and_cover_the_global_batch(ds):
  cfg = _config()
  whole = loader.TrainLoader(ds, cfg, seed=7, global_batch=8, num_workers=0)
  shards = [loader.TrainLoader(ds, cfg, seed=7, global_batch=8, process_index=p, process_count=4,
                               num_workers=0) for p in range(4)]
  for step in range(2):
    parts = [s.batch_image_ids(0, step) for s in shards]
    assert all(len(p) == 2 for p in parts)
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == 8 and flat == whole.batch_image_ids(0, step)
    batches = [next(s) for s in shards]
    full = next(whole)
    for k in full:
      np.testing.assert_array_equal(np.concatenate([b[k] for b in batches]), full[k], err_msg=k)
  with pytest.raises(ValueError, match="multiple"):
    loader.TrainLoader(ds, cfg, seed=0, global_batch=6, process_count=4)


def test_batch_contents(ds):
  with loader.TrainLoader(ds, _config(), seed=0, global_batch=4, num_workers=2) as run:
    batch = next(run)
  assert batch["image"].shape == (4, 64, 64, 3) and batch["gt_masks"].shape == (4, 6, 12, 12)
  assert np.all(batch["gt_valid"].sum(1) >= 1)
  hw = batch["image_hw"]
  assert np.all((hw >= 40) & (hw <= 56))


def test_eval_batches(tmp_path_factory, ds):
  cfg = _config()
  cfg.data.test_short = 48
  cfg.data.test_max_size = 64
  seen = []
  for p in range(2):
    for batch in loader.eval_batches(ds, cfg, batch_size=4, process_index=p, process_count=2,
                                     num_workers=0):
      assert batch["image"].shape == (4, 64, 64, 3)
      seen += batch["image_id"][batch["example_valid"]].tolist()
  assert seen == ds.image_ids
