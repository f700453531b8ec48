"""Batched sweeps: runs that differ only in seed, beta and learning rate train as one program.

`train_batched(cfgs, workdirs)` hands the runs to their task, which stacks their train states on a leading
axis and trains them with one jitted epoch over the shared data (vmapped over the runs; a lax.map on CPU:
engine.epoch.over_runs). Every run still gets its own run directory, metrics, checkpoints, figures,
eval.json and results.json, equal (within float tolerance: vmapped matmuls may round differently) to
training it alone. Runs already finished are skipped; runs resumed from different steps train one after
another. The Hydra launcher `hydra/launcher=batched` (hydra_plugins/cvae_jax_batched) groups a sweep's
jobs with `group_key`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from cvae_jax import experiment, tasks
from cvae_jax.config import Config, to_dict
from cvae_jax.data import Dataset

# Config keys that may differ inside one batched program: they enter the step as traced scalars.
BATCHABLE = ("seed", "objective.beta", "optimizer.learning_rate")


def group_key(cfg: Config) -> str:
  """Runs with equal keys can train together: their configs agree on everything but BATCHABLE."""
  config = to_dict(cfg)
  config["seed"] = config["objective"]["beta"] = config["optimizer"]["learning_rate"] = None
  return json.dumps(config, sort_keys=True)


def can_batch(cfg: Config) -> bool:
  return tasks.get(cfg.task).batchable and not cfg.training.data_parallel and cfg.training.distributed == "none"


def train_batched(cfgs: Sequence[Config], workdirs: Sequence[str | Path], dataset: Optional[Dataset] = None) -> list[dict]:
  """Trains the runs together; returns each run's results (in order). Raises ValueError when the
  configs differ in more than BATCHABLE or their task cannot batch runs."""
  cfgs = [experiment.validate(c) for c in cfgs]
  if len({group_key(c) for c in cfgs}) > 1:
    raise ValueError(f"Batched runs may differ only in {', '.join(BATCHABLE)}; these differ in more.")
  if any(c.training.data_parallel for c in cfgs):
    raise ValueError("Batched runs train on one device: training.data_parallel=true runs train one by one.")
  task = tasks.get(cfgs[0].task)
  if not task.batchable:
    raise ValueError(f"task={task.name} trains one run at a time.")
  return task.train(cfgs, [Path(w) for w in workdirs], dataset)
