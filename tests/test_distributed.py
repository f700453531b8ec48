"""Two processes, one run (JAX's distributed runtime over Gloo on this CPU): the same numbers as one process
at the same global batch, one checkpoint directory and one results.json; streamed data the same parameters
as resident data; a SIGTERM to one process stops
both at the same step, and the rerun ends with the parameters of an uninterrupted run, bit for bit."""
import json
import os
import socket
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from conftest import REPO, synthetic_dataset
from cvae_jax.experiment import restore_run

WORKER = r"""
import json, os, signal, sys
sys.path.insert(0, "tests")
from conftest import small_config, synthetic_dataset
from cvae_jax.engine import epoch as engine_epoch, preemption
from cvae_jax.experiment import train_and_evaluate

workdir, process, processes, port, signal_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
over = {"data.in_memory": sys.argv[6] == "resident", "training.epochs": 2, "training.checkpoint_every_steps": 3, "training.max_checkpoints": 20,
        "data.pixels": "dynamic_binary", "model.kind": "cvae", "evaluation.iwae_samples": 0}
if processes > 1:
  over |= {"training.distributed": "explicit", "training.coordinator_address": f"127.0.0.1:{port}",
           "training.num_processes": processes, "training.process_id": process}
cfg = small_config(**over)
if signal_at >= 0:  # this process alone receives SIGTERM while the piece starting at that step trains
  original = engine_epoch.make_train_epoch
  def make(*args, **kwargs):
    run = original(*args, **kwargs)
    def wrapped(state, images, labels, epoch, *rest, start=0, stop=None):
      if int(epoch) * 8 + start == signal_at:
        os.kill(os.getpid(), signal.SIGTERM)
      return run(state, images, labels, epoch, *rest, start=start, stop=stop)
    return wrapped
  engine_epoch.make_train_epoch = make
try:
  train_and_evaluate(cfg, workdir, dataset=synthetic_dataset(pixels=cfg.data.pixels))
except preemption.Preempted as e:
  print(f"PREEMPTED {e.step}", flush=True)
  sys.exit(preemption.PREEMPTED_EXIT)
import jax
print(f"DEVICES {jax.process_count()} {jax.device_count()}", flush=True)
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run(workdir, processes: int, signal_to=None, signal_at: int = -1, data="resident"):
  """Starts the processes of one run and waits for them: [(exit status, stdout, stderr)] by process id. Their
  output goes to files: a full pipe would block one process inside a collective the other waits on."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  port, logs = free_port(), []
  procs = []
  for i in range(processes):
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    logs.append((out, err))
    procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(workdir), str(i), str(processes), str(port),
                                   str(signal_at if i == signal_to else -1), data], cwd=REPO, env=env, text=True,
                                  stdout=out, stderr=err))
  results = []
  for p, (out, err) in zip(procs, logs):
    p.wait(timeout=600)
    out.seek(0), err.seek(0)
    results.append((p.returncode, out.read(), err.read()))
  return results


def metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def final_params(workdir):
  restored = restore_run(workdir, dataset=synthetic_dataset(pixels="dynamic_binary"))
  assert int(restored.state.step) == 16
  return [np.asarray(a) for a in jax.tree.leaves(restored.params)]


@pytest.mark.integration
def test_two_processes_match_one_and_resume_together_after_a_signal_to_one(tmp_path):
  one = run(tmp_path / "one", 1)
  assert one[0][0] == 0, one[0][2][-3000:]
  two = run(tmp_path / "two", 2)
  for status, out, err in two:
    assert status == 0, err[-3000:]
    assert "DEVICES 2 2" in out  # both processes saw one run over two devices
  # Process 0 alone wrote the run's files; the checkpoints were written once, together.
  assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
  assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == \
      ["12", "15", "16", "3", "6", "8", "9"]
  for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
    assert a["step"] == b["step"]
    for key, value in a.items():
      if key.startswith(("train/", "test/")) and isinstance(value, float):
        assert np.isclose(b[key], value, rtol=1e-5, atol=1e-5), (key, value, b[key])
  for a, b in zip(final_params(tmp_path / "one"), final_params(tmp_path / "two")):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)

  streamed = run(tmp_path / "streamed", 2, data="streamed")  # each process sends its devices their rows
  assert all(status == 0 for status, _, _ in streamed), streamed[0][2][-3000:]
  for a, b in zip(final_params(tmp_path / "two"), final_params(tmp_path / "streamed")):
    np.testing.assert_array_equal(b, a)

  cut = run(tmp_path / "cut", 2, signal_to=1, signal_at=9)  # only process 1 is signalled
  for status, out, err in cut:
    assert status == 75 and "PREEMPTED 12" in out, (status, out, err[-3000:])  # both stop after the same piece
  assert not (tmp_path / "cut" / "results.json").exists()
  resumed = run(tmp_path / "cut", 2)
  assert all(status == 0 for status, _, _ in resumed), resumed[0][2][-3000:]
  for a, b in zip(final_params(tmp_path / "two"), final_params(tmp_path / "cut")):
    np.testing.assert_array_equal(b, a)
  assert json.loads((tmp_path / "cut" / "results.json").read_text())["elbo"] == \
      json.loads((tmp_path / "two" / "results.json").read_text())["elbo"]


def test_explicit_distribution_names_what_it_lacks_before_joining():
  from cvae_jax.config import ConfigError, TrainingConfig
  from cvae_jax.engine import distributed
  with pytest.raises(ConfigError, match="needs training.coordinator_address, training.process_id"):
    distributed.initialize(TrainingConfig(distributed="explicit", num_processes=2))
  with pytest.raises(ConfigError, match=r"training.process_id=2 is invalid: it must be in 0..1"):
    distributed.initialize(TrainingConfig(distributed="explicit", coordinator_address="localhost:1", num_processes=2,
                                          process_id=2))
  assert not jax.distributed.is_initialized()
