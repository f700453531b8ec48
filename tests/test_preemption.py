"""Step checkpoints, preemption signals and the streamed data path: a run stopped mid-epoch by SIGTERM saves,
exits with the requeue status, and its rerun ends with the parameters of an uninterrupted run, bit for bit."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import small_config, synthetic_dataset
from cvae_jax.config import ConfigError
from cvae_jax.engine import epoch as engine_epoch
from cvae_jax.engine import preemption
from cvae_jax.experiment import restore_run, train_and_evaluate, validate
from test_cli import SHORT

STEPS = 8  # per epoch: 256 synthetic examples at batch 32


def config(**overrides):
  return small_config(**{"training.epochs": 2, "training.max_checkpoints": 20, "evaluation.iwae_samples": 0,
                         "training.checkpoint_every_steps": 3} | overrides)


def signal_during(monkeypatch, step: int, number=signal.SIGTERM, steps_per_epoch: int = STEPS):
  """This process receives `number` while the piece of the epoch that starts at global `step` trains."""
  original = engine_epoch.make_train_epoch

  def make(*args, **kwargs):
    run = original(*args, **kwargs)

    def wrapped(state, images, labels, epoch, *rest, start=0, stop=None):
      if int(epoch) * steps_per_epoch + start == step:
        os.kill(os.getpid(), number)
      return run(state, images, labels, epoch, *rest, start=start, stop=stop)
    return wrapped

  monkeypatch.setattr(engine_epoch, "make_train_epoch", make)


def saved_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def params_of(workdir, ds):
  return jax.tree.leaves(restore_run(workdir, dataset=ds).params)


def assert_same_params(a, b):
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_step_checkpoints_fall_mid_epoch_and_a_preempted_run_resumes_to_the_same_parameters(tmp_path, monkeypatch):
  ds = synthetic_dataset()
  whole = train_and_evaluate(config(), tmp_path / "whole", dataset=ds)
  assert saved_steps(tmp_path / "whole") == [3, 6, 8, 9, 12, 15, 16]  # every 3 steps, and each epoch's end

  signal_during(monkeypatch, step=9)  # epoch 2's piece 9..12
  with pytest.raises(preemption.Preempted) as stopped:
    train_and_evaluate(config(), tmp_path / "cut", dataset=ds)
  assert stopped.value.step == 12 and stopped.value.signal_name == "SIGTERM"  # the end of the piece it arrived in
  assert saved_steps(tmp_path / "cut") == [3, 6, 8, 9, 12] and 12 % STEPS != 0  # mid-epoch
  assert not (tmp_path / "cut" / "results.json").exists()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run

  monkeypatch.undo()
  resumed = train_and_evaluate(config(), tmp_path / "cut", dataset=ds)
  assert_same_params(params_of(tmp_path / "cut", ds), params_of(tmp_path / "whole", ds))
  assert resumed["elbo"] == whole["elbo"]
  lines = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines] == [8, 16]


def test_the_pieces_of_every_epoch_share_one_program(tmp_path):
  traces = []  # 8 steps per epoch in pieces of 3: 3, 3 and a padded 2 in each epoch, one trace for all
  train_and_evaluate(config(), tmp_path, dataset=synthetic_dataset(), on_trace=lambda: traces.append(1))
  assert len(traces) == 1


def test_without_step_checkpoints_a_signal_saves_at_the_end_of_its_epoch(tmp_path, monkeypatch):
  ds = synthetic_dataset()
  signal_during(monkeypatch, step=0, number=signal.SIGUSR1)
  with pytest.raises(preemption.Preempted) as stopped:
    train_and_evaluate(config(**{"training.checkpoint_every_steps": 0}), tmp_path, dataset=ds)
  assert stopped.value.step == STEPS and stopped.value.signal_name == "SIGUSR1"
  assert saved_steps(tmp_path) == [STEPS]


def test_the_streamed_path_trains_to_the_parameters_of_the_resident_one_and_resumes_bit_for_bit(tmp_path, monkeypatch):
  # 10 steps per epoch: pieces of 4 steps, the last of each epoch short (padded, its extra steps skipped)
  over = {"training.checkpoint_every_steps": 4, "data.pixels": "dynamic_binary"}
  ds = synthetic_dataset(n_train=320, pixels="dynamic_binary")
  train_and_evaluate(config(**over, **{"data.in_memory": True}), tmp_path / "resident", dataset=ds)
  train_and_evaluate(config(**over, **{"data.in_memory": False}), tmp_path / "streamed", dataset=ds)
  resident = params_of(tmp_path / "resident", ds)
  assert_same_params(params_of(tmp_path / "streamed", ds), resident)

  signal_during(monkeypatch, step=12, steps_per_epoch=10)  # epoch 2's piece 12..16
  with pytest.raises(preemption.Preempted) as stopped:
    train_and_evaluate(config(**over, **{"data.in_memory": False}), tmp_path / "cut", dataset=ds)
  assert stopped.value.step == 16
  monkeypatch.undo()
  train_and_evaluate(config(**over, **{"data.in_memory": False}), tmp_path / "cut", dataset=ds)
  assert_same_params(params_of(tmp_path / "cut", ds), resident)


def test_a_signal_name_the_system_lacks_is_refused():
  with pytest.raises(ConfigError, match="training.preemption_signals.*'SIGNOPE' is not a signal name"):
    validate(config(**{"training.preemption_signals": ["SIGTERM", "SIGNOPE"]}))
  assert preemption.signal_number("usr1") == signal.SIGUSR1 and preemption.signal_number("15") == 15


@pytest.mark.integration
def test_the_command_line_stops_on_sigterm_with_the_requeue_status_and_requeues_the_slurm_job(tmp_path, env_for_cli):
  bin_dir = tmp_path / "bin"  # a stand-in for Slurm's scontrol that records its arguments
  bin_dir.mkdir()
  scontrol = bin_dir / "scontrol"
  scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
  scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
  env = dict(env_for_cli, PATH=f"{bin_dir}:{env_for_cli['PATH']}", SLURM_JOB_ID="4242")
  workdir = tmp_path / "run"
  args = [*SHORT, f"hydra.run.dir={workdir}", "training.epochs=500", "training.checkpoint_every_steps=7",
          "evaluation.iwae_samples=0"]
  proc = subprocess.Popen([sys.executable, "-m", "cvae_jax.train", *args], env=env, cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 240
  while not (workdir / "checkpoints").is_dir() or not any(p.name.isdigit() for p in (workdir / "checkpoints").iterdir()):
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=240)
  assert proc.returncode == preemption.PREEMPTED_EXIT, stderr[-3000:]
  assert "preempted: Stopped by SIGTERM at step" in stderr and "The Slurm job is requeued." in stderr
  assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
  latest = saved_steps(workdir)[-1]
  assert f"at step {latest}:" in stderr and (latest % 7 == 0 or latest % 50 == 0)
  assert not (workdir / "results.json").exists()
