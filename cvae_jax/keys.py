"""Random keys as a pure function of (seed, stream, parts): resume needs no saved RNG state.

Each purpose has its own stream, so e.g. changing the evaluation batch size never changes training.
Below a stream key, every further key is a named part (an IntEnum member of the module that draws it,
such as figures.Figure.SAMPLES) or an index (the step, the epoch, a chunk, a class). The numbers of
the streams and of the named parts are part of every drawn value: changing one changes the results.
"""
import enum

import jax


class Stream(enum.IntEnum):
  PARAMS = 0       # parameter initialization
  REPARAM = 1      # z = mean + sigma * eps in the train step, folded with the step
  DATA_ORDER = 2   # minibatch permutation, folded with the epoch
  BINARIZE = 3     # dynamic binarization in the train step, folded with the step
  EVAL = 4         # evaluation samples (fixed: every evaluation sees the same eps)
  FIGURES = 5      # fixed z and eps for figures and generated samples
  DROPOUT = 6      # the decoder's word dropout in the train step, folded with the step


def stream_key(seed, stream: Stream, *parts) -> jax.Array:
  """fold_in(key(seed), stream), then each part in turn. seed and the index parts may be traced."""
  return fold(jax.random.fold_in(jax.random.key(seed), int(stream)), *parts)


def fold(key: jax.Array, *parts) -> jax.Array:
  """The key of a named part (or an index) below `key`, one fold_in per part."""
  for part in parts:
    key = jax.random.fold_in(key, int(part) if isinstance(part, enum.IntEnum) else part)
  return key
