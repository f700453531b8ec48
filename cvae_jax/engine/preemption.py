"""Preemption: a cluster's warning signal becomes a checkpoint and a requeue, not a lost epoch.

Slurm sends SIGTERM (or the signal chosen with `sbatch --signal=USR1@120`) some time before it kills a
job. While a run trains, `Watch` notes the signal instead of dying; the training loop saves a checkpoint
at the next boundary between pieces of the epoch (training.checkpoint_every_steps) and raises Preempted.
The command line then exits with PREEMPTED_EXIT and, inside a Slurm job with training.requeue=true,
requeues the job itself (`scontrol requeue $SLURM_JOB_ID`): the requeued job runs the same command, which
resumes from that checkpoint, mid-epoch. Submitit's launcher is requeued the same way (it reruns the job's
pickled call when Slurm restarts the job).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Sequence

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure; the same command again continues


class Preempted(Exception):
  """A preemption signal arrived; the checkpoint of `step` is saved and the run stopped."""

  def __init__(self, step: int, signal_name: str):
    self.step, self.signal_name = step, signal_name
    super().__init__(f"Stopped by {signal_name} at step {step}: the checkpoint of step {step} is saved. The same "
                     "command resumes from it.")


def signal_number(name: str) -> int:
  """SIGTERM, TERM or 15 -> 15; ValueError for a name this system lacks."""
  text = str(name).strip().upper()
  if text.isdigit():
    return int(text)
  number = getattr(signal, text if text.startswith("SIG") else "SIG" + text, None)
  if not isinstance(number, int):
    raise ValueError(f"{name!r} is not a signal of this system")
  return int(number)


class Watch:
  """A context that catches the given signals while it is open (main thread only; elsewhere it watches
  nothing) and restores the previous handlers when it closes. `requested` is the first caught signal's name."""

  def __init__(self, names: Sequence[str]):
    self.numbers = [signal_number(n) for n in names]
    self.requested: str | None = None
    self._previous: dict = {}

  def _handle(self, number, frame) -> None:
    if self.requested is None:
      self.requested = signal.Signals(number).name
      log.warning("%s received: saving a checkpoint at the next piece boundary, then stopping.", self.requested)

  def __enter__(self) -> "Watch":
    if threading.current_thread() is threading.main_thread():
      for number in self.numbers:
        self._previous[number] = signal.signal(number, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    self._previous = {}


def requeue_slurm_job() -> bool:
  """`scontrol requeue $SLURM_JOB_ID` inside a Slurm job; False (with a warning) when it cannot."""
  job = os.environ.get("SLURM_JOB_ID")
  if not job:
    return False
  try:
    subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
  except (OSError, subprocess.SubprocessError) as e:
    log.warning("Could not requeue Slurm job %s (%s); resubmit the same command to resume.", job, e)
    return False
  log.info("Requeued Slurm job %s; it resumes from the saved checkpoint.", job)
  return True
