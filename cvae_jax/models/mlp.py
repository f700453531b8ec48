"""The MLP family (`model=mlp`): flatten -> dense layers -> (mean, logvar); the decoder mirrors the widths."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import flax.linen as nn

from cvae_jax.config import Config, ModelConfig, check
from cvae_jax.data import Encoding
from cvae_jax.models.registry import ModelFamily, register
from cvae_jax.models.vae import concat


@dataclass
class MLPConfig(ModelConfig):
  arch: str = "mlp"
  hidden: list[int] = field(default_factory=lambda: [500])  # encoder widths (the decoder mirrors them)
  init_scale: Optional[float] = None  # weights drawn from N(0, init_scale^2) (Kingma & Welling: 0.01);
                                      # None: Flax's default (LeCun normal)


def _kernel_init(init_scale: Optional[float]):
  return nn.linear.default_kernel_init if init_scale is None else nn.initializers.normal(init_scale)


class MLPEncoder(nn.Module):
  """flatten(x) [, c] -> hidden layers -> (mean, logvar)."""
  hidden: Sequence[int]
  latent_size: int
  activation: Callable
  init_scale: Optional[float] = None  # weights ~ N(0, init_scale^2); None: Flax's default

  @nn.compact
  def __call__(self, x, c=None):
    dense = lambda n, **kw: nn.Dense(n, kernel_init=_kernel_init(self.init_scale), **kw)
    h = concat(x.reshape(x.shape[0], -1), c)  # [B, D (+K)]
    for width in self.hidden:
      h = self.activation(dense(width)(h))
    return dense(self.latent_size, name="mean")(h), dense(self.latent_size, name="logvar")(h)


class MLPDecoder(nn.Module):
  """z [, c] -> hidden layers (the encoder's, mirrored) -> logits of the data shape."""
  hidden: Sequence[int]
  data_shape: tuple[int, ...]
  activation: Callable
  init_scale: Optional[float] = None

  @nn.compact
  def __call__(self, z, c=None):
    dense = lambda n: nn.Dense(n, kernel_init=_kernel_init(self.init_scale))
    h = concat(z, c)
    for width in reversed(self.hidden):
      h = self.activation(dense(width)(h))
    return dense(math.prod(self.data_shape))(h).reshape(z.shape[0], *self.data_shape)


def build(cfg: MLPConfig, spec, output_shape: tuple[int, ...]):
  activation = getattr(nn, cfg.activation)
  return (MLPEncoder(tuple(cfg.hidden), cfg.latent_size, activation, cfg.init_scale),
          MLPDecoder(tuple(cfg.hidden), output_shape, activation, cfg.init_scale))


def check_config(cfg: Config) -> None:
  m = cfg.model
  check(all(w >= 1 for w in m.hidden), "model.hidden", m.hidden, "every hidden width must be at least 1")
  check(m.init_scale is None or m.init_scale > 0, "model.init_scale", m.init_scale, "must be > 0, or null")


register(ModelFamily("mlp", MLPConfig, build, encodings=frozenset(Encoding) - {Encoding.tokens}, check=check_config))
