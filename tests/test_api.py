"""cvae_jax.load(run_dir): the Python API against the command lines' own numbers, and its bad inputs."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

import cvae_jax
from cvae_jax import estimators, evaluate, generation
from cvae_jax.keys import Stream, stream_key
from cvae_jax.models import VAE
from conftest import REPO
from test_cli import run_cli

SMALL = ["+experiment=smoke", "data.train_limit=640", "data.test_limit=200", "training.epochs=1",
         "training.figures=false", "evaluation.iwae_samples=0", "training.progress=false"]


def train(tmp_path_factory, name: str, *overrides: str):
  run = tmp_path_factory.mktemp(name) / "run"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
  proc = run_cli([*SMALL, *overrides, f"hydra.run.dir={run}"], env, run.parent)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return run


@pytest.fixture(scope="module")
def cvae_run(tmp_path_factory):
  return train(tmp_path_factory, "cvae")


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
  return train(tmp_path_factory, "vae", "model=mlp", "model.kind=vae", "model.hidden=[64]", "data.pixels=static_binary")


@pytest.fixture(scope="module")
def cvae_model(cvae_run):
  return cvae_jax.load(cvae_run)


@pytest.fixture(scope="module")
def vae_model(vae_run):
  return cvae_jax.load(vae_run)


def test_the_api_gives_the_evaluate_command_s_bound(cvae_run):
  evaluate.main([str(cvae_run), "--iwae-samples", "5", "--no-sample-accuracy", "--quality-samples", "0"])
  bound = json.loads((cvae_run / "eval.json").read_text())["iwae"]["bound"]
  model = cvae_jax.load(cvae_run)
  test = model.dataset.test
  mine = model.log_likelihood(test.images, k=5, labels=test.labels)
  assert mine.shape == (len(test),) and np.all(mine < 0)
  assert mine.mean() == pytest.approx(bound, rel=1e-6)  # the same key, chunks and k as the command line


def test_samples_codes_and_uses_equal_the_generation_functions(cvae_model):
  model = cvae_model
  assert "a cvae (conv) of mnist (28, 28, 1), latent size 2" in repr(model)
  x, labels = model.dataset.test.images[:6], model.dataset.test.labels[:6]
  z = model.encode(x, labels)
  direct = generation.encode_mean(model.network, model.params, model.spec, x.astype(np.float32) / 255.0, labels)
  np.testing.assert_allclose(z, direct, rtol=1e-6)
  assert model.encode(x[..., 0], labels).shape == (6, 2)  # [N, H, W] grayscale is accepted

  images = model.sample(5, condition=7, seed=3)
  expected = generation.class_conditional(model.network, model.params, model.spec, stream_key(3, Stream.FIGURES),
                                          [7], 5, model.likelihood)[0]
  assert images.dtype == np.uint8 and images.shape == (5, 28, 28, 1)
  np.testing.assert_array_equal(images, np.round(np.asarray(expected) * 255).astype(np.uint8))
  cold = model.sample(5, condition=7, seed=3, temperature=0.0)  # every z = 0: five identical images
  assert all(np.array_equal(cold[0], c) for c in cold)

  reconstructed = model.reconstruct(x, labels)
  np.testing.assert_array_equal(reconstructed, model.decode(z, labels))
  translated = model.translate(x, labels)
  assert translated.shape == (6, 10, 28, 28, 1)
  np.testing.assert_array_equal(translated[np.arange(6), labels], reconstructed)  # its own class: the reconstruction
  styled = model.style_transfer(x[:2], labels[:2], [0, 1, 2])
  np.testing.assert_array_equal(styled[:, 1], translated[:2, 1])
  path = model.interpolate(x[0], x[1], steps=4, label_a=int(labels[0]), label_b=int(labels[1]))
  assert path.shape == (4, 28, 28, 1)
  np.testing.assert_array_equal(path[0], reconstructed[0])
  np.testing.assert_array_equal(path[-1], reconstructed[1])
  z_third = (2 * z[0] + z[1]) / 3  # t = 1/3: codes and one-hot conditions mixed alike
  c_third = (2 * np.eye(10)[labels[0]] + np.eye(10)[labels[1]]) / 3
  logits = model.network.apply({"params": model.params}, jnp.asarray(z_third[None]), jnp.asarray(c_third[None]),
                               method=VAE.decode)
  third = np.round(np.asarray(model.likelihood.mean(logits))[0] * 255).astype(np.uint8)
  assert np.abs(path[1].astype(int) - third).max() <= 1  # float rounding of t may move a pixel by one level


def bound(model, x, labels, k: int):
  """L_k per input computed here from the estimators, with the anomaly evaluator's key."""
  ev = model.config.evaluation
  fn = estimators.make_iwae(model.network, model.spec, model.likelihood, k, ev.batch_size, ev.sample_chunk)
  return np.asarray(fn(model.params, jnp.asarray(x), jnp.asarray(labels), stream_key(model.config.seed, Stream.EVAL)))


def test_a_vae_s_anomaly_score_is_its_negative_bound(vae_model):
  model = vae_model
  x = model.dataset.test.images[:50]
  assert set(np.unique(x)) <= {0, 1}  # statically binarized: the data's own units
  np.testing.assert_allclose(model.anomaly_score(x, k=4), -bound(model, x, np.zeros(50, np.int32), 4), rtol=1e-6)
  np.testing.assert_array_equal(model.encode(x.astype(bool)), model.encode(x))  # bool 0/1 pixels are accepted
  samples = model.sample(3)
  assert samples.shape == (3, 28, 28, 1) and samples.dtype == np.uint8 and samples.max() > 1  # intensities 0..255


def test_a_cvae_s_anomaly_score_is_the_class_marginal(cvae_model):
  model = cvae_model
  x = model.dataset.test.images[:5]
  log_prior = np.log(np.bincount(model.dataset.train.labels, minlength=10) / len(model.dataset.train.labels))
  per_class = np.stack([bound(model, x, np.full(5, c, np.int32), 3) for c in range(10)])  # [10, 5] L_k(x | c)
  expected = -logsumexp(per_class + log_prior[:, None], axis=0)
  np.testing.assert_allclose(model.anomaly_score(x, k=3), expected, rtol=1e-5)
  scores = model._jitted("scores", 3)
  model.anomaly_score(x[::-1], k=3)
  assert model._jitted("scores", 3) is scores and scores._cache_size() == 1  # compiled once


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y: m.encode(x[:, :27], y), "x has shape (4, 27, 28, 1); this model takes [N, 28, 28, 1]"),
    (lambda m, x, y: m.encode(x.astype(np.float32) / 255, y), "x has dtype float32; images go in as uint8"),
    (lambda m, x, y: m.encode(x, None), "labels is required: this model is conditional (pass class ids 0..9)"),
    (lambda m, x, y: m.encode(x, [1, 2, 3, 10]), "labels holds class 10, which is not a class of mnist"),
    (lambda m, x, y: m.encode(x, np.array([0.5] * 4)), "labels must be 4 integer class ids"),
    (lambda m, x, y: m.sample(0, condition=1), "n must be a positive integer"),
    (lambda m, x, y: m.sample(2, condition=1, temperature=float("nan")), "temperature must be a number >= 0"),
    (lambda m, x, y: m.decode(np.full((2, 2), np.nan), [1, 2]), "z must be finite floats [N, 2]"),
    (lambda m, x, y: m.log_likelihood(x, k=0, labels=y), "k must be an integer >= 1"),
    (lambda m, x, y: m.interpolate(x[0], x[1], steps=1, label_a=1, label_b=2), "steps must be an integer >= 2"),
    (lambda m, x, y: m.encode(x[:0], y[:0]), "x holds no inputs"),
    (lambda m, x, y: m.encode(x.astype(np.int64) + 300, y), "x holds values in [300, 555]; images are intensities"),
    (lambda m, x, y: m.sample(True, condition=1), "n must be a positive integer"),
    (lambda m, x, y: m.sample(2, condition=1, temperature="1"), "temperature must be a number >= 0"),
    (lambda m, x, y: m.sample(2, condition=1, seed=1.5), "seed must be an integer"),
    (lambda m, x, y: m.anomaly_score(x, k=0), "k must be an integer >= 1"),
    (lambda m, x, y: m.log_likelihood(x, k=2.5, labels=y), "k must be an integer >= 1"),
    (lambda m, x, y: m.style_transfer(x[:1], y[:1], []), "content_labels holds no class"),
])
def test_bad_inputs_to_a_cvae_name_the_argument(cvae_model, call, message):
  model = cvae_model
  x, y = model.dataset.test.images[:4], model.dataset.test.labels[:4]
  with pytest.raises(ValueError) as error:
    call(model, x, y)
  assert message in str(error.value)


@pytest.mark.parametrize("call, message", [
    (lambda m, x: m.sample(2, condition=3), "condition: this model is a vae, which takes no condition"),
    (lambda m, x: m.translate(x, [1, 2, 3, 4]), "translate needs a CVAE of classes; this run is a vae"),
    (lambda m, x: m.encode(x * 255), "holds values up to 255: this run was trained on statically binarized"),
])
def test_bad_inputs_to_a_vae_name_the_argument(vae_model, call, message):
  model = vae_model
  with pytest.raises(ValueError) as error:
    call(model, model.dataset.test.images[:4])
  assert message in str(error.value)


def test_a_run_that_is_training_is_not_loaded(cvae_run):
  from cvae_jax.engine import rundir
  from cvae_jax.tasks import RestoreError
  with rundir.RunLock(cvae_run):  # as a training process holds it (re-entrant here, so a second process)
    import subprocess
    import sys
    script = f"import cvae_jax; cvae_jax.load({str(cvae_run)!r})"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), timeout=300)
  assert proc.returncode != 0 and "RestoreError" in proc.stderr and "is in use by another process" in proc.stderr
  assert RestoreError  # the error a command line turns into one line


def test_the_api_compiles_each_use_once(cvae_model):
  model = cvae_model
  x, y = model.dataset.test.images[:4], model.dataset.test.labels[:4]
  model.encode(x, y)
  encode = model._jitted("encode")
  before = encode._cache_size()
  model.encode(x, y)
  model.encode(x[::-1], y[::-1])
  assert encode._cache_size() == before  # same shapes: no retrace
