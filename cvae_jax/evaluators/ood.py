"""Anomaly scores that correct the likelihood where it fails (a model that finds another dataset's simple
inputs more likely than its own test set: Nalisnick et al. 2019a).

  input complexity   S(x) = -log p(x) - L(x) (Serrà et al. 2020, eq. 2 in nats): L(x) is the length of x
                     under a generic lossless compressor (evaluation.compressor), converted from bits to nats:
                     zlib (level 9) of the stored bytes, the same for images and signals (the default), or PNG
                     (Pillow, level 9) for uint8 images. A simple input is cheap for any compressor, so its high
                     likelihood no longer passes for typicality.
  typicality         |(-log p(x)) - H| (Nalisnick et al. 2019b, "Detecting out-of-distribution inputs to deep
                     generative models using typicality", M = 1): the distance of an input's negative
                     log-likelihood from H, the mean over normal (training) inputs; and `typicality_test`, their
                     test of a batch of M inputs with its bootstrap threshold.
"""
from __future__ import annotations

import io
import math
import zlib

import numpy as np

LN2 = math.log(2.0)


def compressed_bits(example: np.ndarray, compressor: str = "zlib") -> int:
  """Bits of one stored example under the compressor: zlib of its bytes, or PNG of a uint8 image [H, W, C]
  (C = 1 or 3)."""
  if compressor == "png":
    from PIL import Image
    if example.dtype != np.uint8 or example.ndim != 3 or example.shape[-1] not in (1, 3):
      raise ValueError(f"PNG compresses uint8 images [H, W, 1 or 3], not {example.dtype} {example.shape}: use "
                       "evaluation.compressor=zlib")
    buffer = io.BytesIO()
    Image.fromarray(example[..., 0] if example.shape[-1] == 1 else example).save(buffer, format="PNG", compress_level=9)
    return 8 * buffer.getbuffer().nbytes
  return 8 * len(zlib.compress(np.ascontiguousarray(example).tobytes(), 9))


def complexity_nats(examples: np.ndarray, compressor: str = "zlib") -> np.ndarray:
  """L(x) in nats for each stored example.  [N]"""
  return np.array([compressed_bits(x, compressor) * LN2 for x in examples], np.float64)


def typicality_scores(nll: np.ndarray, normal_nll: np.ndarray) -> np.ndarray:
  """|nll - H| per input, H the mean negative log-likelihood of normal inputs.  [N]"""
  return np.abs(np.asarray(nll, np.float64) - float(np.mean(normal_nll)))


def typicality_test(batch_nll: np.ndarray, normal_nll: np.ndarray, alpha: float = 0.01, bootstrap: int = 1000,
                    seed: int = 0) -> dict:
  """Nalisnick et al. 2019b's test: a batch of M inputs is atypical when |mean nll - H| exceeds epsilon, the
  (1 - alpha) quantile of the same statistic over `bootstrap` batches of M drawn (with replacement) from the
  normal inputs' nll (H their mean). Returns the statistic, epsilon and whether the batch is flagged."""
  normal = np.asarray(normal_nll, np.float64)
  m = len(batch_nll)
  entropy = normal.mean()
  draws = np.random.default_rng(seed).choice(normal, size=(bootstrap, m), replace=True)
  epsilon = float(np.quantile(np.abs(draws.mean(axis=1) - entropy), 1 - alpha))
  statistic = float(abs(np.mean(batch_nll) - entropy))
  return {"statistic": statistic, "epsilon": epsilon, "atypical": statistic > epsilon, "batch_size": m}
