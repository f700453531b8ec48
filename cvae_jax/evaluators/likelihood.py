"""The numbers a paper reports about a density model on the test split.

  test_elbo   the ELBO (one reparameterized sample per example) and its terms rec, kl, bpd, and whether the
              likelihood is a normalized density on these inputs (only then is it comparable with NLLs)
  posterior   E_x KL(q(z_u | x) || p(z_u)) per latent dimension; active units, Cov_x(E_q[z_u]) > 0.01
  iwae(k)     L_k (Burda et al. 2016); nll = -L_k. For a CVAE the bound is on log p(x | c).
"""
from __future__ import annotations

import math
import time
from typing import Callable

import jax
import numpy as np

from cvae_jax import estimators
from cvae_jax.estimators import Draw
from cvae_jax.evaluators import EvalContext
from cvae_jax.keys import Stream, fold, stream_key


def _test_split(ctx: EvalContext):
  return jax.device_put(ctx.dataset.test.images), jax.device_put(ctx.dataset.test.labels)


def test_elbo(ctx: EvalContext) -> dict:
  spec = ctx.dataset.spec
  evaluate = estimators.make_evaluate(ctx.model, spec, ctx.likelihood, ctx.cfg.training.eval_batch_size)
  elbo = evaluate(ctx.params, *_test_split(ctx), stream_key(ctx.cfg.seed, Stream.EVAL))
  return {"split": "test", "num_examples": len(ctx.dataset.test),
          "normalized_likelihood": ctx.likelihood.normalized(spec.encoding)} | \
      {k: float(v) for k, v in jax.device_get(elbo).items()}


def posterior(ctx: EvalContext) -> dict:
  if not ctx.model.stochastic:  # a plain autoencoder has no posterior
    return {}
  # with_logvar as the epoch's diagnostics ask: the program they compiled is this one
  make_stats = estimators.make_posterior_stats(ctx.model, ctx.dataset.spec, ctx.cfg.training.eval_batch_size,
                                              with_logvar=True)
  stats = make_stats(ctx.params, *_test_split(ctx), stream_key(ctx.cfg.seed, Stream.EVAL))
  num_active, covariance = estimators.active_units(np.asarray(stats["mean"]))
  return {"kl_per_dim": np.asarray(stats["kl_per_dim"]).mean(axis=0).tolist(), "active_units": num_active,
          "active_unit_threshold": estimators.ACTIVE_UNIT_THRESHOLD, "posterior_mean_covariance": covariance.tolist()}


def iwae(num_samples: int) -> Callable[[EvalContext], dict]:
  """The evaluator of L_k with k = num_samples, chunked as evaluation.batch_size and sample_chunk say."""

  def evaluate(ctx: EvalContext) -> dict:
    if not ctx.model.stochastic:  # a plain autoencoder has no bound
      return {}
    t0 = time.perf_counter()
    ev = ctx.cfg.evaluation
    bound_fn = estimators.make_iwae(ctx.model, ctx.dataset.spec, ctx.likelihood, num_samples, ev.batch_size,
                                    ev.sample_chunk)
    key = fold(stream_key(ctx.cfg.seed, Stream.EVAL), Draw.IWAE)
    bound = np.asarray(bound_fn(ctx.params, *_test_split(ctx), key), np.float64)
    return {"iwae": {"k": num_samples, "num_examples": len(bound), "bound": float(bound.mean()), "nll": float(-bound.mean()),
                     "standard_error": float(bound.std() / math.sqrt(len(bound))),
                     "conditional_on_label": bool(ctx.model.condition_size), "wall_time": time.perf_counter() - t0}}

  evaluate.__name__ = f"iwae, k = {num_samples}"
  return evaluate
