"""Evaluators: what a run reports about a trained model at the end of training and in `python -m
cvae_jax.evaluate`. Each is a function of an EvalContext that returns its part of eval.json; a task lists
the ones it wants (tasks/), the code that runs them (`evaluate`) knows none of them.

  likelihood.py  the test ELBO and its terms, KL per dimension, active units, the importance-weighted bound
  anomaly.py     anomaly scores, AUROC and AUPRC (held-out classes, another dataset)
  samples.py     a classifier's accuracy on class-conditional samples (classifier.py is the judge)
  quality.py     sample quality and diversity in the classifier's features: Frechet distance, precision,
                 recall, density, coverage, overall and per class, beside the train-vs-test reference
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from cvae_jax.config import Config
from cvae_jax.data import Dataset
from cvae_jax.engine import rundir
from cvae_jax.engine.memory import out_of_memory_says
from cvae_jax.likelihoods import Likelihood
from cvae_jax.models import VAE


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """A trained model and everything an evaluator may need about its run."""
  cfg: Config
  dataset: Dataset
  model: VAE
  params: Any
  workdir: Path
  likelihood: Likelihood
  background_params: Any = None  # a background model's parameters (evaluation.background_rate), same network


Evaluator = Callable[[EvalContext], dict]  # returns its part of eval.json


def evaluate(ctx: EvalContext, evaluators: Sequence[Evaluator]) -> dict:
  """Runs the evaluators in turn and writes their merged results to eval.json (atomically); returns them."""
  t0 = time.perf_counter()
  result: dict = {}
  for evaluator in evaluators:
    with out_of_memory_says(f"the end-of-run evaluation ({getattr(evaluator, '__name__', 'evaluator')})",
                            "Lower evaluation.batch_size and evaluation.sample_chunk (or training.eval_batch_size); "
                            "the trained checkpoint is kept: `python -m cvae_jax.evaluate RUN_DIR` evaluates it again."):
      result |= evaluator(ctx)
  result["wall_time"] = time.perf_counter() - t0
  rundir.write_json_atomic(ctx.workdir / "eval.json", result)
  return result
