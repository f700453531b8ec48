"""`hydra/launcher=batched`: a sweep's runs that differ only in seed, beta and learning rate train as one
vmapped program (cvae_jax.batched) when their task can batch runs, then every job runs through the usual task function, which finds
its results.json and returns at once. Jobs that cannot be batched run one after another as with the
basic launcher; a batched group that fails (a NaN in one run, ...) falls back to that too, so each
job's failure is recorded in its own directory.

  python -m cvae_jax.train +experiment=beta_sweep hydra/launcher=batched
"""

import copy
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class BatchedLauncherConf:
  _target_: str = "hydra_plugins.cvae_jax_batched.batched_launcher.BatchedLauncher"
  max_runs: int = 0  # most runs in one program (0: a whole group); memory grows with the number of runs


ConfigStore.instance().store(group="hydra/launcher", name="batched", node=BatchedLauncherConf, provider="cvae_jax")


class BatchedLauncher(BasicLauncher):
  def __init__(self, max_runs: int = 0) -> None:
    super().__init__()
    self.max_runs = max_runs

  def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    # Imported here: Hydra imports every launcher plugin at start-up, and JAX should load only if this one runs.
    from cvae_jax.batched import can_batch, group_key, train_batched
    from cvae_jax.experiment import validate

    if self.max_runs < 0:
      raise ValueError(f"hydra.launcher.max_runs={self.max_runs}: use 0 (whole groups) or a positive cap.")
    groups = defaultdict(list)
    for overrides in job_overrides:
      try:
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        workdir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        task_config = copy.deepcopy(sweep_config)
        with open_dict(task_config):
          del task_config["hydra"]
        cfg = validate(OmegaConf.to_object(task_config))
      except Exception:  # noqa: BLE001  the job runs on its own below and reports its error there
        continue
      if can_batch(cfg):
        groups[group_key(cfg)].append((cfg, workdir))
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save at INFO
    for members in groups.values():
      size = self.max_runs or len(members)
      for start in range(0, len(members), size):
        chunk = members[start:start + size]
        if len(chunk) < 2:
          continue
        try:
          train_batched([c for c, _ in chunk], [w for _, w in chunk])
        except Exception as e:  # noqa: BLE001  each job then runs (and fails, if it must) on its own
          log.warning("Batched training of %d runs stopped (%s: %s); they run one by one.", len(chunk),
                      type(e).__name__, e)
    return super().launch(job_overrides, initial_job_idx)
