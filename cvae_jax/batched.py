"""Batched sweeps: runs that differ only in seed, beta and learning rate train as one program.

`train_batched(cfgs, workdirs)` stacks the runs' train states on a leading axis and trains them with one
jitted epoch over the shared data (vmapped over the runs; a lax.map on CPU: training.over_runs). Every
run still gets its own run directory, metrics, checkpoints, figures, eval.json and results.json, equal
(within float tolerance: vmapped matmuls may round differently) to training it alone with
`train_and_evaluate`. Runs already finished are skipped; runs resumed from different steps fall back to
training one after another.
The Hydra launcher `hydra/launcher=batched` (hydra_plugins/cvae_jax_batched) groups a sweep's jobs
with this module's `group_key`.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from cvae_jax import anomaly, checkpoints, data, rundir, training
from cvae_jax.config import Config, to_dict, validate
from cvae_jax.data import Dataset
from cvae_jax.keys import Stream, stream_key
from cvae_jax.models import create_model

log = logging.getLogger(__name__)

# Config keys that may differ inside one batched program: they enter the step as traced scalars.
BATCHABLE = ("seed", "objective.beta", "optimizer.learning_rate")


def group_key(cfg: Config) -> str:
  """Runs with equal keys can train together: their configs agree on everything but BATCHABLE."""
  config = to_dict(cfg)
  config["seed"] = config["objective"]["beta"] = config["optimizer"]["learning_rate"] = None
  return json.dumps(config, sort_keys=True)


def stack(trees):
  """Pytrees of equal structure -> one pytree whose leaves have a leading axis of runs."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def stack_states(states):
  """One TrainState whose arrays have a leading axis of runs (the static apply_fn and tx of the first)."""
  return states[0].replace(step=jnp.stack([s.step for s in states]), params=stack([s.params for s in states]),
                           opt_state=stack([s.opt_state for s in states]))


def _index(tree, r: int):
  return jax.tree.map(lambda a: a[r], tree)


def train_batched(cfgs: Sequence[Config], workdirs: Sequence[str | Path], dataset: Optional[Dataset] = None) -> list[dict]:
  """Trains the runs together; returns each run's results (in order). Raises ValueError when the
  configs differ in more than BATCHABLE."""
  cfgs, workdirs = [validate(c) for c in cfgs], [Path(w) for w in workdirs]
  if len({group_key(c) for c in cfgs}) > 1:
    raise ValueError(f"Batched runs may differ only in {', '.join(BATCHABLE)}; these differ in more.")
  if any(c.training.data_parallel for c in cfgs):
    raise ValueError("Batched runs train on one device: training.data_parallel=true runs train one by one.")
  results: dict[int, dict] = {}
  for r, (cfg, workdir) in enumerate(zip(cfgs, workdirs)):
    rundir.check_config(workdir, to_dict(cfg))
    finished = rundir.read_results(workdir)
    if finished is not None:
      results[r] = finished
  todo = [r for r in range(len(cfgs)) if r not in results]
  if not todo:
    return [results[r] for r in range(len(cfgs))]

  cfg0 = cfgs[todo[0]]
  ds = dataset if dataset is not None else data.load(cfg0.data)
  spec, epochs = ds.spec, cfg0.training.epochs
  steps = training.steps_per_epoch(cfg0, len(ds.train))
  model = create_model(cfg0.model, spec, cfg0.objective.likelihood)
  if cfg0.evaluation.anomaly_dataset:
    anomaly.load_anomaly_dataset(cfg0, spec)  # a wrong name or shape stops us before any training
  fresh = [training.create_train_state(cfgs[r], model, spec) for r in todo]
  ckpts = [checkpoints.Checkpointer(workdirs[r] / "checkpoints", cfgs[r].training.max_checkpoints) for r in todo]
  logs: list[rundir.MetricsLog] = []
  try:
    restored = [c.restore_latest_good(s) for c, s in zip(ckpts, fresh)]
    start_steps = {0 if s is None else int(s.step) for s in restored}
    if len(start_steps) > 1:  # resumed at different points: train them one after another
      log.warning("Batched runs resume from different steps %s; training them one after another.", sorted(start_steps))
      for c in ckpts:
        c.close()
      ckpts = []
      for r in todo:
        results[r] = training.train_and_evaluate(cfgs[r], workdirs[r], ds)
      return [results[r] for r in range(len(cfgs))]
    states = stack_states([s if s is not None else f for s, f in zip(restored, fresh)])
    for r in todo:
      rundir.init(workdirs[r], to_dict(cfgs[r]))
    start_epoch = start_steps.pop() // steps
    logs += [rundir.MetricsLog(workdirs[r], start_epoch * steps) for r in todo]
    hypers = stack([training.run_hyper(cfgs[r]) for r in todo])

    train_images, train_labels = jax.device_put(ds.train.images), jax.device_put(ds.train.labels)
    eval_splits = {"test": ds.test} | ({"val": ds.validation} if ds.validation is not None else {})
    evaluate_all = training.make_epoch_evaluation(
        cfg0, model, spec, {k: (jax.device_put(s.images), jax.device_put(s.labels)) for k, s in eval_splits.items()})
    train_epoch = training.make_train_epoch(cfg0, model, spec, len(ds.train), batched=True)
    eval_keys = [stream_key(cfgs[r].seed, Stream.EVAL) for r in todo]
    offsets, t0 = [m.wall_time for m in logs], time.perf_counter()
    log.info("Training %d runs as one batched program: %s", len(todo), ", ".join(str(workdirs[r]) for r in todo))
    for epoch in range(start_epoch, epochs):
      first_step = epoch * steps
      states, step_metrics = train_epoch(states, train_images, train_labels, epoch, hypers)
      step_metrics = jax.device_get(step_metrics)
      # One program for all runs: the wall time of each run is the batch's (the cost of a run is this / runs).
      elapsed = time.perf_counter() - t0
      for i, r in enumerate(todo):
        run_metrics = _index(step_metrics, i)
        training.check_finite(run_metrics, first_step)
        row = training.epoch_row(run_metrics, first_step + steps, epoch) | evaluate_all(_index(states.params, i), eval_keys[i])
        row["wall_time"] = offsets[i] + elapsed
        logs[i].write(row)
        training.log_epoch(row, epochs, workdirs[r])
      if (epoch + 1) % cfg0.training.checkpoint_every_epochs == 0 or epoch + 1 == epochs:
        for i in range(len(todo)):
          ckpts[i].save(first_step + steps, _index(states, i))
    for c in ckpts:
      c.wait()
  finally:
    for c in ckpts:
      c.close()
    for m in logs:
      m.close()
  for i, r in enumerate(todo):
    results[r] = training.finish_run(cfgs[r], ds, model, _index(states.params, i), workdirs[r], logs[i], epochs * steps)
  return [results[r] for r in range(len(cfgs))]
