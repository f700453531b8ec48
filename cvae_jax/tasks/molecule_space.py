"""What chemists do with a molecule VAE's latent space: walk between two molecules.

Interpolation (Gomez-Bombarelli et al. 2018, Fig. 3): pairs of test molecules (the first 2N of the test split,
paired in order) are encoded to their posterior means z_a, z_b; the points z_a + t (z_b - z_a) at `steps`
evenly spaced t in [0, 1] (and, for a CVAE, the condition interpolated the same way) are decoded greedily. The
report: validity at each t over the pairs; the share of paths whose ends decode back to their molecules; the
mean number of distinct valid molecules per path (1 when z is ignored: a collapsed posterior decodes every
point to the same string); the mean Tanimoto similarity of consecutive distinct valid molecules along a path
(how smooth the walk is).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cvae_jax.config import Config
from cvae_jax.data import Dataset, moses
from cvae_jax.evaluators import moses_metrics
from cvae_jax.models import VAE
from cvae_jax.models.gru import sample_tokens


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
    z, cc = line(mean), None if c is None else line(c)
    return sample_tokens(model, params, z, cc, jax.random.key(0), vocab.length, temperature=0.0)

  decoded = vocab.to_smiles(vocab.decode(np.asarray(walk(params, x, c))))
  paths = [[decoded[s * pairs + p] for s in range(steps)] for p in range(pairs)]  # [P][S]
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
  return {"pairs": pairs, "steps": steps, "validity_along_path": validity, "validity": float(np.mean(validity)),
          "ends_reconstructed": float(ends_kept), "distinct_per_path": float(np.mean(distinct)),
          "neighbour_similarity": float(np.mean(similarity)) if similarity else float("nan"),
          "example": paths[0]}


def _canonical(smiles: str):
  """RDKit's canonical SMILES, None if the string is not a valid molecule."""
  valid = moses_metrics.canonical_valid([smiles])
  return valid[0] if valid else None
