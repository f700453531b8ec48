"""Runs as a whole: the functions a command line, a test or a notebook calls.

  validate(cfg)                     the config's checks: shared, each registry entry's, the task's
  train_and_evaluate(cfg, workdir)  trains (resuming), evaluates, writes results.json; returns the results
  load_config(workdir)              a run directory's config, typed and validated (older layouts migrated)
  restore_run(workdir)              config, data, task, model and latest checkpoint of a trained run
  load_plugins()                    imports the modules named in $CVAE_JAX_PLUGINS (each registers entries)

    from cvae_jax.experiment import train_and_evaluate
    from cvae_jax.schema import structured
    results = train_and_evaluate(structured({"data": {"name": "mnist"}, "model": {"arch": "mlp"}}), "outputs/nb")
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable, Optional

import yaml

from cvae_jax import data, schema, tasks
from cvae_jax.config import Config
from cvae_jax.data import Dataset
from cvae_jax.engine import distributed
from cvae_jax.tasks import Restored, RestoreError

PLUGINS_ENV = "CVAE_JAX_PLUGINS"


def validate(cfg: Config) -> Config:
  """Raises ConfigError on the first value the run cannot use; returns the config."""
  schema.validate(cfg)
  tasks.get(cfg.task).check(cfg)
  return cfg


def train_and_evaluate(cfg: Config, workdir: str | Path, dataset: Optional[Dataset] = None,
                       on_trace: Optional[Callable[[], None]] = None) -> dict:
  """Trains the config's task in `workdir` (resuming from its latest checkpoint; a finished run is not
  retrained), evaluates, writes figures and results.json, and returns the results. `dataset` replaces the
  config's data (tests); `on_trace` is called each time the train epoch is traced."""
  validate(cfg)
  distributed.initialize(cfg.training)  # several processes: join the others first (training.distributed)
  return tasks.get(cfg.task).train([cfg], [Path(workdir)], dataset, on_trace)[0]


def load_config(workdir: str | Path) -> Config:
  path = Path(workdir) / "config.yaml"
  if not path.exists():
    raise RestoreError(f"{workdir} is not a run directory: it has no config.yaml. Pass the directory a "
                       "training run wrote (outputs/<name>/... or multirun/<name>/...).")
  try:
    config = yaml.safe_load(path.read_text())
    typed = schema.structured(config)
  except Exception as e:  # noqa: BLE001  unreadable YAML, bytes, or keys and types the schema refuses
    raise RestoreError(f"{path} does not hold a config this version can read ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}). Restore that file from a copy, or retrain "
                       "the run in a new directory.") from e
  return validate(typed)


def restore_run(workdir: str | Path, dataset: Optional[Dataset] = None) -> Restored:
  workdir = Path(workdir)
  cfg = load_config(workdir)
  task = tasks.get(cfg.task)
  if not (workdir / "checkpoints").is_dir():
    raise RestoreError(f"{workdir / 'checkpoints'} does not exist: train the run first (rerun its training command).")
  ds = dataset if dataset is not None else data.load(cfg.data)
  model, state = task.restore(cfg, ds, workdir)
  return Restored(cfg, ds, task, model, state)


def load_plugins() -> list[str]:
  """Imports each module named in $CVAE_JAX_PLUGINS (comma-separated, importable from sys.path), so that the
  tasks, model families, datasets and likelihoods it registers can be chosen by name. Returns the names."""
  names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
  for name in names:
    importlib.import_module(name)
  return names
