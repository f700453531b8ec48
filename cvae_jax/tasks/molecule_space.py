"""What chemists do with a molecule VAE's latent space: walk between two molecules, and search it for better ones.

Interpolation (Gomez-Bombarelli et al. 2018, Fig. 3): pairs of test molecules (the first 2N of the test split,
paired in order) are encoded to their posterior means z_a, z_b; the points z_a + t (z_b - z_a) at `steps`
evenly spaced t in [0, 1] (and, for a CVAE, the condition interpolated the same way) are decoded greedily. The
report: validity at each t over the pairs; the share of paths whose ends decode back to their molecules; the
mean number of distinct valid molecules per path; the same along the z path with a CVAE's condition held at the
start molecule's (`distinct_per_path_z_only`: 1 when z is ignored, as a collapsed posterior does, whatever the
condition does); the mean Tanimoto similarity of consecutive distinct valid molecules along a path
(how smooth the walk is).

Optimization (Gomez-Bombarelli et al. 2018, Sec. "Bayesian optimization" in its simplest, gradient form): see
`optimize`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cvae_jax.config import Config
from cvae_jax.data import Dataset, moses
from cvae_jax.models import VAE
from cvae_jax.models.gru import sample_tokens
from cvae_jax.tasks import moses_metrics


def interpolate(cfg: Config, ds: Dataset, model: VAE, params, pairs: int = 100, steps: int = 11) -> dict:
  """Greedy decodes along straight lines between the posterior means of `pairs` pairs of test molecules."""
  if pairs < 1 or steps < 2:
    raise ValueError(f"interpolation needs at least 1 pair and 2 steps (got {pairs} pairs, {steps} steps)")
  vocab = moses.vocabulary(ds.spec, cfg.data.syntax)
  pairs = min(pairs, len(ds.test) // 2)
  x = jnp.asarray(ds.test.images[:2 * pairs])
  c = jnp.asarray(ds.test.labels[:2 * pairs]) if model.condition_size else None
  t = jnp.linspace(0.0, 1.0, steps)[:, None, None]  # [S, 1, 1]

  @jax.jit
  def walk(params, x, c):
    mean, _ = model.apply({"params": params}, x, c, method=VAE.encode)
    line = lambda v: (v[0::2] + t * (v[1::2] - v[0::2])).reshape(steps * pairs, -1)  # [S * P, D], step-major
    z = line(mean)
    both = sample_tokens(model, params, z, None if c is None else line(c), jax.random.key(0), vocab.length, 0.0)
    if c is None:
      return both, both
    held = jnp.broadcast_to(c[0::2], (steps, pairs, c.shape[-1])).reshape(steps * pairs, -1)  # the start's c
    return both, sample_tokens(model, params, z, held, jax.random.key(0), vocab.length, 0.0)

  def as_paths(ids):  # step-major token ids [S * P, T] -> SMILES [P][S]
    decoded = vocab.to_smiles(vocab.decode(np.asarray(ids)))
    return [[decoded[s * pairs + p] for s in range(steps)] for p in range(pairs)]

  walked, walked_z = walk(params, x, c)
  paths, z_paths = as_paths(walked), as_paths(walked_z)
  ends = vocab.to_smiles(vocab.decode(np.asarray(x)))
  canon = [[_canonical(s) for s in path] for path in paths]
  validity = [float(np.mean([path[s] is not None for path in canon])) for s in range(steps)]
  ends_kept = np.mean([path[0] is not None and path[0] == _canonical(ends[2 * p]) and
                       path[-1] is not None and path[-1] == _canonical(ends[2 * p + 1]) for p, path in enumerate(canon)])
  distinct, similarity = [], []
  for path in canon:
    valid = [s for s in path if s is not None]
    chain = [s for i, s in enumerate(valid) if i == 0 or s != valid[i - 1]]  # consecutive repeats once
    distinct.append(len(set(chain)))
    if len(chain) > 1:
      fps = moses_metrics.fingerprints([moses_metrics.molecule(s) for s in chain])
      similarity += [moses_metrics.mean_aggregated_tanimoto(a[None], b[None], "max") for a, b in zip(fps, fps[1:])]
  distinct_z = [len({m for m in map(_canonical, path) if m is not None}) for path in z_paths]
  return {"pairs": pairs, "steps": steps, "validity_along_path": validity, "validity": float(np.mean(validity)),
          "ends_reconstructed": float(ends_kept), "distinct_per_path": float(np.mean(distinct)),
          "distinct_per_path_z_only": float(np.mean(distinct_z)),
          "neighbour_similarity": float(np.mean(similarity)) if similarity else float("nan"),
          "example": paths[0]}


def _canonical(smiles: str):
  """RDKit's canonical SMILES, None if the string is not a valid molecule."""
  valid = moses_metrics.canonical_valid([smiles])
  return valid[0] if valid else None


def fit_predictor(z: np.ndarray, y: np.ndarray, hidden: int = 64, steps: int = 2000, seed: int = 0):
  """A small property predictor on the latent space: an MLP z -> y (one tanh layer of `hidden` units), fitted
  by Adam on the squared error of the standardized y. Returns predict(params, z) -> y, its params, and the
  R^2 on the last fifth of the pairs (held out from the fit)."""
  import flax.linen as nn
  import optax

  class Predictor(nn.Module):
    @nn.compact
    def __call__(self, z):
      return nn.Dense(1)(jnp.tanh(nn.Dense(hidden)(z)))[..., 0]

  cut = len(z) * 4 // 5
  mean, std = float(y[:cut].mean()), float(y[:cut].std()) or 1.0
  net, tx = Predictor(), optax.adam(1e-2)
  params = net.init(jax.random.key(seed), jnp.asarray(z[:1]))
  opt = tx.init(params)
  zt, yt = jnp.asarray(z[:cut]), jnp.asarray((y[:cut] - mean) / std)

  @jax.jit
  def step(params, opt):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((net.apply(p, zt) - yt) ** 2))(params)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt, loss

  for _ in range(steps):
    params, opt, _ = step(params, opt)
  predict = lambda params, z: net.apply(params, z) * std + mean
  held = np.asarray(predict(params, jnp.asarray(z[cut:])))
  spread = np.var(y[cut:]) if len(y) > cut else 0.0
  r2 = 1 - np.mean((held - y[cut:]) ** 2) / spread if spread > 0 else float("nan")
  return predict, params, float(r2)


def optimize(cfg: Config, ds: Dataset, model: VAE, params, prop: str = "qed", fit: int = 10000, starts: int = 200,
             steps: int = 10, step_size: float = 0.5, seed: int = 0) -> dict:
  """Property optimization in the latent space (Gomez-Bombarelli et al. 2018): fit a predictor of the RDKit
  property `prop` on the posterior means of `fit` training molecules; from the posterior means of `starts` test
  molecules take `steps` normalized gradient steps of length `step_size` uphill on the predictor, and decode
  (greedily; a CVAE keeps the start molecule's condition). The baseline moves each start the same distance in a
  random direction. A start succeeds when its decoded molecule is valid and RDKit's value of `prop` beats the
  start molecule's. Reports both success rates, validity and the mean RDKit value of the valid decodes."""
  if prop not in moses.PROPERTIES:
    raise ValueError(f"property {prop!r}: choose one of {list(moses.PROPERTIES)}")
  vocab = moses.vocabulary(ds.spec, cfg.data.syntax)
  encode = jax.jit(lambda params, x, c: model.apply({"params": params}, x, c, method=VAE.encode)[0])
  condition = lambda split, start, stop: jnp.asarray(split.labels[start:stop]) if model.condition_size else None
  fit = min(fit, len(ds.train))
  z_fit = np.concatenate([np.asarray(encode(params, jnp.asarray(ds.train.images[i:min(i + 1000, fit)]),
                                            condition(ds.train, i, min(i + 1000, fit)))) for i in range(0, fit, 1000)])
  y_fit = moses.properties_of(vocab.to_smiles(vocab.decode(ds.train.images[:fit])), [prop])[:, 0]
  predict, predictor, r2 = fit_predictor(z_fit, y_fit, seed=seed)

  starts = min(starts, len(ds.test))
  z0 = encode(params, jnp.asarray(ds.test.images[:starts]), condition(ds.test, 0, starts))
  uphill = jax.grad(lambda z: jnp.sum(predict(predictor, z)))
  z = z0
  for _ in range(steps):
    g = uphill(z)
    z = z + step_size * g / (jnp.linalg.norm(g, axis=-1, keepdims=True) + 1e-12)
  direction = jax.random.normal(jax.random.key(seed), z0.shape)
  z_random = z0 + jnp.linalg.norm(z - z0, axis=-1, keepdims=True) * direction / jnp.linalg.norm(direction, axis=-1,
                                                                                                    keepdims=True)
  decode = jax.jit(lambda params, z, c: sample_tokens(model, params, z, c, jax.random.key(0), vocab.length, 0.0))
  start_values = moses.properties_of(vocab.to_smiles(vocab.decode(ds.test.images[:starts])), [prop])[:, 0]
  result = {"property": prop, "fit": fit, "predictor_r2": r2, "starts": starts, "steps": steps,
            "step_size": step_size, "start_mean": float(np.nanmean(start_values))}
  for name, zz in (("gradient", z), ("random", z_random)):
    values = moses.properties_of(vocab.to_smiles(vocab.decode(np.asarray(decode(params, zz, condition(ds.test, 0, starts))))),
                                 [prop])[:, 0]
    valid = np.isfinite(values)
    result[name] = {"validity": float(valid.mean()), "success": float(np.mean(valid & (values > start_values))),
                    "mean": float(values[valid].mean()) if valid.any() else float("nan"),
                    "predicted": float(np.mean(predict(predictor, zz)))}
  return result
