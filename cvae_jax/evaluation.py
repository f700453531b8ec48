"""Evaluation on a whole split: the test ELBO and its terms, jitted and chunked.

Training calls the same functions each epoch and at the end.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from cvae_jax.config import Likelihood, Pixels
from cvae_jax.data import DatasetSpec, model_input
from cvae_jax.models import VAE
from cvae_jax.objectives import elbo_terms


def one_hot_condition(model: VAE, labels: jax.Array):
  """The CVAE condition c (one-hot labels), or None for a VAE."""
  return jax.nn.one_hot(labels, model.num_classes) if model.num_classes else None


def make_evaluate(model: VAE, spec: DatasetSpec, likelihood: Likelihood, batch_size: int) -> Callable:
  """Returns evaluate(params, images, labels, key) -> {elbo, rec, kl, bpd}, means over all examples.

  The split is padded to whole chunks of `batch_size` and the padding masked out, so the result is
  exact for any split size and memory stays bounded by one chunk.
  """
  num_dims = spec.num_pixels

  def chunk_sums(params, images, labels, mask, key):
    x = model_input(images, spec.pixels, jax.random.fold_in(key, 1))
    out = model.apply({"params": params}, x, one_hot_condition(model, labels), jax.random.fold_in(key, 0))
    terms = elbo_terms(x, out.logits, out.mean, out.logvar, likelihood)  # each [b]
    return {k: jnp.sum(v * mask) for k, v in terms.items()}

  @jax.jit
  def evaluate(params, images, labels, key):
    n = images.shape[0]
    num_chunks = math.ceil(n / batch_size)
    pad = num_chunks * batch_size - n
    images = jnp.pad(images, [(0, pad)] + [(0, 0)] * (images.ndim - 1))
    labels = jnp.pad(labels, (0, pad))
    mask = (jnp.arange(num_chunks * batch_size) < n).astype(jnp.float32)
    chunked = jax.tree.map(lambda a: a.reshape(num_chunks, batch_size, *a.shape[1:]), (images, labels, mask))
    keys = jax.random.split(key, num_chunks)
    sums = jax.lax.map(lambda args: chunk_sums(params, *args[0], args[1]), (chunked, keys))
    means = {k: jnp.sum(v) / n for k, v in sums.items()}
    means["bpd"] = -means["elbo"] / (num_dims * math.log(2.0))
    return means

  return evaluate
