"""Sharded COCO evaluation: inference over a whole val set on every device and process, then COCOeval.

`evaluate(config, variables, annotation_file=..., image_dir=...)` is what `python -m
maskrcnn_jax.evaluate` and training's periodic evaluation call. The work is split as follows.

* **Plan (every process, identical).** The image ids of the json, sorted, are grouped by their exact
  padded input size: the test resize of the json's width/height, rounded up to a multiple of
  `pad_multiple` (default `data.size_divisibility`, 32: what the reference frameworks pad each image
  to, so detections match them; one compile per distinct padded size). Each group is cut into global
  batches of `batch_size_per_device * jax.device_count()` slots; the last batch of a group is filled
  with dummy images whose results are dropped. Every process walks the same list of batches.
* **Devices.** A 1-D `Mesh` over all devices with axis 'data'; the model is `jax.jit`-ed with
  `NamedSharding(mesh, P('data'))` on the batch axis of inputs and outputs and replicated variables.
  Works for any device count.
* **Processes** (`jax.distributed.initialize()` beforehand). The slots of a global batch belong to
  the devices that hold them: a process loads only the images of the slots its addressable devices
  hold (`sharding.addressable_devices_indices_map`), builds its part of the global batch with
  `jax.make_array_from_single_device_arrays`, and reads back only its addressable output shards. So
  each process reads and pastes its own shard of the image ids.
* **Host side, overlapped with the device.** Images are decoded and preprocessed by a thread pool
  a few batches ahead; batch k+1 is dispatched before the outputs of batch k are fetched; each
  image's valid detections go to a process pool ('spawn' context: safe with JAX's threads) that
  pastes the 28x28 masks inside their boxes and RLE-encodes them from the box window
  (`evaluation.host`), so memory per image is bounded by its boxes, never [N, H, W].
* **Gather.** Each process encodes its results (zlib-compressed JSON) and all processes exchange
  them with `multihost_utils.process_allgather` (lengths first, then fixed-size byte chunks); the
  merged results are ordered by image id (detections of an image in score order), so the output is
  the same for any device or process count. Every process then runs COCOeval on the same results
  (identical metrics everywhere, no broadcast); process 0 writes `workdir/predictions.json` and
  `workdir/metrics.json`.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import time
import zlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
from PIL import Image

from maskrcnn_jax import conventions as conventions_lib
from maskrcnn_jax import errors
from maskrcnn_jax.data import transforms
from maskrcnn_jax.evaluation import coco_eval, host
from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN, ModelConfig
from maskrcnn_jax.ops import paste as paste_lib, paste_device, paste_plan

_INPUT_KEYS = ("image", "image_hw", "orig_hw", "scale_factor")
_GATHER_CHUNK = 1 << 26  # bytes per process_allgather call


class EmptyDatasetError(coco_eval.EvaluationError):
  """The val set has no images."""


class MissingImagesError(errors.InputNotFoundError):
  """Image files named in the annotation file are not in the image directory."""


# ------------------------------------------------------------------------------------------------
# Dataset and plan
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalImage:
  image_id: int
  path: str
  hw: Tuple[int, int]  # original (H, W) from the json
  padded_hw: Tuple[int, int]  # model input size of its batch


@dataclasses.dataclass
class Batch:
  padded_hw: Tuple[int, int]
  images: List[Optional[EvalImage]]  # global_batch slots; None = dummy padding


def _image_hw(info: Dict[str, Any], path: str) -> Tuple[int, int]:
  if info.get("height") and info.get("width"):
    return int(info["height"]), int(info["width"])
  with Image.open(path) as im:  # header only: no decode
    return int(im.size[1]), int(im.size[0])


def load_val_set(config: ml_collections.ConfigDict, annotation_file: str, image_dir: str, *,
                 max_images: Optional[int] = None):
  """Reads the json, checks categories and image files; returns (gt COCO, [EvalImage], table).

  Every image of the json is evaluated, with or without annotations (as all three references do
  at test time).

  TODO: read through `maskrcnn_jax.data.coco.CocoDataset` once it lands (the evaluation needs every
  image of the json and the pycocotools COCO object for COCOeval; keep both).

  Raises:
    FileNotFoundError: no annotation file.
    EmptyDatasetError: the json lists no images.
    coco_eval.CategoryMismatchError: categories differ from the checkpoint's classes.
    MissingImagesError: naming the missing image files.
  """
  gt = coco_eval.load_ground_truth(annotation_file)
  ids = sorted(int(i) for i in gt.getImgIds())
  if max_images is not None:
    ids = ids[:int(max_images)]
  if not ids:
    raise EmptyDatasetError(f"the val set {annotation_file} has no images")
  table = coco_eval.check_categories(gt.getCatIds(), config, annotation_file)
  paths = [os.path.join(image_dir, gt.imgs[i]["file_name"]) for i in ids]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    shown = "\n  ".join(missing[:10])
    more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
    raise MissingImagesError(
        f"{len(missing)} of {len(paths)} images of {annotation_file} are missing under "
        f"{image_dir}:\n  {shown}{more}")
  conv = conventions_lib.get(config.convention)
  short, max_size = int(config.data.test_short), int(config.data.test_max_size)
  images = []
  for i, path in zip(ids, paths):
    hw = _image_hw(gt.imgs[i], path)
    new_hw = transforms.test_resize_size(*hw, rule=conv.resize, short=short, max_size=max_size)
    images.append(EvalImage(i, path, hw, new_hw))
  return gt, images, table


def plan_batches(images: Sequence[EvalImage], global_batch: int, pad_multiple: int) -> List[Batch]:
  """Groups images by padded size (rounded up to pad_multiple) into fixed-size global batches.

  `EvalImage.padded_hw` holds the resized (unpadded) size on input; it is replaced by the padded
  size. Groups in ascending size order, image ids ascending inside a group.
  """
  div = max(int(pad_multiple), 1)
  groups: Dict[Tuple[int, int], List[EvalImage]] = collections.defaultdict(list)
  for im in images:
    h, w = im.padded_hw
    im.padded_hw = (int(math.ceil(h / div) * div), int(math.ceil(w / div) * div))
    groups[im.padded_hw].append(im)
  batches = []
  for hw in sorted(groups):
    group = sorted(groups[hw], key=lambda x: x.image_id)
    for s in range(0, len(group), global_batch):
      chunk: List[Optional[EvalImage]] = list(group[s:s + global_batch])
      chunk += [None] * (global_batch - len(chunk))
      batches.append(Batch(hw, chunk))
  return batches


# ------------------------------------------------------------------------------------------------
# Multi-process helpers
# ------------------------------------------------------------------------------------------------


def allgather_bytes(data: bytes) -> List[bytes]:
  """Every process's `data`, in process order (one entry when there is one process)."""
  if jax.process_count() == 1:
    return [data]
  n = np.array([len(data)], np.int32)
  lengths = np.asarray(multihost_utils.process_allgather(n)).reshape(-1)
  total = int(lengths.max())
  buf = np.zeros(max(total, 1), np.uint8)
  buf[:len(data)] = np.frombuffer(data, np.uint8)
  parts: List[List[np.ndarray]] = [[] for _ in lengths]
  for off in range(0, max(total, 1), _GATHER_CHUNK):
    piece = buf[off:off + _GATHER_CHUNK]
    gathered = np.asarray(multihost_utils.process_allgather(piece))
    for p in range(len(lengths)):
      parts[p].append(gathered[p])
  return [np.concatenate(parts[p])[:int(lengths[p])].tobytes() for p in range(len(lengths))]


def _encode_results(per_image: Dict[int, List[Dict[str, Any]]]) -> bytes:
  return zlib.compress(json.dumps(sorted(per_image.items())).encode("utf-8"), 1)


def gather_results(per_image: Dict[int, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
  """All processes' results, ordered by image id (each image's detections in their order)."""
  if jax.process_count() == 1:
    return [e for i in sorted(per_image) for e in per_image[i]]
  merged: Dict[int, List[Dict[str, Any]]] = {}
  for blob in allgather_bytes(_encode_results(per_image)):
    for image_id, entries in json.loads(zlib.decompress(blob).decode("utf-8")):
      if int(image_id) in merged:
        raise RuntimeError(f"image {image_id} was evaluated by two processes")
      merged[int(image_id)] = entries
  return [e for i in sorted(merged) for e in merged[i]]


# ------------------------------------------------------------------------------------------------
# Inference
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class InferenceStats:
  """Wall-clock accounting of `run_inference` (seconds; this process)."""
  images: int = 0  # real images of the whole val set (all processes)
  local_images: int = 0
  batches: int = 0
  compiles: int = 0  # distinct padded sizes
  wall: float = 0.0
  load_cpu: float = 0.0  # summed over loader threads
  paste_cpu: float = 0.0  # summed over paste workers
  wait_load: float = 0.0  # main thread blocked on image loading
  wait_device: float = 0.0  # main thread blocked on device outputs
  wait_paste: float = 0.0  # main thread blocked on paste workers (backpressure + tail)
  wait_paste_device: float = 0.0  # main thread blocked on the device paste's tiles
  paste_bytes: int = 0  # bytes of pasted tiles moved from the devices (device paste)
  gather: float = 0.0

  def as_dict(self) -> Dict[str, float]:
    return dataclasses.asdict(self)


def _default_log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def make_mesh(devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: all devices of all processes)."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


@functools.lru_cache(maxsize=8)
def _sharded_forward(model_cfg: ModelConfig, precision: Any, mesh: Mesh):
  """The jitted, batch-sharded model; cached so that repeated evaluations (training's periodic
  evaluation, benchmarks) reuse the compiled executables of every padded size."""
  model = MaskRCNN(model_cfg, train=False, precision=precision)  # as modeling.build.build_model
  data = NamedSharding(mesh, P("data"))
  return jax.jit(model.apply, in_shardings=(NamedSharding(mesh, P()),) + (data,) * 4,
                 out_shardings=data)


# ---- the steps of `run_inference` -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SlotLayout:
  """The slots (rows) of a global batch that this process's devices hold."""
  global_batch: int
  sharding: NamedSharding  # P('data') over the mesh: the batch axis of inputs and outputs
  device_slots: Dict[Any, range]  # addressable device -> the slots it holds
  local_slots: Tuple[int, ...]  # every slot this process holds, ascending
  row_of: Dict[int, int]  # slot -> its row in this process's local input arrays


def slot_layout(mesh: Mesh, global_batch: int) -> SlotLayout:
  """Which slots of a [global_batch] batch sharded on the mesh's 'data' axis this process holds
  (several devices may hold the same slot when other mesh axes hold replicas)."""
  sharding = NamedSharding(mesh, P("data"))
  slot_map = sharding.addressable_devices_indices_map((global_batch,))
  device_slots = {d: range(*idx[0].indices(global_batch)) for d, idx in slot_map.items()}
  local_slots = tuple(sorted({s for r in device_slots.values() for s in r}))
  return SlotLayout(global_batch, sharding, device_slots, local_slots,
                    {s: r for r, s in enumerate(local_slots)})


def submit_loads(pool: concurrent.futures.Executor, batch: Batch, layout: SlotLayout,
                 kwargs: Dict[str, Any]) -> List[Optional[concurrent.futures.Future]]:
  """Starts decoding and preprocessing the images of this process's slots of `batch` on `pool`.

  Returns one entry per `layout.local_slots`: a Future of `host.load_image`'s dict (image
  [Hp, Wp, 3] float32 padded to `batch.padded_hw`, image_hw, orig_hw, scale_factor [2] float32,
  seconds), or None for a dummy slot.
  """
  futures = []
  for slot in layout.local_slots:
    im = batch.images[slot]
    futures.append(None if im is None else pool.submit(
        host.load_image, im.path, kwargs, batch.padded_hw, im.hw))
  return futures


def dummy_input(hw: Tuple[int, int]) -> Dict[str, Any]:
  """The inputs of an empty slot: image [H, W, 3] float32 zeros, image_hw = orig_hw = (H, W),
  scale_factor [2] float32 ones (its detections are dropped)."""
  return dict(image=np.zeros((hw[0], hw[1], 3), np.float32), image_hw=hw, orig_hw=hw,
              scale_factor=np.ones(2, np.float32))


def global_inputs(batch: Batch, futures: Sequence[Optional[concurrent.futures.Future]],
                  layout: SlotLayout, stats: InferenceStats) -> List[jax.Array]:
  """The model inputs of a global batch, in `_INPUT_KEYS` order, as global arrays sharded on
  'data': image [B, Hp, Wp, 3] float32, image_hw and orig_hw [B, 2] int32, scale_factor [B, 2]
  float32 (B = global batch); this process supplies the rows of its own slots (`futures`, as
  `submit_loads` returned them)."""
  t0 = time.perf_counter()
  loaded = []
  for f in futures:
    if f is None:
      loaded.append(dummy_input(batch.padded_hw))
    else:
      item = f.result()
      stats.load_cpu += item.pop("seconds")
      loaded.append(item)
  stats.wait_load += time.perf_counter() - t0
  local = {
      "image": np.stack([x["image"] for x in loaded]),
      "image_hw": np.asarray([x["image_hw"] for x in loaded], np.int32).reshape(-1, 2),
      "orig_hw": np.asarray([x["orig_hw"] for x in loaded], np.int32).reshape(-1, 2),
      "scale_factor": np.asarray([x["scale_factor"] for x in loaded], np.float32).reshape(-1, 2),
  }
  out = []
  for key in _INPUT_KEYS:
    arr = local[key]
    shards = [jax.device_put(arr[[layout.row_of[s] for s in slots]], d)
              for d, slots in layout.device_slots.items()]
    out.append(jax.make_array_from_single_device_arrays(
        (layout.global_batch,) + arr.shape[1:], layout.sharding, shards))
  return out


def fetch_outputs(out: Dict[str, jax.Array], global_batch: int, stats: InferenceStats, *,
                  skip: Sequence[str] = ()) -> Dict[str, Dict[int, np.ndarray]]:
  """This process's rows of the model's outputs on the host, {key: {slot: row}} (each row the
  slot's fixed-size detections, e.g. boxes [D, 4] float32, valid [D] bool); keys in `skip` stay on
  the device (the device paste's mask_probs)."""
  t0 = time.perf_counter()
  host_out: Dict[str, Dict[int, np.ndarray]] = {}
  for key, arr in out.items():
    if key in skip:
      continue
    rows = {}
    for shard in arr.addressable_shards:
      data = np.asarray(shard.data)
      for j, slot in enumerate(range(*shard.index[0].indices(global_batch))):
        rows[slot] = data[j]
    host_out[key] = rows
  stats.wait_device += time.perf_counter() - t0
  return host_out


def base_job(im: EvalImage, host_out: Dict[str, Dict[int, np.ndarray]], slot: int,
             convention: str, table: np.ndarray) -> Tuple[Dict[str, Any], np.ndarray]:
  """The paste / RLE job of one image, without its masks, and `keep`: [K] int64 indices of the
  slot's valid detections. The job holds image_id, orig_hw, convention, category_ids (`table`)
  and the valid boxes [K, 4] float32, scores [K] float32, labels [K] int32 (and mask_scores [K]
  float32 for Mask Scoring R-CNN)."""
  keep = np.flatnonzero(host_out["valid"][slot])
  job = dict(image_id=im.image_id, orig_hw=im.hw, convention=convention, category_ids=table,
             **{k: host_out[k][slot][keep] for k in ("boxes", "scores", "labels")})
  if "mask_scores" in host_out:
    job["mask_scores"] = host_out["mask_scores"][slot][keep]
  return job, keep


class ResultCollector:
  """Runs each image's paste / RLE job on a worker pool (in this thread without one) and keeps the
  COCO results by image id; `drain` bounds the jobs in flight (backpressure on the main loop)."""

  def __init__(self, executor: Optional[concurrent.futures.Executor], max_pending: int,
               stats: InferenceStats):
    self.executor = executor
    self.max_pending = max_pending
    self.stats = stats
    self.per_image: Dict[int, List[Dict[str, Any]]] = {}
    self.pending: collections.deque = collections.deque()

  def submit(self, fn: Callable[[Dict[str, Any]], Tuple[int, List[Dict[str, Any]], float]],
             job: Dict[str, Any]) -> None:
    """Starts `fn(job)` -> (image_id, COCO result dicts, seconds) (`host.paste_and_encode` or
    `host.encode_tiles`)."""
    if self.executor is None:
      self._take(_Done(fn(job)))
    else:
      self.pending.append(self.executor.submit(fn, job))
    self.stats.local_images += 1

  def drain(self, limit: Optional[int] = None) -> None:
    """Collects the finished jobs, and waits for the oldest while more than `limit` (default
    `max_pending`; 0 = all) are in flight."""
    limit = self.max_pending if limit is None else limit
    t0 = time.perf_counter()
    while self.pending and (len(self.pending) > limit or self.pending[0].done()):
      self._take(self.pending.popleft())
    self.stats.wait_paste += time.perf_counter() - t0

  def _take(self, future) -> None:
    image_id, entries, seconds = future.result()
    self.stats.paste_cpu += seconds
    self.per_image[image_id] = entries


@dataclasses.dataclass
class OutputContext:
  """What handling a batch's outputs needs (one `run_inference` call)."""
  layout: SlotLayout
  convention: str
  table: np.ndarray  # [L] label -> category id
  paste: str  # 'device' | 'host'
  paste_args: Dict[str, Any]  # `paste.convention_args`
  paste_chunk_tiles: int
  stats: InferenceStats
  results: ResultCollector
  # Device paste: the started pastes of the batch whose tiles are not collected yet.
  deferred: List[Any] = dataclasses.field(default_factory=list)


def host_paste(batch: Batch, out: Dict[str, jax.Array], ctx: OutputContext) -> None:
  """Brings the outputs, mask_probs [B, D, M, M] float32 included, to the host and hands each
  image's valid detections to the paste / RLE workers (`host.paste_and_encode`)."""
  host_out = fetch_outputs(out, ctx.layout.global_batch, ctx.stats)
  for slot in ctx.layout.local_slots:
    im = batch.images[slot]
    if im is None:
      continue
    job, keep = base_job(im, host_out, slot, ctx.convention, ctx.table)
    job.update(paste_boxes=host_out["paste_boxes"][slot][keep],
               mask_probs=host_out["mask_probs"][slot][keep])
    ctx.results.submit(host.paste_and_encode, job)
  ctx.results.drain()


def start_device_paste(batch: Batch, out: Dict[str, jax.Array], ctx: OutputContext
                       ) -> List[Tuple[paste_plan.TilePlan, List[jax.Array],
                                       List[Tuple[Dict[str, Any], int]]]]:
  """Fetches the small outputs and starts the paste on each local device (asynchronous).

  Returns, per device shard with real images: (its tile plan, the dispatched packed tile chunks,
  [(job, number of valid detections)] of its images in plan order).
  """
  host_out = fetch_outputs(out, ctx.layout.global_batch, ctx.stats, skip=("mask_probs",))
  boxes_on = {shard.device: shard for shard in out["paste_boxes"].addressable_shards}
  started, seen = [], set()
  for shard in out["mask_probs"].addressable_shards:
    per_slot = shard.data.shape[1]  # detections per image
    det_index, boxes, hws, owners = [], [], [], []
    for j, slot in enumerate(range(*shard.index[0].indices(ctx.layout.global_batch))):
      im = batch.images[slot]
      if im is None or slot in seen:  # a dummy slot, or a replica of one already pasted
        continue
      seen.add(slot)
      job, keep = base_job(im, host_out, slot, ctx.convention, ctx.table)
      det_index.append(j * per_slot + keep)
      boxes.append(host_out["paste_boxes"][slot][keep])
      hws.append(np.broadcast_to(np.asarray(im.hw), (len(keep), 2)))
      owners.append((job, len(keep)))
    if not owners:
      continue
    plan = paste_plan.plan_tiles(np.concatenate(det_index), np.concatenate(boxes),
                                 np.concatenate(hws), method=ctx.paste_args["method"],
                                 mask_size=int(shard.data.shape[-1]))
    chunks = paste_device.dispatch(
        plan, shard.data, boxes_on[shard.device].data, **ctx.paste_args,
        chunk_tiles=ctx.paste_chunk_tiles, device=shard.device)
    started.append((plan, chunks, owners))
  return started


def finish_device_paste(started, ctx: OutputContext) -> None:
  """Collects the pasted tiles of a batch (`start_device_paste`'s result) and hands each image's
  tiles to the RLE workers (`host.encode_tiles`)."""
  for plan, chunks, owners in started:
    t0 = time.perf_counter()
    tiles = paste_device.gather_packed(plan, chunks)
    ctx.stats.wait_paste_device += time.perf_counter() - t0
    ctx.stats.paste_bytes += tiles.nbytes
    d0 = 0
    for job, n in owners:
      t_lo, t_hi = plan.first[d0], plan.first[d0 + n]
      job.update(windows=plan.windows[d0:d0 + n], grid=plan.grid[d0:d0 + n],
                 first=plan.first[d0:d0 + n + 1] - t_lo, tiles=tiles[t_lo:t_hi])
      ctx.results.submit(host.encode_tiles, job)
      d0 += n
  ctx.results.drain()


def handle_outputs(batch: Batch, out: Dict[str, jax.Array], ctx: OutputContext) -> None:
  """Pastes and encodes a batch's detections. Device paste: batch k's tiles are collected after
  batch k + 1's paste was started, so the device always has queued work while the host waits."""
  if ctx.paste == "host":
    host_paste(batch, out, ctx)
    return
  ctx.deferred.append(start_device_paste(batch, out, ctx))
  if len(ctx.deferred) > 1:
    finish_device_paste(ctx.deferred.pop(0), ctx)


def finish_outputs(ctx: OutputContext) -> None:
  """Collects the last device pastes and waits for every paste / RLE job."""
  while ctx.deferred:
    finish_device_paste(ctx.deferred.pop(0), ctx)
  ctx.results.drain(0)


def run_inference(config: ml_collections.ConfigDict, variables: Any, images: Sequence[EvalImage],
                  table: np.ndarray, *, batch_size_per_device: int = 1, num_workers: int = 2,
                  num_loader_threads: int = 4, pad_multiple: Optional[int] = None,
                  mesh: Optional[Mesh] = None, precision: Any = None,
                  executor: Optional[concurrent.futures.Executor] = None,
                  log: Callable[[str], None] = _default_log, progress_every_s: float = 30.0,
                  paste: str = "device", paste_chunk_tiles: int = 4096
                  ) -> Tuple[List[Dict[str, Any]], InferenceStats]:
  """Runs the model on every image and returns COCO results of all processes, in image-id order.

  Args:
    config: the recipe config (model, convention, data.test_short / test_max_size /
      size_divisibility).
    variables: {'params', 'batch_stats'} (numpy or jax arrays, same values on every process).
    images: `load_val_set`'s images (all of them, on every process).
    table: [L] label -> category id (`coco_eval.check_categories`).
    batch_size_per_device: images per device per step.
    num_workers: paste / RLE worker processes (0: in this thread).
    num_loader_threads: threads decoding and preprocessing images ahead of the device.
    pad_multiple: pad inputs to multiples of this (default data.size_divisibility, the
      references' padding; a larger value means fewer compiles but results that differ slightly
      from the references near the bottom / right image border).
    mesh: a 1-D mesh with axis 'data' (default `make_mesh()`).
    precision: passed to the model (`jax.lax.Precision`).
    executor: a process pool to paste with instead of starting one.
    log: progress lines.
    progress_every_s: seconds between progress lines.
    paste: 'device' (ops/paste_device.py: the masks are pasted on the device that ran the model,
      in tiles around each box, and only those tiles come back) or 'host' (the 28x28
      probabilities come back and the workers paste them, ops/paste.py). Identical results.
    paste_chunk_tiles: device paste: 32x32 tiles per device call (bounds its memory).

  Returns:
    (results: list of COCO result dicts with 'segmentation' (and 'mask_score' for Mask Scoring
    R-CNN), ordered by image id; stats).
  """
  t_start = time.perf_counter()
  stats = InferenceStats()
  if paste not in ("device", "host"):
    raise ValueError(f"paste must be 'device' or 'host', got {paste!r}")
  mesh = mesh or make_mesh()
  if "data" not in mesh.axis_names:
    raise ValueError(f"the mesh needs a 'data' axis, got {mesh.axis_names}")
  num_devices = int(mesh.shape["data"])  # other mesh axes (if any) hold replicas
  global_batch = int(batch_size_per_device) * num_devices
  pad_multiple = int(pad_multiple or config.data.size_divisibility or 1)
  div = int(config.data.size_divisibility or 1)
  if pad_multiple % div:
    raise ValueError(f"pad_multiple {pad_multiple} must be a multiple of data.size_divisibility "
                     f"{div}")
  images = [dataclasses.replace(im) for im in images]
  batches = plan_batches(images, global_batch, pad_multiple)
  stats.images = len(images)
  stats.batches = len(batches)
  stats.compiles = len({b.padded_hw for b in batches})

  layout = slot_layout(mesh, global_batch)
  forward = _sharded_forward(ModelConfig.from_config(config), precision, mesh)
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  kwargs = transforms.preprocess_kwargs(config)
  log(f"evaluating {len(images)} images on {num_devices} device(s) in {jax.process_count()} "
      f"process(es): {len(batches)} batches of {global_batch}, {stats.compiles} padded sizes "
      f"(multiples of {pad_multiple})")

  own_pool = None
  if executor is None and num_workers > 0:
    own_pool = executor = concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=multiprocessing.get_context("spawn"))
  loader = concurrent.futures.ThreadPoolExecutor(max(int(num_loader_threads), 1))
  max_pending = max(4 * max(num_workers, 1) * len(layout.local_slots), 16)
  ctx = OutputContext(layout=layout, convention=str(config.convention), table=table, paste=paste,
                      paste_args=paste_lib.convention_args(str(config.convention)),
                      paste_chunk_tiles=paste_chunk_tiles, stats=stats,
                      results=ResultCollector(executor, max_pending, stats))
  prefetch = 2
  try:
    loads = collections.deque(submit_loads(loader, b, layout, kwargs) for b in batches[:prefetch])
    in_flight = None
    done_images, last_log = 0, time.perf_counter()
    for k, batch in enumerate(batches):
      inputs = global_inputs(batch, loads.popleft(), layout, stats)
      if k + prefetch < len(batches):
        loads.append(submit_loads(loader, batches[k + prefetch], layout, kwargs))
      out = forward(variables, *inputs)  # asynchronous dispatch
      if in_flight is not None:  # the previous batch's outputs, while this one runs
        handle_outputs(*in_flight, ctx)
        done_images += sum(im is not None for im in in_flight[0].images)
      in_flight = (batch, out)
      now = time.perf_counter()
      if now - last_log >= progress_every_s and done_images:
        rate = done_images / (now - t_start)
        log(f"eval: {done_images}/{len(images)} images, {rate:.2f} img/s, "
            f"ETA {_fmt_eta((len(images) - done_images) / rate)}")
        last_log = now
    if in_flight is not None:
      handle_outputs(*in_flight, ctx)
    finish_outputs(ctx)
  finally:
    loader.shutdown(wait=False, cancel_futures=True)
    if own_pool is not None:
      own_pool.shutdown(wait=True, cancel_futures=True)
  t0 = time.perf_counter()
  results = gather_results(ctx.results.per_image)
  stats.gather = time.perf_counter() - t0
  stats.wall = time.perf_counter() - t_start
  log(f"inference done: {len(images)} images in {stats.wall:.1f} s "
      f"({len(images) / max(stats.wall, 1e-9):.2f} img/s), {len(results)} detections")
  return results, stats


class _Done:
  """A finished future holding `value` (the in-thread paste path)."""

  def __init__(self, value):
    self._value = value

  def result(self):
    return self._value


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def eval_setting(config: ml_collections.ConfigDict, key: str, default: Any) -> Any:
  """config.eval.<key>, or `default` where the config has no such field."""
  ev = config.get("eval", None)
  value = ev.get(key, None) if ev is not None else None
  return default if value is None else value


def evaluate(config: ml_collections.ConfigDict, variables: Any, *, annotation_file: str,
             image_dir: str, workdir: Optional[str] = None, batch_size_per_device: int = 1,
             num_workers: int = 2, num_loader_threads: int = 4,
             pad_multiple: Optional[int] = None, per_class: bool = False,
             max_images: Optional[int] = None, coco_workers: Optional[int] = None,
             mesh: Optional[Mesh] = None, precision: Any = None,
             log: Callable[[str], None] = _default_log,
             progress_every_s: float = 30.0, paste: Optional[str] = None,
             scorer: Optional[str] = None) -> Dict[str, Dict[str, float]]:
  """COCO bbox and segm AP of `variables` on a COCO-format val set, on all devices and processes.

  Args:
    config: the recipe config.
    variables: {'params', 'batch_stats'} (identical on every process).
    annotation_file: COCO-format json (every image in it is evaluated).
    image_dir: folder the json's file_names are relative to.
    workdir: where process 0 writes predictions.json and metrics.json (None: nothing written).
    batch_size_per_device: images per device per step.
    num_workers: paste / RLE worker processes (0: in the main thread); also used by COCOeval.
    num_loader_threads: image decode / preprocess threads.
    pad_multiple: see `run_inference` (default: data.size_divisibility, reference parity).
    per_class: add per-category AP ('AP-<name>') and print a per-class table.
    max_images: evaluate only the first N image ids (quick checks).
    coco_workers: pycocotools scorer: worker processes for COCOeval's per-image stage (identical
      numbers; default num_workers; 0 or 1: serial).
    mesh: 1-D mesh with axis 'data' (default: all devices).
    precision: model matmul / conv precision.
    log: where progress, the COCOeval summaries and the table go.
    progress_every_s: seconds between progress lines.
    paste: 'device' | 'host' (`run_inference`; default config.eval.paste, else 'device').
    scorer: 'auto' | 'faster_coco_eval' | 'pycocotools' (`coco_eval.resolve_scorer`; default
      config.eval.scorer, else 'auto' = faster-coco-eval when installed).

  Returns:
    {'bbox': {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm',
    'ARl'}, 'segm': {...}} in percent (NaN where COCOeval has nothing to evaluate), the same on
    every process. Mask Scoring R-CNN configs score segm results with the mask score.

  Raises:
    EmptyDatasetError, coco_eval.CategoryMismatchError, MissingImagesError (see
    `load_val_set`), host.ImageSizeMismatchError.
  """
  done = infer(config, variables, annotation_file=annotation_file, image_dir=image_dir,
               batch_size_per_device=batch_size_per_device, num_workers=num_workers,
               num_loader_threads=num_loader_threads, pad_multiple=pad_multiple,
               max_images=max_images, mesh=mesh, precision=precision, log=log,
               progress_every_s=progress_every_s, paste=paste)
  coco_workers = num_workers if coco_workers is None else int(coco_workers)
  return score(config, done, workdir=workdir, per_class=per_class, coco_workers=coco_workers,
               scorer=scorer, log=log)


def evaluate_in_background(config: ml_collections.ConfigDict, variables: Any, *,
                           executor: concurrent.futures.Executor, workdir: Optional[str] = None,
                           per_class: bool = False, coco_workers: int = 0,
                           scorer: Optional[str] = None,
                           log: Callable[[str], None] = _default_log, **kwargs
                           ) -> "concurrent.futures.Future[Dict[str, Dict[str, float]]]":
  """`evaluate` whose scoring runs on `executor` (training's periodic evaluation).

  The inference (devices, paste, RLE, gather across processes) runs now, in this thread, and this
  returns as soon as it is done; COCOeval and the writing of workdir's files run on `executor` (a
  thread pool: no collectives happen there). kwargs: `infer`'s.

  Returns:
    a Future of `evaluate`'s metrics.
  """
  done = infer(config, variables, log=log, **kwargs)
  return executor.submit(score, config, done, workdir=workdir, per_class=per_class,
                         coco_workers=coco_workers, scorer=scorer, log=log)


@dataclasses.dataclass
class Inferred:
  """What `infer` hands to `score`."""
  gt: Any  # pycocotools COCO
  image_ids: List[int]
  results: List[Dict[str, Any]]
  stats: InferenceStats


def infer(config: ml_collections.ConfigDict, variables: Any, *, annotation_file: str,
          image_dir: str, batch_size_per_device: int = 1, num_workers: int = 2,
          num_loader_threads: int = 4, pad_multiple: Optional[int] = None,
          max_images: Optional[int] = None, mesh: Optional[Mesh] = None, precision: Any = None,
          log: Callable[[str], None] = _default_log, progress_every_s: float = 30.0,
          paste: Optional[str] = None, paste_chunk_tiles: int = 4096) -> Inferred:
  """The val set's COCO results (`load_val_set` + `run_inference` with a worker pool)."""
  gt, images, table = load_val_set(config, annotation_file, image_dir, max_images=max_images)
  paste = str(paste or eval_setting(config, "paste", "device"))
  pool = None
  if num_workers > 0:
    pool = concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=multiprocessing.get_context("spawn"))
  try:
    results, stats = run_inference(
        config, variables, images, table, batch_size_per_device=batch_size_per_device,
        num_workers=num_workers, num_loader_threads=num_loader_threads,
        pad_multiple=pad_multiple, mesh=mesh, precision=precision, executor=pool, log=log,
        progress_every_s=progress_every_s, paste=paste, paste_chunk_tiles=paste_chunk_tiles)
  finally:
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)
  return Inferred(gt, [im.image_id for im in images], results, stats)


def score(config: ml_collections.ConfigDict, done: Inferred, *, workdir: Optional[str] = None,
          per_class: bool = False, coco_workers: int = 0, scorer: Optional[str] = None,
          log: Callable[[str], None] = _default_log) -> Dict[str, Dict[str, float]]:
  """COCOeval of `infer`'s results; process 0 writes workdir's predictions.json / metrics.json."""
  scorer = str(scorer or eval_setting(config, "scorer", "auto"))
  t0 = time.perf_counter()
  metrics = coco_eval.evaluate_results(
      done.gt, done.results, image_ids=done.image_ids, per_class=per_class,
      num_workers=coco_workers, log=log, scorer=scorer)
  t_coco = time.perf_counter() - t0
  n = len(done.image_ids)
  total = done.stats.wall + t_coco
  log(f"evaluation: {n} images in {total:.1f} s ({n / total:.2f} img/s; "
      f"inference {done.stats.wall:.1f} s, COCOeval {t_coco:.1f} s)")
  if workdir and jax.process_index() == 0:
    write_outputs(workdir, done.results, metrics)
    log(f"wrote {os.path.join(workdir, 'predictions.json')} and "
        f"{os.path.join(workdir, 'metrics.json')}")
  return metrics


def write_outputs(workdir: str, results: Sequence[Dict[str, Any]],
                  metrics: Dict[str, Dict[str, float]]) -> None:
  """workdir/predictions.json (COCO results) and workdir/metrics.json (percent, NaN as null)."""
  os.makedirs(workdir, exist_ok=True)
  for name, obj in (("predictions.json", list(results)),
                    ("metrics.json", coco_eval.metrics_to_json(metrics))):
    tmp = os.path.join(workdir, f".{name}.tmp")
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2 if name == "metrics.json" else None)
    os.replace(tmp, os.path.join(workdir, name))
