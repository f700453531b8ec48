"""Memory: a train state that cannot fit the device is refused before anything is allocated, and running
out of memory later (activations, evaluation chunks) becomes a message that says what to lower."""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import jax


class OutOfMemoryError(MemoryError):
  """The device's memory is too small for what was asked; the message says what to lower."""


def nbytes(tree: Any) -> int:
  """Bytes of every array (or shape-dtype struct) of a pytree."""
  return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def device_memory(device=None) -> int:
  """The memory a computation may use on the device: an accelerator's limit, or the host's available RAM."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  with open("/proc/meminfo") as f:  # the CPU backend reports no limit: the RAM the system can still give
    available = next((line for line in f if line.startswith("MemAvailable:")), None)
  if available is not None:
    return int(available.split()[1]) * 1024
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(abstract_state: Any, runs: int = 1) -> None:
  """Refuses train states (shape-dtype structs, from jax.eval_shape) that cannot fit the device: the
  parameters, their gradient and the optimizer state, for `runs` runs trained together."""
  params, total = nbytes(abstract_state.params), nbytes(abstract_state)
  need = runs * (total + params)  # the state, and one gradient as large as the parameters
  have = device_memory()
  if need > have:
    raise OutOfMemoryError(
        f"The model has {sum(math.prod(p.shape) for p in jax.tree.leaves(abstract_state.params)):,} parameters: "
        f"its train state and gradient take {need / 2**30:.1f} GiB{f' for {runs} runs' if runs > 1 else ''}, more "
        f"than the {have / 2**30:.1f} GiB of memory of {jax.devices()[0].device_kind}. Nothing was written. "
        "Choose a smaller model (model.latent_size, model.hidden, ...), or fewer runs per batched program "
        "(hydra.launcher.max_runs).")


@contextlib.contextmanager
def out_of_memory_says(what: str, advice: str):
  """Turns XLA's RESOURCE_EXHAUSTED into an OutOfMemoryError saying `what` ran out and `advice`."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    detail = next((line for line in str(e).splitlines() if "RESOURCE_EXHAUSTED" in line), str(e))[:200]
    raise OutOfMemoryError(f"Out of memory in {what} ({detail}). {advice}") from None
