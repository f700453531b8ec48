"""Training on a small synthetic dataset: results, metrics, jit-once, bit-identical resume, guards."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvae_jax.config import ConfigError, Pixels, to_dict
from cvae_jax.engine import checkpoints, epoch, rundir
from cvae_jax.engine.epoch import NonFiniteLossError
from cvae_jax.engine.rundir import RunDirError
from cvae_jax.experiment import train_and_evaluate, validate
from cvae_jax.models import family_of
from conftest import REPO, killed_at_epoch, model_and_state, small_config, synthetic_dataset


def final_state(cfg, ds, workdir):
  _, initial = model_and_state(cfg, ds.spec)
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", 3)
  state = ckpt.restore(initial)
  ckpt.close()
  return state


def read_metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind, arch", [("vae", "mlp"), ("cvae", "mlp"), ("cvae", "conv")])
def test_training_learns_and_reports_consistent_numbers(tmp_path, kind, arch):
  cfg = small_config(**{"model.kind": kind, "model.arch": arch, "training.epochs": 4})
  ds = synthetic_dataset()
  results = train_and_evaluate(cfg, tmp_path, dataset=ds)
  rows = read_metrics(tmp_path)
  assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
  assert [r["step"] for r in rows] == [8, 16, 24, 32]  # 256 // 32 steps per epoch
  assert rows[-1]["test/elbo"] > rows[0]["test/elbo"]  # it learns
  assert results["elbo"] < 0 and results["rec"] > 0 and results["kl"] >= 0
  assert results["elbo"] == pytest.approx(-(results["rec"] + results["kl"]), rel=1e-5)
  assert results["bpd"] == pytest.approx(-results["elbo"] / (64 * np.log(2)), rel=1e-5)
  assert results["steps"] == 32
  assert json.loads((tmp_path / "results.json").read_text()) == results
  assert (tmp_path / "config.yaml").exists() and (tmp_path / "env.jsonl").exists()
  assert list((tmp_path / "tb").iterdir())


def test_beta_changes_the_loss_not_the_reported_elbo_scale(tmp_path):
  ds = synthetic_dataset()
  low = train_and_evaluate(small_config(**{"objective.beta": 0.0}), tmp_path / "b0", dataset=ds)
  high = train_and_evaluate(small_config(**{"objective.beta": 8.0}), tmp_path / "b8", dataset=ds)
  assert high["kl"] < low["kl"]
  row = read_metrics(tmp_path / "b8")[-1]
  assert row["train/loss"] == pytest.approx(row["train/rec"] + 8.0 * row["train/kl"], rel=1e-4)


@pytest.mark.parametrize("loop", ["scan", "steps"])
def test_the_epoch_is_traced_once(tmp_path, loop):
  traces = []
  train_and_evaluate(small_config(**{"training.epochs": 3, "training.epoch_loop": loop}), tmp_path,
                     dataset=synthetic_dataset(), on_trace=lambda: traces.append(1))
  assert len(traces) == 1


def test_the_step_loop_trains_as_the_scan_does(tmp_path):
  # Conv models on CPU loop over jitted steps (training.epoch_loop=auto): the same steps, the same numbers.
  ds = synthetic_dataset()
  conv = {"model.arch": "conv", "model.encoder_channels": [4], "model.decoder_channels": [4],
          "model.conv_stride": 2, "model.dense": 16, "model.kind": "cvae"}
  states = []
  for loop in ("scan", "steps"):
    cfg = small_config(**conv | {"training.epoch_loop": loop})
    train_and_evaluate(cfg, tmp_path / loop, dataset=ds)
    states.append(final_state(cfg, ds, tmp_path / loop))
  for a, b in zip(jax.tree.leaves(states[0].params), jax.tree.leaves(states[1].params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  uses_step_loop = lambda cfg: epoch.uses_step_loop(cfg.training, family_of(cfg.model).host_loop_on_cpu)
  assert uses_step_loop(small_config(**conv)) and not uses_step_loop(small_config())


def test_speed_options_train_to_the_same_parameters(tmp_path):
  # training.scan_unroll and optimizer.flatten change how the epoch is compiled, not what it computes;
  # a wrong unroll remainder (15 steps, unroll 4) or a mixed-up parameter order would change the numbers.
  # Clipping on: flattening must also keep the global norm that clipping takes.
  ds = synthetic_dataset(n_train=480)
  states = {}
  for name, options in {"plain": {}, "unrolled": {"training.scan_unroll": 4},
                        "flat": {"optimizer.flatten": True}}.items():
    cfg = small_config(**options | {"training.epochs": 2, "optimizer.grad_clip_norm": 5.0})
    train_and_evaluate(cfg, tmp_path / name, dataset=ds)
    states[name] = final_state(cfg, ds, tmp_path / name)
  for other in ("unrolled", "flat"):
    assert int(states["plain"].step) == int(states[other].step) == 30
    for x, y in zip(jax.tree.leaves(states["plain"].params), jax.tree.leaves(states[other].params)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  _, init = model_and_state(small_config(), ds.spec)
  moved = [np.abs(x - y).max() for x, y in zip(jax.tree.leaves(states["plain"].params), jax.tree.leaves(init.params))]
  assert min(moved) > 1e-3  # the parameters compared above did train


def test_resume_is_bit_identical(tmp_path, monkeypatch):
  ds = synthetic_dataset(pixels=Pixels.dynamic_binary)
  cfg = small_config(**{"training.epochs": 4, "data.pixels": Pixels.dynamic_binary, "model.kind": "cvae"})
  train_and_evaluate(cfg, tmp_path / "straight", dataset=ds)

  with killed_at_epoch(monkeypatch, 3):  # a kill: epoch 3's checkpoint is never written
    train_and_evaluate(cfg, tmp_path / "resumed", dataset=ds)
  assert not (tmp_path / "resumed" / "results.json").exists()
  train_and_evaluate(cfg, tmp_path / "resumed", dataset=ds)

  a, b = final_state(cfg, ds, tmp_path / "straight"), final_state(cfg, ds, tmp_path / "resumed")
  assert int(a.step) == int(b.step) == 32
  for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
    np.testing.assert_array_equal(x, y)
  strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]
  assert strip(read_metrics(tmp_path / "straight")) == strip(read_metrics(tmp_path / "resumed"))


def test_resume_from_a_checkpoint_every_second_epoch_with_the_wall_time_carried_on(tmp_path, monkeypatch):
  """training.checkpoint_every_epochs=2, killed while epoch 4's line is written: the run resumes from the
  step-16 checkpoint (epoch 2), redoes epochs 3 and 4, and ends equal to an uninterrupted run; its metrics
  lines are one per epoch and the wall time keeps counting from where the kept lines stopped."""
  ds = synthetic_dataset()
  cfg = small_config(**{"training.epochs": 5, "training.checkpoint_every_epochs": 2})
  train_and_evaluate(cfg, tmp_path / "straight", dataset=ds)
  with killed_at_epoch(monkeypatch, 4):  # a kill: epoch 4's checkpoint is never written
    train_and_evaluate(cfg, tmp_path / "resumed", dataset=ds)
  steps = sorted(int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir())
  assert steps == [16]  # epochs 2 only: not 1 or 3
  kept = read_metrics(tmp_path / "resumed")[1]["wall_time"]  # epoch 2's; epoch 3's line goes with its redo
  results = train_and_evaluate(cfg, tmp_path / "resumed", dataset=ds)
  a, b = final_state(cfg, ds, tmp_path / "straight"), final_state(cfg, ds, tmp_path / "resumed")
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  rows = read_metrics(tmp_path / "resumed")
  assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
  assert kept < rows[2]["wall_time"] < rows[3]["wall_time"] < rows[4]["wall_time"] == results["wall_time"]
  assert sorted(int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == [16, 32, 40]


def test_a_finished_run_is_not_retrained(tmp_path):
  cfg, ds = small_config(), synthetic_dataset()
  first = train_and_evaluate(cfg, tmp_path, dataset=ds)
  traces = []
  again = train_and_evaluate(cfg, tmp_path, dataset=ds, on_trace=lambda: traces.append(1))
  assert again == first and not traces


def test_a_run_directory_with_another_config_is_refused(tmp_path):
  ds = synthetic_dataset()
  train_and_evaluate(small_config(), tmp_path, dataset=ds)
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
  with pytest.raises(RunDirError, match=r"objective\.beta: 1\.0 -> 2\.0"):
    train_and_evaluate(small_config(**{"objective.beta": 2.0}), tmp_path, dataset=ds)
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing touched


def test_a_run_written_before_a_new_option_still_resumes(tmp_path):
  import yaml
  cfg = small_config()
  train_and_evaluate(cfg, tmp_path, dataset=synthetic_dataset())
  written = yaml.safe_load((tmp_path / "config.yaml").read_text())
  del written["objective"]["free_bits"]  # as a run directory from before the option existed
  (tmp_path / "config.yaml").write_text(yaml.safe_dump(written))
  rundir.check_config(tmp_path, to_dict(cfg))  # absent = the default: the same run
  with pytest.raises(rundir.RunDirError, match=r"objective.free_bits: '<absent>' -> 0.5"):
    rundir.check_config(tmp_path, to_dict(small_config(**{"objective.free_bits": 0.5})))


def test_non_finite_loss_stops_with_the_step(tmp_path):
  cfg = small_config(**{"optimizer.learning_rate": 1e9, "training.epochs": 2})
  with pytest.raises(NonFiniteLossError, match=r"at step \d+"):
    train_and_evaluate(cfg, tmp_path, dataset=synthetic_dataset())
  assert not (tmp_path / "results.json").exists()


def test_batch_larger_than_the_data_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match="training.batch_size=512"):
    train_and_evaluate(small_config(**{"training.batch_size": 512}), tmp_path, dataset=synthetic_dataset())


def test_gradient_clipping_is_applied(tmp_path):
  ds = synthetic_dataset()
  clipped = train_and_evaluate(small_config(**{"optimizer.grad_clip_norm": 1e-6}), tmp_path / "c", dataset=ds)
  free = train_and_evaluate(small_config(), tmp_path / "f", dataset=ds)
  assert clipped["elbo"] != free["elbo"]


def test_a_clipped_step_equals_optax_clipping_then_the_optimizer():
  """One train step moves the parameters as Optax's clip_by_global_norm then Adagrad(rate) would, on the
  gradient of the step's own loss (same keys). Adagrad, because Adam's first step hardly depends on the
  gradient's scale."""
  import optax
  from cvae_jax.tasks.density import DensityTask
  ds = synthetic_dataset()
  cfg = small_config(**{"optimizer.grad_clip_norm": 0.5, "optimizer.name": "adagrad", "optimizer.learning_rate": 0.1})
  model, state = model_and_state(cfg, ds.spec)
  plan = DensityTask().plan(cfg, model, ds.spec, len(ds.train))
  images, labels = jnp.asarray(ds.train.images[:32]), jnp.asarray(ds.train.labels[:32])
  new_state, _ = jax.jit(epoch.make_train_step(plan))(state, images, labels)
  keys = epoch.StepKeys(plan.hyper.seed, state.step)
  grads = jax.grad(lambda p: plan.loss(p, images, labels, keys, plan.hyper)[0])(state.params)
  assert float(optax.tree.norm(grads)) > 0.5  # clipping acts
  reference = optax.chain(optax.clip_by_global_norm(0.5), optax.adagrad(cfg.optimizer.learning_rate))
  updates, _ = reference.update(grads, reference.init(state.params), state.params)
  for x, y in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(optax.apply_updates(state.params, updates))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_aggressive_training_alternates_encoder_only_and_decoder_only_steps_then_trains_both():
  """He et al. 2019 with a fixed inner loop of 2: steps 0, 1 move the encoder alone, as the optimizer would on
  the encoder's own gradient; step 2 the decoder alone; after the aggressive epoch, every step moves both.
  The part a step leaves alone keeps its optimizer moments too."""
  import optax
  from cvae_jax.tasks.density import DensityTask
  ds = synthetic_dataset()
  cfg = small_config(**{"optimizer.name": "adagrad", "optimizer.learning_rate": 0.1,
                        "training.aggressive_encoder_steps": 2, "training.aggressive_epochs": 1})
  model, state = model_and_state(cfg, ds.spec)
  plan = DensityTask().plan(cfg, model, ds.spec, len(ds.train))
  step = jax.jit(epoch.make_train_step(plan))
  images, labels = jnp.asarray(ds.train.images[:32]), jnp.asarray(ds.train.labels[:32])
  moved = lambda new, old, part: not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(new.params[part]), jax.tree.leaves(old.params[part])))
  moments = lambda s, part: [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(s.opt_state)
                             if f"'{part}'" in jax.tree_util.keystr(path)]
  first, _ = step(state, images, labels)
  grads = jax.grad(lambda p: plan.loss(p, images, labels, epoch.StepKeys(plan.hyper.seed, state.step), plan.hyper)[0])(
      state.params)
  grads["decoder"] = jax.tree.map(jnp.zeros_like, grads["decoder"])
  reference = optax.adagrad(0.1)
  updates, _ = reference.update(grads, reference.init(state.params), state.params)
  want = optax.apply_updates(state.params, updates)
  for x, y in zip(jax.tree.leaves(first.params["encoder"]), jax.tree.leaves(want["encoder"])):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  assert not moved(first, state, "decoder")
  assert moments(first, "decoder") and moments(first, "encoder")
  for a, b in zip(moments(first, "decoder"), moments(state, "decoder")):
    np.testing.assert_array_equal(a, b)
  second, _ = step(first, images, labels)
  third, _ = step(second, images, labels)
  assert moved(second, first, "encoder") and not moved(second, first, "decoder")
  assert moved(third, second, "decoder") and not moved(third, second, "encoder")
  after = third.replace(step=jnp.asarray(plan.steps_per_epoch, third.step.dtype))  # the aggressive epoch is over
  both, _ = step(after, images, labels)
  assert moved(both, after, "encoder") and moved(both, after, "decoder")
  with pytest.raises(ConfigError, match="aggressive_epochs"):
    validate(small_config(**{"training.aggressive_encoder_steps": 2, "training.aggressive_epochs": 0}))


@pytest.mark.parametrize("user_flags, expected", [
    ("", "--xla_cpu_enable_concurrency_optimized_scheduler=false"),
    ("--xla_force_host_platform_device_count=2",
     "--xla_force_host_platform_device_count=2 --xla_cpu_enable_concurrency_optimized_scheduler=false"),
    ("--xla_cpu_enable_concurrency_optimized_scheduler=true", "--xla_cpu_enable_concurrency_optimized_scheduler=true"),
])
def test_the_command_lines_set_the_cpu_scheduler_flag_unless_the_user_did(user_flags, expected):
  """The conv models' CPU step is 1.5-1.9x faster without XLA:CPU's concurrency-optimized scheduler; XLA
  reads the flag only from XLA_FLAGS, so the command lines add it at start, and never override the user's.
  Importing the library changes nothing."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | ({"XLA_FLAGS": user_flags} if user_flags else {})
  script = ("import os, cvae_jax.experiment, cvae_jax.train; before = os.environ.get('XLA_FLAGS', ''); "
            "cvae_jax.xla_cpu.use_fast_scheduler(); print(before); print(os.environ['XLA_FLAGS'])")
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                       cwd=REPO).stdout.splitlines()
  assert out == [user_flags, expected]  # test_cli.py checks that a training run's env.jsonl records it


def test_select_on_validation_evaluates_and_restores_the_best_validation_epoch_and_survives_a_kill(tmp_path, monkeypatch):
  from cvae_jax import estimators, likelihoods
  from cvae_jax.data import Dataset
  from cvae_jax.engine import loop
  from cvae_jax.keys import Stream, stream_key
  # The validation split comes from a shifted distribution (two bands of rows, not three), so its ELBO turns
  # down while training on 32 examples at a high learning rate goes on.
  base = synthetic_dataset(n_train=32, n_test=64)
  ds = Dataset(base.spec, base.train, base.test, synthetic_dataset(n_train=64, num_classes=2, seed=1).train)
  cfg = small_config(**{"training.select_on_validation": True, "data.validation_size": 64, "training.epochs": 8,
                        "training.batch_size": 8, "model.hidden": [256], "optimizer.learning_rate": 5e-2,
                        "evaluation.iwae_samples": 0})
  results = train_and_evaluate(cfg, tmp_path / "straight", dataset=ds)
  rows = read_metrics(tmp_path / "straight")
  best = int(np.argmax([r["val/elbo"] for r in rows]))
  assert best < len(rows) - 1  # the run overfits: the last epoch is not the best, so the selection matters
  assert results["selected_epoch"] == rows[best]["epoch"]
  assert results["elbo"] == rows[best]["test/elbo"] != rows[-1]["test/elbo"]
  # The restored parameters are the selected ones: their validation ELBO is the best epoch's.
  params = loop.selected_params(final_state(cfg, ds, tmp_path / "straight"))
  evaluate = estimators.make_evaluate(model_and_state(cfg, ds.spec)[0], ds.spec, likelihoods.of(cfg.objective), 50)
  val = evaluate(params, ds.validation.images, ds.validation.labels, stream_key(cfg.seed, Stream.EVAL))["elbo"]
  np.testing.assert_allclose(float(val), rows[best]["val/elbo"], rtol=1e-5)
  # Killed after the best epoch and resumed: the best parameters travel in the checkpoint.
  with killed_at_epoch(monkeypatch, best + 2):
    train_and_evaluate(cfg, tmp_path / "killed", dataset=ds)
  resumed = train_and_evaluate(cfg, tmp_path / "killed", dataset=ds)
  assert resumed["selected_epoch"] == results["selected_epoch"]
  np.testing.assert_allclose(resumed["elbo"], results["elbo"], rtol=1e-5)


def test_select_on_validation_without_a_validation_split_is_refused():
  from cvae_jax.experiment import validate
  with pytest.raises(ConfigError, match=r"training\.select_on_validation.*data\.validation_size"):
    validate(small_config(**{"training.select_on_validation": True}))
