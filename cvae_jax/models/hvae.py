"""The hierarchical family (`model=hvae`): a deep VAE whose latents are groups at several resolutions, in the
style of VDVAE (Child 2021) and NVAE (Vahdat & Kautz 2020).

A bottom-up path of residual blocks reads x and keeps its activation at every resolution. A top-down path
starts from a learned state at the lowest resolution and visits the groups in order, upsampling between
stages. Group l reads the top-down state h:
  prior      p(z_l | z_<l)    = N(mu_p, sigma_p^2) from a block of h (which also gives features added to h)
  posterior  q(z_l | x, z_<l) = N(mu_q, sigma_q^2) from a block of [h, the bottom-up activation]
then z_l (drawn from q when training, from p when generating) enters h through a 1x1 conv, and a residual
block follows. The decoder's output is read from the last state. A CVAE's condition enters both paths: an
embedding of c is added to the bottom-up input and to the top-down state at the start of every stage.

The model keeps the VAE interface (models/vae.py), with z the concatenation of every group's latents in
top-down order, flattened: [B, latent_size], latent_size = sum over groups of (pixels at its resolution) x
latent_channels (`group_sizes` gives each group's share):
  __call__(x, c, rng) -> VAEOutput   one joint draw z ~ q(z | x); prior_mean / prior_logvar hold the
                                     prior p(z_l | z_<l) each group had along that draw; with prior_groups=m
                                     the lowest m groups take their prior's mean instead (the anomaly
                                     score llr>k, Havtorn et al. 2021)
  encode(x, c)        -> (mean, logvar) of q along the posterior-mean path (z_l = mu_q for every group):
                                     what the collapse diagnostics and the latent figures read
  decode(z, c)        -> logits of p(x | z) for a given z of every group
  generate(rng, c, n, temperature)   z_l ~ N(mu_p, (t sigma_p)^2) group by group (VDVAE's temperature)

VDVAE's stabilizers: the last conv of every residual block and the z projection start scaled by
sqrt(1 / number of blocks), and the prior's block starts at zero (p = N(0, I), no features), so the stack
starts as the identity; updates with an outlying gradient norm are skipped by training.skip_grad_norm.
Options for resolution: model.remat recomputes activations in the backward pass (models/remat.py: each
encoder block, each block of every group, each group and the head keep only their inputs),
model.compute_dtype=bfloat16 computes in bfloat16 with float32 parameters, statistics and
loss. Works on images and on 1-D signals (the kernels have one dimension per spatial axis).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cvae_jax.config import Config, ConfigError, ModelConfig, Regularizer, check
from cvae_jax.data import Encoding
from cvae_jax.models.conv import depth_to_space
from cvae_jax.models.registry import ModelFamily, register
from cvae_jax.models.remat import checkpointed, conv_for
from cvae_jax.models.vae import VAEOutput, required_condition

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass
class HVAEConfig(ModelConfig):
  arch: str = "hvae"
  width: int = 64             # channels of the residual state of both paths
  bottleneck: int = 16        # channels inside each residual block
  latent_channels: int = 8    # channels of each group's z
  encoder_blocks: list[int] = field(default_factory=lambda: [2, 2, 2])  # bottom-up residual blocks per stage;
                              # stage 0 is at the data's resolution, each next one `downsample` times smaller
  decoder_groups: list[int] = field(default_factory=lambda: [1, 2, 2])  # latent groups per stage (same stages)
  downsample: int = 2         # resolution ratio between consecutive stages (average pooling down, nearest up)
  patch: int = 1              # stage 0 works on patch x patch blocks of pixels stacked as channels (space to depth
                              # in, depth to space out): patch^2 times fewer positions, a lossless reshaping
  kernel_size: int = 3        # the middle conv of each block
  remat: bool = False         # recompute activations in the backward pass: less memory, ~1/3 more compute
  compute_dtype: str = "float32"  # float32 or bfloat16 (GPU/TPU); parameters, statistics and the loss stay float32


def _scaled_init(scale: float):
  """LeCun normal with its variance times `scale` (VDVAE multiplies the weights by sqrt(1 / n_blocks))."""
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


class Block(nn.Module):
  """act -> 1x1 conv -> act -> kxk conv -> act -> 1x1 conv (VDVAE's bottleneck block, one middle conv fewer);
  plus the input when residual. `last_scale` scales the last conv's initial variance (0: zeros). `conv` is
  the convolution nn.Conv calls (remat.conv_for)."""
  middle: int
  out: int
  kernel: int
  activation: Callable
  residual: bool = True
  last_scale: float = 1.0
  dtype: jnp.dtype = jnp.float32
  conv: Callable = lax.conv_general_dilated

  @nn.compact
  def __call__(self, h, extra=None):
    """extra: a second input, read as concatenate([h, extra], -1) (then not residual) without storing it."""
    d = h.ndim - 2
    conv = lambda n, k, name, **kw: nn.Conv(n, (k,) * d, padding="SAME", dtype=self.dtype, name=name,
                                            conv_general_dilated=self.conv, **kw)
    last_init = nn.initializers.zeros if self.last_scale == 0 else _scaled_init(self.last_scale)
    if extra is None:
      y = conv(self.middle, 1, "Conv_0")(self.activation(h))
    else:
      y = _ConcatConv1x1(self.middle, self.dtype, name="Conv_0")(self.activation(h), self.activation(extra))
    y = conv(self.middle, self.kernel, "Conv_1")(self.activation(y))
    y = conv(self.out, 1, "Conv_2", kernel_init=last_init)(self.activation(y))
    return h + y if self.residual else y


class _ConcatConv1x1(nn.Module):
  """nn.Conv(features, 1x1) of concatenate([a, b], -1), with nn.Conv's parameters (kernel [1.., Ca + Cb, F],
  bias [F]), as two matmuls: the concatenation (twice the width at full resolution) is never stored."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, a, b):
    d, na = a.ndim - 2, a.shape[-1]
    cin = na + b.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (1,) * d + (cin, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    k = kernel.reshape(cin, self.features).astype(self.dtype)
    return jnp.dot(a.astype(self.dtype), k[:na]) + jnp.dot(b.astype(self.dtype), k[na:]) + bias.astype(self.dtype)


class Group(nn.Module):
  """One latent group of the top-down path. Mode by argument: a posterior draw (act and rng), the
  posterior mean (act, no rng), a given z, or a prior draw at a temperature (no act). Returns the new state
  and the group's statistics (float32): q mean / logvar (None without act), p mean / logvar, z."""
  width: int
  middle: int
  latent_channels: int
  kernel: int
  activation: Callable
  num_blocks: int
  block: Callable
  dtype: jnp.dtype
  remat: bool = False  # each block `checkpointed`

  def setup(self):
    zc, blocks = self.latent_channels, self.num_blocks
    self.posterior = self.block(self.middle, 2 * zc, self.kernel, self.activation, residual=False, dtype=self.dtype)
    self.prior = self.block(self.middle, 2 * zc + self.width, self.kernel, self.activation, residual=False,
                            last_scale=0.0, dtype=self.dtype)
    self.z_proj = nn.Dense(self.width, kernel_init=_scaled_init(1.0 / blocks), dtype=self.dtype)
    self.resnet = self.block(self.middle, self.width, self.kernel, self.activation, last_scale=1.0 / blocks,
                             dtype=self.dtype)

  def __call__(self, h, act=None, rng=None, z=None, temperature: float = 1.0):
    zc = self.latent_channels
    prior = checkpointed(self.prior, h, enabled=self.remat)
    p_mean, p_logvar = (prior[..., :zc].astype(jnp.float32), prior[..., zc:2 * zc].astype(jnp.float32))
    q_mean = q_logvar = None
    if act is not None:
      q = checkpointed(self.posterior, h, act.astype(h.dtype), enabled=self.remat)  # a block of [h, act]
      q = q.astype(jnp.float32)
      q_mean, q_logvar = q[..., :zc], q[..., zc:]
    h = h + prior[..., 2 * zc:]
    if z is None:
      if act is None:  # a prior draw at temperature t
        z = p_mean + temperature * jnp.exp(0.5 * p_logvar) * jax.random.normal(rng, p_mean.shape)
      elif rng is None:  # the posterior-mean path
        z = q_mean
      else:
        z = q_mean + jnp.exp(0.5 * q_logvar) * jax.random.normal(rng, q_mean.shape)
    h = checkpointed(self.resnet, h + self.z_proj(z.astype(self.dtype)), enabled=self.remat)
    return h, (q_mean, q_logvar, p_mean, p_logvar, z)


def _over_positions(e, h):
  """A per-example vector [B, F] shaped to add at every position of h [B, *spatial, F]."""
  return e.reshape(e.shape[0], *([1] * (h.ndim - 2)), e.shape[-1])


def _upsample(h, factor: int):
  for axis in range(1, h.ndim - 1):
    h = jnp.repeat(h, factor, axis=axis)
  return h


def space_to_depth(x, block: int):
  """[B, *spatial, C] -> [B, *(spatial / block), C * block^d], the inverse of conv.depth_to_space."""
  if block == 1:
    return x
  b, *spatial, channels = x.shape
  d = len(spatial)
  x = x.reshape(b, *[n for s in spatial for n in (s // block, block)], channels)
  order = [0] + [1 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)] + [1 + 2 * d]
  return x.transpose(order).reshape(b, *[s // block for s in spatial], channels * block**d)


def _flatten(groups) -> jax.Array:
  return jnp.concatenate([g.reshape(g.shape[0], -1) for g in groups], axis=-1)


class HierarchicalVAE(nn.Module):
  """The VAE interface over a top-down hierarchy (see the module docstring)."""
  cfg: HVAEConfig
  data_shape: tuple[int, ...]    # the data's [*spatial, channels]
  output_channels: int           # decoder outputs per position (channels x the likelihood's outputs per channel)
  condition_size: int = 0
  stochastic: bool = True
  autoregressive: bool = False

  @property
  def stage_shapes(self) -> list[tuple[int, ...]]:
    """The spatial shape of every stage, stage 0 at the data's resolution."""
    spatial = [s // self.cfg.patch for s in self.data_shape[:-1]]
    return [tuple(s // self.cfg.downsample**i for s in spatial) for i in range(len(self.cfg.decoder_groups))]

  @property
  def group_stages(self) -> list[int]:
    """The stage of every group, in top-down order (lowest resolution first)."""
    return [s for s in reversed(range(len(self.cfg.decoder_groups))) for _ in range(self.cfg.decoder_groups[s])]

  @property
  def group_sizes(self) -> tuple[int, ...]:
    """Latent units per group, in the order of z."""
    return tuple(math.prod(self.stage_shapes[s]) * self.cfg.latent_channels for s in self.group_stages)

  @property
  def latent_size(self) -> int:
    return sum(self.group_sizes)

  def setup(self):
    cfg = self.cfg
    dtype = COMPUTE_DTYPES[cfg.compute_dtype]
    activation = getattr(nn, cfg.activation)
    block = functools.partial(Block, conv=conv_for(cfg.remat))
    num_blocks = sum(cfg.encoder_blocks) + sum(cfg.decoder_groups)
    d = len(self.data_shape) - 1
    self.stem = nn.Conv(cfg.width, (cfg.kernel_size,) * d, padding="SAME", dtype=dtype)
    self.encoder_blocks = [[block(cfg.bottleneck, cfg.width, cfg.kernel_size, activation, last_scale=1.0 / num_blocks,
                                  dtype=dtype) for _ in range(n)] for n in cfg.encoder_blocks]
    self.groups = [Group(cfg.width, cfg.bottleneck, cfg.latent_channels, cfg.kernel_size, activation, num_blocks,
                         block, dtype, remat=cfg.remat) for _ in self.group_stages]
    self.stage_bias = [self.param(f"stage_bias_{s}", nn.initializers.zeros, (*shape, cfg.width))
                       for s, shape in enumerate(self.stage_shapes)]
    if self.condition_size:
      self.embed_input = nn.Dense(cfg.width, dtype=dtype)
      self.embed_stages = [nn.Dense(cfg.width, dtype=dtype) for _ in self.stage_shapes]
    self.head = nn.Conv(self.output_channels * cfg.patch**d, (1,) * d, dtype=dtype,
                        conv_general_dilated=conv_for(cfg.remat))
    self.dtype = dtype
    self.activation = activation

  def _condition(self, c):
    return required_condition(self.condition_size, c)

  def bottom_up(self, x, c):
    """The bottom-up activation at every stage.  [B, *spatial, C] -> list of [B, *stage_shape, width]"""
    h = self.stem(space_to_depth(2.0 * x - 1.0, self.cfg.patch).astype(self.dtype))
    if c is not None:
      h = h + _over_positions(self.embed_input(c.astype(self.dtype)), h)
    acts = []
    for s, blocks in enumerate(self.encoder_blocks):
      if s:
        window = (self.cfg.downsample,) * (h.ndim - 2)
        h = nn.avg_pool(h, window, strides=window)
      for b in blocks:
        h = checkpointed(b, h, enabled=self.cfg.remat)
      acts.append(h)
    return acts

  def top_down(self, batch: int, c, acts=None, rng=None, zs=None, temperature: float = 1.0, prior_groups: int = 0):
    """Visits the groups top-down; returns the output logits (float32) and each group's statistics.
    prior_groups: the last (lowest) that many groups take z from their prior at `temperature` even given acts;
    their posterior statistics are reported as the prior's, so they add nothing to log p(z) - log q(z)."""
    h, stats, g = None, [], 0
    first_prior = len(self.group_stages) - prior_groups
    for s in reversed(range(len(self.stage_shapes))):
      bias = jnp.broadcast_to(self.stage_bias[s].astype(self.dtype), (batch, *self.stage_bias[s].shape))
      h = bias if h is None else _upsample(h, self.cfg.downsample) + bias
      if c is not None:
        h = h + _over_positions(self.embed_stages[s](c.astype(self.dtype)), h)
      for _ in range(self.cfg.decoder_groups[s]):
        from_prior = acts is not None and g >= first_prior
        args = (h, None if acts is None or from_prior else acts[s],
                None if rng is None else jax.random.fold_in(rng, g), None if zs is None else zs[g], temperature)
        h, st = checkpointed(self.groups[g], *args, enabled=self.cfg.remat)
        if from_prior:
          st = (st[2], st[3], *st[2:])
        stats.append(st)
        g += 1
    head = lambda m, h, activation=self.activation: m(activation(h))
    out = checkpointed(self.head, h, method=head, enabled=self.cfg.remat)
    return depth_to_space(out.astype(jnp.float32), self.cfg.patch), stats

  def _split(self, z):
    """[B, latent_size] -> each group's z [B, *stage_shape, latent_channels]."""
    out, start = [], 0
    for s, size in zip(self.group_stages, self.group_sizes):
      out.append(z[:, start:start + size].reshape(z.shape[0], *self.stage_shapes[s], self.cfg.latent_channels))
      start += size
    return out

  def encode(self, x, c=None):
    c = self._condition(c)
    _, stats = self.top_down(x.shape[0], c, acts=self.bottom_up(x, c))
    return _flatten([s[0] for s in stats]), _flatten([s[1] for s in stats])

  def decode(self, z, c=None, x=None):
    logits, _ = self.top_down(z.shape[0], self._condition(c), zs=self._split(z))
    return logits

  def __call__(self, x, c, rng, prior_groups: int = 0, prior_temperature: float = 0.0) -> VAEOutput:
    """prior_groups > 0: the lowest that many groups decode from their prior at prior_temperature (0: its
    mean) instead of the posterior, and leave log p(z) - log q(z) (the L^{>k} of Havtorn et al. 2021)."""
    c = self._condition(c)
    acts = self.bottom_up(x, c)
    logits, stats = self.top_down(x.shape[0], c, acts=acts, rng=rng if self.stochastic else None,
                                  temperature=prior_temperature, prior_groups=prior_groups)
    q_mean, q_logvar, p_mean, p_logvar, z = (_flatten([s[i] for s in stats]) for i in range(5))
    if not self.stochastic:
      return VAEOutput(mean=q_mean, logvar=None, z=q_mean, logits=logits)
    return VAEOutput(mean=q_mean, logvar=q_logvar, z=z, logits=logits, prior_mean=p_mean, prior_logvar=p_logvar)

  def generate(self, rng, c=None, num_samples: Optional[int] = None, temperature: float = 1.0):
    """z_l ~ N(mu_p, (temperature sigma_p)^2) group by group, decoded: logits."""
    n = c.shape[0] if c is not None else num_samples
    logits, _ = self.top_down(n, self._condition(c), rng=rng, temperature=temperature)
    return logits


def build_model(cfg: HVAEConfig, spec, output_shape: tuple[int, ...], condition_size: int, stochastic: bool):
  spatial = output_shape[:-1]
  factor = cfg.patch * cfg.downsample ** (len(cfg.decoder_groups) - 1)
  if any(s % factor for s in spatial):
    raise ConfigError(
        f"model.decoder_groups has {len(cfg.decoder_groups)} stages with model.downsample={cfg.downsample} and "
        f"model.patch={cfg.patch}: the lowest resolution is the data's {list(spatial)} divided by {factor}, which "
        "does not divide it. Use fewer stages, another downsample or patch, or data.resize to a size it divides.")
  # Tuples, not the config's lists: a hashable module shares its compiled programs (models.init_params).
  frozen = replace(cfg, encoder_blocks=tuple(cfg.encoder_blocks), decoder_groups=tuple(cfg.decoder_groups))
  return HierarchicalVAE(frozen, tuple(spec.shape), output_shape[-1], condition_size, stochastic)


def check_config(cfg: Config) -> None:
  m = cfg.model
  for key in ("width", "bottleneck", "latent_channels", "downsample", "patch", "kernel_size"):
    check(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "must be at least 1")
  check(len(m.encoder_blocks) == len(m.decoder_groups) >= 1, "model.encoder_blocks", m.encoder_blocks,
        f"needs one entry per stage, as model.decoder_groups={list(m.decoder_groups)} has")
  check(all(n >= 0 for n in m.encoder_blocks), "model.encoder_blocks", m.encoder_blocks, "counts must be >= 0")
  check(all(n >= 0 for n in m.decoder_groups) and sum(m.decoder_groups) >= 1, "model.decoder_groups",
        m.decoder_groups, "counts must be >= 0, with at least one group in all")
  check(m.compute_dtype in COMPUTE_DTYPES, "model.compute_dtype", m.compute_dtype, f"use one of {list(COMPUTE_DTYPES)}")
  groups = sum(m.decoder_groups)
  check(all(k < groups for k in cfg.evaluation.llr_groups), "evaluation.llr_groups", list(cfg.evaluation.llr_groups),
        f"each llr score keeps at least one of the {groups} groups on the posterior: use k from 1 to {groups - 1}")
  check(Regularizer(cfg.objective.regularizer) != Regularizer.tcvae, "objective.regularizer",
        cfg.objective.regularizer, "the total-correlation estimate needs one Gaussian posterior; model=hvae has a "
        "hierarchy of them: use kl or capacity")


register(ModelFamily("hvae", HVAEConfig, build=None, model=build_model,
                     encodings=frozenset(Encoding) - {Encoding.tokens}, host_loop_on_cpu=True, check=check_config))
