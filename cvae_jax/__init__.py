"""cvae_jax: variational autoencoders and conditional VAEs in JAX, Flax, Optax, Orbax and Hydra.

`model = cvae_jax.load(run_dir)` brings a trained run back as an object that samples, encodes, decodes
and scores (cvae_jax/api.py, docs/api.md). Below it, `cvae_jax.experiment` trains a config
(train_and_evaluate) and restores a run (restore_run); docs/architecture.md maps the packages. Importing it has no side effects (cvae_jax.xla_cpu says what the
command lines set).
"""


def __getattr__(name: str):
  # `cvae_jax.load` without importing JAX and the whole library when the package is imported (PEP 562).
  if name in ("load", "Model"):
    from cvae_jax import api
    return getattr(api, name)
  raise AttributeError(f"module 'cvae_jax' has no attribute {name!r}")
