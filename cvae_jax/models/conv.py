"""The convolutional family (`model=conv`, presets conv, conv_deep, conv1d): strided convs down, sub-pixel
convs up. 2-D images and 1-D signals alike (the kernel has one dimension per spatial axis)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax

from cvae_jax.config import Config, ConfigError, ModelConfig, check
from cvae_jax.data import Encoding
from cvae_jax.models.registry import ModelFamily, register
from cvae_jax.models.vae import concat


@dataclass
class ConvConfig(ModelConfig):
  arch: str = "conv"
  encoder_channels: list[int] = field(default_factory=lambda: [32])  # channels of the encoder's conv layers
  decoder_channels: list[int] = field(default_factory=list)  # upsampling (sub-pixel conv) layers (empty: dense to the data)
  kernel_size: int = 3     # square (cubic) kernel size
  decoder_kernel_size: Optional[int] = None  # the decoder's kernel size (null: kernel_size). A sub-pixel conv of
                           # kernel 3 covers every input a stride-2 transposed conv of kernel 4 reaches
  conv_stride: int = 1     # stride of every conv, and upsampling factor of every decoder layer
  dense: int = 64          # width of the dense layer on each side
  upsample_to_output: bool = False  # true: one more upsampling layer gives the outputs itself (disentanglement_lib's
                           # decoder, whose last transposed conv has the data's channels); false: a stride-1 conv
                           # after the last upsampling layer does


class ConvEncoder(nn.Module):
  """conv layers -> flatten -> dense [, c] -> (mean, logvar).

  With channels=(32,), kernel 3, stride 1, dense 64 this is the seed article's CVAE encoder:
  Conv2D(32, 3x3, 'same') + ReLU, flatten, dense 64, concat label, mean and log-variance.
  """
  channels: Sequence[int]
  kernel_size: int
  stride: int
  dense: int
  latent_size: int
  activation: Callable

  @nn.compact
  def __call__(self, x, c=None):
    spatial = x.ndim - 2  # [B, *spatial, C]
    h = x
    for ch in self.channels:
      h = self.activation(nn.Conv(ch, (self.kernel_size,) * spatial, strides=self.stride, padding="SAME")(h))
    h = self.activation(nn.Dense(self.dense)(h.reshape(h.shape[0], -1)))
    h = concat(h, c)
    return nn.Dense(self.latent_size, name="mean")(h), nn.Dense(self.latent_size, name="logvar")(h)


def depth_to_space(h: jax.Array, block: int) -> jax.Array:
  """[B, *spatial, C * block^d] -> [B, *(spatial * block), C], channel blocks laid out as
  tf.nn.depth_to_space does: output[b, h*s + i, w*s + j, c] = input[b, h, w, (i*s + j)*C + c]."""
  b, *spatial, channels = h.shape
  d = len(spatial)
  out_channels = channels // block**d
  h = h.reshape(b, *spatial, *([block] * d), out_channels)
  order = [0] + [axis for i in range(d) for axis in (1 + i, 1 + d + i)] + [1 + 2 * d]
  return h.transpose(order).reshape(b, *[n * block for n in spatial], out_channels)


class ConvDecoder(nn.Module):
  """z [, c] -> dense -> (upsampling convs) -> logits.

  With no decoder channels it is the seed article's decoder: concat(z, label), dense 64, dense to the
  image. Otherwise a dense layer makes a [*spatial / stride^n, channels[0]] map that each layer upsamples
  by `stride`, and a last stride-1 conv gives the logits. Upsampling is a sub-pixel convolution (Shi et
  al. 2016: a stride-1 conv to stride^d times the channels, then depth_to_space), the same family of maps
  as a strided transposed conv but about 9x faster to differentiate on XLA:CPU, whose transposed-conv
  gradients are slow.
  """
  channels: Sequence[int]
  kernel_size: int
  stride: int
  dense: int
  data_shape: tuple[int, ...]
  activation: Callable
  upsample_to_output: bool = False

  @nn.compact
  def __call__(self, z, c=None):
    h = self.activation(nn.Dense(self.dense)(concat(z, c)))
    if not self.channels:
      return nn.Dense(math.prod(self.data_shape))(h).reshape(z.shape[0], *self.data_shape)
    *spatial, out_channels = self.data_shape
    start = [s // upsampling(self.stride, self.channels, self.upsample_to_output) for s in spatial]
    h = self.activation(nn.Dense(math.prod(start) * self.channels[0])(h))
    h = h.reshape(z.shape[0], *start, self.channels[0])
    kernel = (self.kernel_size,) * len(spatial)
    for ch in self.channels:
      h = nn.Conv(ch * self.stride ** len(spatial), kernel, padding="SAME")(h)
      h = self.activation(depth_to_space(h, self.stride))
    if self.upsample_to_output:
      return depth_to_space(nn.Conv(out_channels * self.stride ** len(spatial), kernel, padding="SAME")(h), self.stride)
    return nn.Conv(out_channels, kernel, padding="SAME")(h)


def upsampling(stride: int, channels: Sequence[int], upsample_to_output: bool) -> int:
  """How much the decoder's convs enlarge the map the dense layer makes."""
  return stride ** (len(channels) + bool(channels and upsample_to_output))


def build(cfg: ConvConfig, spec, output_shape: tuple[int, ...]):
  factor = upsampling(cfg.conv_stride, cfg.decoder_channels, cfg.upsample_to_output)
  spatial = output_shape[:-1]
  if cfg.decoder_channels and any(s % factor for s in spatial):
    raise ConfigError(
        f"model.decoder_channels={list(cfg.decoder_channels)} with model.conv_stride={cfg.conv_stride} "
        f"upsample by {factor}, which does not divide the data's spatial shape {spatial}. "
        "Use fewer decoder layers or another stride.")
  activation = getattr(nn, cfg.activation)
  encoder = ConvEncoder(tuple(cfg.encoder_channels), cfg.kernel_size, cfg.conv_stride, cfg.dense,
                        cfg.latent_size, activation)
  decoder = ConvDecoder(tuple(cfg.decoder_channels), cfg.decoder_kernel_size or cfg.kernel_size, cfg.conv_stride,
                        cfg.dense, output_shape, activation, cfg.upsample_to_output)
  return encoder, decoder


def check_config(cfg: Config) -> None:
  m = cfg.model
  check(all(ch >= 1 for ch in m.encoder_channels + m.decoder_channels), "model.encoder_channels",
        (m.encoder_channels, m.decoder_channels), "channel counts must be at least 1")
  check(m.kernel_size >= 1, "model.kernel_size", m.kernel_size, "must be at least 1")
  check(m.decoder_kernel_size is None or m.decoder_kernel_size >= 1, "model.decoder_kernel_size",
        m.decoder_kernel_size, "must be at least 1, or null for model.kernel_size")
  check(m.conv_stride >= 1, "model.conv_stride", m.conv_stride, "must be at least 1")
  check(m.dense >= 1, "model.dense", m.dense, "must be at least 1")


register(ModelFamily("conv", ConvConfig, build, encodings=frozenset(Encoding) - {Encoding.tokens},
                     host_loop_on_cpu=True, check=check_config))
