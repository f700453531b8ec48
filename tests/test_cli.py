"""The command line end to end on real MNIST: smoke run, kill -9 and resume, bad input, a sweep."""
import csv
import json
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

import jax

# A short run: 50 steps per epoch on 3,200 MNIST images.
SHORT = ["+experiment=smoke", "data.train_limit=3200", "data.test_limit=500", "training.figures=false",
         "training.progress=false"]


def run_cli(args, env, cwd, timeout=300, module="cvae_jax.train"):
  return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=timeout)


def final_params(workdir):
  step = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  state = ocp.StandardCheckpointer().restore((workdir / "checkpoints" / str(step) / "default").absolute())
  return step, state


@pytest.mark.integration
def test_smoke_experiment_end_to_end(tmp_path, env_for_cli):
  workdir = tmp_path / "run"
  start = time.perf_counter()
  proc = run_cli(["+experiment=smoke", f"hydra.run.dir={workdir}", "training.progress=false"], env_for_cli, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert time.perf_counter() - start < 120
  results = json.loads((workdir / "results.json").read_text())
  assert results["steps"] == 200 and results["elbo"] < 0
  assert sorted(results["figures"]) == ["latent_scatter.png", "manifold.png", "reconstructions.png", "samples.png"]
  for name in results["figures"]:
    assert (workdir / "figures" / name).stat().st_size > 5000
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [100, 200]
  env = json.loads((workdir / "env.jsonl").read_text().splitlines()[0])
  assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in env["xla_flags"]  # set by the command line
  assert results["iwae_samples"] == 10 and results["nll"] < -results["elbo"] + 1  # L_10 tightens the bound

  # Evaluation restores the checkpoint: the ELBO matches training's, and CVAE samples are judged.
  proc = run_cli([str(workdir), "--iwae-samples", "50", "--samples-per-class", "100", "--quality-samples", "500"],
                 env_for_cli, tmp_path, module="cvae_jax.evaluate")
  assert proc.returncode == 0, proc.stderr[-3000:]
  evaluated = json.loads((workdir / "eval.json").read_text())
  assert evaluated["elbo"] == pytest.approx(results["elbo"], rel=1e-5)
  assert evaluated["iwae"]["k"] == 50 and evaluated["iwae"]["conditional_on_label"]
  assert len(evaluated["kl_per_dim"]) == 2 and 0 <= evaluated["active_units"] <= 2
  accuracy = evaluated["sample_accuracy"]
  assert accuracy["classifier_test_accuracy"] > 0.9 and len(accuracy["per_class"]) == 10
  quality = evaluated["sample_quality"]  # the same classifier's features: samples against the test set
  assert quality["samples"] == 500 and len(quality["per_class"]) == 10
  assert 0 <= quality["recall"] <= 1 and quality["reference"]["fd"] < quality["fd"]  # training images score better
  # After 200 steps the CVAE barely uses its label yet (see samples.png), so only consistency here; the
  # accuracy of a trained CVAE's samples is in the README.
  assert accuracy["overall"] == pytest.approx(np.mean(accuracy["per_class"]))
  assert all(0 <= a <= 1 for a in accuracy["per_class"])

  proc = run_cli([str(workdir), "--out", str(tmp_path / "uses")], env_for_cli, tmp_path, module="cvae_jax.generate")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("samples", "translation", "style_transfer", "interpolation", "traversal", "manifold"):
    assert (tmp_path / "uses" / f"{name}.png").stat().st_size > 5000


def _checkpoint_steps(workdir):
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def _saving(workdir):
  folder = workdir / "checkpoints"
  return folder.exists() and any("tmp" in p.name for p in folder.iterdir())


@pytest.mark.slow  # about 95 s; test_training.py::test_resume_is_bit_identical and test_faults.py cover resume
def test_kill_9_at_random_moments_then_rerun_gives_the_same_parameters(tmp_path, env_for_cli):
  """SIGKILL three times (once during a checkpoint save, twice at random moments after a new
  checkpoint), rerunning the same command each time; the result equals an uninterrupted run's."""
  args = SHORT + ["training.epochs=8"]
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  proc = run_cli(args + [f"hydra.run.dir={straight}"], env_for_cli, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]

  rng = random.Random(0)
  kills = []
  for attempt in range(3):
    before = _checkpoint_steps(killed)[-1:] or [0]
    child = subprocess.Popen([sys.executable, "-m", "cvae_jax.train", *args, f"hydra.run.dir={killed}"],
                             env=env_for_cli, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    if attempt == 0:  # during a save: the moment Orbax's temporary checkpoint folder exists
      while time.time() < deadline and not (_checkpoint_steps(killed) and _saving(killed)):
        time.sleep(0.002)
      where = "during a checkpoint save"
    else:  # a random moment after this attempt has written a new checkpoint
      while time.time() < deadline and (_checkpoint_steps(killed)[-1:] or [0])[0] <= before[0]:
        time.sleep(0.01)
      time.sleep(rng.uniform(0.0, 1.5))
      where = "at a random moment"
    child.send_signal(signal.SIGKILL)
    child.wait()
    kills.append((where, _checkpoint_steps(killed)))
    assert child.returncode == -signal.SIGKILL, f"attempt {attempt} finished before it could be killed"
  print("kills (where, checkpoints on disk after the kill):", kills)
  assert not (killed / "results.json").exists()
  assert all(steps for _, steps in kills), kills

  proc = run_cli(args + [f"hydra.run.dir={killed}"], env_for_cli, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (step_a, a), (step_b, b) = final_params(straight), final_params(killed)
  assert step_a == step_b == 400
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  res_a = json.loads((straight / "results.json").read_text())
  res_b = json.loads((killed / "results.json").read_text())
  assert res_a["metrics"] == res_b["metrics"]
  rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [50 * e for e in range(1, 9)]  # no duplicated or missing epochs


@pytest.mark.slow  # about 30 s; the two-job sweep below covers command-line sweeps, test_config the swept values
def test_beta_sweep_runs_with_no_extra_flag(tmp_path, env_for_cli):
  sweep = tmp_path / "sweep"
  proc = run_cli(["+experiment=beta_sweep", "objective.beta=1,8", f"hydra.sweep.dir={sweep}",
                  "data.train_limit=1280", "data.test_limit=500", "training.epochs=2", "training.figures=false",
                  "training.progress=false"], env_for_cli, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  runs = sorted(p for p in sweep.iterdir() if p.is_dir())  # one directory per beta, named by its overrides
  assert len(runs) == 2 and "objective.beta=1," in runs[0].name and "objective.beta=8," in runs[1].name
  kl = [json.loads((run / "results.json").read_text())["kl"] for run in runs]
  assert kl[1] < kl[0]

  # The report lists every job; a job whose directory is gone shows as not started, not dropped.
  shutil.rmtree(runs[1])
  proc = run_cli([str(sweep)], env_for_cli, tmp_path, module="cvae_jax.report")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(sweep / "report.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["objective.beta"], r["status"]) for r in rows] == [("1.0", "finished"), ("8", "not started")]
  assert float(rows[0]["elbo"]) == pytest.approx(json.loads((runs[0] / "results.json").read_text())["elbo"])
  assert "| objective.beta | status |" in (sweep / "report.md").read_text()


@pytest.mark.integration
def test_a_two_job_sweep_through_the_joblib_launcher_with_one_failing_job(tmp_path, env_for_cli):
  """Two jobs in parallel processes (hydra-joblib-launcher); a third fails: the sweep exits non-zero,
  names it, and the report lists it as failed beside the finished ones."""
  sweep = tmp_path / "sweep"
  proc = run_cli(["--multirun", "hydra/launcher=local", "hydra.launcher.n_jobs=2", "objective.beta=1,4,-1",
                  f"hydra.sweep.dir={sweep}", *SHORT, "data.train_limit=640", "training.epochs=1",
                  "evaluation.iwae_samples=0"], env_for_cli, tmp_path)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "1 job(s) of the sweep failed" in proc.stderr and "objective.beta=-1.0 is invalid" in proc.stderr
  assert "Joblib.Parallel" in proc.stdout + proc.stderr  # it really went through the launcher
  done = sorted(p.name for p in sweep.iterdir() if (p / "results.json").exists())
  assert len(done) == 2 and all("objective.beta=1," in n or "objective.beta=4," in n for n in done)
  failed = [p for p in sweep.iterdir() if (p / "failed.json").exists()]
  assert len(failed) == 1 and "objective.beta=-1" in failed[0].name
  proc = run_cli([str(sweep)], env_for_cli, tmp_path, module="cvae_jax.report")
  with open(sweep / "report.csv") as f:
    statuses = sorted(r["status"] for r in csv.DictReader(f))
  assert statuses == ["failed", "finished", "finished"]


@pytest.mark.integration
def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path, env_for_cli):
  """The same command started twice (a double submission, a requeue beside a live job): the second stops
  with one line naming the first, which finishes alone: one metrics line per epoch."""
  run = tmp_path / "run"
  args = [sys.executable, "-m", "cvae_jax.train", *SHORT, "training.epochs=2", f"hydra.run.dir={run}"]
  first = subprocess.Popen(args, env=env_for_cli, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
  deadline = time.time() + 120
  while time.time() < deadline and not (run / ".lock").exists():
    time.sleep(0.05)
  second = run_cli(args[3:], env_for_cli, tmp_path)
  assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
  assert second.returncode == 2 and "Traceback" not in second.stderr
  assert "is in use by another process (host" in second.stderr and f"pid {first.pid}" in second.stderr
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in rows] == [1, 2] and not (run / ".lock").exists()
