"""Faults and guards on a small synthetic run: corrupt checkpoints, another architecture's checkpoint,
divergence (stop or skip), a truncated metrics line, determinism."""
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvae_jax.engine import epoch, rundir
from cvae_jax.engine.checkpoints import CheckpointMismatchError
from cvae_jax.engine.epoch import NonFiniteLossError
from cvae_jax.experiment import restore_run, train_and_evaluate
from cvae_jax.tasks import density
from conftest import killed_at_epoch, small_config, synthetic_dataset
from test_training import final_state, read_metrics


def interrupted_run(cfg, ds, workdir, monkeypatch, at_epoch=3):
  """Trains until epoch `at_epoch` would be logged, then stops as a kill would (no checkpoint for it)."""
  with killed_at_epoch(monkeypatch, at_epoch):
    train_and_evaluate(cfg, workdir, dataset=ds)


def test_corrupt_latest_checkpoint_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
  cfg, ds = small_config(**{"training.epochs": 4}), synthetic_dataset()
  train_and_evaluate(cfg, tmp_path / "straight", dataset=ds)
  run = tmp_path / "run"
  interrupted_run(cfg, ds, run, monkeypatch)
  latest = run / "checkpoints" / "16"
  for path in latest.rglob("*"):  # damage every data file of the newest checkpoint
    if path.is_file() and path.stat().st_size > 0 and "d" in path.parent.name:
      path.write_bytes(b"\0" * 7)
  (latest / "default" / "_METADATA").write_text("{not json")
  with caplog.at_level(logging.WARNING):
    train_and_evaluate(cfg, run, dataset=ds)
  assert any("checkpoints/16" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
  assert (run / "checkpoints" / "16.corrupt").is_dir()  # kept for inspection, not deleted
  a, b = final_state(cfg, ds, tmp_path / "straight"), final_state(cfg, ds, run)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)  # resumed from step 8 and reached the same parameters


def test_an_incomplete_checkpoint_is_ignored_with_a_warning(tmp_path, monkeypatch, caplog):
  cfg, ds = small_config(**{"training.epochs": 4}), synthetic_dataset()
  interrupted_run(cfg, ds, tmp_path, monkeypatch)
  partial = tmp_path / "checkpoints" / "24.orbax-checkpoint-tmp-1795651799"  # what a kill during a save leaves
  (partial / "default").mkdir(parents=True)
  (partial / "default" / "_METADATA").write_text("{")
  with caplog.at_level(logging.WARNING):
    train_and_evaluate(cfg, tmp_path, dataset=ds)
  assert any("24.orbax-checkpoint-tmp" in r.getMessage() and "incomplete" in r.getMessage() for r in caplog.records)
  assert not partial.exists()
  assert [r["step"] for r in read_metrics(tmp_path)] == [8, 16, 24, 32]  # resumed from 16


def test_a_checkpoint_of_another_architecture_is_refused_untouched(tmp_path, monkeypatch):
  ds = synthetic_dataset()
  interrupted_run(small_config(**{"model.hidden": [32]}), ds, tmp_path / "a", monkeypatch)
  other = tmp_path / "b"
  shutil.copytree(tmp_path / "a" / "checkpoints", other / "checkpoints")
  before = sorted(p.name for p in (other / "checkpoints").iterdir())
  with pytest.raises(CheckpointMismatchError, match="another model"):
    train_and_evaluate(small_config(**{"model.hidden": [16]}), other, dataset=ds)
  assert sorted(p.name for p in (other / "checkpoints").iterdir()) == before


def poison_after(monkeypatch, epoch_index):
  """Makes the epoch function return a NaN loss from epoch `epoch_index` on, as a diverging run would."""
  original = epoch.make_train_epoch

  def make(*args, **kwargs):
    epoch_fn = original(*args, **kwargs)
    def poisoned(state, images, labels, epoch, *rest, **pieces):
      state, metrics = epoch_fn(state, images, labels, epoch, *rest, **pieces)
      if int(epoch) >= epoch_index:
        metrics = dict(metrics, loss=metrics["loss"].at[3].set(jnp.nan))
      return state, metrics
    return poisoned

  monkeypatch.setattr(epoch, "make_train_epoch", make)


def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  poison_after(monkeypatch, epoch_index=2)
  with pytest.raises(NonFiniteLossError, match="at step 20"):  # epoch 3 starts after step 16; 4th step
    train_and_evaluate(small_config(**{"training.epochs": 4}), tmp_path, dataset=synthetic_dataset())
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [8, 16] and not (tmp_path / "results.json").exists()
  assert [r["step"] for r in read_metrics(tmp_path)] == [8, 16]


def test_skip_nonfinite_skips_and_counts_the_bad_updates(tmp_path, monkeypatch):
  # One training image makes the loss NaN whenever its batch is drawn: exactly once per epoch.
  ds = synthetic_dataset()
  ds.train.images[5] = 255
  original = density.elbo_terms

  def poisoned_terms(x, logits, mean, logvar, likelihood, prior=None):
    terms = original(x, logits, mean, logvar, likelihood, prior)
    bad = jnp.all(x.reshape(x.shape[0], -1) == 1.0, axis=-1)
    return dict(terms, rec=jnp.where(bad, jnp.nan, terms["rec"]))

  monkeypatch.setattr(density, "elbo_terms", poisoned_terms)
  with pytest.raises(NonFiniteLossError):
    train_and_evaluate(small_config(), tmp_path / "stop", dataset=ds)
  results = train_and_evaluate(small_config(**{"training.skip_nonfinite": True}), tmp_path / "skip", dataset=ds)
  rows = read_metrics(tmp_path / "skip")
  assert [r["train/skipped"] for r in rows] == [1, 1, 1]
  assert all(np.isfinite(r["train/loss"]) for r in rows) and np.isfinite(results["elbo"])


def test_a_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path, monkeypatch):
  cfg, ds = small_config(**{"training.epochs": 4}), synthetic_dataset()
  interrupted_run(cfg, ds, tmp_path, monkeypatch)
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 24, "epoch": 3, "train/lo')  # a write cut short
  train_and_evaluate(cfg, tmp_path, dataset=ds)
  assert [r["step"] for r in read_metrics(tmp_path)] == [8, 16, 24, 32]


def test_same_seed_and_config_give_identical_metrics(tmp_path):
  ds = synthetic_dataset()
  cfg = small_config(**{"model.kind": "cvae"})
  a = train_and_evaluate(cfg, tmp_path / "a", dataset=ds)
  b = train_and_evaluate(cfg, tmp_path / "b", dataset=ds)
  strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]
  assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))
  assert a["metrics"] == b["metrics"]
  c = train_and_evaluate(small_config(**{"model.kind": "cvae", "seed": 1}), tmp_path / "c", dataset=ds)
  assert c["metrics"] != a["metrics"]  # another seed differs: the comparison can fail


def test_the_metrics_log_keeps_only_the_lines_up_to_the_restored_step(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step, wall in ((8, 1.0), (16, 2.0), (24, 3.0)):
      f.write(json.dumps({"step": step, "epoch": step // 8, "wall_time": wall}) + "\n")
  log = rundir.MetricsLog(tmp_path, resume_step=16)
  log.close()
  assert [r["step"] for r in log.rows] == [8, 16] and log.wall_time == 2.0  # the cumulative time goes on from 2 s
  assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [8, 16]


HOLD_LOCK = """
import sys, time
from cvae_jax.engine import rundir
with rundir.RunLock(sys.argv[1]):
  print("held", flush=True)
  time.sleep(120)
"""


def test_a_run_directory_has_one_owner_and_a_dead_owner_s_lock_is_taken_over(tmp_path, caplog):
  import os
  import signal
  import subprocess
  import sys
  from conftest import REPO
  env = dict(os.environ, PYTHONPATH=str(REPO))
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(rundir.RunDirError, match=rf"in use by another process \(host .*, pid {holder.pid}"):
      train_and_evaluate(small_config(), tmp_path, dataset=synthetic_dataset())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing written by the refused run
  finally:
    holder.send_signal(signal.SIGKILL)  # as kill -9: the kernel drops its lock, its lock file stays
    holder.wait()
  with caplog.at_level(logging.WARNING):
    results = train_and_evaluate(small_config(), tmp_path, dataset=synthetic_dataset())
  assert results["steps"] == 24 and not (tmp_path / ".lock").exists()
  assert any(f"pid {holder.pid}" in r.getMessage() and "taking it over" in r.getMessage() for r in caplog.records)


def test_a_damaged_results_file_is_kept_aside_and_the_run_finishes_again(tmp_path, caplog):
  cfg, ds = small_config(), synthetic_dataset()
  first = train_and_evaluate(cfg, tmp_path, dataset=ds)
  text = (tmp_path / "results.json").read_text()
  (tmp_path / "results.json").write_text(text[:40])  # cut short
  with caplog.at_level(logging.WARNING):
    again = train_and_evaluate(cfg, tmp_path, dataset=ds)
  assert (tmp_path / "results.json.damaged").read_text() == text[:40]
  assert {k: v for k, v in again.items() if k != "wall_time"} == {k: v for k, v in first.items() if k != "wall_time"}
  assert [r["step"] for r in read_metrics(tmp_path)] == [8, 16, 24]  # finished from the last checkpoint, no retraining


def test_a_full_disk_stops_with_where_and_how_much_and_the_rerun_resumes(tmp_path, monkeypatch):
  import shutil as shutil_module
  from cvae_jax.engine import checkpoints
  cfg, ds = small_config(**{"training.epochs": 4}), synthetic_dataset()
  train_and_evaluate(cfg, tmp_path / "straight", dataset=ds)
  usage, saves = shutil_module.disk_usage, []

  def filling_disk(path):  # room for the first two checkpoints, then a full disk
    saves.append(path)
    real = usage(path)
    return real._replace(free=real.free if len(saves) <= 2 else 1024)

  monkeypatch.setattr(checkpoints.shutil, "disk_usage", filling_disk)
  run = tmp_path / "run"
  with pytest.raises(checkpoints.DiskFullError, match=r"The disk holding .*/run/checkpoints is full \(0\.0 MiB free\): "
                     r"the checkpoint of step 24 \(0\.\d+ MiB\) could not be written\. The checkpoint of step 16 is "
                     r"kept\. Free some space, then rerun the same command"):
    train_and_evaluate(cfg, run, dataset=ds)
  monkeypatch.setattr(checkpoints.shutil, "disk_usage", usage)
  assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [8, 16]
  train_and_evaluate(cfg, run, dataset=ds)  # space freed: the same call resumes from step 16
  a, b = final_state(cfg, ds, tmp_path / "straight"), final_state(cfg, ds, run)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)


def test_a_disk_that_fills_while_orbax_writes_is_reported_as_full(tmp_path, monkeypatch):
  from cvae_jax.engine import checkpoints
  original = checkpoints.ocp.CheckpointManager.save

  def failing_save(self, step, *args, **kwargs):
    if step == 16:
      raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.decoder/0": Failed to write 4292608 bytes: '
                       "No space left on device [os_error_code='28']")
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "save", failing_save)
  with pytest.raises(checkpoints.DiskFullError, match="the checkpoint of step 16 .* The checkpoint of step 8 is kept"):
    train_and_evaluate(small_config(), tmp_path, dataset=synthetic_dataset())


def test_a_model_too_large_for_memory_is_refused_before_anything_is_written(tmp_path):
  from cvae_jax.engine.memory import OutOfMemoryError
  # MLP 64-H-(4, 4) and 4-H-64 with H = 4e9: 142 H + 72 parameters, 4 bytes each, times 4 (parameters, gradient,
  # Adam's two moments): 8463.9 GiB.
  with pytest.raises(OutOfMemoryError, match=r"The model has 568,000,000,072 parameters: its train state and gradient "
                                             r"take 8463\.9 GiB, more than the [\d.]+ GiB of memory of .*\. Nothing was "
                                             r"written"):
    train_and_evaluate(small_config(**{"model.hidden": [4_000_000_000]}), tmp_path / "run", dataset=synthetic_dataset())
  assert not (tmp_path / "run").exists()


def test_running_out_of_memory_while_training_says_what_to_lower(tmp_path, monkeypatch):
  from cvae_jax.engine import epoch as engine_epoch
  from cvae_jax.engine.memory import OutOfMemoryError
  original = engine_epoch.make_train_epoch

  def make(*args, **kwargs):
    run_epoch = original(*args, **kwargs)

    def exhausted(state, images, labels, epoch, *rest, **pieces):
      if int(epoch) == 1:
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 51200002560 bytes.")
      return run_epoch(state, images, labels, epoch, *rest, **pieces)
    return exhausted

  monkeypatch.setattr(engine_epoch, "make_train_epoch", make)
  with pytest.raises(OutOfMemoryError, match=r"Out of memory in training, epoch 2 \(RESOURCE_EXHAUSTED: .*\)\. Lower "
                                             r"training.batch_size; the last checkpoint is kept"):
    train_and_evaluate(small_config(), tmp_path, dataset=synthetic_dataset())
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [8]


def test_a_checkpoint_whose_files_changed_is_set_aside_before_any_read(tmp_path, caplog):
  from flax import struct
  from cvae_jax.engine.checkpoints import MANIFEST, Checkpointer, check_manifest, write_manifest

  class State(struct.PyTreeNode):
    params: dict

  state = State(params={"w": jnp.arange(6.0).reshape(2, 3)})
  ckpt = Checkpointer(tmp_path / "checkpoints", 3)
  ckpt.save(1, state)
  ckpt.save(2, jax.tree.map(lambda a: a + 1, state))
  ckpt.close()
  for step in (1, 2):
    assert (tmp_path / "checkpoints" / str(step) / MANIFEST).is_file()
    check_manifest(tmp_path / "checkpoints" / str(step))  # intact: no error
  data = max((p for p in (tmp_path / "checkpoints" / "2").rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)
  data.write_bytes(bytes(b ^ 1 for b in data.read_bytes()))  # same size, other bytes
  with pytest.raises(ValueError, match="changed after it was saved"):
    check_manifest(tmp_path / "checkpoints" / "2")
  data.unlink()
  with pytest.raises(ValueError, match="is missing"):
    check_manifest(tmp_path / "checkpoints" / "2")
  restored = Checkpointer(tmp_path / "checkpoints", 3).restore_latest_good(state)
  np.testing.assert_array_equal(restored.params["w"], state.params["w"])  # step 1's values
  assert (tmp_path / "checkpoints" / "2.corrupt").is_dir() and "2 is unreadable" in caplog.text
  (tmp_path / "checkpoints" / "1" / MANIFEST).unlink()  # a step saved before manifests is read as it is
  check_manifest(tmp_path / "checkpoints" / "1")
  (tmp_path / "checkpoints" / "1" / (MANIFEST + ".tmp")).write_text("{\"cut")  # a write that a full disk stopped
  write_manifest(tmp_path / "checkpoints" / "1")
  check_manifest(tmp_path / "checkpoints" / "1")  # the leftover is neither listed nor kept
  assert not (tmp_path / "checkpoints" / "1" / (MANIFEST + ".tmp")).exists()


def test_a_run_directory_named_with_brackets_writes_readable_checkpoints(tmp_path, caplog):
  # A sweep over a list names its jobs data.exclude_classes=[1,2]: Orbax's merge of its per-process files globs
  # the directory's name, brackets included, and left such checkpoints without their OCDBT manifest.
  workdir = tmp_path / "data.exclude_classes=[1,2]"
  ds = synthetic_dataset()
  train_and_evaluate(small_config(**{"training.epochs": 1}), workdir, dataset=ds)
  assert (workdir / "checkpoints" / "8" / "default" / "manifest.ocdbt").is_file()
  assert int(restore_run(workdir, dataset=ds).state.step) == 8
  # One written that way before is merged when it is read.
  for path in (workdir / "checkpoints" / "8" / "default").iterdir():
    if path.name in ("manifest.ocdbt", "d"):
      shutil.rmtree(path) if path.is_dir() else path.unlink()
  (workdir / "checkpoints" / "8" / "cvae_jax_manifest.json").unlink()
  with caplog.at_level("WARNING"):
    assert int(restore_run(workdir, dataset=ds).state.step) == 8
  assert "merged it now" in caplog.text
