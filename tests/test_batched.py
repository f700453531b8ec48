"""Batched sweeps: runs that differ in seed, beta and learning rate, trained as one vmapped program, equal
training each alone; the Hydra launcher does it for a sweep."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from cvae_jax import batched
from cvae_jax.experiment import restore_run, train_and_evaluate

from conftest import REPO, killed_at_epoch, small_config, synthetic_dataset

SETTINGS = [(1.0, 1e-3, 0), (4.0, 3e-3, 1), (0.5, 1e-3, 2)]  # (beta, learning rate, seed)


def test_batched_runs_equal_runs_alone(tmp_path):
  ds = synthetic_dataset()
  cfgs = [small_config(**{"objective.beta": b, "optimizer.learning_rate": lr, "seed": s, "model.kind": "cvae"})
          for b, lr, s in SETTINGS]
  together = batched.train_batched(cfgs, [tmp_path / f"batched{i}" for i in range(3)], ds)
  alone = [train_and_evaluate(c, tmp_path / f"alone{i}", ds) for i, c in enumerate(cfgs)]
  for i, (a, b) in enumerate(zip(together, alone)):
    for key in ("elbo", "rec", "kl", "nll"):
      assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-4), (i, key)
    pa, pb = restore_run(tmp_path / f"batched{i}", ds).params, restore_run(tmp_path / f"alone{i}", ds).params
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    rows = (tmp_path / f"batched{i}" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == cfgs[i].training.epochs and (tmp_path / f"batched{i}" / "eval.json").exists()
  assert together[0]["elbo"] != together[1]["elbo"]  # the runs really differ
  # Finished runs are not retrained: the same call returns the stored results.
  assert batched.train_batched(cfgs, [tmp_path / f"batched{i}" for i in range(3)], ds) == together


def test_runs_that_differ_in_shape_are_not_batched(tmp_path):
  cfgs = [small_config(), small_config(**{"model.latent_size": 8})]
  assert batched.group_key(cfgs[0]) != batched.group_key(cfgs[1])
  assert batched.group_key(small_config(**{"seed": 3, "objective.beta": 2.0})) == batched.group_key(cfgs[0])
  with pytest.raises(ValueError, match="may differ only in"):
    batched.train_batched(cfgs, [tmp_path / "a", tmp_path / "b"], synthetic_dataset())
  parallel = [small_config(**{"training.data_parallel": True, "seed": s}) for s in (0, 1)]
  with pytest.raises(ValueError, match="one device"):
    batched.train_batched(parallel, [tmp_path / "c", tmp_path / "d"], synthetic_dataset())


@pytest.mark.slow  # a CLI sweep (about 30 s); the in-process tests above cover train_batched itself
def test_the_batched_launcher_runs_a_sweep_as_one_program(tmp_path, env_for_cli):
  sweep = tmp_path / "sweep"
  command = [sys.executable, "-m", "cvae_jax.train", "--multirun", "+experiment=smoke", "model=mlp", "model.hidden=[64]",
             "data.train_limit=1280", "training.epochs=1", "evaluation.iwae_samples=0", "training.figures=false",
             "objective.beta=1,2", "hydra/launcher=batched", f"hydra.sweep.dir={sweep}", "training.progress=false"]
  proc = subprocess.run(command, cwd=REPO, env=env_for_cli, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Training 2 runs as one batched program" in proc.stderr + proc.stdout
  runs = sorted(sweep.glob("*objective.beta=*"), key=lambda p: p.name)  # beta=1 before beta=2
  results = [json.loads((run / "results.json").read_text()) for run in runs]
  assert len(results) == 2
  assert results[0]["kl"] > results[1]["kl"]  # beta 2 pulls the KL down: each run got its own beta


def test_a_partly_finished_and_interrupted_batched_group_resumes_to_the_same_results(tmp_path, monkeypatch):
  """Run 0 finished on its own beforehand; runs 1 and 2 are stopped as a kill would after their epoch-2
  checkpoints. The same call then leaves run 0 as it was and resumes 1 and 2 together: their results equal
  an uninterrupted batched training of the same runs."""
  ds = synthetic_dataset()
  cfgs = [small_config(**{"objective.beta": b, "optimizer.learning_rate": lr, "seed": s}) for b, lr, s in SETTINGS]
  straight = batched.train_batched(cfgs, [tmp_path / f"straight{i}" for i in range(3)], ds)
  dirs = [tmp_path / f"run{i}" for i in range(3)]
  first = train_and_evaluate(cfgs[0], dirs[0], ds)
  with killed_at_epoch(monkeypatch, 3):
    batched.train_batched(cfgs, dirs, ds)
  assert [sorted(int(p.name) for p in (d / "checkpoints").iterdir()) for d in dirs[1:]] == [[8, 16], [8, 16]]
  again = batched.train_batched(cfgs, dirs, ds)
  assert again[0] == first == json.loads((dirs[0] / "results.json").read_text())  # not retrained
  for i in (1, 2):
    assert again[i]["elbo"] == pytest.approx(straight[i]["elbo"], rel=1e-6)
    assert [json.loads(line)["epoch"] for line in (dirs[i] / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
