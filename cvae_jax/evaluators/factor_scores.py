"""The standard disentanglement scores of a representation against ground-truth factors, after
google-research/disentanglement_lib (dlib, evaluation/metrics/, the unsupervised study's metric configs):
its sample counts as the defaults, its classifiers, its formulas. The glue that makes a model's encoder a
representation, and the counts our sweeps use, are in evaluators/disentanglement.py.

Every score is a function of (table, represent, rng, ...): `table` a FactorTable (data/factors.py),
`represent(stored examples [N, ...]) -> codes [N, Z]`, `rng` a numpy Generator that draws every factor
setting (and seeds the classifiers), so a score is reproducible and testable without a network.

Each score samples its own points, as dlib does: nothing is shared between scores. Where they differ from dlib:
  - factors are drawn by a numpy Generator through table.sample / sample_with_fixed, vectorized over the
    points, not dlib's RandomState one point at a time: the same distribution, other draws;
  - dlib's FactorVAE score reports num_active_dims = len(mask), which is the number of all dimensions
    (a dlib bug); we report the number of active ones;
  - SAP scores a dimension that is constant on the training examples 0 (sap_score_matrix);
  - DCI's trees get a seed from rng (dlib's are unseeded: they break ties between equal splits at random).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.stats

from cvae_jax.data.factors import FactorTable

Represent = Callable[[np.ndarray], np.ndarray]  # stored examples [N, ...] -> codes [N, Z]

BLOCK = 8192  # examples handed to `represent` at a time: bounds the host memory of large examples


def codes_of(table: FactorTable, represent: Represent, factors: np.ndarray) -> np.ndarray:
  """The codes of the examples of each factor setting, in blocks of BLOCK.  [N, Z] float64"""
  factors = np.asarray(factors)
  parts = [represent(table.examples(factors[i:i + BLOCK])) for i in range(0, len(factors), BLOCK)]
  return np.concatenate([np.asarray(p, np.float64) for p in parts])


def sample_codes(table: FactorTable, represent: Represent, rng: np.random.Generator, n: int):
  """n settings drawn uniformly and their codes: (codes [n, Z], factors [n, F]); dlib's
  generate_batch_factor_code."""
  factors = table.sample(n, rng)
  return codes_of(table, represent, factors), factors


def _batched_codes(table: FactorTable, represent: Represent, factors: np.ndarray) -> np.ndarray:
  """Codes of settings grouped in batches: factors [P, B, F] -> codes [P, B, Z]."""
  p, b, f = factors.shape
  codes = codes_of(table, represent, factors.reshape(p * b, f))
  return codes.reshape(p, b, -1)


# The beta-VAE score -------------------------------------------------------------------------------------------

def beta_vae_features(table: FactorTable, represent: Represent, rng: np.random.Generator, num_points: int,
                      batch_size: int = 64):
  """dlib beta_vae._generate_training_batch: each point draws a factor k and two batches of batch_size settings
  that agree on factor k pair by pair; its feature is mean_b |z1_b - z2_b|, its label k.
  (features [P, Z], labels [P])"""
  labels = rng.integers(0, table.num_factors, num_points)
  first = table.sample(num_points * batch_size, rng).reshape(num_points, batch_size, -1)   # [P, B, F]
  second = table.sample(num_points * batch_size, rng).reshape(num_points, batch_size, -1)
  points = np.arange(num_points)
  second[points, :, labels] = first[points, :, labels]
  features = np.abs(_batched_codes(table, represent, first) - _batched_codes(table, represent, second)).mean(axis=1)
  return features, labels


def beta_vae_score(table: FactorTable, represent: Represent, rng: np.random.Generator, batch_size: int = 64,
                   num_train: int = 10_000, num_eval: int = 5_000) -> dict:
  """The beta-VAE score (Higgins et al. 2017, "beta-VAE: Learning basic visual concepts with a constrained
  variational framework", ICLR): the accuracy of a linear classifier that tells, from the mean absolute code
  difference of pairs of examples sharing one factor, which factor they share. dlib beta_vae.py: batches of
  64, 10,000 training and 5,000 evaluation points, sklearn LogisticRegression at its defaults (C = 1, lbfgs,
  100 iterations). Chance is 1 / num_factors. The score is eval_accuracy."""
  from sklearn.linear_model import LogisticRegression
  train_x, train_y = beta_vae_features(table, represent, rng, num_train, batch_size)
  model = LogisticRegression(random_state=int(rng.integers(2**31))).fit(train_x, train_y)
  eval_x, eval_y = beta_vae_features(table, represent, rng, num_eval, batch_size)
  return {"train_accuracy": float(model.score(train_x, train_y)), "eval_accuracy": float(model.score(eval_x, eval_y))}


# The FactorVAE score ------------------------------------------------------------------------------------------

def majority_vote(votes: np.ndarray):
  """The FactorVAE score's classifier from its vote table votes[factor, dim] (how often dim had the least
  normalized variance when factor was fixed): each dim predicts the factor it was most often the argmin for
  (ties: the lowest factor, as np.argmax). (classifier [Z], accuracy on that table)"""
  votes = np.asarray(votes)
  classifier = np.argmax(votes, axis=0)
  correct = votes[classifier, np.arange(votes.shape[1])].sum()
  return classifier, float(correct / max(votes.sum(), 1))


def vote_accuracy(votes: np.ndarray, classifier: np.ndarray) -> float:
  """The accuracy of a majority-vote classifier on another vote table."""
  return float(votes[classifier, np.arange(votes.shape[1])].sum() / max(votes.sum(), 1))


def factor_vae_votes(table: FactorTable, represent: Represent, rng: np.random.Generator, num_points: int,
                     batch_size: int, active: np.ndarray, variances: np.ndarray) -> np.ndarray:
  """dlib factor_vae._generate_training_batch: each point fixes a random factor k in a batch of batch_size settings
  (table.sample_with_fixed) and votes for (k, the active dim of least Var_batch(z_d) / variances_d). active [A]:
  the dims kept; variances [A]: their global variances.  votes [F, A] int64"""
  labels = rng.integers(0, table.num_factors, num_points)
  factors = np.stack([table.sample_with_fixed(batch_size, int(k), rng) for k in labels])  # [P, B, F]
  votes = np.zeros((table.num_factors, len(active)), np.int64)
  step = max(1, BLOCK // batch_size)  # points whose codes are held at a time
  for start in range(0, num_points, step):
    part = slice(start, start + step)
    codes = _batched_codes(table, represent, factors[part])[..., active]  # [p, B, A]
    argmin = np.argmin(np.var(codes, axis=1, ddof=1) / variances, axis=1)
    np.add.at(votes, (labels[part], argmin), 1)
  return votes


def factor_vae_score(table: FactorTable, represent: Represent, rng: np.random.Generator, batch_size: int = 64,
                     num_train: int = 10_000, num_eval: int = 5_000, num_variance_estimate: int = 10_000,
                     prune_threshold: float = 0.05) -> dict:
  """The FactorVAE score (Kim & Mnih 2018, "Disentangling by factorising", ICML): fix one factor in a batch, divide
  each code dimension's variance in the batch by its global variance, and vote (factor, dimension of least
  normalized variance); the score is the accuracy of the majority-vote classifier dimension -> factor. dlib
  factor_vae.py: global variances (ddof 1) of 10,000 random examples; dimensions whose global standard deviation
  is below 0.05 are pruned (dlib's prune_dims compares sqrt(variance) with the threshold: a variance below
  0.0025); batches of 64; 10,000 training and 5,000 evaluation points. The score is eval_accuracy; no active
  dimension scores 0. factor_of_dim: the factor each code dimension votes for (-1: pruned or never a vote)."""
  codes, _ = sample_codes(table, represent, rng, num_variance_estimate)
  variances = np.var(codes, axis=0, ddof=1)
  active = np.flatnonzero(np.sqrt(variances) >= prune_threshold)
  if not len(active):
    return {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0, "factor_of_dim": [-1] * len(variances)}
  train_votes = factor_vae_votes(table, represent, rng, num_train, batch_size, active, variances[active])
  classifier, train_accuracy = majority_vote(train_votes)
  eval_votes = factor_vae_votes(table, represent, rng, num_eval, batch_size, active, variances[active])
  factor_of_dim = np.full(len(variances), -1)
  factor_of_dim[active] = np.where(train_votes.sum(axis=0) > 0, classifier, -1)
  return {"train_accuracy": train_accuracy, "eval_accuracy": vote_accuracy(eval_votes, classifier),
          "num_active_dims": int(len(active)), "factor_of_dim": factor_of_dim.tolist()}


# MIG ----------------------------------------------------------------------------------------------------------

def histogram_discretize(codes: np.ndarray, num_bins: int = 20) -> np.ndarray:
  """dlib utils._histogram_discretize: each dimension cut into num_bins equal-width bins over its own range,
  numbered 1..num_bins (np.digitize against the left edges).  [N, Z] int"""
  codes = np.asarray(codes)
  return np.stack([np.digitize(c, np.histogram(c, num_bins)[1][:-1]) for c in codes.T], axis=1)


def discrete_mutual_info(discrete_codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
  """I(z_d; v_k) in nats by sklearn's mutual_info_score (the plug-in estimate).  [Z, F]"""
  from sklearn.metrics import mutual_info_score
  return np.array([[mutual_info_score(v, z) for v in np.asarray(factors).T] for z in np.asarray(discrete_codes).T])


def discrete_entropy(factors: np.ndarray) -> np.ndarray:
  """H(v_k) in nats, as dlib computes it: mutual_info_score(v, v).  [F]"""
  from sklearn.metrics import mutual_info_score
  return np.array([mutual_info_score(v, v) for v in np.asarray(factors).T])


def mig_from_codes(codes: np.ndarray, factors: np.ndarray, num_bins: int = 20) -> dict:
  """dlib mig._compute_mig on given codes [N, Z] and factor indices [N, F]: MIG = mean_k (I(z_(1); v_k) -
  I(z_(2); v_k)) / H(v_k), the two most informative dimensions about v_k. normalized_mutual_info [Z, F] =
  I(z_d; v_k) / H(v_k). A single code dimension has no second: its gap is to 0."""
  mutual_info = discrete_mutual_info(histogram_discretize(codes, num_bins), factors)  # [Z, F]
  entropy = discrete_entropy(factors)
  top = np.sort(np.vstack([mutual_info, np.zeros_like(mutual_info[:1])]), axis=0)[::-1]
  per_factor = (top[0] - top[1]) / entropy
  return {"mig": float(per_factor.mean()), "per_factor": per_factor.tolist(), "entropy": entropy.tolist(),
          "normalized_mutual_info": (mutual_info / entropy).tolist()}


def mig(table: FactorTable, represent: Represent, rng: np.random.Generator, num_train: int = 10_000,
        num_bins: int = 20) -> dict:
  """The mutual information gap (Chen et al. 2018, "Isolating sources of disentanglement in variational
  autoencoders", NeurIPS): for each factor, the gap between the mutual information of its most and its second
  most informative code dimension, over its entropy, averaged over the factors. dlib mig.py: 10,000 random
  examples, each code dimension discretized into 20 equal-width bins, plug-in mutual information. A factor of K
  equally spaced values in a dimension of its own keeps all its information when K <= 20 (the values fall in
  distinct bins); the finite sample biases the mutual information of an independent pair up by about
  (K_1 - 1)(K_2 - 1) / 2N nats."""
  return mig_from_codes(*sample_codes(table, represent, rng, num_train), num_bins)


# DCI ----------------------------------------------------------------------------------------------------------

def dci_importance(codes_train, factors_train, codes_test, factors_test, rng: np.random.Generator,
                   n_estimators: int = 100, max_depth: int = 3):
  """dlib dci.compute_importance_gbt: per factor, a sklearn GradientBoostingClassifier (dlib's: its defaults,
  100 trees of depth 3) from all code dimensions to the factor; importance[d, k] its feature importance of
  dimension d. (importance [Z, F], mean train accuracy, mean test accuracy)"""
  from sklearn.ensemble import GradientBoostingClassifier
  num_factors = factors_train.shape[1]
  importance = np.zeros((codes_train.shape[1], num_factors))
  train_accuracy, test_accuracy = [], []
  for k in range(num_factors):
    # A fixed random_state (dlib leaves it None): the trees then break ties between features the same way each run.
    model = GradientBoostingClassifier(n_estimators=n_estimators, max_depth=max_depth,
                                       random_state=int(rng.integers(2**31)))
    model.fit(codes_train, factors_train[:, k])
    importance[:, k] = np.abs(model.feature_importances_)
    train_accuracy.append(np.mean(model.predict(codes_train) == factors_train[:, k]))
    test_accuracy.append(np.mean(model.predict(codes_test) == factors_test[:, k]))
  return importance, float(np.mean(train_accuracy)), float(np.mean(test_accuracy))


def dci_disentanglement(importance: np.ndarray) -> float:
  """sum_d rho_d (1 - H_F(P_d.)), P_d. the row d of the importance matrix [Z, F] normalized, H_F the entropy in base
  F, rho_d = row d's share of the total importance (dlib dci.disentanglement, 1e-11 added against log 0)."""
  importance = np.asarray(importance, np.float64)
  per_code = 1.0 - scipy.stats.entropy(importance.T + 1e-11, base=importance.shape[1])
  weights = importance if importance.sum() else np.ones_like(importance)
  return float(np.sum(per_code * weights.sum(axis=1) / weights.sum()))


def dci_completeness(importance: np.ndarray) -> float:
  """sum_k rho_k (1 - H_Z(P_.k)), the columns in base Z (the number of code dimensions: a dead unit changes the base,
  so the completeness of an imperfect code, 1 - H / log Z, moves with Z; dlib dci.completeness)."""
  importance = np.asarray(importance, np.float64)
  per_factor = 1.0 - scipy.stats.entropy(importance + 1e-11, base=importance.shape[0])
  weights = importance if importance.sum() else np.ones_like(importance)
  return float(np.sum(per_factor * weights.sum(axis=0) / weights.sum()))


def dci(table: FactorTable, represent: Represent, rng: np.random.Generator, num_train: int = 10_000,
        num_test: int = 5_000, n_estimators: int = 100, max_depth: int = 3) -> dict:
  """Disentanglement, completeness and informativeness (Eastwood & Williams 2018, "A framework for the quantitative
  evaluation of disentangled representations", ICLR): from the importance of each code dimension to predicting
  each factor (gradient-boosted trees), disentanglement = how much each dimension is about one factor only,
  completeness = how much each factor is in one dimension only, informativeness = the trees' accuracy. dlib
  dci.py: 10,000 training and 5,000 test examples, sklearn's GradientBoostingClassifier at its defaults
  (n_estimators=100, max_depth=3)."""
  codes_train, factors_train = sample_codes(table, represent, rng, num_train)
  codes_test, factors_test = sample_codes(table, represent, rng, num_test)
  importance, train_accuracy, test_accuracy = dci_importance(codes_train, factors_train, codes_test, factors_test,
                                                             rng, n_estimators, max_depth)
  return {"disentanglement": dci_disentanglement(importance), "completeness": dci_completeness(importance),
          "informativeness_train": train_accuracy, "informativeness_test": test_accuracy,
          "importance": importance.tolist()}


# SAP ----------------------------------------------------------------------------------------------------------

def sap_score_matrix(codes_train, factors_train, codes_test, factors_test) -> np.ndarray:
  """dlib sap_score.compute_score_matrix, discrete factors: for each (dimension d, factor k), the test accuracy of a
  sklearn LinearSVC(C=0.01, class_weight="balanced") from z_d alone to v_k.  [Z, F]

  A dimension constant on the training examples scores 0, as in dlib's branch for continuous factors (var > 1e-12);
  dlib's discrete branch fits the SVM anyway and scores the share of the one class it then predicts (about 1 / K),
  so that a dead unit could become some factor's second best and lower its gap."""
  from sklearn.svm import LinearSVC
  scores = np.zeros((codes_train.shape[1], factors_train.shape[1]))
  for d in np.flatnonzero(np.var(codes_train, axis=0) > 1e-12):
    for k in range(factors_train.shape[1]):
      classifier = LinearSVC(C=0.01, class_weight="balanced").fit(codes_train[:, d:d + 1], factors_train[:, k])
      scores[d, k] = np.mean(classifier.predict(codes_test[:, d:d + 1]) == factors_test[:, k])
  return scores


def top_two_gap(scores: np.ndarray) -> np.ndarray:
  """Per factor, the best minus the second best dimension's score (dlib compute_avg_diff_top_two before the mean).
  [F]"""
  top = np.sort(scores, axis=0)
  return top[-1] - top[-2]


def sap(table: FactorTable, represent: Represent, rng: np.random.Generator, num_train: int = 10_000,
        num_test: int = 5_000) -> dict:
  """The separated attribute predictability score (Kumar et al. 2018, "Variational inference of disentangled latent
  concepts from unlabeled observations", ICLR, section 3): how much better the best single code dimension predicts
  each factor than the second best, averaged over the factors. dlib sap_score.py with continuous_factors=False:
  10,000 training and 5,000 test examples, one linear SVM per (dimension, factor), its test accuracy."""
  codes_train, factors_train = sample_codes(table, represent, rng, num_train)
  codes_test, factors_test = sample_codes(table, represent, rng, num_test)
  scores = sap_score_matrix(codes_train, factors_train, codes_test, factors_test)
  gap = top_two_gap(scores)
  return {"sap": float(gap.mean()), "per_factor": gap.tolist(), "score_matrix": scores.tolist()}
