"""Several processes, one run: JAX's distributed runtime (multi-controller SPMD).

Every process runs the same command. `initialize` joins them (training.distributed=auto reads the
cluster's environment: Slurm, Open MPI, ...; explicit: training.coordinator_address, num_processes,
process_id). Then jax.devices() holds every process's devices, the data-parallel mesh spans them all, and
a global batch splits over them. Every process takes part in each compiled step and each checkpoint save
(Orbax writes one checkpoint together); the run directory's own files (config, metrics, results) are
written by process 0 alone (`is_primary`).
"""
from __future__ import annotations

import logging

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cvae_jax.config import ConfigError, Distributed, TrainingConfig

log = logging.getLogger(__name__)


def initialize(training: TrainingConfig) -> None:
  """Joins this process to the others of the run (once per process; before any JAX computation)."""
  mode = Distributed(training.distributed)
  if mode == Distributed.none or jax.distributed.is_initialized():
    return
  # CPU processes exchange their gradients through Gloo; accelerators use their own collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if mode == Distributed.explicit:
    missing = [k for k in ("coordinator_address", "num_processes", "process_id") if getattr(training, k) is None]
    if missing:
      raise ConfigError(f"training.distributed=explicit needs {', '.join('training.' + k for k in missing)} (the "
                        "coordinator's host:port, the number of processes, and this process's id 0..n-1).")
    if not 0 <= training.process_id < training.num_processes:
      raise ConfigError(f"training.process_id={training.process_id} is invalid: it must be in 0.."
                        f"{training.num_processes - 1} (training.num_processes={training.num_processes}).")
    jax.distributed.initialize(training.coordinator_address, training.num_processes, training.process_id)
  else:
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
      raise ConfigError(f"training.distributed=auto found no cluster to join ({e}). Run it under srun (Slurm), "
                        "mpirun, or set training.distributed=explicit with training.coordinator_address, "
                        "num_processes and process_id.") from e
  log.info("Process %d of %d; %d devices in all (%d here).", jax.process_index(), jax.process_count(),
           jax.device_count(), jax.local_device_count())


def is_primary() -> bool:
  """Whether this process writes the run directory's files (process 0; the only one without distribution)."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """True when `flag` holds on any process: every process must call it at the same point (a collective)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.max(multihost_utils.process_allgather(np.asarray(int(flag), np.int32))))


def _global(a, sharding) -> jax.Array:
  """One global array from a host array every process holds whole: each device gets its own part."""
  a = np.asarray(a)
  return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def replicate(mesh: Mesh):
  """Returns put(tree): every array of `tree` (the same on every process) copied to every device of the mesh."""
  sharding = NamedSharding(mesh, PartitionSpec())
  return lambda tree: jax.tree.map(lambda a: _global(a, sharding), tree)


def split_batches(mesh: Mesh, batched: bool = False):
  """Returns put(batches): a piece's streamed batches [(runs,) steps, B, ...] (the same on every process) as
  global arrays whose batch axis is split over the mesh's "data" axis."""
  lead = (None, None) if batched else (None,)
  return lambda tree: jax.tree.map(lambda a: _global(a, NamedSharding(mesh, PartitionSpec(*lead, "data"))), tree)
