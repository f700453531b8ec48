"""Models: the VAE module and its interface (vae.py), the registry of families (registry.py), and one
module per family: mlp.py, conv.py, gru.py, hvae.py. A new family is a module that calls `register`.
Parameters are initialized by one compiled program (initialize.py)."""
from cvae_jax.models.initialize import init_params
from cvae_jax.models.registry import FAMILIES, ModelFamily, create_model, family_of, register
from cvae_jax.models.vae import VAE, VAEOutput, concat, reparameterize
from cvae_jax.models import conv, gru, hvae, mlp  # noqa: F401  (each registers its family)

__all__ = ["FAMILIES", "ModelFamily", "create_model", "family_of", "init_params", "register", "VAE", "VAEOutput",
           "concat", "reparameterize"]
