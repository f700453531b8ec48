"""The KL weight over training: constant beta, a linear warm-up, or cyclical annealing; the KL's target
capacity of the capacity objective.

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
  """Returns weight(step, beta=cfg.beta) -> the KL weight used by the update at 0-based `step`
  (beta may be traced: batched sweeps vary it).

  linear (Bowman et al. 2016): beta * min(1, step / warmup_steps), warmup_steps = kl_warmup_epochs epochs.
  cyclical (Fu et al. 2019, "Cyclical Annealing Schedule"): the run is split into kl_cycles cycles of
  total_steps / kl_cycles steps; in each, beta * min(1, tau / kl_cycle_ratio), tau in [0, 1) the position
  within the cycle: a rise from 0 to beta over the first kl_cycle_ratio of the cycle, then beta.
  """
  schedule = KLSchedule(cfg.kl_schedule)
  if schedule == KLSchedule.constant:
    return lambda step, beta=cfg.beta: beta
  if schedule == KLSchedule.linear:
    fraction = optax.linear_schedule(0.0, 1.0, transition_steps=max(1, round(cfg.kl_warmup_epochs * steps_per_epoch)))
  else:
    period = total_steps / cfg.kl_cycles
    fraction = lambda step: jnp.minimum(1.0, jnp.mod(step, period) / period / cfg.kl_cycle_ratio)
  return lambda step, beta=cfg.beta: beta * fraction(step)


def capacity_at(step, capacity: float, capacity_steps: int):
  """C(step) = capacity * min(1, step / capacity_steps): the KL the capacity objective asks for at `step`
  (Burgess et al. 2018, Sec. 4; disentanglement_lib's annealed VAE)."""
  return capacity * jnp.minimum(1.0, step / capacity_steps)
