"""The optimizer and the learning-rate schedule of every model the engine trains."""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax

from cvae_jax.config import LRSchedule, OptimizerConfig, OptimizerName


def create_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """Adam or Adagrad (after optional weight decay and global-norm clipping) with a unit step: the train
  step multiplies the update by the run's learning rate, so it can vary across a batched sweep. Both are
  linear in the rate, so this equals optax.adam(rate) / optax.adagrad(rate)."""
  if OptimizerName(cfg.name) == OptimizerName.adagrad:
    base = optax.adagrad(1.0)
  else:
    base = optax.adam(1.0, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm is not None else []
  if cfg.weight_decay:  # the gradient of weight_decay/2 |theta|^2, before the adaptive scaling (an L2 prior)
    parts.append(optax.add_decayed_weights(cfg.weight_decay))
  tx = optax.chain(*parts, base) if parts else base
  # Elementwise updates give the same numbers on one concatenated vector; the global norm may round differently.
  return optax.flatten(tx) if cfg.flatten else tx


def learning_rate_factor(cfg: OptimizerConfig, steps_per_epoch: int, epochs: int) -> Callable:
  """factor(step) multiplying the learning rate. burda: epochs [(3^i - 1)/2, (3^(i+1) - 1)/2) form stage
  i, at 10^(-i/7) (Burda et al. 2016: 3^i passes at 0.001 * 10^(-i/7), i = 0..7, 3280 passes in all).
  cosine: (1 + cos(pi * step / (epochs * steps_per_epoch))) / 2 (Loshchilov & Hutter 2017, no restarts),
  so it depends on training.epochs: a run resumed with more epochs follows the longer curve from there."""
  schedule = LRSchedule(cfg.schedule)
  if schedule == LRSchedule.constant:
    return lambda step: 1.0
  if schedule == LRSchedule.cosine:
    return optax.cosine_decay_schedule(1.0, decay_steps=max(1, epochs * steps_per_epoch))
  starts = jnp.asarray([(3**i - 1) // 2 for i in range(1, 21)])  # first epoch of stages 1, 2, ...

  def factor(step):
    stage = jnp.sum(step // steps_per_epoch >= starts)
    return 10.0 ** (-stage / 7.0)

  return factor
