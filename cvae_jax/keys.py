"""Random keys as a pure function of (seed, stream, step): resume needs no saved RNG state.

Each purpose has its own stream, so e.g. changing the evaluation batch size never changes training.
Inside a step the stream key is folded with the global step (or epoch for the data order).
"""
import enum

import jax


class Stream(enum.IntEnum):
  PARAMS = 0       # parameter initialization
  REPARAM = 1      # z = mean + sigma * eps in the train step, folded with the step
  DATA_ORDER = 2   # minibatch permutation, folded with the epoch
  BINARIZE = 3     # dynamic binarization in the train step, folded with the step
  EVAL = 4         # evaluation samples (fixed: every evaluation sees the same eps)
  FIGURES = 5      # fixed z and eps for figures


def stream_key(seed: int, stream: Stream) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), int(stream))
