"""Ground-truth factors of variation: what the disentanglement scores read (evaluators/disentanglement.py).

A dataset generated from known factors (dSprites: shape, scale, orientation, x, y) gives a FactorTable: the
factors' names, their number of values, the values themselves, and a function from factor indices to the
stored examples. The scores sample factors, ask the table for the examples and compare the model's codes
with the factors; they never see how the examples were made.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class FactorTable:
  names: tuple[str, ...]          # one per factor, e.g. ("shape", "scale", "orientation", "x", "y")
  sizes: tuple[int, ...]          # the number of values of each factor
  values: tuple[np.ndarray, ...]  # each factor's values, in index order (scale: 0.5 ... 1.0)
  examples: Callable[[np.ndarray], np.ndarray]  # factor indices [N, F] int -> stored examples [N, ...]

  @property
  def num_factors(self) -> int:
    return len(self.sizes)

  def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
    """n factor settings drawn uniformly and independently, as indices.  [n, F] int64"""
    return np.stack([rng.integers(0, size, n) for size in self.sizes], axis=1)

  def sample_with_fixed(self, n: int, factor: int, rng: np.random.Generator) -> np.ndarray:
    """n settings that share one random value of `factor`, the others drawn uniformly (the beta-VAE and
    FactorVAE scores' batches).  [n, F] int64"""
    factors = self.sample(n, rng)
    factors[:, factor] = rng.integers(0, self.sizes[factor])
    return factors

  def index(self, factors: np.ndarray) -> np.ndarray:
    """The position of each setting in the dataset's canonical order (the last factor varies fastest).  [N]"""
    return np.ravel_multi_index(tuple(np.asarray(factors).T), self.sizes)
