"""Restore a trained run from its directory: config, data, model and the latest checkpoint."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf

from cvae_jax import checkpoints, data
from cvae_jax.config import Config, validate
from cvae_jax.data import Dataset
from cvae_jax.models import VAE, create_model


class RestoreError(RuntimeError):
  """The directory is not a trained run; the message says what is missing."""


@dataclasses.dataclass
class Restored:
  cfg: Config
  dataset: Dataset
  model: VAE
  state: Any  # flax TrainState at the latest checkpoint

  @property
  def params(self):
    return self.state.params


def load_config(workdir: Path) -> Config:
  path = Path(workdir) / "config.yaml"
  if not path.exists():
    raise RestoreError(f"{workdir} is not a run directory: it has no config.yaml. Pass the directory a "
                       "training run wrote (outputs/<name>/... or multirun/<name>/...).")
  schema = OmegaConf.structured(Config)
  return validate(OmegaConf.to_object(OmegaConf.merge(schema, yaml.safe_load(path.read_text()))))


def restore_run(workdir: Path, dataset: Optional[Dataset] = None) -> Restored:
  from cvae_jax.training import create_train_state  # training imports evaluation, which imports us
  workdir = Path(workdir)
  cfg = load_config(workdir)
  ckpt_dir = workdir / "checkpoints"
  if not ckpt_dir.is_dir():
    raise RestoreError(f"{ckpt_dir} does not exist: train the run first (rerun its training command).")
  ckpt = checkpoints.Checkpointer(ckpt_dir, cfg.training.max_checkpoints)
  try:
    if ckpt.latest_step() is None:
      raise RestoreError(f"{ckpt_dir} holds no checkpoint: train the run first (rerun its training command).")
    ds = dataset if dataset is not None else data.load(cfg.data)
    if ds.spec.vocab:  # token data: the ids must mean what they meant in training
      from cvae_jax import moses
      moses.save_or_check_vocabulary(workdir, ds.spec, cfg.data.syntax)
    model = create_model(cfg.model, ds.spec, cfg.objective.likelihood)
    state = ckpt.restore_latest_good(create_train_state(cfg, model, ds.spec))
    if state is None:
      raise RestoreError(f"No checkpoint in {ckpt_dir} is readable (see the warnings above): retrain the run.")
  finally:
    ckpt.close()
  return Restored(cfg, ds, model, state)
