"""Anomaly detection by likelihood: a score per test input, AUROC and AUPRC (scikit-learn), histograms.

Scores (higher = more anomalous), by model kind:
  vae   neg_elbo             -ELBO, averaged over k samples of q(z|x)
        nll                  -L_k, the k-sample importance-weighted bound (Burda et al. 2016)
  cvae  marginal_nll         -log sum_c p(c) p(x|c), each p(x|c) by L_k; p(c) = training label frequencies
        best_label_nll       -max_c L_k(x|c): the label that explains x best
        marginal_neg_elbo, best_label_neg_elbo: the same with the ELBO in place of L_k
  ae    reconstruction       -log p(x | decode(encode(x))): the baseline of An & Cho (2015)
  vae   llr>m                hierarchies (model=hvae), each m of evaluation.llr_groups: L_k - L^{>m}_k, L^{>m} the bound
                             with the lowest m groups at their prior's mean: Havtorn et al.'s (2021) LLR>k, whose L^{>m}
                             leaves the low-level statistics that dominate log p(x) to the prior
  all   input_complexity     the kind's bound (nll, marginal_nll or reconstruction) minus the input's compressed
                             length L(x) in nats (Serrà et al. 2020; evaluation.compressor; evaluators/ood.py)
        typicality           |bound - H|, H the bound's mean over (up to 2,000) training inputs (Nalisnick et al.
                             2019b, one input at a time)
        likelihood_ratio     bound - background bound: minus the log-likelihood ratio log p(x) - log p_bg(x) of the
                             model against its background model (Ren et al. 2019; evaluation.background_rate)
Protocols: held_out (the test images of data.exclude_classes, never trained on, against the test images
of the other classes) and cross_dataset (evaluation.anomaly_dataset's test split against ours).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cvae_jax import data
from cvae_jax.config import Config
from cvae_jax.data import Dataset, DatasetSpec, DataError
from cvae_jax.engine import rundir
from cvae_jax.estimators import Draw, inputs, iwae_bound, joint_bound, map_over_split
from cvae_jax.evaluators import EvalContext, ood
from cvae_jax.keys import Stream, fold, stream_key
from cvae_jax.likelihoods import Likelihood
from cvae_jax.models import VAE


def make_scores(model: VAE, spec: DatasetSpec, likelihood: Likelihood, num_samples: int, batch_size: int,
                sample_chunk: int, class_log_prior: np.ndarray | None = None, llr_groups=()) -> Callable:
  """Returns scores(params, images, labels, key) -> {score name: [N]} over a whole split.

  `class_log_prior` [K]: log p(c) for the CVAE marginal, -inf for classes never trained on (they are
  skipped). Each m of `llr_groups` adds a hierarchy's llr>m score. Labels are not used: an anomaly detector does not
  know them.
  """
  if model.condition_size:
    classes = jnp.asarray(np.flatnonzero(np.isfinite(class_log_prior)))
    log_prior = jnp.asarray(class_log_prior)[classes]

  def per_batch(params, images, labels, key):
    x = inputs(spec, images, key)
    key = fold(key, Draw.REPARAM)
    if not model.stochastic:
      out = model.apply({"params": params}, x, None, key)
      return {"reconstruction": -likelihood.log_prob(x, out.logits)}
    if not model.condition_size:
      bound, elbo = iwae_bound(model, params, x, None, key, num_samples, sample_chunk, likelihood, with_elbo=True)
      scores = {"neg_elbo": -elbo, "nll": -bound}
      for m in llr_groups if model.group_sizes is not None else ():
        upper = joint_bound(model, params, x, None, key, num_samples, sample_chunk, likelihood, prior_groups=m)
        scores[f"llr>{m}"] = bound - upper
      return scores

    def under_class(k):  # [b], [b]: the bounds on log p(x | c = k)
      c = spec.condition_input(jnp.full(x.shape[0], k))
      return iwae_bound(model, params, x, c, key, num_samples, sample_chunk, likelihood, with_elbo=True)

    bound, elbo = jax.lax.map(under_class, classes)  # [C, b] each
    lse = lambda a: jax.scipy.special.logsumexp(a + log_prior[:, None], axis=0)
    return {"marginal_nll": -lse(bound), "best_label_nll": -bound.max(axis=0),
            "marginal_neg_elbo": -lse(elbo), "best_label_neg_elbo": -elbo.max(axis=0)}

  return map_over_split(per_batch, batch_size)


BOUNDS = ("nll", "marginal_nll", "reconstruction")  # each kind's -log p(x) (or its stand-in), corrected below
TYPICAL_SET = 2000  # training inputs whose mean bound is H


def bound_of(scores: dict) -> np.ndarray:
  return scores[next(k for k in BOUNDS if k in scores)]


def add_corrected_scores(scores: dict, complexity: np.ndarray, entropy: float, background: dict | None = None) -> dict:
  """The scores with input_complexity, typicality and (given the background model's scores of the same inputs)
  likelihood_ratio, computed from the kind's bound (BOUNDS)."""
  bound = bound_of(scores)
  out = scores | {"input_complexity": bound - complexity, "typicality": ood.typicality_scores(bound, [entropy])}
  if background is not None:
    out["likelihood_ratio"] = bound - bound_of(background)
  return out


def detection_metrics(scores: np.ndarray, is_anomaly: np.ndarray) -> dict:
  """AUROC and AUPRC (average precision, the anomalies as the positive class) of one score, and its mean over
  the normal and over the anomalous inputs (for -ELBO: the bound on each group, which the mixed mean hides).

  An infinite score ranks as the most (or least) anomalous; NaN scores are left out and counted; the means
  are over finite scores."""
  from sklearn.metrics import average_precision_score, roc_auc_score
  scores, is_anomaly = np.asarray(scores, np.float64), np.asarray(is_anomaly)
  keep, is_finite = ~np.isnan(scores), np.isfinite(scores)
  finite = scores[is_finite]
  lo, hi = (finite.min() - 1, finite.max() + 1) if finite.size else (-1.0, 1.0)
  group_means = {name: float(np.mean(scores[is_finite & (is_anomaly == label)])) if np.any(is_finite & (is_anomaly == label))
                 else float("nan") for name, label in (("mean_normal", 0), ("mean_anomalous", 1))}
  scores, is_anomaly = np.clip(scores[keep], lo, hi), is_anomaly[keep]
  return {"auroc": float(roc_auc_score(is_anomaly, scores)), "auprc": float(average_precision_score(is_anomaly, scores)),
          "anomaly_fraction": float(np.mean(is_anomaly)), "nan_scores": int((~keep).sum()), **group_means}


def histogram_figure(path: Path, protocols: dict[str, tuple[dict, np.ndarray]], title: str) -> None:
  """One panel per (protocol, score): histograms of the score for normal and anomalous inputs."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = [(p, name, s[name], y) for p, (s, y) in protocols.items() for name in s]
  fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3), squeeze=False)
  for ax, (protocol, name, score, y) in zip(axes[0], panels):
    finite = np.isfinite(score)
    lo, hi = np.percentile(score[finite], [0.5, 99.5])
    if hi <= lo:  # every score equal (a model against itself): one bin around the value
      lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 60)
    ax.hist(score[(y == 0) & finite], bins, alpha=0.6, density=True, label="normal")
    ax.hist(score[(y == 1) & finite], bins, alpha=0.6, density=True, label="anomalous")
    ax.set_title(f"{protocol}: {name}", fontsize=9)
    ax.set_xlabel("score (nats)")
  axes[0, 0].legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def load_anomaly_dataset(cfg: Config, spec: DatasetSpec) -> Dataset:
  """evaluation.anomaly_dataset, loaded like the training data; errors name that key. Training calls this
  before its first step, so a wrong name or shape stops the run before any work."""
  name = cfg.evaluation.anomaly_dataset
  try:
    other = data.load(dataclasses.replace(cfg.data, name=name, exclude_classes=[], validation_size=0,
                                          calibration_size=0, test_limit=None))
  except DataError as e:
    raise DataError(f"evaluation.anomaly_dataset={name!r}: {e}") from e
  if other.spec.shape != spec.shape:
    raise DataError(f"evaluation.anomaly_dataset={name!r} has inputs of shape {other.spec.shape}, the "
                    f"model takes {spec.shape}; choose a dataset of the same shape.")
  return other


def class_log_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """log p(c) of each class: its frequency among the training labels (normalized: exp sums to 1), -inf for a
  class never trained on.  [K]"""
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  with np.errstate(divide="ignore"):
    return np.log(counts / counts.sum())


def score_anomalies(ctx: EvalContext) -> dict:
  """Scores the test split (and evaluation.anomaly_dataset's), writes anomaly.json, anomaly_scores.npz
  and figures/anomaly_scores.png; returns the anomaly.json content."""
  t0 = time.perf_counter()
  cfg, ds, model, params, workdir = ctx.cfg, ctx.dataset, ctx.model, ctx.params, ctx.workdir
  ev, spec = cfg.evaluation, ds.spec
  log_prior = class_log_prior(ds.train.labels, spec.num_classes) if model.condition_size else None
  scores_fn = make_scores(model, spec, ctx.likelihood, ev.anomaly_samples, ev.batch_size,
                          ev.sample_chunk, log_prior, tuple(ev.llr_groups))
  key = stream_key(cfg.seed, Stream.EVAL)
  score = lambda split, with_params=params: {k: np.asarray(v, np.float64) for k, v in jax.device_get(
      scores_fn(with_params, jax.device_put(split.images), jax.device_put(split.labels), key)).items()}
  normal = ds.train.images[:TYPICAL_SET], ds.train.labels[:TYPICAL_SET]
  entropy = float(np.mean(bound_of(score(data.Split(*normal)))))
  background = ctx.background_params
  corrected = lambda split, scores: add_corrected_scores(
      scores, ood.complexity_nats(split.images, ev.compressor), entropy,
      None if background is None else score(split, background))
  test_scores = corrected(ds.test, score(ds.test))
  held_out = np.isin(ds.test.labels, list(cfg.data.exclude_classes))
  if cfg.data.exclude_classes and (held_out.all() or not held_out.any()):
    raise DataError(f"The test split ({len(ds.test)} examples) holds {'only' if held_out.any() else 'no'} examples of "
                    f"data.exclude_classes={list(cfg.data.exclude_classes)}: nothing to compare. Raise data.test_limit.")
  protocols = {}
  if held_out.any():
    protocols["held_out"] = (test_scores, held_out.astype(np.int32))
  if ev.anomaly_dataset:
    other = load_anomaly_dataset(cfg, spec)
    other_scores = corrected(other.test, score(other.test))
    normal = {k: v[~held_out] for k, v in test_scores.items()}  # only classes the model was trained on
    protocols["cross_dataset"] = ({k: np.concatenate([normal[k], other_scores[k]]) for k in normal},
                                  np.r_[np.zeros((~held_out).sum(), np.int32), np.ones(len(other.test), np.int32)])
  result = {"k": ev.anomaly_samples, "llr_groups": list(ev.llr_groups), "exclude_classes": list(cfg.data.exclude_classes),
            "anomaly_dataset": ev.anomaly_dataset, "protocols": {}}
  for name, (scores, is_anomaly) in protocols.items():
    result["protocols"][name] = {
        "num_normal": int((is_anomaly == 0).sum()), "num_anomalous": int(is_anomaly.sum()),
        "scores": {k: detection_metrics(v, is_anomaly) for k, v in scores.items()}}
  np.savez_compressed(workdir / "anomaly_scores.npz", **{f"{p}/{k}": v for p, (s, _) in protocols.items()
                                                          for k, v in s.items()},
                      **{f"{p}/is_anomaly": y for p, (_, y) in protocols.items()})
  if protocols:
    (workdir / "figures").mkdir(exist_ok=True)
    histogram_figure(workdir / "figures" / "anomaly_scores.png", protocols,
                     f"{spec.name}, {'ae' if not model.stochastic else 'cvae' if model.condition_size else 'vae'}, "
                     f"held out {list(cfg.data.exclude_classes)}")
  result["wall_time"] = time.perf_counter() - t0
  rundir.write_json_atomic(workdir / "anomaly.json", result)
  return result


def auroc_summary(result: dict) -> dict:
  """{"<protocol>/<score>": AUROC}: the flat form results.json and sweep reports carry."""
  return {f"{p}/{k}": round(v["auroc"], 4) for p, block in result["protocols"].items()
          for k, v in block["scores"].items()}


def evaluator(ctx: EvalContext) -> dict:
  """The anomaly evaluator: scores written beside eval.json, the AUROCs in it."""
  return {"anomaly_auroc": auroc_summary(score_anomalies(ctx))}
