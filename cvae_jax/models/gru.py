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
  # Word dropout (Bowman et al. 2016): in training, each previous-token input of the decoder (after the start
  # token) is replaced by a zero embedding with this probability, so the decoder must lean on z for the string.
  # Evaluation, scoring and sampling always see every token.
  word_dropout: float = 0.0


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
    rnn = nn.Bidirectional(nn.RNN(nn.GRUCell(half)), nn.RNN(nn.GRUCell(half)), return_carry=True)
    (forward, backward), _ = rnn(nn.Embed(self.vocab_size, self.embedding_size)(x), seq_lengths=lengths)
    h = concat(jnp.concatenate([forward, backward], axis=-1), c)
    return nn.Dense(self.latent_size, name="mean")(h), nn.Dense(self.latent_size, name="logvar")(h)


class GRUDecoder(nn.Module):
  """Autoregressive p(x | z[, c]) = prod_t p(x_t | x_<t, z, c): a GRU whose first state is a function of
  (z, c) and whose input at step t is the embedding of x_(t-1) (the start token at t = 0) beside (z, c).
  Training and scoring feed the true tokens (teacher forcing); `step` runs one position for sampling.
  With word_dropout > 0 and a 'dropout' rng given to apply (the train step gives one), each input token after
  the start token is dropped (a zero embedding) with that probability."""
  vocab_size: int
  embedding_size: int
  rnn_size: int
  word_dropout: float = 0.0

  def setup(self):
    self.embed = nn.Embed(self.vocab_size, self.embedding_size)
    self.initial = nn.Dense(self.rnn_size)
    self.cell = nn.GRUCell(self.rnn_size)
    self.rnn = nn.RNN(self.cell)
    self.logits = nn.Dense(self.vocab_size)

  def start(self, z, c=None):
    return jnp.tanh(self.initial(concat(z, c)))

  def __call__(self, z, c=None, x=None):
    if x is None:
      raise ValueError("the GRU decoder scores a given sequence x; sample with models.sample_tokens")
    x = x.astype(jnp.int32)
    previous = jnp.concatenate([jnp.full((x.shape[0], 1), BOS, jnp.int32), x[:, :-1]], axis=1)
    zc = concat(z, c)
    embedded = self.embed(previous)
    if self.word_dropout > 0 and self.has_rng("dropout"):
      dropped = jax.random.bernoulli(self.make_rng("dropout"), self.word_dropout, previous.shape)
      dropped = dropped.at[:, 0].set(False)  # the start token stays
      embedded = jnp.where(dropped[..., None], 0.0, embedded)
    inputs = jnp.concatenate([embedded, jnp.broadcast_to(zc[:, None], (*x.shape, zc.shape[-1]))], -1)
    return self.logits(self.rnn(inputs, initial_carry=self.start(z, c)))  # [B, T, V]

  def step(self, carry, token, z, c=None):
    carry, h = self.cell(carry, jnp.concatenate([self.embed(token), concat(z, c)], axis=-1))
    return carry, self.logits(h)


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
          GRUDecoder(len(spec.vocab), cfg.embedding_size, cfg.rnn_size, cfg.word_dropout))


def check_config(cfg: Config) -> None:
  m = cfg.model
  check(m.embedding_size >= 1 and m.rnn_size >= 2, "model.rnn_size", m.rnn_size,
        "model.embedding_size must be >= 1 and model.rnn_size >= 2")
  check(0.0 <= m.word_dropout < 1.0, "model.word_dropout", m.word_dropout,
        "the probability of dropping a decoder input token must be in [0, 1)")


register(ModelFamily("gru", GRUConfig, build, encodings=frozenset({Encoding.tokens}), autoregressive=True,
                     check=check_config))
