"""cvae_jax: variational autoencoders and conditional VAEs in JAX, Flax, Optax, Orbax and Hydra."""
import os

# XLA:CPU's default concurrency-optimized scheduler slows the conv models' train step by 1.5-1.9x (2-core
# EPYC: 3,200 -> 5,500-5,900 images/s without it; 16-core Xeon: 5,600 -> 8,400-9,200) and does not help
# the MLP (experiments/speed/README.md). XLA reads XLA_FLAGS when JAX first creates its CPU client, so the
# flag is added at import; it is ignored per jit (compiler_options), and a value already in XLA_FLAGS wins.
_CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _CPU_SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CPU_SCHEDULER_FLAG}=false".strip()
