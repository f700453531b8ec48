"""cvae_jax: variational autoencoders and conditional VAEs in JAX, Flax, Optax, Orbax and Hydra.

The library: `cvae_jax.experiment` trains a config (train_and_evaluate) and restores a run (restore_run);
docs/architecture.md maps the packages. Importing it has no side effects (cvae_jax.xla_cpu says what the
command lines set).
"""
