"""The disentanglement evaluator: the beta-VAE, FactorVAE, MIG, DCI and SAP scores (evaluators/factor_scores.py,
after disentanglement_lib) of the encoder's posterior mean on a dataset with ground-truth factors
(data/factors.py), and latent traversals labelled with the factor each unit captures.

A run asks for it with evaluation.disentanglement=true. It needs the dataset's FactorTable and an unconditional
code: a dataset without factors, or a CVAE (whose code depends on its label), is a ConfigError (`check`), which
the task can raise before training. A plain autoencoder is scored like a VAE (its code is the encoder's output).
"""
from __future__ import annotations

import dataclasses
import enum
import time

import jax
import numpy as np

from cvae_jax import data, figures
from cvae_jax.config import Config, ConfigError, Kind, ScoreProtocol
from cvae_jax.data import Modality, model_input
from cvae_jax.data.factors import FactorTable
from cvae_jax.evaluators import EvalContext
from cvae_jax.evaluators import factor_scores as scores
from cvae_jax.keys import Stream, fold, stream_key
from cvae_jax.models import VAE


class Part(enum.IntEnum):
  """The named parts below the run's Stream.EVAL key drawn here (numbered after estimators.Draw's: no key shared)."""
  SCORES = 4      # the factor settings and the classifiers' seeds, one independent stream per score
  BINARIZE = 5    # dynamic binarization of the examples (other encodings draw nothing)
  TRAVERSAL = 6   # which examples the traversal figure shows


@dataclasses.dataclass(frozen=True)
class Protocol:
  """The scores' sample counts and classifier sizes. DLIB: disentanglement_lib's (its unsupervised study's metric
  configs). FAST (evaluation.disentanglement_protocol=fast, the default): about a minute per model on 2 CPU cores
  instead of about 16.

  Measured with disentanglement_lib's conv encoder (convs 32, 32, 64, 64 of kernel 4 and stride 2, dense 256,
  Z = 10) on 64x64 packed-binary images with dSprites' factor sizes (3, 6, 40, 32, 32): it encodes 4,100 examples a
  second. DLIB encodes 2.9 million examples (1.92 million for the beta-VAE score, 0.97 million for FactorVAE: 470 s
  and 237 s) and fits 11,300 trees for DCI (243 s). FAST: beta-VAE 23 s, FactorVAE 14 s, MIG 2.5 s, DCI 10 s,
  SAP 4 s. Kept: every batch size, threshold, bin count and classifier setting, and the counts of MIG and SAP.
  Reduced, with the effect measured on a synthetic code of dSprites' factor sizes (10 units: one per factor, each
  with 0.4 of the next factor leaked in, one mixing x and y, four of pure noise, plus Gaussian noise of sd 2 for
  the beta-VAE and FactorVAE numbers, 0.3 for DCI's):
    - beta-VAE and FactorVAE: 500 training and 250 evaluation points (from 10,000 and 5,000). The classifiers
      (a logistic regression of Z features, a majority vote per unit) fit on 500 points; the evaluation accuracy's
      standard deviation grows from 0.004 to 0.036 (beta-VAE) and from 0.005 to 0.032 (FactorVAE), the mean moves
      by -0.022 +- 0.013 and -0.004 +- 0.011 (a code of score 0.62 and 0.56 under DLIB, 8 seeds).
    - DCI: 2,000 training examples and 20 trees per class (from 10,000 and 100), the same ratio of trees to examples:
      the importance the trees give to noise units depends on how far they overfit, which that ratio sets (with
      10,000 examples and 10 trees disentanglement rose from 0.418 to 0.627; with 2,000 and 50 it fell to 0.356).
      On that code and on a second (sizes 3, 6, 10, 8, 8, half rotated) disentanglement and completeness moved by
      -0.016 to +0.012 (0.418 -> 0.407, 0.412; 0.242 -> 0.254, 0.247; two seeds), informativeness (test accuracy)
      fell by 0.03 and 0.06 (fewer training examples per value): compare it between runs of one protocol only.
  """
  beta_vae_train: int = 10_000     # points (pairs of batches of 64) the logistic regression is fitted on
  beta_vae_eval: int = 5_000       # points its accuracy is measured on
  factor_vae_train: int = 10_000   # points (batches of 64 with one factor fixed) the vote table counts
  factor_vae_eval: int = 5_000
  variance_estimate: int = 10_000  # examples of the global variances (FactorVAE)
  mig_train: int = 10_000          # examples of the mutual information
  dci_train: int = 10_000          # examples the gradient-boosted trees are fitted on
  dci_test: int = 5_000
  dci_trees: int = 100             # n_estimators of each factor's GradientBoostingClassifier
  sap_train: int = 10_000
  sap_test: int = 5_000


DLIB = Protocol()
FAST = Protocol(beta_vae_train=500, beta_vae_eval=250, factor_vae_train=500, factor_vae_eval=250,
                 dci_train=2_000, dci_trees=20)

CHUNK = 1024  # examples per jitted encoder call (one compiled shape: the last chunk is padded)
INFORMATIVE = 0.05  # a unit captures a factor when I(z; v) / H(v) exceeds this: 5x the plug-in bias of an
                    # independent pair ((20 - 1)(40 - 1) / 2N nats, / H = log 40, at N = 10,000: 0.01)
TRAVERSAL_EXAMPLES = 3
TRAVERSAL_VALUES = np.linspace(-2.0, 2.0, 9)


def check(cfg: Config) -> FactorTable:
  """The dataset's FactorTable, or a ConfigError that says why this run cannot be scored."""
  entry = data.entry_for(cfg.data.name)
  table = entry.factors(cfg.data) if entry.factors is not None else None
  if table is None:
    raise ConfigError(f"evaluation.disentanglement=true scores a code against the data's ground-truth factors; "
                      f"data.name={cfg.data.name!r} has none. Choose a dataset with factors (dsprites) or set "
                      f"evaluation.disentanglement=false.")
  if Kind(cfg.model.kind) == Kind.cvae:
    raise ConfigError("evaluation.disentanglement=true scores the code q(z | x); model.kind=cvae encodes q(z | x, c), "
                      "which has no code without a label. Use model.kind=vae (or ae), or evaluation.disentanglement="
                      "false.")
  return table


def make_represent(ctx: EvalContext, key: jax.Array) -> scores.Represent:
  """represent(stored examples [N, ...]) -> the encoder's posterior mean [N, Z], in jitted chunks of CHUNK; chunk i
  of each call binarizes (dynamic binarization only) with fold(key, Part.BINARIZE, i)."""
  encoding = ctx.dataset.spec.encoding
  key = fold(key, Part.BINARIZE)

  @jax.jit
  def encode(params, stored, key):
    x = model_input(stored, encoding, key)
    return ctx.model.apply({"params": params}, x, None, method="encode")[0]

  def represent(stored: np.ndarray) -> np.ndarray:
    codes = []
    for i, start in enumerate(range(0, len(stored), CHUNK)):
      chunk = stored[start:start + CHUNK]
      n = len(chunk)
      if n < CHUNK:  # pad with the last example: one compiled shape
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], CHUNK - n, axis=0)])
      codes.append((encode(ctx.params, chunk, fold(key, i)), n))  # dispatched now, read below
    return np.concatenate([np.asarray(z)[:n] for z, n in codes])

  return represent


def unit_factors(normalized_mutual_info: np.ndarray, names) -> list:
  """The factor each code unit captures: the one of highest I(z_d; v_k) / H(v_k), None below INFORMATIVE."""
  nmi = np.asarray(normalized_mutual_info)  # [Z, F]
  return [names[k] if row[k] > INFORMATIVE else None for row, k in zip(nmi, nmi.argmax(axis=1))]


def score_all(table: FactorTable, represent: scores.Represent, seed: np.random.SeedSequence,
              protocol: Protocol = FAST) -> dict:
  """Every score of one representation, each with its own random stream (spawned from seed, in a fixed order, so
  one score's counts never change another's draws); the eval.json block less the wall time."""
  rngs = [np.random.default_rng(s) for s in seed.spawn(5)]
  p, names, times = protocol, list(table.names), {}

  def timed(name, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(table, represent, *args, **kwargs)
    times[name] = time.perf_counter() - t0
    return out

  beta = timed("beta_vae", scores.beta_vae_score, rngs[0], num_train=p.beta_vae_train, num_eval=p.beta_vae_eval)
  factor = timed("factor_vae", scores.factor_vae_score, rngs[1], num_train=p.factor_vae_train,
                 num_eval=p.factor_vae_eval, num_variance_estimate=p.variance_estimate)
  mig = timed("mig", scores.mig, rngs[2], num_train=p.mig_train)
  dci = timed("dci", scores.dci, rngs[3], num_train=p.dci_train, num_test=p.dci_test, n_estimators=p.dci_trees)
  sap = timed("sap", scores.sap, rngs[4], num_train=p.sap_train, num_test=p.sap_test)
  return {
      "beta_vae": beta["eval_accuracy"], "factor_vae": factor["eval_accuracy"], "mig": mig["mig"],
      "dci_disentanglement": dci["disentanglement"], "dci_completeness": dci["completeness"],
      "dci_informativeness": dci["informativeness_test"], "sap": sap["sap"],
      "factors": names,
      "beta_vae_train_accuracy": beta["train_accuracy"],
      "factor_vae_train_accuracy": factor["train_accuracy"], "factor_vae_num_active_dims": factor["num_active_dims"],
      "factor_vae_unit_factor": [names[k] if k >= 0 else None for k in factor["factor_of_dim"]],
      "mig_per_factor": dict(zip(names, mig["per_factor"])),
      "normalized_mutual_info": mig["normalized_mutual_info"],  # [Z, F]
      "unit_factor": unit_factors(mig["normalized_mutual_info"], names),
      "dci_informativeness_train": dci["informativeness_train"], "dci_importance": dci["importance"],  # [Z, F]
      "sap_per_factor": dict(zip(names, sap["per_factor"])), "sap_score_matrix": sap["score_matrix"],  # [Z, F]
      "protocol": dataclasses.asdict(protocol), "wall_times": times}


def traversal_labels(result: dict) -> list[str]:
  nmi = np.asarray(result["normalized_mutual_info"])
  return [f"z[{d}]: {name} ({nmi[d].max():.2f})" if name else f"z[{d}]: none"
          for d, name in enumerate(result["unit_factor"])]


def evaluator(ctx: EvalContext, protocol: Protocol | None = None) -> dict:
  """The scores of the encoder's posterior mean, and figures/traversals.png for image data; eval.json's
  "disentanglement" block. Reproducible: every draw comes from the run's Stream.EVAL and Stream.FIGURES keys."""
  t0 = time.perf_counter()
  table = check(ctx.cfg)
  if protocol is None:  # evaluation.disentanglement_protocol
    protocol = DLIB if ScoreProtocol(ctx.cfg.evaluation.disentanglement_protocol) == ScoreProtocol.dlib else FAST
  key = stream_key(ctx.cfg.seed, Stream.EVAL)
  seed = np.random.SeedSequence(np.asarray(jax.random.key_data(fold(key, Part.SCORES))).tolist())
  result = score_all(table, make_represent(ctx, key), seed, protocol)
  spec = ctx.dataset.spec
  if spec.modality == Modality.image:  # traversals are drawn for images only, as the other figures
    rng = np.random.default_rng(np.asarray(jax.random.key_data(stream_key(ctx.cfg.seed, Stream.FIGURES,
                                                                          Part.TRAVERSAL))).tolist())
    x = model_input(table.examples(table.sample(TRAVERSAL_EXAMPLES, rng)), spec.encoding, fold(key, Part.TRAVERSAL))
    (ctx.workdir / "figures").mkdir(exist_ok=True)
    figures.factor_traversals(ctx.workdir / "figures" / "traversals.png", ctx.model, ctx.params, spec,
                              ctx.likelihood, x, traversal_labels(result), TRAVERSAL_VALUES)
  return {"disentanglement": result | {"wall_time": time.perf_counter() - t0}}
