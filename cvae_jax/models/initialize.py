"""Parameters initialized by one compiled program."""
import functools

import flax.linen as nn
import jax


def init_params(module: nn.Module, rngs, *args):
  """`module.init(rngs, *args)["params"]`, compiled as one program. Run eagerly, Flax's init compiles every
  op of every layer as a program of its own, which made initializing 1.3-2.3x slower on CPU
  (experiments/speed/README.md); with XLA's default optimizations the parameters are the same bit for bit.
  A hashable module is a static argument, so modules of equal configs share the
  program (rngs and args are traced: every seed shares it too); one with an unhashable attribute (a list)
  is compiled for this call only."""
  try:
    hash(module)
  except TypeError:
    return jax.jit(lambda rngs, *args: module.init(rngs, *args)["params"])(rngs, *args)
  return _shared_init(module, rngs, *args)


@functools.partial(jax.jit, static_argnums=0)
def _shared_init(module: nn.Module, rngs, *args):
  return module.init(rngs, *args)["params"]
