"""`python -m cvae_jax.evaluate RUN_DIR [--iwae-samples 5000]`: the numbers a paper reports, in eval.json.

  elbo, rec, kl, bpd     the test ELBO (one reparameterized sample per image) and its terms
  iwae                   L_k (Burda et al. 2016) at the chosen k; nll = -L_k. For a CVAE the bound is
                         on log p(x | c), the class-conditional likelihood.
  kl_per_dim             E_x KL(q(z_u | x) || p(z_u)) per latent dimension
  active_units           units with Cov_x(E_q[z_u]) > 0.01, and that covariance per unit
  anomaly_auroc          with evaluation.anomaly: AUROC per protocol and score (details in anomaly.json)
  sample_accuracy        CVAE only: a classifier's accuracy on class-conditional samples, per class and
                         overall, beside the classifier's own test accuracy
Training calls `evaluate_model` at its end with its config's (smaller) k.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

from cvae_jax import anomaly, classifier, evaluation, generation, rundir
from cvae_jax.config import Config, Likelihood, Pixels
from cvae_jax.data import Dataset, DataError
from cvae_jax.keys import Stream, stream_key
from cvae_jax.models import VAE
from cvae_jax.restore import RestoreError, restore_run


def normalized_likelihood(likelihood: Likelihood, pixels: Pixels) -> bool:
  """Whether the ELBO bounds a normalized log-likelihood: not Bernoulli cross-entropy on grayscale, and
  not a Gaussian density on binary pixels (unbounded as the scale shrinks)."""
  if likelihood == Likelihood.bernoulli:
    return pixels != Pixels.grayscale
  if likelihood == Likelihood.gaussian:
    return pixels in (Pixels.real, Pixels.grayscale)
  return True


def sample_accuracy(model: VAE, params, ds: Dataset, likelihood: Likelihood, workdir: Path, seed: int,
                    per_class: int = 1000) -> dict:
  """Generates per_class samples of every class and asks the classifier which class each shows."""
  judge, judge_params, judge_accuracy = classifier.load_or_train(workdir / "classifier", ds, seed)
  predict = classifier.make_predict(judge)
  key = stream_key(seed, Stream.FIGURES)
  per_class_accuracy = []
  for k in range(ds.spec.num_classes):
    images = generation.class_conditional(model, params, jax.random.fold_in(key, k), [k], per_class, likelihood)[0]
    per_class_accuracy.append(float(np.mean(predict(judge_params, images) == k)))
  return {"overall": float(np.mean(per_class_accuracy)), "per_class": per_class_accuracy,
          "samples_per_class": per_class, "classifier_test_accuracy": judge_accuracy}


def evaluate_model(cfg: Config, ds: Dataset, model: VAE, params, workdir: Path, iwae_samples: int,
                   with_sample_accuracy: bool, samples_per_class: int = 1000) -> dict:
  """Every number of eval.json for one model on the test split; writes eval.json and returns it."""
  t0 = time.perf_counter()
  spec, likelihood, ev = ds.spec, cfg.objective.likelihood, cfg.evaluation
  images, labels = jax.device_put(ds.test.images), jax.device_put(ds.test.labels)
  key = stream_key(cfg.seed, Stream.EVAL)
  result = {"split": "test", "num_examples": len(ds.test),
            "normalized_likelihood": normalized_likelihood(likelihood, spec.pixels)}
  elbo = evaluation.make_evaluate(model, spec, likelihood, cfg.training.eval_batch_size)(params, images, labels, key)
  result |= {k: float(v) for k, v in jax.device_get(elbo).items()}

  if model.stochastic:  # a plain autoencoder has no posterior and no bound
    stats = evaluation.make_posterior_stats(model, spec, cfg.training.eval_batch_size)(params, images, labels, key)
    kl_per_dim = np.asarray(stats["kl_per_dim"]).mean(axis=0)
    num_active, covariance = evaluation.active_units(np.asarray(stats["mean"]))
    result |= {"kl_per_dim": kl_per_dim.tolist(), "active_units": num_active,
               "active_unit_threshold": evaluation.ACTIVE_UNIT_THRESHOLD,
               "posterior_mean_covariance": covariance.tolist()}

  if iwae_samples > 0 and model.stochastic:
    t_iwae = time.perf_counter()
    iwae = evaluation.make_iwae(model, spec, likelihood, iwae_samples, ev.batch_size, ev.sample_chunk)
    bound = np.asarray(iwae(params, images, labels, jax.random.fold_in(key, 2)), np.float64)
    result["iwae"] = {"k": iwae_samples, "bound": float(bound.mean()), "nll": float(-bound.mean()),
                      "standard_error": float(bound.std() / math.sqrt(len(bound))),
                      "conditional_on_label": bool(model.num_classes),
                      "wall_time": time.perf_counter() - t_iwae}
  if cfg.evaluation.anomaly:
    result["anomaly_auroc"] = anomaly.auroc_summary(anomaly.score_anomalies(cfg, ds, model, params, workdir))
  # The judge is trained on the run's training split: it must have seen every class, and images.
  judgeable = not cfg.data.exclude_classes and len(spec.image_shape) == 3
  if with_sample_accuracy and model.num_classes and judgeable:
    result["sample_accuracy"] = sample_accuracy(model, params, ds, likelihood, workdir, cfg.seed, samples_per_class)
  result["wall_time"] = time.perf_counter() - t0
  rundir.write_json_atomic(workdir / "eval.json", result)
  return result


def evaluate_run(workdir: Path, iwae_samples: int = 5000, with_sample_accuracy: bool = True,
                 samples_per_class: int = 1000) -> dict:
  restored = restore_run(workdir)
  return evaluate_model(restored.cfg, restored.dataset, restored.model, restored.params, Path(workdir),
                        iwae_samples, with_sample_accuracy, samples_per_class)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdir", type=Path, help="a run directory written by python -m cvae_jax.train")
  parser.add_argument("--iwae-samples", type=int, default=5000, help="k of the importance-weighted bound (0: skip)")
  parser.add_argument("--no-sample-accuracy", action="store_true", help="skip the classifier judging CVAE samples")
  parser.add_argument("--samples-per-class", type=int, default=1000)
  args = parser.parse_args(argv)
  if args.iwae_samples < 0 or args.samples_per_class < 1:
    parser.error("--iwae-samples must be >= 0 and --samples-per-class >= 1")
  try:
    result = evaluate_run(args.workdir, args.iwae_samples, not args.no_sample_accuracy, args.samples_per_class)
  except (RestoreError, DataError) as e:
    sys.exit(f"error: {e}")
  summary = {k: result[k] for k in ("elbo", "rec", "kl", "active_units", "wall_time") if k in result}
  if "iwae" in result:
    summary["nll"], summary["k"] = result["iwae"]["nll"], result["iwae"]["k"]
  if "sample_accuracy" in result:
    summary["sample_accuracy"] = result["sample_accuracy"]["overall"]
  print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
  print(f"wrote {args.workdir / 'eval.json'}")


if __name__ == "__main__":
  main()
