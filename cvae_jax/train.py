"""Command line: `python -m cvae_jax.train [+experiment=NAME] [key=value ...] [--multirun]`.

A thin Hydra entry point: compose and type-check the config, find the run directory, call
experiment.train_and_evaluate. Nothing below this module imports Hydra. Before composing, it imports the
plug-in modules named in $CVAE_JAX_PLUGINS and gives Hydra every registered dataset's and model family's
config node (`<name>_schema` in the data and model groups, which conf/data/*.yaml and conf/model/*.yaml extend).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Sequence

import hydra
from hydra import compose as hydra_compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cvae_jax import data, experiment, models, resources, tasks, xla_cpu
from cvae_jax.config import Config, ConfigError
from cvae_jax.data import DataError
from cvae_jax.engine import distributed, preemption
from cvae_jax.engine.checkpoints import CheckpointMismatchError, DiskFullError
from cvae_jax.engine.epoch import NonFiniteLossError
from cvae_jax.engine.memory import OutOfMemoryError
from cvae_jax.engine.rundir import RunDirError, directory_name

log = logging.getLogger(__name__)

experiment.load_plugins()
_store = ConfigStore.instance()
_store.store(name="config_schema", node=Config)
for _entry in data.DATASETS.values():
  _store.store(group="data", name=f"{_entry.name}_schema", node=_entry.config)
for _family in models.FAMILIES.values():
  _store.store(group="model", name=f"{_family.name}_schema", node=_family.config)
# conf/config.yaml names run directories ${run_dirname:${hydra.job.override_dirname}}: short enough for a file name.
OmegaConf.register_new_resolver("run_dirname", directory_name, replace=True)

# Errors that come from the user's input or environment: one clear line, exit code 2, no traceback.
USER_ERRORS = (ConfigError, DataError, RunDirError, NonFiniteLossError, CheckpointMismatchError, OutOfMemoryError,
               DiskFullError)


_created_by_this_run: set[Path] = set()  # output folders that did not exist before this process


def _clean_up(path: Path) -> None:
  """A run that failed before it started leaves nothing behind: the folders Hydra created for it (and
  the log file in them) are removed; a folder that existed before is never touched."""
  if path.resolve() in _created_by_this_run and not (path / "config.yaml").exists():
    shutil.rmtree(path, ignore_errors=True)
  for folder in path.parents:  # the empty parents Hydra made (outputs/<name>/)
    if folder.resolve() not in _created_by_this_run or not folder.is_dir() or any(folder.iterdir()):
      return
    folder.rmdir()


FAILED = "failed.json"  # in a sweep job's directory: why the job failed (the report lists it)


def _check_output_dir(path: Path) -> None:
  """Stops with one line when the run or sweep directory cannot be created or written."""
  existing = next(p for p in (path, *path.parents) if p.exists())
  _created_by_this_run.update(p.resolve() for p in (path, *path.parents) if not p.exists())
  if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
    what = "is not a directory" if not existing.is_dir() else "is not writable"
    print(f"error: cannot create the output directory {path}: {existing} {what}. Choose another with "
          "hydra.run.dir=... (hydra.sweep.dir=... for sweeps).", file=sys.stderr)
    sys.exit(2)


class RunChecks(Callback):
  """Before Hydra creates the output directory: check it can. After a sweep: name the failed jobs and
  exit non-zero if there are any."""

  def on_run_start(self, config: DictConfig, **kwargs) -> None:
    _check_output_dir(Path(config.hydra.run.dir))

  def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
    _check_output_dir(Path(config.hydra.sweep.dir))

  def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
    failed = sorted(Path(config.hydra.sweep.dir).glob(f"*/{FAILED}"))
    if failed:
      print(f"error: {len(failed)} job(s) of the sweep failed; the others' results are kept:", file=sys.stderr)
      for path in failed:
        print(f"  {path.parent}: {json.loads(path.read_text())['error']}", file=sys.stderr)
      sys.exit(1)


# The repository's conf/ in a clone, the copy inside the package when installed from a wheel; users add
# their own folders on top with hydra.searchpath=[file:///path/to/my_conf].
CONF_DIR = str(resources.conf_dir())


def compose(overrides: Sequence[str] = ()) -> Config:
  """The typed, validated config the command line would train for these overrides (no `--multirun`, no
  `hydra.*` keys): for notebooks and scripts, with Hydra's compose API on the same conf/.

      cfg = compose(["+experiment=smoke", "training.epochs=3"])
      results = experiment.train_and_evaluate(cfg, "runs/smoke")
  """
  with initialize_config_dir(CONF_DIR, version_base="1.3"):
    return experiment.validate(OmegaConf.to_object(hydra_compose("config", overrides=list(overrides))))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(dict_cfg: DictConfig) -> float:
  xla_cpu.use_fast_scheduler()  # before JAX's first computation creates its CPU client
  workdir = Path(HydraConfig.get().runtime.output_dir)
  in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
  try:
    cfg: Config = experiment.validate(OmegaConf.to_object(dict_cfg))
    results = experiment.train_and_evaluate(cfg, workdir)
  except preemption.Preempted as e:  # the checkpoint is saved: requeue, and stop with the status that says so
    requeued = cfg.training.requeue and distributed.is_primary() and preemption.requeue_slurm_job()
    print(f"preempted: {e}{' The Slurm job is requeued.' if requeued else ''}", file=sys.stderr)
    sys.exit(preemption.PREEMPTED_EXIT)
  except Exception as e:  # noqa: BLE001  a sweep goes on past one failed job; a single run stops
    if isinstance(e, OSError) and e.errno == errno.ENOSPC and not isinstance(e, DiskFullError):
      e = DiskFullError(errno.ENOSPC, f"The disk is full: {e.strerror} ({e.filename or workdir}). The last "
                        "checkpoint is kept. Free some space, then rerun the same command: it resumes from there.")
    if in_sweep:
      # Record the failure where the report finds it; the other jobs keep running.
      workdir.mkdir(parents=True, exist_ok=True)
      detail = str(e) if isinstance(e, USER_ERRORS) else traceback.format_exc(limit=-3)
      (workdir / FAILED).write_text(json.dumps({"error": f"{type(e).__name__}: {e}", "detail": detail}) + "\n")
      log.error("job failed: %s", e)
      return float("nan")
    if not isinstance(e, USER_ERRORS):
      raise
    _clean_up(workdir)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if not distributed.is_primary():  # the first process writes the run's files and reports its number
    return float("nan")
  (workdir / FAILED).unlink(missing_ok=True)  # a rerun that succeeded clears an earlier failure
  return tasks.get(cfg.task).headline_value(results)  # what a hyperparameter sweeper (e.g. Optuna) maximizes


if __name__ == "__main__":
  # Run the function of the imported module, not of __main__: Hydra's callbacks (RunChecks) import
  # cvae_jax.train by name, and both must share _created_by_this_run.
  from cvae_jax import train
  train.main()
