"""Device mesh and data-parallel shardings for training (jax.jit + NamedSharding, no pmap).

One mesh axis, 'data', over every device of every process. The global batch is sharded along its
leading dimension; parameters, optimizer state and batch statistics are replicated. Under `jax.jit`
the train step is written for the global batch (means over the batch are global means, trainable
BatchNorm statistics are synchronized over the whole batch, like SyncBN), so the result does not
depend on the number of devices up to float reduction order.

Multi-host: call `initialize_distributed()` first (jax.distributed.initialize(), which reads the
coordinator from the cluster environment: SLURM, Open MPI, Cloud TPU, or the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID variables); each process then loads only its own
`global_batch / process_count` images and `shard_batch` assembles the global arrays with
`jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maskrcnn_jax import errors

logger = logging.getLogger(__name__)

DATA_AXIS = "data"


def initialize_distributed(force: bool = False) -> bool:
  """jax.distributed.initialize() when running multi-process (or when `force`).

  Returns True if it initialized. Detection: any of JAX_COORDINATOR_ADDRESS, SLURM_NTASKS > 1,
  OMPI_COMM_WORLD_SIZE > 1 in the environment. Must run before any other JAX call.
  """
  env = os.environ
  multi = (bool(env.get("JAX_COORDINATOR_ADDRESS"))
           or int(env.get("SLURM_NTASKS", "1") or 1) > 1
           or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)
  if not (multi or force):
    return False
  jax.distributed.initialize()
  logger.info("jax.distributed: process %d of %d, %d local / %d global devices",
              jax.process_index(), jax.process_count(), jax.local_device_count(),
              jax.device_count())
  return True


def make_mesh(num_devices: int = -1, devices: Optional[list] = None) -> Mesh:
  """A 1-D mesh named 'data' over `num_devices` devices (-1: all of them, every process)."""
  devices = list(jax.devices() if devices is None else devices)
  if num_devices is not None and num_devices > 0:
    if num_devices > len(devices):
      raise errors.ConfigError(
          f"mesh.data={num_devices} but only {len(devices)} devices are visible")
    if jax.process_count() > 1 and num_devices != len(devices):
      raise errors.ConfigError("multi-process training uses every device (mesh.data = -1)")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise errors.ConfigError(
        f"train.global_batch={global_batch} is not a multiple of the {n} devices of "
        f"the mesh; use a multiple of {n}")
  if global_batch % jax.process_count():
    raise errors.ConfigError(
        f"train.global_batch={global_batch} is not a multiple of the "
        f"{jax.process_count()} processes")


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict:
  """Process-local numpy batch (leading dim = global_batch / process_count) -> global jax.Arrays.

  Every process passes its own, different, rows; the global array is their concatenation in
  process order (jax.make_array_from_process_local_data).
  """
  sharding = data_sharding(mesh)
  out = {}
  nproc = jax.process_count()
  for key, value in batch.items():
    value = np.asarray(value)
    global_shape = (value.shape[0] * nproc,) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of `tree` (host or device arrays) replicated on the mesh."""
  return jax.device_put(tree, replicated(mesh))
