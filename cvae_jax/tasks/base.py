"""The task protocol and the registry of tasks by name (`task=NAME`).

A task is what a run trains, evaluates and reports. The command lines, the sweep report, the batched
launcher and restore look a task up by name and call these methods; no generic module names a task. A new
task is one module with a Task subclass and a call to `register` (docs/architecture.md).
"""
from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

from cvae_jax.config import Config, ConfigError
from cvae_jax.data import Dataset
from cvae_jax.engine import loop
from cvae_jax.registry import Registry


class RestoreError(RuntimeError):
  """The directory is not a trained run; the message says what is missing."""


@dataclasses.dataclass
class Restored:
  """A trained run brought back from its directory (experiment.restore_run)."""
  cfg: Config
  dataset: Dataset
  task: "Task"
  model: Any   # the task's model (a VAE for the density tasks)
  state: Any   # its train state at the latest checkpoint

  @property
  def params(self):
    """The parameters the run selected: the best on its stopping split where the state keeps them
    (loop.EarlyStoppingState), else the latest."""
    return loop.selected_params(self.state)


class Task(abc.ABC):
  name: ClassVar[str]
  headline: ClassVar[str]               # the results.json number a sweeper maximizes and a report sorts by
  headline_sign: ClassVar[float] = 1.0  # -1 when the headline is a loss (lower is better)
  report_columns: ClassVar[tuple[str, ...]]  # the results.json numbers a sweep report tabulates
  batchable: ClassVar[bool] = False     # runs that differ in seed, beta and learning rate train as one program

  def check(self, cfg: Config) -> None:
    """Raises ConfigError when the config asks what this task cannot do (its own keys, its data)."""

  @abc.abstractmethod
  def train(self, cfgs: Sequence[Config], workdirs: Sequence[Path], dataset: Optional[Dataset] = None,
            on_trace: Optional[Callable[[], None]] = None) -> list[dict]:
    """Trains each run in its directory (resuming; a finished run is not retrained), evaluates it, writes
    results.json; returns each run's results. Several runs only when `batchable` (one program)."""

  def headline_value(self, results: dict) -> float:
    """The number a sweeper maximizes."""
    return self.headline_sign * results[self.headline]

  def report_row(self, workdir: Path, results: dict) -> dict:
    """A finished run's numbers in a sweep report: its report_columns (from results.json by default)."""
    return {k: results.get(k) for k in self.report_columns}

  def restore(self, cfg: Config, dataset: Dataset, workdir: Path) -> tuple[Any, Any]:
    """(model, state at the latest checkpoint) of a trained run, for evaluate, generate and notebooks."""
    raise ConfigError(f"task={self.name} runs cannot be restored for evaluation or generation: their "
                      "results.json holds the test numbers.")

  def evaluate(self, restored: Restored, workdir: Path) -> dict:
    """The end-of-training evaluation again, on a restored run with its (possibly changed) config."""
    raise ConfigError(f"task={self.name} has no separate evaluation: its results.json holds the test numbers.")


TASKS: Registry[Task] = Registry("task", "a task")
register, get = TASKS.register, TASKS.lookup
