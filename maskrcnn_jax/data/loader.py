"""Deterministic, resumable, sharded data loading (pure Python + a thread pool).

`TrainLoader` makes the batch at (epoch, step) a pure function of (seed, epoch, step, process):

* epoch permutation: `np.random.default_rng((seed, epoch)).permutation(N)` over the training image
  ids (`CocoDataset.train_image_ids`); `steps_per_epoch = N // global_batch` (the remainder is
  dropped, as the references' infinite / grouped samplers effectively do, keeping shapes static);
* global batch `step` = permutation positions [step * G, (step + 1) * G); process p of P takes the
  contiguous slice [p * G / P, (p + 1) * G / P) of it (the processes' shards are disjoint and
  cover the global batch);
* the example at permutation position q is `pipeline.train_example(..., rng=example_rng(seed,
  epoch, index))` with index the image's position in the training id list;
* a sample that fails (unreadable image, bad annotation) is logged with its image id and file,
  counted in `skipped`, and replaced by the next position of the same permutation (q + 1, q + 2,
  ... mod N), so the replacement is deterministic too. More than `max_consecutive_failures`
  failures in a row raise a RuntimeError (a broken dataset or a bug, not a bad sample).

`state()` returns the position of the next batch, `{'epoch': e, 'step_in_epoch': s}`; after
`restore(state)` the loader yields exactly the batches an uninterrupted run would have. Prefetching
(`num_workers` threads, `prefetch` batches ahead) changes only timing, never order or content.

grain is the JAX ecosystem's loader; it is not a dependency here: the pipeline is numpy / OpenCV /
pycocotools code that releases the GIL in its heavy parts, and determinism + resumability come
from the index arithmetic above. (Multiprocess workers can be added behind the same interface.)
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import traceback
from typing import Any, Deque, Dict, Iterator, List, Optional, Tuple

import numpy as np

from maskrcnn_jax.data import coco as coco_lib
from maskrcnn_jax.data import pipeline

logger = logging.getLogger(__name__)


def _describe(dataset: coco_lib.CocoDataset, image_id: int) -> str:
  try:
    return f"image id {image_id} ({dataset.image_info(image_id)['file_name']})"
  except KeyError:
    return f"image id {image_id}"


class TrainLoader:
  """Training batches for one process (module docstring).

  Args:
    dataset: a `CocoDataset`.
    config: the recipe config (`pipeline.data_option` fields).
    seed: data seed.
    process_index, process_count: this process and the number of processes (jax.process_index(),
      jax.process_count()).
    global_batch: images per step over all processes; a multiple of process_count.
    num_workers: threads decoding / transforming examples (default config.data.num_workers, 2);
      0 loads synchronously in the caller's thread.
    prefetch: batches prepared ahead when num_workers > 0.
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
      raise ValueError(f"global_batch {global_batch} must be a positive multiple of "
                       f"process_count {process_count}")
    self.dataset = dataset
    self.config = config
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.global_batch = int(global_batch)
    self.local_batch = self.global_batch // self.process_count
    if filter_empty is None:
      filter_empty = bool(pipeline.data_option(config, "train_filter_empty"))
    self.image_ids: List[int] = dataset.train_image_ids(filter_empty=filter_empty)
    if len(self.image_ids) < self.global_batch:
      raise ValueError(f"{dataset.annotation_file}: {len(self.image_ids)} training images, fewer "
                       f"than the global batch {self.global_batch}")
    self.steps_per_epoch = len(self.image_ids) // self.global_batch
    self.num_workers = int(pipeline.data_option(config, "num_workers")
                           if num_workers is None else num_workers)
    self.prefetch = max(int(prefetch), 1)
    self.max_consecutive_failures = int(max_consecutive_failures)
    self._epoch = 0
    self._step = 0
    # Counted when a batch is handed out (not when prefetched), so the counts are deterministic.
    self.skipped = 0
    self.skipped_samples: List[Tuple[int, str]] = []  # (image_id, reason), the latest 1000
    self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
    self._pending: Deque[Tuple[Tuple[int, int], List[concurrent.futures.Future]]] = \
        collections.deque()
    self._perm_cache: Dict[int, np.ndarray] = {}

  # ---------------------------------------------------------------------------------------------
  # position
  # ---------------------------------------------------------------------------------------------

  def state(self) -> Dict[str, int]:
    """The position of the next batch: {'epoch', 'step_in_epoch'} (JSON / orbax friendly)."""
    return dict(epoch=int(self._epoch), step_in_epoch=int(self._step))

  def restore(self, state: Dict[str, Any]) -> None:
    """Continues from a `state()`; the prefetched batches are discarded."""
    epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
    if epoch < 0 or not 0 <= step < self.steps_per_epoch:
      raise ValueError(f"bad loader state {state} (steps_per_epoch {self.steps_per_epoch})")
    self._drop_pending()
    self._epoch, self._step = epoch, step

  def set_position_from_step(self, global_step: int) -> None:
    """Positions the loader at the batch of optimizer step `global_step` (0-based)."""
    self.restore(dict(epoch=global_step // self.steps_per_epoch,
                      step_in_epoch=global_step % self.steps_per_epoch))

  # ---------------------------------------------------------------------------------------------
  # indices
  # ---------------------------------------------------------------------------------------------

  def permutation(self, epoch: int) -> np.ndarray:
    """[N] int64: the epoch's order of training-id indices."""
    perm = self._perm_cache.get(epoch)
    if perm is None:
      perm = np.random.default_rng((self.seed, int(epoch))).permutation(len(self.image_ids))
      self._perm_cache = {epoch: perm}  # one epoch at a time is enough
    return perm

  def positions(self, epoch: int, step: int, process_index: Optional[int] = None) -> np.ndarray:
    """[local_batch] int64: the permutation positions of one process's shard of a global batch."""
    p = self.process_index if process_index is None else int(process_index)
    start = step * self.global_batch + p * self.local_batch
    return np.arange(start, start + self.local_batch, dtype=np.int64)

  def batch_image_ids(self, epoch: int, step: int,
                      process_index: Optional[int] = None) -> List[int]:
    """The image ids of a shard before any failure replacement."""
    perm = self.permutation(epoch)
    return [self.image_ids[perm[q]] for q in self.positions(epoch, step, process_index)]

  # ---------------------------------------------------------------------------------------------
  # loading
  # ---------------------------------------------------------------------------------------------

  def _load_position(self, epoch: int, position: int, perm: np.ndarray):
    """(example, [(image_id, reason), ...] skipped) for one permutation position."""
    skipped = []
    n = len(perm)
    for attempt in range(self.max_consecutive_failures + 1):
      index = int(perm[(position + attempt) % n])
      image_id = self.image_ids[index]
      try:
        example = pipeline.train_example(self.dataset, image_id, self.config,
                                         rng=pipeline.example_rng(self.seed, epoch, index))
        return example, skipped
      except Exception as e:  # pylint: disable=broad-except  (counted, logged, capped)
        reason = f"{type(e).__name__}: {e}"
        if not isinstance(e, (OSError, coco_lib.DatasetError)):
          reason += "\n" + traceback.format_exc(limit=3)
        skipped.append((image_id, reason))
    raise RuntimeError(
        f"{self.max_consecutive_failures + 1} consecutive training samples failed (epoch {epoch}, "
        f"position {position}); last: {_describe(self.dataset, skipped[-1][0])}: {skipped[-1][1]}")

  def load_batch(self, epoch: int, step: int) -> Tuple[Dict[str, np.ndarray], List]:
    """Synchronously builds one batch: (batch dict, skipped list). Pure in (epoch, step)."""
    perm = self.permutation(epoch)
    results = [self._load_position(epoch, int(q), perm) for q in self.positions(epoch, step)]
    return self._assemble(results)

  @staticmethod
  def _assemble(results) -> Tuple[Dict[str, np.ndarray], List]:
    examples = [r[0] for r in results]
    skipped = [s for r in results for s in r[1]]
    return pipeline.batch_examples(examples), skipped

  def _advance(self, epoch: int, step: int) -> Tuple[int, int]:
    step += 1
    if step == self.steps_per_epoch:
      return epoch + 1, 0
    return epoch, step

  def _drop_pending(self) -> None:
    for _, futures in self._pending:
      for f in futures:
        f.cancel()
    self._pending.clear()

  def _fill(self) -> None:
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(
          max_workers=self.num_workers, thread_name_prefix="maskrcnn_jax_data")
    pos = self._pending[-1][0] if self._pending else None
    pos = self._advance(*pos) if pos is not None else (self._epoch, self._step)
    while len(self._pending) < self.prefetch + 1:
      epoch, step = pos
      perm = self.permutation(epoch)
      futures = [self._pool.submit(self._load_position, epoch, int(q), perm)
                 for q in self.positions(epoch, step)]
      self._pending.append((pos, futures))
      pos = self._advance(epoch, step)

  def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    pos = (self._epoch, self._step)
    if self.num_workers <= 0:
      batch, skipped = self.load_batch(*pos)
    else:
      if self._pending and self._pending[0][0] != pos:
        self._drop_pending()
      self._fill()
      _, futures = self._pending.popleft()
      batch, skipped = self._assemble([f.result() for f in futures])
    for image_id, reason in skipped:
      self.skipped += 1
      self.skipped_samples = (self.skipped_samples + [(image_id, reason)])[-1000:]
      logger.warning("skipped training sample %s: %s [%d skipped so far]",
                     _describe(self.dataset, image_id), reason, self.skipped)
    self._epoch, self._step = self._advance(*pos)
    return batch

  def close(self, wait: bool = True) -> None:
    """Stops the worker threads (pending work is cancelled)."""
    self._drop_pending()
    if self._pool is not None:
      self._pool.shutdown(wait=wait, cancel_futures=True)
      self._pool = None

  def __enter__(self) -> "TrainLoader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close(wait=False)
    except Exception:  # pylint: disable=broad-except
      pass


def eval_batches(dataset: coco_lib.CocoDataset, config, *, batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 pad_to: Optional[Tuple[int, int]] = None,
                 num_workers: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
  """Evaluation batches of one process, in image-id order.

  The sorted image ids (all of them, with or without annotations) are split into contiguous
  per-process blocks; every process yields the same number of batches of `batch_size`, the tail
  padded with copies of a placeholder flagged `example_valid=False`. An unreadable image is logged
  (with its id and file) and also yields `example_valid=False` (its gt then counts as missed).

  Yields:
    `pipeline.batch_examples` of `pipeline.eval_example`s plus example_valid [B] bool.
  """
  ids = list(dataset.image_ids)
  per_process = -(-len(ids) // process_count)
  num_batches = -(-per_process // batch_size)
  mine = ids[process_index * per_process:(process_index + 1) * per_process]
  workers = int(pipeline.data_option(config, "num_workers") if num_workers is None
                else num_workers)

  def load(image_id):
    try:
      return pipeline.eval_example(dataset, image_id, config, pad_to=pad_to), True
    except (OSError, coco_lib.DatasetError) as e:
      logger.warning("evaluation: skipped %s: %s", _describe(dataset, image_id), e)
      return None, False

  def placeholder(like: Optional[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    div = int(pipeline.data_option(config, "size_divisibility"))
    shape = like["image"].shape if like is not None else (
        tuple(pad_to) + (3,) if pad_to is not None else (max(div, 1), max(div, 1), 3))
    return dict(image=np.zeros(shape, np.float32), image_hw=np.ones(2, np.int32),
                orig_hw=np.ones(2, np.int32), scale_factor=np.ones(2, np.float32),
                image_id=np.array(-1, np.int64))

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
  try:
    for b in range(num_batches):
      chunk = mine[b * batch_size:(b + 1) * batch_size]
      results = list(pool.map(load, chunk)) if pool is not None else [load(i) for i in chunk]
      like = next((r[0] for r in results if r[0] is not None), None)
      examples, valid = [], []
      for image_id, (ex, ok) in zip(chunk, results):
        if not ok:
          ex = placeholder(like)
          ex["image_id"] = np.array(image_id, np.int64)
        examples.append(ex)
        valid.append(ok)
      while len(examples) < batch_size:
        examples.append(placeholder(like))
        valid.append(False)
      batch = pipeline.batch_examples(examples)
      batch["example_valid"] = np.array(valid, bool)
      yield batch
  finally:
    if pool is not None:
      pool.shutdown(wait=True)
