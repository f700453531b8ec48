"""The GRU family for token sequences (`model=gru`, molecules): embedding, a bidirectional GRU encoder, and
an autoregressive GRU decoder that sees (z, condition) at every step, with its ancestral sampler."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvae_jax.config import Config, ModelConfig, check
from cvae_jax.data import Encoding
from cvae_jax.data.smiles import BOS, PAD
from cvae_jax.models.registry import ModelFamily, register
from cvae_jax.models.vae import VAE, concat


@dataclass
class GRUConfig(ModelConfig):
  arch: str = "gru"
  embedding_size: int = 32  # width of the token embedding
  rnn_size: int = 256       # GRU width (the encoder runs one each way, each half this wide)
  # Stacked GRU layers in the decoder, each rnn_size wide (MOSES's VAE: 3 of 512). (z, c) enters the first
  # layer's input; every layer starts from the same state, a function of (z, c), as in MOSES's VAE.
  decoder_layers: int = 1
  # Word dropout (Bowman et al. 2016): in training, each previous-token input of the decoder (after the start
  # token) is replaced by a zero embedding with this probability, so the decoder must lean on z for the string.
  # Evaluation, scoring and sampling always see every token.
  word_dropout: float = 0.0


class Affine(nn.Module):
  """The kernel [in_features, features] and bias of an nn.Dense under the same names and initializers,
  returned to be used rather than applied."""
  in_features: int
  features: int
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self):
    kernel = self.param("kernel", self.kernel_init, (self.in_features, self.features))
    return kernel, self.param("bias", nn.initializers.zeros_init(), (self.features,)) if self.use_bias else 0.0


def gru_update(h, x_r, x_z, x_n, w_hr, w_hz, w_hn, b_hn):
  """One step of flax's nn.GRUCell given the input projections x_r, x_z, x_n (biases included)."""
  r = jax.nn.sigmoid(x_r + h @ w_hr)
  u = jax.nn.sigmoid(x_z + h @ w_hz)
  n = jnp.tanh(x_n + r * (h @ w_hn + b_hn))
  return (1.0 - u) * n + u * h


def recurrent_kernels(size: int):
  """The hidden-to-hidden kernels of nn.GRUCell (hr, hz without bias, hn with), under its names."""
  orthogonal = nn.initializers.orthogonal()
  (w_hr, _), (w_hz, _), (w_hn, b_hn) = (Affine(size, size, use_bias=gate == "hn", kernel_init=orthogonal,
                                               name=gate)() for gate in ("hr", "hz", "hn"))
  return w_hr, w_hz, w_hn, b_hn


class TokenGRU(nn.Module):
  """A GRU over token ids whose input at step t is [embedding of token t, context], the context being one
  vector per sequence ((z, c) for the decoder) or absent. Its equations and parameters are flax's
  nn.GRUCell's (ir, iz, in with biases, hr, hz without, hn with; the same shapes and initializers), and its
  outputs equal nn.RNN(nn.GRUCell) fed the concatenated inputs, to float rounding (tests/test_molecules.py).

  It does less arithmetic. The input projection [e_t, s] @ W = e_t @ W_e + s @ W_s is a row of the [V, H]
  table embedding @ W_e, looked up per step, plus s @ W_s, computed once per sequence. Only the three
  [B, H] x [H, H] recurrent matmuls remain inside the lax.scan. Hoisting the input matmuls out of the scan
  as one big matmul, or fusing the three recurrent kernels into one, measured slower on XLA:CPU
  (experiments/molecules/README.md, Speed).

  __call__(carry [B, H], tokens [B, T], embedding [V, E], context [B, S] or None) -> (last carry,
  outputs [B, T, H]). With lengths [B], the positions at and after a sequence's length leave its carry as
  it was (the carry is the state after its last token); reverse=True runs from the end (the backward half
  of a bidirectional GRU); keep [B, T] (word dropout) zeroes the embedding where False. tokens [B] is one
  step: -> (new carry, new carry)."""
  features: int

  @nn.compact
  def __call__(self, carry, tokens, embedding, context=None, lengths=None, reverse: bool = False, keep=None):
    size, embedding_size = self.features, embedding.shape[-1]
    context_size = 0 if context is None else context.shape[-1]
    inputs = [Affine(embedding_size + context_size, size, name=gate)() for gate in ("ir", "iz", "in")]
    kernels = recurrent_kernels(size)
    tables = [embedding @ kernel[:embedding_size] for kernel, _ in inputs]  # [V, H] each
    per_sequence = [bias if context is None else context @ kernel[embedding_size:] + bias for kernel, bias in inputs]

    def step(h, position):
      token, valid, kept = position
      x_r, x_z, x_n = (table[token] for table in tables)
      if kept is not None:
        x_r, x_z, x_n = (x * kept[:, None] for x in (x_r, x_z, x_n))
      new = gru_update(h, x_r + per_sequence[0], x_z + per_sequence[1], x_n + per_sequence[2], *kernels)
      if valid is not None:
        new = jnp.where(valid[:, None], new, h)
      return new, new

    if tokens.ndim == 1:
      return step(carry, (tokens, None, None))
    valid = None if lengths is None else jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    kept = None if keep is None else keep.astype(carry.dtype)
    carry, outputs = jax.lax.scan(step, carry, jax.tree.map(lambda a: None if a is None else a.T,
                                                               (tokens, valid, kept)), reverse=reverse)
    return carry, jnp.swapaxes(outputs, 0, 1)


class DenseGRU(nn.Module):
  """A GRU over vector inputs, flax's nn.GRUCell's equations and parameters: a stacked decoder's upper
  layers, fed the layer below's outputs. __call__(carry [B, H], inputs [B, T, D]) -> (last carry, outputs
  [B, T, H]); the input projections of all steps are one matmul outside the scan. inputs [B, D] is one
  step: -> (new carry, new carry)."""
  features: int

  @nn.compact
  def __call__(self, carry, inputs):
    projections = [Affine(inputs.shape[-1], self.features, name=gate)() for gate in ("ir", "iz", "in")]
    kernels = recurrent_kernels(self.features)
    x_r, x_z, x_n = (inputs @ kernel + bias for kernel, bias in projections)
    if inputs.ndim == 2:
      new = gru_update(carry, x_r, x_z, x_n, *kernels)
      return new, new

    def step(h, x):
      new = gru_update(h, *x, *kernels)
      return new, new

    carry, outputs = jax.lax.scan(step, carry, tuple(jnp.swapaxes(x, 0, 1) for x in (x_r, x_z, x_n)))
    return carry, jnp.swapaxes(outputs, 0, 1)


class GRUEncoder(nn.Module):
  """Token ids [B, T] -> embedding -> a GRU each way over the tokens up to the end token -> [both final
  states, c] -> (mean, logvar)."""
  vocab_size: int
  embedding_size: int
  rnn_size: int  # both directions together
  latent_size: int

  @nn.compact
  def __call__(self, x, c=None):
    x = x.astype(jnp.int32)
    lengths = jnp.sum(x != PAD, axis=-1)  # the tokens and the end token
    half = self.rnn_size // 2
    embedding = nn.Embed(self.vocab_size, self.embedding_size).embedding
    zeros = jnp.zeros((x.shape[0], half), embedding.dtype)
    # The names are the ones nn.Bidirectional(nn.RNN(nn.GRUCell)) gives these layers, so saved runs load.
    forward, _ = TokenGRU(half, name="GRUCell_0")(zeros, x, embedding, lengths=lengths)
    backward, _ = TokenGRU(half, name="GRUCell_1")(zeros, x, embedding, lengths=lengths, reverse=True)
    h = concat(jnp.concatenate([forward, backward], axis=-1), c)
    return nn.Dense(self.latent_size, name="mean")(h), nn.Dense(self.latent_size, name="logvar")(h)


class GRUDecoder(nn.Module):
  """Autoregressive p(x | z[, c]) = prod_t p(x_t | x_<t, z, c): a GRU whose first state is a function of
  (z, c) and whose input at step t is the embedding of x_(t-1) (the start token at t = 0) beside (z, c);
  with layers > 1, more GRUs stacked on its outputs, starting from the same state. The carry is a tuple of
  the layers' states. Training and scoring feed the true tokens (teacher forcing); `step` runs one position
  for sampling.
  With word_dropout > 0 and a 'dropout' rng given to apply (the train step gives one), each input token after
  the start token is dropped (a zero embedding) with that probability."""
  vocab_size: int
  embedding_size: int
  rnn_size: int
  word_dropout: float = 0.0
  layers: int = 1

  def setup(self):
    self.embed = nn.Embed(self.vocab_size, self.embedding_size)
    self.initial = nn.Dense(self.rnn_size)
    self.cell = TokenGRU(self.rnn_size)
    self.upper = [DenseGRU(self.rnn_size) for _ in range(self.layers - 1)]
    self.logits = nn.Dense(self.vocab_size)

  def start(self, z, c=None):
    return (jnp.tanh(self.initial(concat(z, c))),) * self.layers

  def __call__(self, z, c=None, x=None):
    if x is None:
      raise ValueError("the GRU decoder scores a given sequence x; sample with models.sample_tokens")
    x = x.astype(jnp.int32)
    previous = jnp.concatenate([jnp.full((x.shape[0], 1), BOS, jnp.int32), x[:, :-1]], axis=1)
    keep = None
    if self.word_dropout > 0 and self.has_rng("dropout"):
      keep = ~jax.random.bernoulli(self.make_rng("dropout"), self.word_dropout, previous.shape)
      keep = keep.at[:, 0].set(True)  # the start token stays
    first = self.start(z, c)
    _, outputs = self.cell(first[0], previous, self.embed.embedding, concat(z, c), keep=keep)
    for layer, h0 in zip(self.upper, first[1:]):
      _, outputs = layer(h0, outputs)
    return self.logits(outputs)  # [B, T, V]

  def step(self, carry, token, z, c=None):
    h, _ = self.cell(carry[0], token, self.embed.embedding, concat(z, c))
    states = [h]
    for layer, state in zip(self.upper, carry[1:]):
      h, _ = layer(state, h)
      states.append(h)
    return tuple(states), self.logits(h)


def sample_tokens(model: VAE, params, z: jax.Array, c: Optional[jax.Array], key: jax.Array, length: int,
                  temperature: float = 1.0) -> jax.Array:
  """Ancestral sampling from the autoregressive decoder: x_t ~ p(x_t | x_<t, z, c) with the logits divided by
  `temperature` (1: the model's distribution; 0: greedy, the most likely token at each step), `length`
  positions (everything after the first end token is ignored by Vocabulary.decode).  [B, length] ids"""
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
  apply = lambda *args, method: model.apply({"params": params}, *args, method=method)

  def position(state, key_t):
    carry, token = state
    carry, logits = apply(carry, token, z, c, method=VAE.decoder_step)
    token = jnp.argmax(logits, -1) if temperature == 0 else jax.random.categorical(key_t, logits / temperature)
    return (carry, token), token

  first = jnp.full((z.shape[0],), BOS, jnp.int32)
  _, tokens = jax.lax.scan(position, (apply(z, c, method=VAE.decoder_start), first), jax.random.split(key, length))
  return tokens.T


def build(cfg: GRUConfig, spec, output_shape):
  return (GRUEncoder(len(spec.vocab), cfg.embedding_size, cfg.rnn_size, cfg.latent_size),
          GRUDecoder(len(spec.vocab), cfg.embedding_size, cfg.rnn_size, cfg.word_dropout, cfg.decoder_layers))


def check_config(cfg: Config) -> None:
  m = cfg.model
  check(m.embedding_size >= 1 and m.rnn_size >= 2, "model.rnn_size", m.rnn_size,
        "model.embedding_size must be >= 1 and model.rnn_size >= 2")
  check(m.decoder_layers >= 1, "model.decoder_layers", m.decoder_layers, "the decoder needs at least one GRU layer")
  check(0.0 <= m.word_dropout < 1.0, "model.word_dropout", m.word_dropout,
        "the probability of dropping a decoder input token must be in [0, 1)")


register(ModelFamily("gru", GRUConfig, build, encodings=frozenset({Encoding.tokens}), autoregressive=True,
                     check=check_config))
