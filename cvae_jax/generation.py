"""The uses people come for, as functions of (model, params, inputs) that return decoder means.

  class_conditional  z ~ p(z) decoded under each requested class (at a temperature)
  translate          encode x under its own label, decode the same z under every class
                     (the same handwriting as another digit)
  style_transfer     the latent style of one image rendered with the class of another
  interpolate        decode points on the line between two images' latent codes (and labels)
  traverse           vary one latent dimension at a time around an image's code
A VAE ignores every label argument. Labels are the dataset's (DatasetSpec.condition_input makes the
condition). Outputs are the likelihood's mean: images in [0, 1].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cvae_jax.data import DatasetSpec
from cvae_jax.estimators import condition
from cvae_jax.likelihoods import Likelihood
from cvae_jax.models import VAE


def encode_mean(model: VAE, params, spec: DatasetSpec, x, labels) -> jax.Array:
  """E_q[z | x, c]: the code a figure uses for an image (no sampling noise).  [B, Z]"""
  mean, _ = model.apply({"params": params}, x, condition(model, spec, jnp.asarray(labels)), method="encode")
  return mean


def decode_mean(model: VAE, params, spec: DatasetSpec, z, labels, likelihood: Likelihood) -> jax.Array:
  """The likelihood's mean image for each z under each label.  [B, *shape]"""
  c = condition(model, spec, jnp.asarray(labels))
  return likelihood.mean(model.apply({"params": params}, z, c, method="decode"))


def class_conditional(model: VAE, params, spec: DatasetSpec, key, classes, per_class: int,
                      likelihood: Likelihood, temperature: float = 1.0) -> jax.Array:
  """[len(classes), per_class, *shape]: per_class prior samples decoded under each class (the prior's scale
  times the temperature; a hierarchy draws group by group)."""
  classes = np.asarray(classes)
  labels = jnp.asarray(np.repeat(classes, per_class))
  logits = model.apply({"params": params}, key, condition(model, spec, labels), len(labels), temperature,
                       method="generate")
  images = likelihood.mean(logits)
  return images.reshape(len(classes), per_class, *images.shape[1:])


def translate(model: VAE, params, spec: DatasetSpec, x, labels, likelihood: Likelihood) -> jax.Array:
  """[B, K, *shape]: image b's code (encoded under its own label) decoded under every class k."""
  num_classes = spec.num_classes
  z = encode_mean(model, params, spec, x, labels)  # [B, Z]
  b = z.shape[0]
  z_rep = jnp.repeat(z, num_classes, axis=0)
  targets = np.tile(np.arange(num_classes), b)
  return decode_mean(model, params, spec, z_rep, targets, likelihood).reshape(b, num_classes, *x.shape[1:])


def style_transfer(model: VAE, params, spec: DatasetSpec, style_x, style_labels, content_labels,
                   likelihood: Likelihood) -> jax.Array:
  """[S, C, *shape]: the style code of each style image rendered as the class of each content image."""
  z = encode_mean(model, params, spec, style_x, style_labels)  # [S, Z]
  s, c = z.shape[0], len(content_labels)
  images = decode_mean(model, params, spec, jnp.repeat(z, c, axis=0), np.tile(np.asarray(content_labels), s),
                       likelihood)
  return images.reshape(s, c, *style_x.shape[1:])


def interpolate(model: VAE, params, spec: DatasetSpec, x_a, label_a, x_b, label_b, steps: int,
                likelihood: Likelihood) -> jax.Array:
  """[steps, *shape]: decodes (1 - t) z_a + t z_b under the condition (1 - t) c_a + t c_b."""
  z = encode_mean(model, params, spec, jnp.stack([x_a, x_b]), np.array([label_a, label_b]))
  t = jnp.linspace(0.0, 1.0, steps)[:, None]
  z_t = (1 - t) * z[0] + t * z[1]
  c = None
  if model.condition_size:
    ends = spec.condition_input(jnp.array([label_a, label_b]))
    c = (1 - t) * ends[0] + t * ends[1]
  return likelihood.mean(model.apply({"params": params}, z_t, c, method="decode"))


def traverse(model: VAE, params, spec: DatasetSpec, x, label, values, likelihood: Likelihood) -> jax.Array:
  """[Z, len(values), *shape]: dimension d of the image's code set to each value, the others kept."""
  z = encode_mean(model, params, spec, x[None], np.array([label]))[0]  # [Z]
  values = jnp.asarray(values, jnp.float32)
  dims = model.latent_size
  codes = jnp.tile(z, (dims, len(values), 1))                    # [Z, V, Z]
  codes = codes.at[jnp.arange(dims), :, jnp.arange(dims)].set(values)
  images = decode_mean(model, params, spec, codes.reshape(-1, dims), np.full(dims * len(values), label), likelihood)
  return images.reshape(dims, len(values), *x.shape)
