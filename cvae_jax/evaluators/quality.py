"""Sample quality and diversity as numbers: the Fréchet distance, precision and recall, density and coverage
of generated images against the test images, in the feature space of the run's classifier (classifier.py,
its 128-d penultimate layer: on MNIST-like data what Inception's features are to FID). docs/sample_quality.md
defines each number and the protocol.

  frechet_distance      ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))   (Heusel et al. 2017)
  precision, recall     k-NN manifolds, k = 3                             (Kynkäänniemi et al. 2019)
  density, coverage     k-NN balls of the real points, k = 5              (Naeem et al. 2020)

The metrics are numpy in float64 with distances in chunks (a few thousand points a side). Every number is
reported beside a reference: the same metrics for as many training images against the same test images,
what a perfect generator scores with this many samples (all five depend on the sample count).
"""
from __future__ import annotations

import enum
from typing import Optional

import jax
import numpy as np

from cvae_jax import generation
from cvae_jax.data import Modality
from cvae_jax.evaluators import EvalContext, classifier
from cvae_jax.keys import Stream, stream_key

K_PRECISION_RECALL = 3  # Kynkäänniemi et al. 2019's k
K_DENSITY_COVERAGE = 5  # Naeem et al. 2020's k
CHUNK_ENTRIES = 1 << 22  # distances held at once (32 MiB of float64)
DECODE_CHUNK = 1000      # prior samples decoded at once


class Part(enum.IntEnum):
  """The named parts below the FIGURES key (apart from generate.py's 100-105 and sample accuracy's classes)."""
  SAMPLES = 200    # the prior z of the generated samples (a CVAE folds in the class)
  REFERENCE = 201  # the random order in which training images are picked for the reference


# The metrics, on features [N, D].

def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
  """The Fréchet distance between Gaussians fitted to two feature sets [N, D], [M, D] (unbiased covariances)."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  return gaussian_frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
  """The symmetric square root of a covariance; rounding's tiny negative eigenvalues count as 0."""
  values, vectors = np.linalg.eigh(s)
  return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def gaussian_frechet_distance(mu1, s1, mu2, s2) -> float:
  """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)) (Heusel et al. 2017). S1 S2 is not
  symmetric, but it is similar to R S2 R with R = S1^(1/2), which is symmetric PSD: Tr((S1 S2)^(1/2)) is the
  sum of the square roots of that matrix's eigenvalues. No complex sqrtm, stable for singular covariances."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
  root = _sqrt_psd(s1)
  middle = root @ s2 @ root
  cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
  distance = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)
  return max(distance, 0.0)  # identical sets give rounding's -1e-13, not a negative distance


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """||a_i - b_j||^2 [len(a), len(b)], float64, never negative."""
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
  return np.maximum(d, 0)


def _chunks(rows: int, columns: int):
  step = max(1, CHUNK_ENTRIES // max(columns, 1))
  return ((i, min(i + step, rows)) for i in range(0, rows, step))


def knn_radii(x: np.ndarray, *ks: int) -> np.ndarray:
  """The squared distance from each point of x [N, D] to its k-th nearest other point, for each k [len(ks), N]
  (one pass for several k; duplicates count: a point with k copies has radius 0)."""
  x = np.asarray(x, np.float64)
  if len(x) <= max(ks):
    raise ValueError(f"k-NN radii with k={max(ks)} need more than {max(ks)} points; got {len(x)}.")
  radii = np.empty((len(ks), len(x)))
  for i, j in _chunks(len(x), len(x)):
    d = _squared_distances(x[i:j], x)
    d[np.arange(j - i), np.arange(i, j)] = -1.0  # itself: always the first, so index k is the k-th other point
    radii[:, i:j] = np.partition(d, ks, axis=1)[:, ks].T
  return radii


def manifold_metrics(real: np.ndarray, fake: np.ndarray, k_pr: int = K_PRECISION_RECALL,
                     k_dc: int = K_DENSITY_COVERAGE) -> dict:
  """Precision, recall (Kynkäänniemi et al. 2019) and density, coverage (Naeem et al. 2020) of fake [M, D]
  against real [N, D]. A ball B(x, r_k(x)) is closed, r_k the distance to the k-th nearest other point of x's
  own set.
    precision = share of fake points inside some real point's k_pr ball
    recall    = share of real points inside some fake point's k_pr ball
    density   = (1 / (k_dc M)) sum_j #{real i : fake j inside i's k_dc ball}   (1 on average when fake ~ real)
    coverage  = share of real points whose k_dc ball holds some fake point"""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  (real_pr, real_dc), (fake_pr,) = knn_radii(real, k_pr, k_dc), knn_radii(fake, k_pr)
  in_real, inside, recalled, covered = 0, 0, np.zeros(len(real), bool), np.zeros(len(real), bool)
  for i, j in _chunks(len(fake), len(real)):  # one pass over the fake-to-real distances [chunk, N]
    d = _squared_distances(fake[i:j], real)
    in_real += int(np.any(d <= real_pr[None], axis=1).sum())
    in_dc = d <= real_dc[None]
    inside += int(in_dc.sum())
    covered |= in_dc.any(axis=0)
    recalled |= np.any(d <= fake_pr[i:j, None], axis=0)
  return {"precision": in_real / len(fake), "recall": float(recalled.mean()),
          "density": inside / (k_dc * len(fake)), "coverage": float(covered.mean())}


NAMES = ("fd", "precision", "recall", "density", "coverage")


def metrics(real: np.ndarray, fake: np.ndarray) -> dict:
  """All five numbers (NAMES) of fake features against real features."""
  return {"fd": frechet_distance(real, fake)} | manifold_metrics(real, fake)


def measured(real, fake) -> dict:
  """metrics(real, fake), or None for every number when a side has too few points for the k-NN radii."""
  need = max(K_PRECISION_RECALL, K_DENSITY_COVERAGE) + 1
  return metrics(real, fake) if min(len(real), len(fake)) >= need else dict.fromkeys(NAMES)


def _by_group(real, real_groups, fake, fake_groups, num_classes: int) -> list[dict]:
  """metrics per class, fake of class k against real of class k, with the counts of each side; the numbers
  are None where a side has too few points for the k-NN radii."""
  out = []
  for k in range(num_classes):
    r, f = real[real_groups == k], fake[fake_groups == k]
    out.append(measured(r, f) | {"samples": int(len(f)), "test_images": int(len(r))})
  return out


# The evaluator.

def measurable(ctx: EvalContext) -> bool:
  """The classifier gives the features: it reads images, learns labelled classes, and must have seen every
  class of the test split (held-out classes would also put anomalies among the real images)."""
  spec = ctx.dataset.spec
  return bool(spec.modality == Modality.image and spec.num_classes and not ctx.cfg.data.exclude_classes
              and ctx.cfg.evaluation.quality_samples > 0)


def _generated(ctx: EvalContext, n: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """Prior samples decoded to the likelihood's mean [n', *shape], and their classes: for a CVAE ceil(n / K) of
  each class (n' >= n), as generation.class_conditional draws them; for a VAE n (z ~ N(0, I)) and None."""
  spec, key = ctx.dataset.spec, stream_key(ctx.cfg.seed, Stream.FIGURES, Part.SAMPLES)
  if ctx.model.condition_size:
    per_class = -(-n // spec.num_classes)  # every class gets samples, however small n is
    images = [generation.class_conditional(ctx.model, ctx.params, spec, jax.random.fold_in(key, k), [k], per_class,
                                           ctx.likelihood)[0] for k in range(spec.num_classes)]
    return np.concatenate([np.asarray(x) for x in images]), np.repeat(np.arange(spec.num_classes), per_class)
  z = jax.random.normal(key, (n, ctx.model.latent_size))  # drawn at once: the chunking changes no sample
  chunks = [z[i:i + DECODE_CHUNK] for i in range(0, n, DECODE_CHUNK)]
  images = [generation.decode_mean(ctx.model, ctx.params, spec, zc, np.zeros(len(zc), np.int32), ctx.likelihood)
            for zc in chunks]  # a VAE ignores the labels
  return np.concatenate([np.asarray(x) for x in images]), None


def _reference(ctx: EvalContext, n: int, classes: Optional[np.ndarray]) -> np.ndarray:
  """Indices of the training images a perfect generator would have drawn: n at random, or for a CVAE as
  many of each class as it generated (fewer where the class has fewer)."""
  labels = ctx.dataset.train.labels
  order = np.asarray(jax.random.permutation(stream_key(ctx.cfg.seed, Stream.FIGURES, Part.REFERENCE), len(labels)))
  if classes is None:
    return order[:n]
  # The first of each class in one random order: a uniform draw within each class.
  return np.concatenate([order[labels[order] == k][:int(np.sum(classes == k))]
                         for k in range(ctx.dataset.spec.num_classes)])


def sample_quality(ctx: EvalContext) -> dict:
  """evaluation.quality_samples prior samples (a CVAE: ceil(that / K) of each class) against the test images,
  overall and per class, beside the reference (as many training images, drawn the same way).

  Per class: a CVAE's samples of class k against the test images of class k. A VAE has no class to ask for:
  its samples (and the reference's training images) are grouped by the classifier's predicted class, against
  the test images of that (true) class; a per-class "samples" count then shows which classes it draws how
  often. A class with too few samples or test images for the k-NN radii (more than k = 5 each) has None.
  A plain autoencoder (model.kind=ae) is scored the same way: z ~ N(0, I) decoded, a prior it never matched."""
  if not measurable(ctx):
    return {}
  ds, n = ctx.dataset, ctx.cfg.evaluation.quality_samples
  judge, judge_params, judge_accuracy = classifier.load_or_train(ctx.workdir / "classifier", ds, ctx.cfg.seed)
  features, predict = classifier.make_features(judge), classifier.make_predict(judge)
  images, classes = _generated(ctx, n)  # [M, *shape] in [0, 1], [M] or None
  picked = _reference(ctx, n, classes)  # [M'] training indices
  train_images = classifier.intensities(ds.train.images[picked], ds.spec.encoding)
  real = features(judge_params, classifier.intensities(ds.test.images, ds.spec.encoding))  # [N, 128]
  fake, reference = features(judge_params, images), features(judge_params, train_images)  # [M, 128], [M', 128]
  if classes is None:  # grouped by what the judge sees in them
    fake_groups, reference_groups = predict(judge_params, images), predict(judge_params, train_images)
  else:
    fake_groups, reference_groups = classes, ds.train.labels[picked]
  num_classes = ds.spec.num_classes
  return {"sample_quality": measured(real, fake) | {
      "per_class": _by_group(real, ds.test.labels, fake, fake_groups, num_classes),
      "reference": measured(real, reference) | {
          "samples": int(len(reference)),
          "per_class": _by_group(real, ds.test.labels, reference, reference_groups, num_classes)},
      "samples": int(len(fake)), "test_images": int(len(real)),
      "per_class_by": "condition" if classes is not None else "classifier prediction",
      "features": f"classifier penultimate ({classifier.FEATURES})",
      "k": {"precision_recall": K_PRECISION_RECALL, "density_coverage": K_DENSITY_COVERAGE},
      "classifier_test_accuracy": judge_accuracy}}
