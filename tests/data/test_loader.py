"""TrainLoader: resumable position, process shards, prefetch-independent content."""
from __future__ import annotations

import json
import logging

import cv2
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
  assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.uint8
  assert batch["gt_masks_bits"].shape == (4, 6, 12, 2)  # 12 bits packed into 2 bytes
  assert np.all(batch["gt_valid"].sum(1) >= 1)
  hw = batch["image_hw"]
  assert np.all((hw >= 40) & (hw <= 56))


# A dataset of landscape (32 x 48), portrait (48 x 32) and square (40 x 40) images. Image 2's file
# is not an image; image 5's polygon holds a string (a bad annotation the json check lets through).
LANDSCAPE = [i for i in range(1, 25) if i % 5 in (1, 2, 4)]
SQUARE = [9]
PORTRAIT = [i for i in range(1, 25) if i not in LANDSCAPE and i not in SQUARE]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
  root = tmp_path_factory.mktemp("mixed")
  rng = np.random.default_rng(0)
  images, anns = [], []
  for i in range(1, 25):
    h, w = (32, 48) if i in LANDSCAPE else (40, 40) if i in SQUARE else (48, 32)
    name = f"{i}.png"
    if i == 2:
      (root / name).write_bytes(b"not a png")
    else:
      cv2.imwrite(str(root / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    images.append(dict(id=i, file_name=name, height=h, width=w))
    poly = [2.0, 3.0, w - 5.0, 4.0, w / 2, h - 2.0]
    if i == 5:
      poly[2] = "x"
    anns.append(dict(id=i, image_id=i, category_id=1 + i % 3, iscrowd=0, area=50.0,
                     bbox=[2.0, 3.0, w - 7.0, h - 5.0], segmentation=[poly]))
  cats = [dict(id=c, name=str(c)) for c in (1, 2, 3)]
  (root / "ann.json").write_text(json.dumps(dict(images=images, annotations=anns,
                                                 categories=cats)))
  return coco.CocoDataset(str(root / "ann.json"), str(root), convention="mmdet")


def _mixed_config():
  c = config_lib.mask_rcnn(convention="mmdet")
  c.data.train_short = (32,)
  c.data.train_max_size = 48
  c.data.size_divisibility = 16
  c.data.max_instances = 3
  c.data.gt_mask_size = 8
  return c


def test_aspect_ratio_buckets(mixed):
  """Default buckets: landscape (32 x 48) and portrait (48 x 32; the square image joins it); each
  global batch is one bucket, in the order the buckets fill along the epoch's permutation."""
  cfg = _mixed_config()
  with loader.TrainLoader(mixed, cfg, seed=1, global_batch=4, num_workers=0) as run:
    assert run.buckets == [(32, 48), (48, 32)]
    assert run.steps_per_epoch == len(LANDSCAPE) // 4 + (len(PORTRAIT) + 1) // 4 == 5
    for epoch in range(2):
      perm = np.random.default_rng((1, epoch)).permutation(len(run.image_ids))
      where = {run.image_ids[j]: q for q, j in enumerate(perm)}  # image id -> perm position
      seen, last = [], -1
      for step in range(run.steps_per_epoch):
        ids = run.batch_image_ids(epoch, step)
        bucket = run.batch_bucket(epoch, step)
        assert set(ids) <= set(LANDSCAPE if bucket == (32, 48) else PORTRAIT + SQUARE)
        # Within a batch: the bucket's images in permutation order; batches ordered by their last.
        assert [where[i] for i in ids] == sorted(where[i] for i in ids)
        assert where[ids[-1]] > last
        last = where[ids[-1]]
        seen += ids
      assert len(set(seen)) == len(seen) == 20  # 4 images left over: 2 landscape, 2 portrait
    run.restore(dict(epoch=0, step_in_epoch=0))
    for step in range(run.steps_per_epoch):
      batch = next(run)
      assert batch["image"].shape[1:3] == run.batch_bucket(0, step)
  # Explicit buckets: one square bucket is one group, the plain permutation cut into batches.
  cfg.data.train_buckets = ((48, 48),)
  with loader.TrainLoader(mixed, cfg, seed=1, global_batch=4, num_workers=0) as run:
    perm = np.random.default_rng((1, 0)).permutation(len(run.image_ids))
    assert run.steps_per_epoch == 6
    assert run.batch_image_ids(0, 1) == [run.image_ids[j] for j in perm[4:8]]


def test_workers_give_the_same_batches_skips_and_resume(mixed, caplog):
  """Worker processes (grain) and synchronous loading give the same batches and the same skipped
  samples (a corrupt image, a bad polygon), named and counted; a restored loader with workers
  continues with the same batches."""
  cfg = _mixed_config()
  # Seed 3 draws image 2 in steps 3 and 8, image 5 in steps 4 and 9 (of 5 per epoch).
  with loader.TrainLoader(mixed, cfg, seed=3, global_batch=4, num_workers=0) as sync:
    want = [next(sync) for _ in range(10)]
    want_skipped = sync.skipped_samples
  assert [i for i, _ in want_skipped] == [2, 5, 2, 5] and sync.skipped == 4
  assert "TypeError" in want_skipped[1][1] or "ValueError" in want_skipped[1][1]
  with caplog.at_level(logging.WARNING), loader.TrainLoader(
      mixed, cfg, seed=3, global_batch=4, num_workers=2) as run:
    got = [next(run) for _ in range(4)]
    state = run.state()
    got += [next(run) for _ in range(6)]
    assert run.skipped_samples == want_skipped
  for a, b in zip(got, want):
    _assert_same(a, b)
  assert "image id 2 (2.png)" in caplog.text and "image id 5 (5.png)" in caplog.text
  assert "4 skipped so far" in caplog.text
  with loader.TrainLoader(mixed, cfg, seed=3, global_batch=4, num_workers=2) as resumed:
    resumed.restore(state)
    for w in want[4:]:
      _assert_same(next(resumed), w)
