"""Model families by name (`model.arch`, chosen with `model=NAME`). Each family builds an (encoder, decoder)
pair for a dataset and states which input encodings it reads; `create_model` wraps the pair in the VAE."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import flax.linen as nn

from cvae_jax.config import Config, ConfigError, Kind, ModelConfig
from cvae_jax.data import DatasetSpec
from cvae_jax.models.vae import VAE
from cvae_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class ModelFamily:
  name: str
  config: type  # its config node: a ModelConfig subclass with the family's own keys
  build: Optional[Callable]  # (model config, DatasetSpec, decoder output shape) -> (encoder, decoder) modules
  encodings: frozenset  # the input encodings (data.Encoding) it reads
  autoregressive: bool = False  # the decoder reads x shifted right (teacher forcing) and samples token by token
  host_loop_on_cpu: bool = False  # training.epoch_loop=auto: a host loop of steps on CPU (XLA:CPU runs
                                  # convolutions in a loop body about 10x slower than at top level)
  check: Callable[[Config], None] = lambda cfg: None  # value checks of its own keys
  model: Optional[Callable] = None  # instead of build, the whole model: (model config, DatasetSpec, decoder output
                                    # shape, condition size, stochastic) -> a module with the VAE interface


FAMILIES: Registry[ModelFamily] = Registry("model.arch", "a model family (choose one with model=NAME)")
register = FAMILIES.register


def family_of(cfg: ModelConfig) -> ModelFamily:
  return FAMILIES.lookup(cfg.arch)


def create_model(cfg: ModelConfig, spec: DatasetSpec, outputs_per_channel: int = 1, shared_scale: bool = False) -> VAE:
  """The VAE / CVAE / AE of the config for this data; the likelihood's outputs per channel size the decoder.
  shared_scale: a Gaussian's scale is one learned parameter per position and channel (objective.shared_scale)."""
  family = family_of(cfg)
  kind = Kind(cfg.kind)
  output_shape = (*spec.shape[:-1], spec.shape[-1] * outputs_per_channel)
  condition_size = spec.condition_size if kind == Kind.cvae else 0
  if family.model is not None:
    if shared_scale:
      raise ConfigError(f"objective.shared_scale: model.arch={cfg.arch!r} builds its own decoder outputs; "
                        "use a per-input scale (objective.shared_scale=false) or another model.arch")
    return family.model(cfg, spec, output_shape, condition_size, kind != Kind.ae)
  encoder, decoder = family.build(cfg, spec, output_shape)
  return VAE(encoder=encoder, decoder=decoder, latent_size=cfg.latent_size,
             condition_size=condition_size, stochastic=kind != Kind.ae,
             autoregressive=family.autoregressive, shared_scale_channels=spec.shape[-1] if shared_scale else 0)


def check_activation(cfg: Config) -> None:
  if not callable(getattr(nn, cfg.model.activation, None)):
    raise ConfigError(f"model.activation={cfg.model.activation!r} is invalid: use a flax.linen activation name "
                      "such as relu, tanh, gelu, elu.")
