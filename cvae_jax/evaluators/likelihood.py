"""The numbers a paper reports about a density model on the test split.

  test_elbo   the ELBO (one reparameterized sample per example) and its terms rec, kl, bpd, and whether the
              likelihood is a normalized density on these inputs (only then is it comparable with NLLs)
  posterior   E_x KL(q(z_u | x) || p(z_u)) per latent dimension; active units, Cov_x(E_q[z_u]) > 0.01
  iwae(k)     L_k (Burda et al. 2016); nll = -L_k. For a CVAE the bound is on log p(x | c).
"""
from __future__ import annotations

import hashlib
import io
import math
import time
import zipfile
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from cvae_jax import estimators
from cvae_jax.engine import rundir
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


CHUNKS_PER_SAVE = 10  # chunks of evaluation.batch_size images between two saves of the per-image bounds


def _fingerprint(ctx: EvalContext, num_samples: int) -> str:
  """What the per-image bounds depend on: the weights, k, the chunking and keys, the data settings."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(ctx.params)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  ev = ctx.cfg.evaluation
  digest.update(repr((num_samples, ev.batch_size, ev.sample_chunk, ctx.cfg.seed, ctx.cfg.data)).encode())
  return digest.hexdigest()


def _saved_bounds(path: Path, fingerprint: str, batch_size: int) -> np.ndarray:
  """The per-image bounds an earlier evaluation of these weights saved (a prefix of the test split, cut to
  whole chunks); none if the file is absent, unreadable or of other weights or settings."""
  try:
    with np.load(path) as saved:
      if str(saved["fingerprint"]) == fingerprint:
        bound = saved["bound"]
        return bound[:len(bound) // batch_size * batch_size]
      print(f"{path.name} holds the bounds of other weights or settings; computing them for these")
  except FileNotFoundError:
    pass
  except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:  # cut short or garbage
    print(f"{path.name} could not be read ({e}); computing the bound from the first image")
  return np.zeros(0, np.float64)


def _save_bounds(path: Path, bound: np.ndarray, fingerprint: str) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, bound=bound, fingerprint=np.array(fingerprint))
  rundir.write_bytes_atomic(path, buffer.getvalue())


def iwae(num_samples: int) -> Callable[[EvalContext], dict]:
  """The evaluator of L_k with k = num_samples, chunked as evaluation.batch_size and sample_chunk say.
  The per-image bounds are saved in the run directory (iwae_k<k>.npz) every CHUNKS_PER_SAVE chunks: an
  evaluation that is stopped resumes where it was, and one over more test images (--test-limit) starts
  after those already computed. The slices draw the keys the whole split would, so the bounds do not
  depend on where an evaluation stopped."""

  def evaluate(ctx: EvalContext) -> dict:
    if not ctx.model.stochastic:  # a plain autoencoder has no bound
      return {}
    t0 = time.perf_counter()
    ev = ctx.cfg.evaluation
    bound_fn = estimators.make_iwae(ctx.model, ctx.dataset.spec, ctx.likelihood, num_samples, ev.batch_size,
                                    ev.sample_chunk)
    key = fold(stream_key(ctx.cfg.seed, Stream.EVAL), Draw.IWAE)
    images, labels = ctx.dataset.test.images, ctx.dataset.test.labels
    n = len(images)
    path, fingerprint = ctx.workdir / f"iwae_k{num_samples}.npz", _fingerprint(ctx, num_samples)
    saved = _saved_bounds(path, fingerprint, ev.batch_size)
    bound = saved[:n]
    # A split of at most CHUNKS_PER_SAVE chunks is one slice; longer ones go in slices of that many chunks,
    # the last padded to a whole slice so that one program serves them all.
    step = min(CHUNKS_PER_SAVE * ev.batch_size, math.ceil(n / ev.batch_size) * ev.batch_size)
    for start in range(len(bound), n, step):
      stop = min(start + step, n)
      pad = step - (stop - start)
      pad_to = lambda a: np.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
      part = bound_fn(ctx.params, pad_to(images[start:stop]), pad_to(labels[start:stop]), key,
                      start // ev.batch_size)
      bound = np.concatenate([bound, np.asarray(part, np.float64)[:stop - start]])
      if len(bound) > len(saved):  # a shorter evaluation keeps the longer one's file
        _save_bounds(path, bound, fingerprint)
      if step < n:
        print(f"L_{num_samples}: {len(bound)} of {n} test images ({path.name})", flush=True)
    return {"iwae": {"k": num_samples, "num_examples": len(bound), "bound": float(bound.mean()), "nll": float(-bound.mean()),
                     "standard_error": float(bound.std() / math.sqrt(len(bound))),
                     "conditional_on_label": bool(ctx.model.condition_size), "wall_time": time.perf_counter() - t0,
                     "computed": n - min(len(saved), n)}}

  evaluate.__name__ = f"iwae, k = {num_samples}"
  return evaluate
