"""The training loop, once for every model: epochs of the compiled epoch function, the non-finite guard,
per-epoch metrics, checkpoints and resume, and early stopping as a hook.

A Phase is a directory the loop trains into (checkpoints/, metrics.jsonl, tb/): a run directory, or a
part of one (a task that trains several models gives each its own; the sample judge's classifier/). `fit` trains one
state, or N runs' states stacked on a leading axis (a batched sweep), each run with its own phase.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.training import train_state
from tqdm.auto import tqdm

from cvae_jax.engine import checkpoints, distributed, rundir
from cvae_jax.engine import preemption as preemption_lib
from cvae_jax.engine.epoch import check_finite, epoch_row
from cvae_jax.engine.memory import out_of_memory_says

log = logging.getLogger(__name__)
SUMMARY = ("train/loss", "test/elbo", "test/rec", "test/kl", "stop/loss", "stop/best")  # the numbers logged per epoch


class Phase:
  """The checkpoints and metrics of one model's training, in `directory`."""

  def __init__(self, directory: Path, max_checkpoints: int, name: Optional[str] = None):
    self.directory = Path(directory)
    self.name = name or self.directory.name
    self.checkpointer = checkpoints.Checkpointer(self.directory / "checkpoints", max_checkpoints)
    self.metrics: Optional[rundir.MetricsLog] = None

  def restore(self, like: Any, legacy=()) -> Optional[Any]:
    """The newest readable checkpoint in `like`'s structure (see Checkpointer.restore_latest_good), or None."""
    return self.checkpointer.restore_latest_good(like, legacy)

  def open_metrics(self, resume_step: int) -> None:
    self.directory.mkdir(parents=True, exist_ok=True)
    self.metrics = rundir.MetricsLog(self.directory, resume_step)

  def close(self) -> None:
    self.checkpointer.close()
    if self.metrics is not None:
      self.metrics.close()


class EarlyStoppingState(train_state.TrainState):
  """A train state with an early-stopping record: the best parameters so far, their stopping loss, and the
  epochs since. It lives in the state (not in a flax.training.early_stopping.EarlyStopping beside it) so
  that one checkpoint holds it, and its patience counts epochs without improvement (flax's stops one later)."""
  best_params: Any = None
  best_loss: jax.Array = None
  bad_epochs: jax.Array = None

  @classmethod
  def start(cls, params, tx, **kwargs) -> "EarlyStoppingState":
    return cls.create(apply_fn=None, params=params, tx=tx, best_params=_copy(params),
                      best_loss=jnp.asarray(jnp.inf, jnp.float32), bad_epochs=jnp.asarray(0), **kwargs)


def selected_params(state):
  """The parameters a run keeps: the best so far where the state records them (EarlyStoppingState), else the
  latest."""
  best = getattr(state, "best_params", None)
  return state.params if best is None else best


def _copy(tree):
  """Separate buffers: the epoch donates the state's, and one buffer may not be donated twice."""
  return jax.tree.map(jnp.copy, tree)


class EarlyStopping:
  """The hook `fit` calls after each epoch: it scores the parameters by stopping_loss(params) -> float,
  keeps the best, and ends training after `patience` epochs without a lower loss."""

  def __init__(self, patience: int, stopping_loss: Callable[[Any], float]):
    self.patience, self.stopping_loss = patience, stopping_loss

  def done(self, state: EarlyStoppingState) -> bool:
    return int(state.bad_epochs) >= self.patience

  def __call__(self, state: EarlyStoppingState) -> tuple[EarlyStoppingState, dict]:
    stop = float(self.stopping_loss(state.params))
    better = stop < float(state.best_loss)
    state = state.replace(best_params=_copy(state.params) if better else state.best_params,
                          best_loss=jnp.asarray(min(stop, float(state.best_loss)), jnp.float32),
                          bad_epochs=jnp.asarray(0 if better else int(state.bad_epochs) + 1))
    return state, {"stop/loss": stop, "stop/best": float(state.best_loss)}


def index(tree, i: int):
  """Run i's part of a pytree whose leaves carry a leading axis of runs."""
  return jax.tree.map(lambda a: a[i], tree)


def stack(trees):
  """Pytrees of equal structure -> one pytree whose leaves have a leading axis of runs."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def stack_states(states):
  """One TrainState whose arrays have a leading axis of runs (the static apply_fn and tx of the first)."""
  return states[0].replace(step=jnp.stack([s.step for s in states]), params=stack([s.params for s in states]),
                           opt_state=stack([s.opt_state for s in states]))


def fit(phases: Sequence[Phase], state, train_epoch: Callable, images, labels, *, epochs: int, steps: int,
        checkpoint_every: int = 1, checkpoint_every_steps: int = 0, hypers=None,
        epoch_metrics: Optional[Callable[[int, Any], dict]] = None,
        epoch_images: Optional[Callable[[int, Any], dict]] = None, early_stopping: Optional[EarlyStopping] = None,
        progress: bool = False, preemption: Optional[preemption_lib.Watch] = None):
  """Trains `state` from its step to `epochs` epochs of `steps` steps and returns it.

  One phase: `state` is one run's. Several: `state` and `hypers` hold a leading axis of runs, trained by
  one batched `train_epoch` (engine.epoch.TrainEpoch, or any function with its call signature). Each epoch:
  the step metrics are checked for non-finite losses (the run stops with the step; the last good checkpoint
  is kept), each run's line gets the train/* means, then epoch_metrics(run index, params) and the
  early-stopping hook's numbers, and goes to its metrics log (with epoch_images(run index, params), image
  grids for TensorBoard); checkpoints every `checkpoint_every` epochs and at the end, and every
  `checkpoint_every_steps` steps within an epoch. A signal `preemption` caught saves at the next such
  boundary (or the epoch's end) and raises Preempted. A run resumed mid-epoch continues from its step; that
  epoch's train/* means cover the steps since. A phase whose metrics log is not open (a process other than
  the first of a distributed run) writes no metrics; every process saves the checkpoints together.
  """
  batched = hypers is not None
  if batched and early_stopping is not None:
    raise ValueError("early stopping acts on one run's state; train the runs of a batched sweep without it")
  member = (lambda tree, i: index(tree, i)) if batched else (lambda tree, i: tree)
  step0 = int(jax.device_get(state.step if not batched else state.step[0]))
  offsets, t0 = [p.metrics.wall_time if p.metrics else 0.0 for p in phases], time.perf_counter()
  start = step0 // steps
  every = checkpoint_every_steps
  bar = tqdm(range(start, epochs), initial=start, total=epochs, unit="epoch", disable=not progress,
             desc=f"train {phases[0].name}")

  def save(step: int) -> None:
    for i, phase in enumerate(phases):
      phase.checkpointer.save(step, member(state, i))

  def asked() -> bool:  # every process decides together: the save that follows is collective
    return preemption is not None and distributed.any_process(preemption.requested is not None)

  def stop(step: int) -> None:
    for phase in phases:
      phase.checkpointer.wait()
    raise preemption_lib.Preempted(step, preemption.requested or "a signal to another process")

  for epoch in bar:
    if early_stopping is not None and early_stopping.done(state):
      break
    first_step = epoch * steps
    begin = max(step0 - first_step, 0)
    # Pieces end where a step checkpoint is due (global steps that are multiples of `every`); without them the
    # epoch is one piece.
    ends = range((-first_step) % every or every, steps, every) if every else []
    parts, lo = [], begin
    for hi in [e for e in ends if e > begin] + [steps]:
      with out_of_memory_says(f"training, epoch {epoch + 1}", "Lower training.batch_size; the last checkpoint is "
                              "kept, and the same command then resumes from it."):
        state, piece_metrics = train_epoch(state, images, labels, epoch, hypers, start=lo, stop=hi) if batched else \
            train_epoch(state, images, labels, epoch, start=lo, stop=hi)
        parts.append(jax.device_get(piece_metrics))
      if hi < steps:  # mid-epoch: nothing non-finite may be saved as good
        for i in range(len(phases)):
          check_finite(member(parts[-1], i), first_step + lo)
        save(first_step + hi)
        if asked():
          stop(first_step + hi)
      lo = hi
    step_metrics = jax.tree.map(lambda *m: np.concatenate(m, axis=1 if batched else 0), *parts)
    elapsed = time.perf_counter() - t0  # batched: one program for all runs, each gets the batch's time
    for i in range(len(phases)):
      check_finite(member(step_metrics, i), first_step + begin)
    extra = {}
    if early_stopping is not None:
      state, extra = early_stopping(state)
    for i, phase in enumerate(phases):
      if phase.metrics is None:
        continue
      row = epoch_row(member(step_metrics, i), first_step + steps, epoch) | extra
      if epoch_metrics is not None:
        with out_of_memory_says(f"the evaluation of epoch {epoch + 1}", "Lower training.eval_batch_size; the last "
                                "checkpoint is kept, and the same command then resumes from it."):
          row |= epoch_metrics(i, member(state.params, i))
      row["wall_time"] = offsets[i] + elapsed
      phase.metrics.write(row)
      if epoch_images is not None:
        phase.metrics.write_images(row["step"], epoch_images(i, member(state.params, i)))
      log.info("%s epoch %d/%d step %d: %s", phase.name, row["epoch"], epochs, row["step"],
               ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k in SUMMARY and isinstance(v, float)))
      if "test/elbo" in row:
        bar.set_postfix({"test/elbo": f"{row['test/elbo']:.2f}"})
    stopping = early_stopping is not None and early_stopping.done(state)
    stop_now = asked()
    if (epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs or stopping or stop_now:
      save(first_step + steps)
    if stop_now and epoch + 1 < epochs:
      stop(first_step + steps)
  for phase in phases:
    phase.checkpointer.wait()
  return state
