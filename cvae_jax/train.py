"""Command line: `python -m cvae_jax.train [+experiment=NAME] [key=value ...] [--multirun]`.

A thin Hydra entry point: compose and type-check the config, find the run directory, call
train_and_evaluate. Nothing below this module imports Hydra.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cvae_jax.config import Config, ConfigError, validate
from cvae_jax.data import DataError
from cvae_jax.rundir import RunDirError
from cvae_jax.training import NonFiniteLossError, train_and_evaluate

log = logging.getLogger(__name__)
ConfigStore.instance().store(name="config_schema", node=Config)

# Errors that come from the user's input or environment: one clear line, exit code 2, no traceback.
USER_ERRORS = (ConfigError, DataError, RunDirError, NonFiniteLossError)


def _remove_if_empty(path: Path) -> None:
  """Hydra creates the run directory before we can validate; leave no empty folders behind."""
  for folder in (path, *path.parents):
    if folder == Path.cwd() or not folder.is_dir() or any(folder.iterdir()):
      return
    folder.rmdir()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dict_cfg: DictConfig) -> float:
  workdir = Path(HydraConfig.get().runtime.output_dir)
  try:
    cfg: Config = validate(OmegaConf.to_object(dict_cfg))
    results = train_and_evaluate(cfg, workdir)
  except USER_ERRORS as e:
    _remove_if_empty(workdir)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  return results["elbo"]  # what a hyperparameter sweeper (e.g. Optuna) would maximize


if __name__ == "__main__":
  main()
