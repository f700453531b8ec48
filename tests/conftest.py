"""Shared fixtures: a small synthetic dataset for fast training tests, real MNIST loaded once."""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

# What the tests check is our code, not XLA's optimizing passes, and with most of them off XLA compiles a
# test's programs about twice as fast (docs/testing.md has the suite's times). Set before JAX is imported,
# which reads its flags from the environment; the subprocesses inherit it (and then share the cache below).
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 compiles as a user's run does, as CI runs the integration tests.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402 (after the flag above)
import numpy as np
import pytest

from cvae_jax import schema, xla_cpu
from cvae_jax.config import Config, Pixels
from cvae_jax.data import Dataset, DatasetSpec, Split
from cvae_jax.data.images import ImageDataConfig

# The tests run as the command lines do: XLA:CPU's scheduler flag before JAX's first computation.
xla_cpu.use_fast_scheduler()
# Most of the suite's time is XLA compiling, and many tests compile the same programs again (the same tiny
# models, and the command-line tests' subprocesses): one compilation cache for the session, which the
# subprocesses inherit through the environment, compiles each program once. Each pytest-xdist worker has
# its own: sharing one needs JAX's file lock around every read and write, which made the suite 2x slower.
_XLA_CACHE = tempfile.mkdtemp(prefix="cvae_jax_test_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
# Closed forms are checked to float32 precision: GPUs would otherwise run float32 matmuls as TF32
# (JAX's default there), about 1e-3 relative. No effect on CPU.
jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]


def pytest_xdist_auto_num_workers(config) -> int:
  """Workers for pyproject's `-n auto`: two where two cores exist (the default suite is mostly XLA compiling,
  one core per program: 1.6x on 2 cores, docs/testing.md), none (one process) when `-m` selects the
  integration or slow tests, which start processes of their own and time them. `-n N` on the command line
  wins."""
  selected = config.option.markexpr or ""
  if any(mark in selected and f"not {mark}" not in selected for mark in ("integration", "slow")):
    return 0
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  return 2 if cores >= 2 else 0


def synthetic_dataset(n_train: int = 256, n_test: int = 64, shape=(8, 8, 1), num_classes: int = 3,
                      pixels: Pixels = Pixels.grayscale, seed: int = 0) -> Dataset:
  """Class-dependent blobs: each class lights a different band of rows, plus noise."""
  rng = np.random.default_rng(seed)

  def split(n):
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    images = rng.integers(0, 60, (n, *shape)).astype(np.float32)
    band = shape[0] // num_classes
    for k in range(num_classes):
      images[labels == k, k * band:(k + 1) * band] += 180
    return Split(images=np.clip(images, 0, 255).astype(np.uint8), labels=labels)

  spec = DatasetSpec(name="synthetic", shape=tuple(shape), condition_size=num_classes, encoding=pixels)
  return Dataset(spec, split(n_train), split(n_test))


def small_config(**overrides) -> Config:
  """A tiny MLP VAE config for fast tests; overrides are 'section.key' -> value. `model.arch` chooses the
  family (its node starts from the family's defaults) and `data.name` the dataset's node."""
  arch = overrides.get("model.arch", "mlp")
  config = {"model": {"arch": arch, "kind": "vae", "latent_size": 4} | ({"hidden": [32]} if arch == "mlp" else {}),
            "data": {"name": "mnist"},
            "training": {"batch_size": 32, "epochs": 3, "progress": False, "eval_batch_size": 50, "figures": False},
            "evaluation": {"iwae_samples": 8, "batch_size": 32, "sample_chunk": 8, "quality_samples": 0}}
  for key, value in overrides.items():
    *path, name = key.split(".")
    node = config
    for part in path:
      node = node.setdefault(part, {})
    node[name] = getattr(value, "value", value)
  return schema.structured(config)  # typed through the schema, so enums and types are real


# Fashion-MNIST does not ship with the repository (MNIST does, in data/mnist/): the tests that need it are
# marked `fashion_mnist` and skip unless its official files are found. CI runs them in a second step with
# the files and CVAE_JAX_REQUIRE_FASHION_MNIST=1, which turns the skip into a failure.
REQUIRE_FASHION_MNIST = "CVAE_JAX_REQUIRE_FASHION_MNIST"


def require_fashion_mnist() -> Path:
  """The folder holding Fashion-MNIST's four official .gz files; skips the calling test without them."""
  from cvae_jax import data
  folder, looked = data.find_manual_dir("fashion_mnist", None)
  if folder is None:
    reason = (f"Fashion-MNIST's official files are not in {' or '.join(map(str, looked))}: set "
              f"{data.MANUAL_DIR_ENV} to a folder holding fashion_mnist/ with the four .gz files of "
              "github.com/zalandoresearch/fashion-mnist to run this test")
    if os.environ.get(REQUIRE_FASHION_MNIST):
      pytest.fail(reason)
    pytest.skip(reason)
  return folder


@contextlib.contextmanager
def killed_at_epoch(monkeypatch, epoch: int):
  """Inside it, training stops as a kill would when it is about to log `epoch`'s metrics line: that epoch's
  checkpoint is never written (KeyboardInterrupt, expected and caught)."""
  from cvae_jax.engine import rundir
  original = rundir.MetricsLog.write

  def stop(self, row):
    if row["epoch"] == epoch:
      raise KeyboardInterrupt
    original(self, row)

  monkeypatch.setattr(rundir.MetricsLog, "write", stop)
  try:
    with pytest.raises(KeyboardInterrupt):
      yield
  finally:
    monkeypatch.setattr(rundir.MetricsLog, "write", original)


def model_and_state(cfg: Config, spec: DatasetSpec):
  """The density task's model for this data and its initial train state (as training builds them)."""
  from cvae_jax.tasks.density import DensityTask
  task = DensityTask()
  model = task.build_model(cfg, spec)
  return model, task.initial_state(cfg, model, spec)


@pytest.fixture(scope="session")
def mnist():
  from cvae_jax import data
  return data.load(ImageDataConfig(name="mnist"))


@pytest.fixture
def env_for_cli():
  """Environment for running the command line in a subprocess (quiet TensorFlow, no progress bar)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
  return env
