"""`python -m cvae_jax.evaluate RUN_DIR [--iwae-samples 5000] [--quality-samples 5000]`: the numbers a paper
reports, in eval.json.

Restores the run's latest checkpoint and runs its task's end-of-training evaluation again, with a larger k
and the sample judge. For the density tasks:
  elbo, rec, kl, bpd     the test ELBO (one reparameterized sample per image) and its terms
  iwae                   L_k (Burda et al. 2016) at the chosen k; nll = -L_k. For a CVAE the bound is
                         on log p(x | c), the class-conditional likelihood.
  kl_per_dim             E_x KL(q(z_u | x) || p(z_u)) per latent dimension
  active_units           units with Cov_x(E_q[z_u]) > 0.01, and that covariance per unit
  anomaly_auroc          with evaluation.anomaly: AUROC per protocol and score (details in anomaly.json)
  sample_accuracy        CVAE only: a classifier's accuracy on class-conditional samples, per class and
                         overall, beside the classifier's own test accuracy
  disentanglement        with evaluation.disentanglement (data with ground-truth factors): the beta-VAE,
                         FactorVAE, MIG, DCI and SAP scores; --disentanglement-protocol dlib for
                         disentanglement_lib's sample counts
  sample_quality         images: Fréchet distance, precision, recall, density and coverage of prior samples
                         against the test set in the classifier's features, overall and per class, beside
                         the same numbers for as many training images (docs/sample_quality.md)
--test-limit N evaluates on the first N test images (a hierarchy's k=5000 bound is a full pass per draw).
The options set the run's evaluation.iwae_samples, evaluation.sample_accuracy, evaluation.samples_per_class,
evaluation.quality_samples, evaluation.disentanglement_protocol and evaluation.llr_groups (--llr-groups 1 3:
a hierarchy's anomaly scores llr>1 and llr>3) for this evaluation only (config.yaml is not changed).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from cvae_jax import api, experiment, xla_cpu
from cvae_jax.config import ConfigError
from cvae_jax.data import DataError, Split
from cvae_jax.engine.memory import OutOfMemoryError
from cvae_jax.tasks import RestoreError


def evaluate_run(workdir: Path, iwae_samples: int = 5000, sample_accuracy: bool = True,
                 samples_per_class: int = 1000, quality_samples: int = 5000,
                 disentanglement_protocol: str | None = None, test_limit: int | None = None,
                 llr_groups: list[int] | None = None) -> dict:
  restored = api.load(workdir).restored
  if test_limit:  # the first test_limit test images only (a bound too slow for the whole split; eval.json says how many)
    ds = restored.dataset
    restored.dataset = dataclasses.replace(ds, test=Split(ds.test.images[:test_limit], ds.test.labels[:test_limit]))
  evaluation = restored.cfg.evaluation
  restored.cfg.evaluation = dataclasses.replace(
      evaluation, iwae_samples=iwae_samples, sample_accuracy=sample_accuracy, samples_per_class=samples_per_class,
      quality_samples=quality_samples,
      disentanglement_protocol=disentanglement_protocol or evaluation.disentanglement_protocol,
      llr_groups=evaluation.llr_groups if llr_groups is None else list(llr_groups))
  experiment.validate(restored.cfg)  # the changed settings are checked as a run's are
  return restored.task.evaluate(restored, Path(workdir))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdir", type=Path, help="a run directory written by python -m cvae_jax.train")
  parser.add_argument("--iwae-samples", type=int, default=5000, help="k of the importance-weighted bound (0: skip)")
  parser.add_argument("--no-sample-accuracy", action="store_true", help="skip the classifier judging CVAE samples")
  parser.add_argument("--samples-per-class", type=int, default=1000)
  parser.add_argument("--quality-samples", type=int, default=5000,
                      help="samples of the Fréchet distance, precision/recall, density/coverage (0: skip)")
  parser.add_argument("--test-limit", type=int, default=None,
                      help="evaluate on the first N test images only (eval.json records N; default: all)")
  parser.add_argument("--disentanglement-protocol", choices=["fast", "dlib"], default=None,
                      help="sample counts of the disentanglement scores (default: the run's)")
  parser.add_argument("--llr-groups", type=int, nargs="*", default=None,
                      help="a hierarchy's llr>k anomaly scores, one per k (default: the run's evaluation.llr_groups)")
  args = parser.parse_args(argv)
  if args.iwae_samples < 0 or args.samples_per_class < 1:
    parser.error("--iwae-samples must be >= 0 and --samples-per-class >= 1")
  if args.test_limit is not None and args.test_limit < 1:
    parser.error(f"--test-limit must be at least 1 (or left out for the whole test split); got {args.test_limit}")
  if args.quality_samples != 0 and args.quality_samples < 10:
    parser.error(f"--quality-samples must be 0 (skip) or at least 10 (the k-NN radii need more than k = 5 "
                 f"samples); got {args.quality_samples}")
  xla_cpu.use_fast_scheduler()
  experiment.load_plugins()
  try:
    result = evaluate_run(args.workdir, args.iwae_samples, not args.no_sample_accuracy, args.samples_per_class,
                          args.quality_samples, args.disentanglement_protocol, args.test_limit, args.llr_groups)
  except (RestoreError, DataError, ConfigError, OutOfMemoryError) as e:
    sys.exit(f"error: {e}")
  summary = {k: result[k] for k in ("elbo", "rec", "kl", "active_units", "wall_time") if k in result}
  if "iwae" in result:
    summary["nll"], summary["k"] = result["iwae"]["nll"], result["iwae"]["k"]
  if "sample_accuracy" in result:
    summary["sample_accuracy"] = result["sample_accuracy"]["overall"]
  if "sample_quality" in result:
    quality = result["sample_quality"]
    summary |= {"fd": quality["fd"], "fd_reference": quality["reference"]["fd"], "recall": quality["recall"],
                "coverage": quality["coverage"]}
  print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
  print(f"wrote {args.workdir / 'eval.json'}")


if __name__ == "__main__":
  main()
