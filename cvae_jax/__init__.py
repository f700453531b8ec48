"""cvae_jax: variational autoencoders and conditional VAEs in JAX, Flax, Optax, Orbax and Hydra."""
