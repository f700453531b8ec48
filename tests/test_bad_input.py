"""Every row of the README's bad-input table: a clear message, a non-zero exit, nothing overwritten.

The command lines run in one worker process (tests/cli_worker.py: `python -m` semantics, Hydra and the
logging reset between commands), so Python, JAX and Hydra are imported once for all the rows."""
import json
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, require_fashion_mnist
from test_cli import SHORT

FAST = SHORT + ["data.train_limit=640", "training.epochs=1", "evaluation.iwae_samples=0"]
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


class Worker:
  """One tests/cli_worker.py process; run() answers as subprocess.run([python, -m, module, *args]) would."""

  def __init__(self):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "cli_worker.py")], env=env, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)

  def run(self, module, args, cwd, timeout=300) -> subprocess.CompletedProcess:
    self.proc.stdin.write(json.dumps({"module": module, "args": [str(a) for a in args], "cwd": str(cwd)}) + "\n")
    self.proc.stdin.flush()
    ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
    assert ready, f"python -m {module} {' '.join(map(str, args))} did not finish in {timeout} s"
    line = self.proc.stdout.readline()
    assert line, f"the command-line worker died (exit code {self.proc.wait()})"
    reply = json.loads(line)
    return subprocess.CompletedProcess([module, *args], reply["returncode"], reply["stdout"], reply["stderr"])

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def cli():
  worker = Worker()
  yield worker
  worker.close()


def snapshot(folder: Path) -> dict:
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cli):
  """A real (tiny) finished MNIST run that the run-directory rows reuse."""
  base = tmp_path_factory.mktemp("finished")
  proc = cli.run("cvae_jax.train", FAST + [f"hydra.run.dir={base / 'run'}"], base)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return base / "run"


def fashion_copy(tmp_path, damage=None):
  """A manual dir with Fashion-MNIST's files (from CVAE_JAX_MANUAL_DIR), one optionally damaged."""
  source = require_fashion_mnist()
  target = tmp_path / "manual" / "fashion_mnist"
  target.mkdir(parents=True)
  for name in FASHION_FILES:
    shutil.copy(source / name, target / name)
  if damage == "truncated":
    data = (target / "train-labels-idx1-ubyte.gz").read_bytes()
    (target / "train-labels-idx1-ubyte.gz").write_bytes(data[: len(data) // 2])
  if damage == "checksum":  # same size, one byte changed: only the sha256 can tell
    data = bytearray((target / "train-labels-idx1-ubyte.gz").read_bytes())
    data[-20] ^= 0xFF
    (target / "train-labels-idx1-ubyte.gz").write_bytes(bytes(data))
  return tmp_path / "manual"


# (id, command-line args given tmp_path and the finished run, expected message, exit code)
CASES = [
    ("unknown key", lambda t, r: ["model.no_such_key=1"], "Key 'no_such_key' not in 'ConvConfig'", 1),
    ("wrong type", lambda t, r: ["model.latent_size=two"], "Value 'two' of type 'str' could not be converted", 1),
    ("unknown choice", lambda t, r: ["objective.kl_schedule=sometimes"], "Invalid value 'sometimes', expected one of", 1),
    ("key of another model family", lambda t, r: ["model.hidden=[64]"], "Key 'hidden' not in 'ConvConfig'", 1),
    ("unknown model family", lambda t, r: ["model.arch=transformer"], "model.arch='transformer' is not a model family", 2),
    ("unknown config file", lambda t, r: ["model=transformer"], "Could not find 'model/transformer'", 1),
    ("latent size 0", lambda t, r: ["model.latent_size=0"], "model.latent_size=0 is invalid", 2),
    ("negative beta", lambda t, r: ["objective.beta=-1"], "objective.beta=-1.0 is invalid", 2),
    ("negative k", lambda t, r: ["evaluation.iwae_samples=-1"], "evaluation.iwae_samples=-1 is invalid", 2),
    ("batch larger than the data", lambda t, r: FAST + ["training.batch_size=100000"],
     "training.batch_size=100000 is larger than the training set", 2),
    ("validation split too large", lambda t, r: FAST + ["data.validation_size=60000", "data.train_limit=null"],
     "data.validation_size=60000 leaves no training data", 2),
    ("decoder does not fit the image", lambda t, r: FAST + ["model.decoder_channels=[8,8,8]", "model.conv_stride=2"],
     "does not divide the data's spatial shape", 2),
    ("unknown dataset", lambda t, r: ["data.name=no_such_dataset"], "is not a TFDS dataset", 2),
    ("missing manual files", lambda t, r: ["data=fashion_mnist", f"data.manual_dir={t / 'empty'}",
                                           f"data.data_dir={t / 'tfds'}"],
     "Put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz", 2),
    ("truncated data file", lambda t, r: ["data=fashion_mnist", f"data.manual_dir={fashion_copy(t, 'truncated')}",
                                          f"data.data_dir={t / 'tfds'}"], "TFDS could not prepare 'fashion_mnist'", 2),
    ("wrong checksum", lambda t, r: ["data=fashion_mnist", f"data.manual_dir={fashion_copy(t, 'checksum')}",
                                     f"data.data_dir={t / 'tfds'}"], "TFDS could not prepare 'fashion_mnist'", 2),
    ("unwritable output directory", lambda t, r: [f"hydra.run.dir={Path(__file__)}/run"],
     "cannot create the output directory", 2),
    ("run directory of another config", lambda t, r: FAST + ["objective.beta=2", f"hydra.run.dir={r}"],
     "holds a run with a different config (objective.beta: 1.0 -> 2.0)", 2),
    ("unreadable config.yaml in the run directory", lambda t, r: FAST + [f"hydra.run.dir={r}"], "is unreadable", 2),
    ("checkpoint of another architecture", lambda t, r: FAST + ["model.dense=32", f"hydra.run.dir={r}"],
     "holds parameters of another model", 2),
    ("diverging run", lambda t, r: FAST + ["optimizer.learning_rate=1e12", f"hydra.run.dir={t / 'nan'}"],
     "The loss became nan at step", 2),
]


NEEDS_FASHION_MNIST = {"truncated data file", "wrong checksum"}  # they damage a copy of the official files


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.fashion_mnist) if c[0] in NEEDS_FASHION_MNIST
                                  else c for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_row(case, tmp_path, cli, finished_run):
  name, make_args, message, code = case
  run_dir = finished_run
  if name in ("run directory of another config", "unreadable config.yaml in the run directory",
              "checkpoint of another architecture"):
    run_dir = tmp_path / "copy"
    if name == "checkpoint of another architecture":  # another model's checkpoints, no config.yaml
      shutil.copytree(finished_run / "checkpoints", run_dir / "checkpoints")
    else:
      shutil.copytree(finished_run, run_dir)
    if name == "unreadable config.yaml in the run directory":
      (run_dir / "config.yaml").write_text("model: [unclosed\n")
  args = make_args(tmp_path, run_dir)
  if not any(a.startswith("hydra.run.dir=") for a in args):
    args = args + [f"hydra.run.dir={tmp_path / 'out'}"]
  before = snapshot(run_dir) if run_dir != finished_run else snapshot(finished_run)
  proc = cli.run("cvae_jax.train", args, tmp_path)
  assert proc.returncode == code, proc.stderr[-2000:]
  assert message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  if code == 2:
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")], "one 'error:' line"
  after = snapshot(run_dir)
  assert {k: after.get(k) for k in before} == before  # nothing overwritten
  assert set(after) - set(before) <= {"train.log"}    # at most the log of this attempt is added
  assert not (tmp_path / "out").exists()  # nothing written for a run that did not start


@pytest.mark.parametrize("module, args, message", [
    ("cvae_jax.evaluate", ["{tmp}"], "is not a run directory: it has no config.yaml"),
    ("cvae_jax.evaluate", ["{empty_run}"], "does not exist: train the run first"),
    ("cvae_jax.generate", ["{tmp}"], "is not a run directory"),
    ("cvae_jax.report", ["{tmp}/nowhere"], "is not a folder"),
])
def test_bad_input_to_the_other_commands(module, args, message, tmp_path, cli):
  empty_run = tmp_path / "empty_run"
  empty_run.mkdir()
  (empty_run / "config.yaml").write_text("seed: 0\n")
  args = [a.format(tmp=tmp_path, empty_run=empty_run) for a in args]
  before = snapshot(tmp_path)
  proc = cli.run(module, args, tmp_path)
  assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert snapshot(tmp_path) == before


def test_the_worker_answers_as_a_fresh_process(tmp_path, cli, env_for_cli):
  args = ["objective.beta=-1", f"hydra.run.dir={tmp_path / 'out'}"]
  fresh = subprocess.run([sys.executable, "-m", "cvae_jax.train", *args], env=env_for_cli, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
  in_worker = cli.run("cvae_jax.train", args, tmp_path)
  assert (in_worker.returncode, in_worker.stdout, in_worker.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
  assert fresh.returncode == 2 and fresh.stderr.startswith("error: objective.beta=-1.0 is invalid")
