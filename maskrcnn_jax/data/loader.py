"""Deterministic, resumable, sharded training batches, loaded in worker processes (grain).

`TrainLoader` makes the batch at (epoch, step) a pure function of (seed, epoch, step, process):

* buckets: every training image (`CocoDataset.train_image_ids`) belongs to the bucket that holds
  it (`pipeline.image_bucket`, from its json size; by default landscape or portrait), and a global
  batch holds images of one bucket, padded to it, so the train step compiles once per bucket;
* epoch order: `np.random.default_rng((seed, epoch)).permutation(N)`; each bucket's images in
  that order are cut into global batches of G = global_batch, and the batches are ordered by the
  permutation position of their last image: the order in which detectron2's
  `AspectRatioGroupedDataset` emits a bucket once it fills (mmdet's `GroupSampler` also draws
  each batch from one group). The remainder (< G per bucket) is dropped, so
  `steps_per_epoch = sum over buckets of n_b // G` is the same every epoch; with a single bucket
  this is simply the permutation cut into batches;
* process p of P takes the contiguous slice [p * G / P, (p + 1) * G / P) of each global batch (the
  shards are disjoint and cover the global batch; all have the batch's bucket shape);
* the example of an image is `pipeline.train_example(..., rng=example_rng(seed, epoch, index))`
  with index the image's position in the training id list;
* a sample that fails (unreadable image, bad annotation) is logged with its image id and file,
  counted in `skipped`, and replaced by the next image of the same bucket in the epoch order
  (wrapping around), so the replacement is deterministic too. More than
  `max_consecutive_failures` failures in a row raise a RuntimeError (a broken dataset or a bug,
  not a bad sample).

`state()` returns the position of the next batch, `{'epoch': e, 'step_in_epoch': s}` (the trainer
stores it in every checkpoint); after `restore(state)` the loader yields exactly the batches an
uninterrupted run would have.

Workers: with `num_workers` > 0 the batches are made in that many processes by grain (the JAX
ecosystem's loader): `MapDataset.range(first_step, ...).map(make batch)` ->
`to_iter_dataset()` -> `mp_prefetch`, which gives worker w the global steps w, w + n, ... and
returns them in order, through shared memory. Since a batch is a pure function of its global
step, the workers change timing only, never order or content, and resuming needs no worker state:
the pipeline restarts at the restored step. Skipped samples travel back with their batch and are
counted when the batch is handed out, so the counts are deterministic too. `num_workers=0` loads
synchronously in the caller.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
import traceback
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from maskrcnn_jax import errors
from maskrcnn_jax.data import coco as coco_lib
from maskrcnn_jax.data import pipeline

logger = logging.getLogger(__name__)

# The last global step the worker pipeline ranges over (it is never reached).
_NO_END = 2 ** 62


def _describe(dataset: coco_lib.CocoDataset, image_id: int) -> str:
  try:
    return f"image id {image_id} ({dataset.image_info(image_id)['file_name']})"
  except KeyError:
    return f"image id {image_id}"


class BatchMaker:
  """The pure part of `TrainLoader`: which images form a batch, and the batch itself.

  Picklable (the dataset drops its pycocotools index), so that worker processes run it. Calling it
  with a global step g returns the batch of (epoch, step) = divmod(g, steps_per_epoch) as
  dict(batch=..., skipped=[(image_id, reason), ...], epoch=e, step=s).
  """

  def __init__(self, dataset: coco_lib.CocoDataset, config, *, seed: int, process_index: int,
               process_count: int, global_batch: int, image_ids: List[int],
               max_consecutive_failures: int):
    self.dataset = dataset
    self.config = config
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.global_batch = int(global_batch)
    self.local_batch = self.global_batch // self.process_count
    self.image_ids = list(image_ids)
    self.max_consecutive_failures = int(max_consecutive_failures)
    sizes = [(int(info["height"]), int(info["width"]))
             for info in map(dataset.image_info, self.image_ids)]
    of_size = {hw: pipeline.image_bucket(config, dataset.convention, hw) for hw in set(sizes)}
    buckets = [of_size[hw] for hw in sizes]
    self.buckets: List[Tuple[int, int]] = sorted(set(buckets))
    index = {b: i for i, b in enumerate(self.buckets)}
    self.image_bucket = np.array([index[b] for b in buckets], np.int64)  # per training image
    per_bucket = np.bincount(self.image_bucket, minlength=len(self.buckets))
    self.bucket_sizes = per_bucket.tolist()
    self.steps_per_epoch = int(np.sum(per_bucket // self.global_batch))
    self._plan_cache: Dict[int, Any] = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_plan_cache"] = {}
    return state

  def epoch_plan(self, epoch: int):
    """(orders, batch_bucket, batch_start) of an epoch: orders[b] = [n_b] int64, the training-id
    indices of bucket b in the epoch's order; global batch s takes orders[batch_bucket[s]]
    [batch_start[s] : batch_start[s] + global_batch]."""
    plan = self._plan_cache.get(epoch)
    if plan is None:
      perm = np.random.default_rng((self.seed, int(epoch))).permutation(len(self.image_ids))
      of_pos = self.image_bucket[perm]
      orders, ends, buckets, starts = [], [], [], []
      for b in range(len(self.buckets)):
        pos = np.flatnonzero(of_pos == b)
        orders.append(perm[pos])
        k = np.arange(len(pos) // self.global_batch)
        ends.append(pos[(k + 1) * self.global_batch - 1])
        buckets.append(np.full(len(k), b))
        starts.append(k * self.global_batch)
      by_end = np.argsort(np.concatenate(ends), kind="stable")
      plan = (orders, np.concatenate(buckets)[by_end], np.concatenate(starts)[by_end])
      self._plan_cache = {epoch: plan}  # one epoch at a time is enough
    return plan

  def shard(self, epoch: int, step: int,
            process_index: Optional[int] = None) -> Tuple[int, np.ndarray, int]:
    """(bucket index, that bucket's epoch order, first position of the process's shard in it)."""
    orders, batch_bucket, batch_start = self.epoch_plan(epoch)
    p = self.process_index if process_index is None else int(process_index)
    b = int(batch_bucket[step])
    return b, orders[b], int(batch_start[step]) + p * self.local_batch

  def _load(self, epoch: int, order: np.ndarray, position: int, image_out: np.ndarray):
    """(example, [(image_id, reason), ...] skipped) for one position of a bucket's order; the
    image is written into `image_out` (its zeroed row of the batch)."""
    skipped = []
    n = len(order)
    for attempt in range(self.max_consecutive_failures + 1):
      index = int(order[(position + attempt) % n])
      image_id = self.image_ids[index]
      try:
        example = pipeline.train_example(self.dataset, image_id, self.config,
                                         rng=pipeline.example_rng(self.seed, epoch, index),
                                         image_out=image_out)
        return example, skipped
      except Exception as e:  # pylint: disable=broad-except  (counted, logged, capped)
        reason = f"{type(e).__name__}: {e}"
        if not isinstance(e, (OSError, coco_lib.DatasetError)):
          reason += "\n" + traceback.format_exc(limit=3)
        skipped.append((image_id, reason))
        image_out[...] = 0  # the failed sample may have written its image already
    raise RuntimeError(
        f"{self.max_consecutive_failures + 1} consecutive training samples failed (epoch {epoch}, "
        f"bucket order position {position}); last: {_describe(self.dataset, skipped[-1][0])}: "
        f"{skipped[-1][1]}")

  def load_batch(self, epoch: int, step: int) -> Tuple[Dict[str, np.ndarray], List]:
    """One process's batch: (`pipeline.batch_examples` padded to the bucket, skipped list).

    Each image is resized straight into its row of the batch's image array; in a worker the
    arrays are in shared memory, which grain then hands to the trainer without another copy.
    """
    b, order, first = self.shard(epoch, step)
    zeros = _shared_zeros if _IN_WORKER else np.zeros
    dtype = np.float32 if self.dataset.convention.normalize_before_resize else np.uint8
    images = zeros((self.local_batch,) + self.buckets[b] + (3,), dtype)
    results = [self._load(epoch, order, first + i, images[i]) for i in range(self.local_batch)]
    batch = pipeline.batch_examples(
        [{k: v for k, v in r[0].items() if k != "image"} for r in results], zeros=zeros)
    return dict(image=images, **batch), [s for r in results for s in r[1]]

  def __call__(self, global_step: int) -> Dict[str, Any]:
    epoch, step = divmod(int(global_step), self.steps_per_epoch)
    batch, skipped = self.load_batch(epoch, step)
    return dict(batch=batch, skipped=skipped, epoch=epoch, step=step)


_IN_WORKER = False  # set in grain's worker processes


def _shared_zeros(shape, dtype) -> np.ndarray:
  """A zero-filled array in shared memory (new POSIX shared memory reads as zeros)."""
  from grain import multiprocessing as grain_mp  # pylint: disable=g-import-not-at-top
  return grain_mp.SharedMemoryArray(shape, dtype)


def _delete_shared_memory_synchronously() -> None:
  """grain frees the shared memory of the arrays it hands out on a daemon thread, which does not
  run once the process is exiting: the arrays of a batch released just before the exit are left to
  the resource tracker, which warns of "leaked shared_memory objects". Freeing them when they are
  released costs some 0.1 ms per batch. (grain 0.2 has no public switch for this.)"""
  from grain import multiprocessing as grain_mp  # pylint: disable=g-import-not-at-top
  disable = getattr(grain_mp.SharedMemoryArray, "_disable_async_del", None)
  if disable is not None:
    disable()


def _init_worker(parent_pid: int, *unused) -> None:
  """Runs first in each worker process: OpenCV on one thread (a worker is meant to have a core),
  and an exit once the training process is gone: grain's workers would otherwise wait on their
  output queue forever after a SIGKILL of the trainer."""
  import cv2  # pylint: disable=g-import-not-at-top
  global _IN_WORKER
  _IN_WORKER = True
  cv2.setNumThreads(1)

  def exit_with_parent():
    while os.getppid() == parent_pid:
      time.sleep(1.0)
    os._exit(0)  # pylint: disable=protected-access

  threading.Thread(target=exit_with_parent, name="exit_with_parent", daemon=True).start()


class TrainLoader:
  """Training batches for one process (module docstring).

  Args:
    dataset: a `CocoDataset`.
    config: the recipe config (`pipeline.data_option` fields).
    seed: data seed.
    process_index, process_count: this process and the number of processes (jax.process_index(),
      jax.process_count()).
    global_batch: images per step over all processes; a multiple of process_count.
    num_workers: worker processes making batches (default config.data.num_workers); 0 loads
      synchronously in the caller's thread. A host feeding 8 GPUs needs about one core per
      150 images/s (docs/training.md, "Data loading").
    prefetch: batches buffered per worker.
    filter_empty: drop images without a valid non-crowd instance (default
      config.data.train_filter_empty, True).
    max_consecutive_failures: see the module docstring.

  Iterating yields dicts of [global_batch // process_count, ...] numpy arrays
  (`pipeline.batch_examples` of `pipeline.train_example`s), endlessly, epoch after epoch.
  """

  def __init__(self, dataset: coco_lib.CocoDataset, config, *, seed: int, process_index: int = 0,
               process_count: int = 1, global_batch: int, num_workers: Optional[int] = None,
               prefetch: int = 2, filter_empty: Optional[bool] = None,
               max_consecutive_failures: int = 32):
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"bad process_index {process_index} / process_count {process_count}")
    if global_batch < 1 or global_batch % process_count:
      raise errors.ConfigError(
          f"global_batch {global_batch} must be a positive multiple of "
          f"process_count {process_count}")
    self.dataset = dataset
    self.config = config
    if filter_empty is None:
      filter_empty = bool(pipeline.data_option(config, "train_filter_empty"))
    self.image_ids: List[int] = dataset.train_image_ids(filter_empty=filter_empty)
    self.maker = BatchMaker(dataset, config, seed=seed, process_index=process_index,
                            process_count=process_count, global_batch=global_batch,
                            image_ids=self.image_ids,
                            max_consecutive_failures=max_consecutive_failures)
    self.global_batch = self.maker.global_batch
    self.local_batch = self.maker.local_batch
    self.steps_per_epoch = self.maker.steps_per_epoch
    sizes = ", ".join(f"{h}x{w}: {n}" for (h, w), n in zip(self.maker.buckets,
                                                           self.maker.bucket_sizes))
    if self.steps_per_epoch == 0:
      raise errors.ConfigError(
          f"{dataset.annotation_file}: {len(self.image_ids)} training images, no "
          f"bucket holds a global batch of {self.global_batch} (images per bucket: "
          f"{sizes})")
    logger.info("training images per bucket: %s; %d steps per epoch (%d images left out of "
                "each epoch by the last partial batch of each bucket)", sizes,
                self.steps_per_epoch, len(self.image_ids) - self.steps_per_epoch *
                self.global_batch)
    self.num_workers = int(pipeline.data_option(config, "num_workers")
                           if num_workers is None else num_workers)
    self.prefetch = max(int(prefetch), 1)
    self._epoch = 0
    self._step = 0
    # Counted when a batch is handed out (not when prefetched), so the counts are deterministic.
    self.skipped = 0
    self.skipped_samples: List[Tuple[int, str]] = []  # (image_id, reason), the latest 1000
    self._iter = None

  @property
  def buckets(self) -> List[Tuple[int, int]]:
    """The (H, W) shapes of the batches' images, one per bucket that has images."""
    return list(self.maker.buckets)

  # ---------------------------------------------------------------------------------------------
  # position
  # ---------------------------------------------------------------------------------------------

  def state(self) -> Dict[str, int]:
    """The position of the next batch: {'epoch', 'step_in_epoch'} (JSON / orbax friendly)."""
    return dict(epoch=int(self._epoch), step_in_epoch=int(self._step))

  def restore(self, state: Dict[str, Any]) -> None:
    """Continues from a `state()`; batches already prepared by the workers are discarded."""
    epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
    if epoch < 0 or not 0 <= step < self.steps_per_epoch:
      raise ValueError(f"bad loader state {state} (steps_per_epoch {self.steps_per_epoch})")
    self._stop_workers()
    self._epoch, self._step = epoch, step

  def set_position_from_step(self, global_step: int) -> None:
    """Positions the loader at the batch of optimizer step `global_step` (0-based)."""
    self.restore(dict(epoch=global_step // self.steps_per_epoch,
                      step_in_epoch=global_step % self.steps_per_epoch))

  # ---------------------------------------------------------------------------------------------
  # indices
  # ---------------------------------------------------------------------------------------------

  def batch_image_ids(self, epoch: int, step: int,
                      process_index: Optional[int] = None) -> List[int]:
    """The image ids of a shard before any failure replacement."""
    _, order, first = self.maker.shard(epoch, step, process_index)
    return [self.image_ids[order[(first + i) % len(order)]] for i in range(self.local_batch)]

  def batch_bucket(self, epoch: int, step: int) -> Tuple[int, int]:
    """The (H, W) of the images of a global batch."""
    return self.maker.buckets[self.maker.shard(epoch, step)[0]]

  # ---------------------------------------------------------------------------------------------
  # loading
  # ---------------------------------------------------------------------------------------------

  def load_batch(self, epoch: int, step: int) -> Tuple[Dict[str, np.ndarray], List]:
    """Synchronously builds one batch: (batch dict, skipped list). Pure in (epoch, step)."""
    return self.maker.load_batch(epoch, step)

  def _start_workers(self) -> None:
    # grain imports JAX and spawns processes: only when workers are asked for.
    import grain  # pylint: disable=g-import-not-at-top
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      # grain 0.2 reads its absl flags when it starts workers, parsed or not.
      flags.FLAGS.mark_as_parsed()
    first = self._epoch * self.steps_per_epoch + self._step
    ds = grain.MapDataset.range(first, _NO_END).map(self.maker)
    # No reader threads inside a worker: each worker is one process making one batch at a time.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers,
                                                     per_worker_buffer_size=self.prefetch),
                        worker_init_fn=functools.partial(_init_worker, os.getpid()))
    self._iter = iter(ds)

  def _stop_workers(self) -> None:
    if self._iter is not None:
      self._iter.close()
      self._iter = None

  def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    pos = (self._epoch, self._step)
    if self.num_workers <= 0:
      batch, skipped = self.load_batch(*pos)
    else:
      if self._iter is None:
        self._start_workers()
      out = next(self._iter)
      _delete_shared_memory_synchronously()
      if (out["epoch"], out["step"]) != pos:
        raise RuntimeError(f"the workers returned the batch of (epoch, step) "
                           f"{(out['epoch'], out['step'])}, expected {pos}")
      batch, skipped = out["batch"], out["skipped"]
    for image_id, reason in skipped:
      self.skipped += 1
      self.skipped_samples = (self.skipped_samples + [(image_id, reason)])[-1000:]
      logger.warning("skipped training sample %s: %s [%d skipped so far]",
                     _describe(self.dataset, image_id), reason, self.skipped)
    self._step += 1
    if self._step == self.steps_per_epoch:
      self._epoch, self._step = self._epoch + 1, 0
    return batch

  def close(self) -> None:
    """Stops the worker processes."""
    self._stop_workers()

  def __enter__(self) -> "TrainLoader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass
