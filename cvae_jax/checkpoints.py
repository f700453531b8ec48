"""Orbax checkpoints: one CheckpointManager per run directory, keeping the newest few.

Orbax writes each step to a temporary folder and renames it when complete, so a kill during a
save leaves the previous checkpoint as the latest complete one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: Path, max_to_keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self._manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Asynchronous; `wait` (or the next save) makes it durable."""
    self._manager.save(step, args=ocp.args.StandardSave(state))

  def restore(self, like: Any, step: Optional[int] = None) -> Any:
    """Restores into the structure, shapes and dtypes of `like` (a state built by create_train_state)."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
