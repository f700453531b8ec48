"""cvae_jax.load(run_dir): the Python API against the command lines' own numbers, and its bad inputs."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import cvae_jax
from cvae_jax import evaluate, generation
from cvae_jax.keys import Stream, stream_key
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
  evaluate.main([str(cvae_run), "--iwae-samples", "5", "--no-sample-accuracy"])
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
  np.testing.assert_array_equal(path[0], reconstructed[0])
  np.testing.assert_array_equal(path[-1], reconstructed[1])


def test_a_vae_s_anomaly_score_is_its_negative_bound(vae_model):
  model = vae_model
  x = model.dataset.test.images[:50]
  assert set(np.unique(x)) <= {0, 1}  # statically binarized: the data's own units
  np.testing.assert_allclose(model.anomaly_score(x, k=4), -model.log_likelihood(x, k=4), rtol=1e-6)
  assert model.sample(3).shape == (3, 28, 28, 1)


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y: m.encode(x[:, :27], y), "x has shape (4, 27, 28, 1); this model takes [N, 28, 28, 1]"),
    (lambda m, x, y: m.encode(x.astype(np.float32) / 255, y), "x has dtype float32; images go in as uint8"),
    (lambda m, x, y: m.encode(x, None), "labels is required: this model is conditional (pass class ids 0..9)"),
    (lambda m, x, y: m.encode(x, [1, 2, 3, 10]), "labels holds class 10, which is not a class of mnist"),
    (lambda m, x, y: m.encode(x, np.array([0.5] * 4)), "labels must be 4 integer class ids"),
    (lambda m, x, y: m.sample(0, condition=1), "n must be a positive integer"),
    (lambda m, x, y: m.sample(2, condition=1, temperature=float("nan")), "temperature must be >= 0"),
    (lambda m, x, y: m.decode(np.full((2, 2), np.nan), [1, 2]), "z must be finite floats [N, 2]"),
    (lambda m, x, y: m.log_likelihood(x, k=0, labels=y), "k must be >= 1"),
    (lambda m, x, y: m.interpolate(x[0], x[1], steps=1, label_a=1, label_b=2), "steps must be an integer >= 2"),
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


def test_the_api_compiles_each_use_once(cvae_model):
  model = cvae_model
  x, y = model.dataset.test.images[:4], model.dataset.test.labels[:4]
  model.encode(x, y)
  encode = model._jitted("encode")
  before = encode._cache_size()
  model.encode(x, y)
  model.encode(x[::-1], y[::-1])
  assert encode._cache_size() == before  # same shapes: no retrace
