"""Sample accuracy: a classifier (classifier.py) says which class each class-conditional sample shows."""
from __future__ import annotations

import jax
import numpy as np

from cvae_jax import generation
from cvae_jax.data import Modality
from cvae_jax.evaluators import EvalContext, classifier
from cvae_jax.keys import Stream, stream_key


def judgeable(ctx: EvalContext) -> bool:
  """The judge is trained on the run's training split: it must have seen every class, and it reads images."""
  spec = ctx.dataset.spec
  return bool(ctx.model.condition_size and spec.num_classes and spec.modality == Modality.image
              and not ctx.cfg.data.exclude_classes)


def sample_accuracy(ctx: EvalContext) -> dict:
  """Generates evaluation.samples_per_class samples of every class and asks the classifier which class
  each shows: the accuracy per class and overall, beside the classifier's own test accuracy."""
  if not judgeable(ctx):
    return {}
  per_class = ctx.cfg.evaluation.samples_per_class
  judge, judge_params, judge_accuracy = classifier.load_or_train(ctx.workdir / "classifier", ctx.dataset,
                                                                 ctx.cfg.seed)
  predict = classifier.make_predict(judge)
  key = stream_key(ctx.cfg.seed, Stream.FIGURES)
  accuracy = []
  for k in range(ctx.dataset.spec.num_classes):
    images = generation.class_conditional(ctx.model, ctx.params, ctx.dataset.spec, jax.random.fold_in(key, k), [k],
                                          per_class, ctx.likelihood)[0]
    accuracy.append(float(np.mean(predict(judge_params, images) == k)))
  return {"sample_accuracy": {"overall": float(np.mean(accuracy)), "per_class": accuracy,
                              "samples_per_class": per_class, "classifier_test_accuracy": judge_accuracy}}
