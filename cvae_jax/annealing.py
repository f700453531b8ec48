"""The KL weight over training: constant beta, a linear warm-up, or cyclical annealing.

Remedies for posterior collapse that start with a small KL weight so the encoder learns to use z before
the KL pulls q(z|x) to the prior. Free bits, the third remedy, changes the KL term itself
(objectives.free_bits_kl). Schedules are pure functions of the step: a resumed run reproduces them.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax

from cvae_jax.config import KLSchedule, ObjectiveConfig


def kl_weight_schedule(cfg: ObjectiveConfig, steps_per_epoch: int, total_steps: int) -> Callable:
  """Returns weight(step) -> the KL weight used by the update at 0-based `step`.

  linear (Bowman et al. 2016): beta * min(1, step / warmup_steps), warmup_steps = kl_warmup_epochs epochs.
  cyclical (Fu et al. 2019, "Cyclical Annealing Schedule"): the run is split into kl_cycles cycles of
  total_steps / kl_cycles steps; in each, beta * min(1, tau / kl_cycle_ratio), tau in [0, 1) the position
  within the cycle: a rise from 0 to beta over the first kl_cycle_ratio of the cycle, then beta.
  """
  beta = float(cfg.beta)
  schedule = KLSchedule(cfg.kl_schedule)
  if schedule == KLSchedule.constant:
    return optax.constant_schedule(beta)
  if schedule == KLSchedule.linear:
    return optax.linear_schedule(0.0, beta, transition_steps=max(1, round(cfg.kl_warmup_epochs * steps_per_epoch)))
  period = total_steps / cfg.kl_cycles

  def cyclical(step):
    tau = jnp.mod(step, period) / period
    return beta * jnp.minimum(1.0, tau / cfg.kl_cycle_ratio)

  return cyclical
