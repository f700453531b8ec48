"""Rematerialization (`model.remat`) that cuts memory on every backend.

`checkpointed(module, *args)` calls the module keeping only its float inputs for the backward pass, which
recomputes the activations: jax.checkpoint's trade. On GPU and TPU it is nn.checkpoint (jax.checkpoint) as is.
On CPU jax.checkpoint saves nothing (the hierarchical VAE at 256 px: 7.3 GiB of temporaries, 7.0 without
remat). It orders the recomputation after the output cotangent with an optimization barrier, which XLA:CPU
strips before scheduling (cse_barrier_expander); and XLA:CPU's scheduler emits every weight gradient at the
end of the program, so every recomputed activation lives to the end. There the whole backward of the call
(recomputation, input cotangents, parameter gradients) runs inside one XLA conditional that takes the output
cotangent, which XLA can neither hoist nor split: 2.4x less at every size of the resolution benchmark. The
conditional's other branch (taken when the output cotangent's first element is NaN, where the gradients would
be non-finite anyway) returns NaN gradients.

`conv_general_dilated` is lax.conv_general_dilated with gradients computed as convolutions in the forward
one's layout; modules run inside `checkpointed` on CPU take it as their nn.Conv's `conv_general_dilated`.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def backward_in_conditional() -> bool:
  """Whether `checkpointed` runs the backward in a conditional (XLA:CPU) rather than under jax.checkpoint."""
  return jax.default_backend() == "cpu"


def _is_float(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact)


def checkpointed(module: nn.Module, *args, method: Optional[Callable] = None, enabled: bool = True):
  """method(module, *args) (default module(*args)), its activations recomputed in the backward pass (a plain
  call when not `enabled`). Only the float arguments are differentiated; the others (keys, None, Python
  numbers) are held as they are."""
  call = method if method is not None else (lambda m, *a: m(*a))
  if not enabled:
    return call(module, *args)
  if not backward_in_conditional():
    return nn.checkpoint(call)(module, *args)
  proto = module.clone(parent=None)
  is_float = [_is_float(a) for a in args]
  held = tuple(a for a, f in zip(args, is_float) if not f)

  def merge(floats, held):
    floats, held = iter(floats), iter(held)
    return [next(floats) if f else next(held) for f in is_float]

  def fn(m, *floats):
    return call(m, *merge(floats, held))

  def fwd(m, *floats):
    return fn(m, *floats), (m.variables, floats, held)

  def bwd(residuals, ct):
    variables, floats, held = residuals

    def backward(variables, floats, ct):
      _, vjp = jax.vjp(lambda v, *f: proto.apply(v, *merge(f, held), method=call), variables, *floats)
      grads, *input_grads = vjp(ct)
      return {"params": grads["params"]}, tuple(input_grads)

    def nans(variables, floats, ct):
      shapes = jax.eval_shape(backward, variables, floats, ct)
      return jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)

    first = next(x for x in jax.tree.leaves(ct) if _is_float(x)).reshape(-1)[0]
    grads, input_grads = lax.cond(jnp.isnan(first), nans, backward, variables, floats, ct)
    return (grads, *input_grads)

  return nn.custom_vjp(fn, fwd, bwd)(module, *(a for a, f in zip(args, is_float) if f))


def _conv(x, kernel, padding):
  """Stride-1 convolution [B, *S, I] x [*K, I, O] -> [B, *S, O] with explicit padding."""
  s = "HWD"[:x.ndim - 2]
  dims = lax.conv_dimension_numbers(x.shape, kernel.shape, (f"N{s}C", f"{s}IO", f"N{s}C"))
  return lax.conv_general_dilated(x, kernel, (1,) * (x.ndim - 2), padding, dimension_numbers=dims)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _canonical_conv(x, kernel, padding):
  return _conv(x, kernel, padding)


def _canonical_conv_fwd(x, kernel, padding):
  return _conv(x, kernel, padding), (x, kernel)


def _canonical_conv_bwd(padding, residuals, g):
  """Both gradients as convolutions in the forward one's layout (batch, spatial, feature), around explicit
  transposes. Autodiff's transposed convolutions use other layouts, which XLA:CPU rewrites into this one only
  in the program's top level (its ConvCanonicalization visits the entry computation): inside the conditional
  of `checkpointed` they fell to XLA's unoptimized loop convolution, ~10x slower."""
  x, kernel = residuals
  d = x.ndim - 2
  spatial = tuple(range(1, d + 1))
  flipped = jnp.flip(kernel, tuple(range(d))).swapaxes(-1, -2)
  dx = _conv(g, flipped, [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel.shape[:d], padding)])
  dk = _conv(x.transpose((d + 1, *spatial, 0)), g.transpose((*spatial, 0, d + 1)), padding)  # [I, *K, O]
  return dx, dk.transpose((*spatial, 0, d + 1))


_canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
  """lax.conv_general_dilated's signature as nn.Conv calls it, with _canonical_conv's gradients: stride 1,
  no dilation, one group, nn.Conv's layout."""
  d = lhs.ndim - 2
  if (tuple(window_strides) != (1,) * d or any(v not in (None, (1,) * d) for v in (lhs_dilation, rhs_dilation))
      or feature_group_count != 1):
    raise NotImplementedError("only stride-1, undilated, ungrouped convolutions")
  if padding == "SAME":
    padding = [((k - 1) // 2, k // 2) for k in rhs.shape[:d]]
  elif padding == "VALID":
    padding = [(0, 0)] * d
  return _canonical_conv(lhs, rhs, tuple(tuple(p) for p in padding))


def conv_for(remat: bool) -> Callable:
  """The convolution modules run by `checkpointed` use: ours inside XLA:CPU's conditional, else lax's."""
  return conv_general_dilated if remat and backward_in_conditional() else lax.conv_general_dilated
