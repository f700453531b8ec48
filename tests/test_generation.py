"""The generation uses return what their definitions say, checked against direct encode/decode calls."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvae_jax import generation, likelihoods
from cvae_jax.config import Kind
from cvae_jax.data import DatasetSpec
from cvae_jax.models import create_model, init_params
from cvae_jax.models.mlp import MLPConfig

SPEC = DatasetSpec("toy", (6, 6, 1), 4)
L = likelihoods.get("bernoulli")


@pytest.fixture(scope="module")
def cvae():
  model = create_model(MLPConfig(kind=Kind.cvae, hidden=[16], latent_size=3), SPEC)
  x = jax.random.uniform(jax.random.key(0), (5, 6, 6, 1))
  labels = np.array([0, 1, 2, 3, 1])
  params = init_params(model, {"params": jax.random.key(1)}, x, jax.nn.one_hot(labels, 4), jax.random.key(2))
  return model, params, x, labels


def test_translation_keeps_the_code_and_changes_the_label(cvae):
  model, params, x, labels = cvae
  out = generation.translate(model, params, SPEC, x, labels, L)
  assert out.shape == (5, 4, 6, 6, 1)
  z = generation.encode_mean(model, params, SPEC, x, labels)
  for k in range(4):
    np.testing.assert_allclose(out[:, k], generation.decode_mean(model, params, SPEC, z, np.full(5, k), L), rtol=1e-5)
  assert not np.allclose(out[:, 0], out[:, 1])


def test_style_transfer_uses_style_code_and_content_class(cvae):
  model, params, x, labels = cvae
  out = generation.style_transfer(model, params, SPEC, x[:2], labels[:2], labels[2:], L)
  assert out.shape == (2, 3, 6, 6, 1)
  z = generation.encode_mean(model, params, SPEC, x[:2], labels[:2])
  for j, k in enumerate(labels[2:]):
    np.testing.assert_allclose(out[:, j], generation.decode_mean(model, params, SPEC, z, np.full(2, k), L), rtol=1e-5)


def test_interpolation_ends_at_both_images(cvae):
  model, params, x, labels = cvae
  out = generation.interpolate(model, params, SPEC, x[0], labels[0], x[1], labels[1], 5, L)
  z = generation.encode_mean(model, params, SPEC, x[:2], labels[:2])
  np.testing.assert_allclose(out[0], generation.decode_mean(model, params, SPEC, z[:1], labels[:1], L)[0], rtol=1e-5)
  np.testing.assert_allclose(out[-1], generation.decode_mean(model, params, SPEC, z[1:2], labels[1:2], L)[0], rtol=1e-5)


def test_traversal_sets_one_dimension_at_a_time(cvae):
  model, params, x, labels = cvae
  values = np.array([-2.0, 0.0, 2.0])
  out = generation.traverse(model, params, SPEC, x[0], labels[0], values, L)
  assert out.shape == (3, 3, 6, 6, 1)
  z = np.asarray(generation.encode_mean(model, params, SPEC, x[:1], labels[:1])[0])
  for d in range(3):
    for i, v in enumerate(values):
      code = z.copy()
      code[d] = v
      expected = generation.decode_mean(model, params, SPEC, jnp.asarray(code)[None], labels[:1], L)[0]
      np.testing.assert_allclose(out[d, i], expected, rtol=1e-5)


def test_class_conditional_shapes(cvae):
  model, params, _, _ = cvae
  out = generation.class_conditional(model, params, SPEC, jax.random.key(0), [0, 3], 7, L)
  assert out.shape == (2, 7, 6, 6, 1) and float(out.min()) >= 0 and float(out.max()) <= 1


def test_class_conditional_samples_are_grouped_by_class(cvae):
  # Row i holds class classes[i]: sample j of it is the prior draw number i * per_class + j decoded under it.
  model, params, _, _ = cvae
  key, classes, per_class = jax.random.key(5), [2, 0, 3], 4
  out = generation.class_conditional(model, params, SPEC, key, classes, per_class, L)
  z = jax.random.normal(key, (len(classes) * per_class, model.latent_size))
  for i, k in enumerate(classes):
    expected = generation.decode_mean(model, params, SPEC, z[i * per_class:(i + 1) * per_class], np.full(per_class, k), L)
    np.testing.assert_allclose(out[i], expected, rtol=1e-5)
