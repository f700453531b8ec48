"""XLA:CPU settings the command lines apply when their process starts; importing cvae_jax changes nothing.

XLA:CPU's default concurrency-optimized scheduler slows the conv models' train step by 1.5-1.9x (2-core
EPYC: 3,200 -> 5,500-5,900 images/s without it; 16-core Xeon: 5,600 -> 8,400-9,200) and does not help the
MLP (experiments/speed/README.md). XLA reads XLA_FLAGS once, when JAX first creates its CPU client, and
ignores the option per jit (compiler_options), so it has to be in the environment before the first
computation. In a notebook, call it first:

  import cvae_jax.xla_cpu; cvae_jax.xla_cpu.use_fast_scheduler()
"""
import os

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def use_fast_scheduler() -> None:
  """Adds `--xla_cpu_enable_concurrency_optimized_scheduler=false` to XLA_FLAGS; a value already there wins."""
  if SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SCHEDULER_FLAG}=false".strip()
