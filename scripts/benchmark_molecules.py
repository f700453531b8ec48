"""Training throughput of the molecule CVAE (model=gru), molecules per second, against the same model
built from flax's nn.RNN(nn.GRUCell), in one run.

  python scripts/benchmark_molecules.py                          # rnn_size 256 and 512, batch 128
  python scripts/benchmark_molecules.py --rnn-size 256 --batch-size 128 512 --epochs 5
  python scripts/benchmark_molecules.py --rnn-size 256 512 --decoder-layers 1 2 3   # stacked decoders

Both variants are the molecules experiment's model (conf/experiment/molecules_cvae.yaml: embedding 32,
bidirectional GRU encoder of rnn_size / 2 each way, 64-d z, GRU decoder of rnn_size fed (z, 6 properties)
at every step) with the same parameters: ours runs models/gru.py's TokenGRU, the reference runs the textbook
layers (embedding, concatenation, nn.RNN(nn.GRUCell)), which compute the same function. Each trains by the
project's compiled epoch (one lax.scan per epoch, as `python -m cvae_jax.train` runs it) on random token
ids of MOSES's shape (53 slots, 27 tokens); the recurrence runs over every slot, so the speed does not
depend on the tokens. The variants' epochs run round-robin (scripts/benchmark.py's `interleaved`), and
molecules/s is the median over the timed epochs. Their first-epoch losses agree to float rounding, which
checks that they train the same model. The reference is the one-layer decoder; rows of a stacked decoder
(--decoder-layers above 1) time ours alone, in the same round-robin as the one-layer rows of their size.
"""
from __future__ import annotations

import argparse
import json
import platform
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmark import interleaved  # scripts/benchmark.py
from cvae_jax import schema, xla_cpu
from cvae_jax.data import DatasetSpec, Encoding
from cvae_jax.data.smiles import BOS, PAD
from cvae_jax.data.spec import Condition, Modality
from cvae_jax.engine import epoch
from cvae_jax.models.gru import GRUDecoder
from cvae_jax.models.vae import concat
from cvae_jax.tasks.density import DensityTask

TASK = DensityTask()
SLOTS, VOCAB, PROPERTIES = 53, 27, 6  # the MOSES subset's token shape and condition (experiments/molecules)


class ReferenceEncoder(nn.Module):
  """GRUEncoder written with flax's layers: embed, then nn.Bidirectional(nn.RNN(nn.GRUCell))."""
  vocab_size: int
  embedding_size: int
  rnn_size: int
  latent_size: int

  @nn.compact
  def __call__(self, x, c=None):
    x = x.astype(jnp.int32)
    half = self.rnn_size // 2
    rnn = nn.Bidirectional(nn.RNN(nn.GRUCell(half)), nn.RNN(nn.GRUCell(half)), return_carry=True)
    (forward, backward), _ = rnn(nn.Embed(self.vocab_size, self.embedding_size)(x), seq_lengths=jnp.sum(x != PAD, -1))
    h = concat(jnp.concatenate([forward, backward], axis=-1), c)
    return nn.Dense(self.latent_size, name="mean")(h), nn.Dense(self.latent_size, name="logvar")(h)


class ReferenceDecoder(GRUDecoder):
  """GRUDecoder written with flax's layers: the embedded previous token beside (z, c) at every step, into
  nn.RNN(nn.GRUCell)."""

  def setup(self):
    self.embed = nn.Embed(self.vocab_size, self.embedding_size)
    self.initial = nn.Dense(self.rnn_size)
    self.cell = nn.GRUCell(self.rnn_size)
    self.rnn = nn.RNN(self.cell)
    self.logits = nn.Dense(self.vocab_size)

  def __call__(self, z, c=None, x=None):
    x = x.astype(jnp.int32)
    previous = jnp.concatenate([jnp.full((x.shape[0], 1), BOS, jnp.int32), x[:, :-1]], axis=1)
    zc = concat(z, c)
    inputs = jnp.concatenate([self.embed(previous), jnp.broadcast_to(zc[:, None], (*x.shape, zc.shape[-1]))], -1)
    return self.logits(self.rnn(inputs, initial_carry=self.start(z, c)[0]))


def config(rnn_size: int, batch_size: int, decoder_layers: int = 1):
  return schema.structured({
      "model": {"arch": "gru", "kind": "cvae", "latent_size": 64, "embedding_size": 32, "rnn_size": rnn_size,
                "decoder_layers": decoder_layers},
      "data": {"name": "moses"}, "objective": {"likelihood": "categorical", "kl_schedule": "linear", "kl_warmup_epochs": 1},
      "optimizer": {"learning_rate": 1e-3, "grad_clip_norm": 50.0}, "training": {"batch_size": batch_size}})


def molecules(n: int, seed: int = 0):
  """n random molecules of MOSES's shape: lengths 20..52 tokens, then the end token (id 2) and padding."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(20, SLOTS, size=n)
  tokens = rng.integers(3, VOCAB, size=(n, SLOTS)).astype(np.uint8)
  tokens[np.arange(n), lengths] = 2
  tokens[np.arange(SLOTS)[None] > lengths[:, None]] = PAD
  return jnp.asarray(tokens), jnp.asarray(rng.normal(size=(n, PROPERTIES)).astype(np.float32))


def epoch_loop(cfg, spec, tokens, conditions, reference: bool):
  model = TASK.build_model(cfg, spec)
  if reference:
    m = cfg.model
    model = model.clone(encoder=ReferenceEncoder(VOCAB, m.embedding_size, m.rnn_size, m.latent_size),
                        decoder=ReferenceDecoder(VOCAB, m.embedding_size, m.rnn_size))
  state = TASK.initial_state(cfg, model, spec)
  run = epoch.make_train_epoch(TASK.plan(cfg, model, spec, len(tokens)))
  n = (len(tokens) // cfg.training.batch_size) * cfg.training.batch_size
  losses = []

  def run_epoch(e):
    nonlocal state
    state, metrics = run(state, tokens, conditions, e)
    losses.append(float(jnp.mean(jax.block_until_ready(metrics)["loss"])))  # the mean over the steps
    return n

  return run_epoch, losses


def main(argv: Optional[list[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rnn-size", nargs="+", type=int, default=[256, 512])
  parser.add_argument("--batch-size", nargs="+", type=int, default=[128])
  parser.add_argument("--decoder-layers", nargs="+", type=int, default=[1],
                      help="GRU layers in the decoder (the flax reference runs with 1)")
  parser.add_argument("--molecules", type=int, default=12800, help="training molecules per epoch")
  parser.add_argument("--epochs", type=int, default=4, help="timed epochs per variant (after one warm-up)")
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args(argv)
  xla_cpu.use_fast_scheduler()
  spec = DatasetSpec(name="moses", shape=(SLOTS,), condition_size=PROPERTIES, encoding=Encoding.tokens,
                     modality=Modality.tokens, condition=Condition.vector, vocab=tuple(f"t{i}" for i in range(VOCAB)))
  tokens, conditions = molecules(args.molecules)
  rows = []
  print(f"{jax.devices()[0].device_kind}, {platform.processor() or platform.machine()}; "
        f"{args.molecules} molecules per epoch, median of {args.epochs} epochs after one warm-up")
  print("| rnn_size | decoder layers | batch | TokenGRU molecules/s | nn.RNN(nn.GRUCell) molecules/s | ratio "
        "| first-epoch loss, both |")
  print("|---|---|---|---|---|---|---|")
  for rnn_size in args.rnn_size:
    for batch_size in args.batch_size:
      variants, losses = {}, {}
      for layers in dict.fromkeys(args.decoder_layers):  # each count once, in the order given
        variants[layers], losses[layers] = epoch_loop(config(rnn_size, batch_size, layers), spec, tokens, conditions,
                                                      reference=False)
      if 1 in args.decoder_layers:
        variants["reference"], losses["reference"] = epoch_loop(config(rnn_size, batch_size), spec, tokens,
                                                                conditions, reference=True)
      timed = interleaved(variants, args.epochs)
      for layers in dict.fromkeys(args.decoder_layers):
        row = {"rnn_size": rnn_size, "decoder_layers": layers, "batch_size": batch_size,
               "ours_molecules_per_s": timed[layers]["images_per_s"], "first_epoch_loss": [losses[layers][0]]}
        reference = "- | -"  # the flax reference is the one-layer decoder
        if layers == 1:
          row["reference_molecules_per_s"] = timed["reference"]["images_per_s"]
          row["first_epoch_loss"].append(losses["reference"][0])
          row["ratio"] = row["ours_molecules_per_s"] / row["reference_molecules_per_s"]
          reference = f"{row['reference_molecules_per_s']:.0f} | {row['ratio']:.2f}x"
        rows.append(row)
        print(f"| {rnn_size} | {layers} | {batch_size} | {row['ours_molecules_per_s']:.0f} | {reference} | "
              f"{', '.join(f'{loss:.5f}' for loss in row['first_epoch_loss'])} |", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": str(jax.devices()[0]), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
