"""ChemNet (Preuer et al. 2018) in JAX, for the Fréchet ChemNet Distance (FCD) of MOSES.

MOSES computes FCD with `fcd_torch` (insilicomedicine/fcd_torch, MIT): ChemNet's Keras weights ported to
PyTorch, applied to RDKit-canonical SMILES one-hot encoded over 35 symbols and padded to 350 positions; the
activations are the last LSTM's final state (512 units). PyTorch itself is not needed to apply it: this
module reads the same weights file (ChemNet_v0.13_pretrained.pt, PyTorch's legacy pickle format) with the
standard library and runs the same layers in JAX. Install the weights without PyTorch:

    pip install --no-deps fcd_torch==1.0.7

The layers, as fcd_torch builds them from that file: Conv1d(35 -> 32, kernel 4, stride 2, 'same') + SELU,
Conv1d(32 -> 32, 4, 2, 'same') + SELU, then over the reversed sequence LSTM(32 -> 128), then reversed again
LSTM(128 -> 512), whose output at the last position is the activation. The check that this port is fcd_torch:
the activations of MOSES's test molecules reproduce the mean and covariance MOSES ships for them
(test_stats.npz), see experiments/molecules/README.md.
"""
from __future__ import annotations

import collections
import functools
import importlib.util
import pickle
import struct
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

WEIGHTS = "ChemNet_v0.13_pretrained.pt"
INSTALL = "pip install --no-deps fcd_torch==1.0.7"
# fcd_torch's vocabulary; 'X' is any other symbol, '.' ends the string. Cl, Br and Si are the two-letter ones
# (fcd_torch reads a symbol as two letters when the next character is r, i or l).
VOCAB = ("C", "N", "O", "H", "F", "Cl", "P", "B", "Br", "S", "I", "Si", "#", "(", ")", "+", "-", "1", "2", "3",
         "4", "5", "6", "7", "8", "=", "[", "]", "@", "c", "n", "o", "s", "X", ".")
INDEX = {s: i for i, s in enumerate(VOCAB)}
LENGTH = 350  # fcd_torch pads every string to 350 positions
ACTIVATIONS = 512


class ChemNetError(RuntimeError):
  """The ChemNet weights are missing or unreadable."""


def find_weights(path: Optional[str] = None) -> Path:
  """The weights file: `path` if given, else the one inside the installed fcd_torch package (found without
  importing it, which would import PyTorch)."""
  if path is None:
    spec = importlib.util.find_spec("fcd_torch")
    if spec is None or not spec.submodule_search_locations:
      raise ChemNetError(f"FCD needs ChemNet's weights from the fcd_torch package: `{INSTALL}` (PyTorch is not needed).")
    path = Path(spec.submodule_search_locations[0]) / WEIGHTS
  path = Path(path)
  if not path.is_file():
    raise ChemNetError(f"ChemNet's weights {path} are missing; reinstall them with `{INSTALL}`.")
  return path


def read_legacy_torch(path: Path):
  """The object a legacy-format `torch.save` wrote, its tensors as NumPy arrays. The format: four pickles
  (magic number, protocol, system info, the object with storages as persistent ids), the sorted storage keys,
  then each storage as an int64 element count and its raw little-endian bytes."""
  dtypes = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "LongStorage": np.int64}
  storages: dict[str, np.ndarray] = {}
  tensors = []

  class Unpickler(pickle.Unpickler):
    def find_class(self, module, name):  # only what a state dict of float tensors needs
      if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
        return lambda storage, offset, size, stride, *_: tensors.append((storage, offset, size, stride)) or len(tensors) - 1
      if module == "torch" and name in dtypes:
        return name
      if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
      raise pickle.UnpicklingError(f"unexpected {module}.{name} in {path}")

    def persistent_load(self, pid):
      _, storage_type, key, _, _ = pid[:5]
      return key, dtypes[storage_type]

  with open(path, "rb") as f:
    try:
      if pickle.load(f) != 0x1950a86a20f9469cfc6c:
        raise ChemNetError(f"{path} is not a legacy PyTorch file; reinstall it with `{INSTALL}`.")
      pickle.load(f), pickle.load(f)  # protocol, system info
      obj = Unpickler(f).load()
      keys = pickle.load(f)
      kinds = {key: dtype for (key, dtype), *_ in tensors}
      for key in keys:
        count, = struct.unpack("<q", f.read(8))
        dtype = np.dtype(kinds[key])
        storages[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype)
    except (pickle.UnpicklingError, EOFError, struct.error, KeyError, ValueError) as e:
      raise ChemNetError(f"{path} cannot be read ({type(e).__name__}: {e}); reinstall it with `{INSTALL}`.") from e

  def array(i):
    (key, dtype), offset, size, stride = tensors[i]
    itemsize = np.dtype(dtype).itemsize
    return np.lib.stride_tricks.as_strided(storages[key][offset:], size, [s * itemsize for s in stride]).copy()

  # The object: [(kind, (state dict, constructor kwargs, other info))], its tensors still indices into `tensors`.
  return [(kind, {k: array(v) for k, v in state.items()}, dict(kwargs), dict(info)) for kind, (state, kwargs, info) in obj]


@functools.lru_cache(maxsize=2)
def load(path: Optional[str] = None) -> tuple:
  """ChemNet's layers [(kind, params, kwargs, info)], checked against the architecture fcd_torch builds."""
  layers = read_legacy_torch(find_weights(path))
  kinds = [(kind, info.get("reverse"), info.get("last")) for kind, _, _, info in layers]
  if kinds != [("Conv1d", None, None), ("Conv1d", None, None), ("LSTM", True, False), ("LSTM", True, True)]:
    raise ChemNetError(f"unexpected ChemNet layers {kinds}; this code reads fcd_torch 1.0.7's weights (`{INSTALL}`).")
  return tuple(layers)


def one_hot(smiles: str) -> np.ndarray:
  """fcd_torch's encoding of one canonical SMILES: [LENGTH, 35] one-hot rows, '.' after the last symbol (or at
  the last position when the string is longer), divided by 35 (fcd_torch's scaling)."""
  smiles = smiles + "."
  out = np.zeros((LENGTH, len(VOCAB)), np.float32)
  src = dst = 0
  while True:
    two = smiles[src + 1] in "ril"
    symbol = smiles[src:src + 2] if two else smiles[src]
    src += 2 if two else 1
    out[dst, INDEX.get(symbol, INDEX["X"])] = 1
    dst += 1
    if smiles[src] == "." or dst == LENGTH - 1:
      out[dst, INDEX["."]] = 1
      break
  return out / len(VOCAB)


def _same_padding(length: int, kernel: int, stride: int) -> tuple[int, int]:
  """fcd_torch's SamePadding1d (not TensorFlow's 'same': it pads (1, 1) where TensorFlow pads (1, 2))."""
  pad = max(kernel - stride, 0) if length % stride == 0 else max(kernel - length % stride, 0)
  return (pad // stride, pad // stride) if pad % stride == 0 else (pad // stride, pad - pad // stride)


def _conv(x, weight, stride):  # x [B, C, T], weight [O, C, K]: PyTorch's Conv1d (cross-correlation), no bias
  padding = _same_padding(x.shape[2], weight.shape[2], stride)
  y = jax.lax.conv_general_dilated(x, weight, (stride,), [padding], dimension_numbers=("NCH", "OIH", "NCH"))
  return jax.nn.selu(y)


def _lstm(x, p):  # x [B, T, D] -> outputs [B, T, H]: PyTorch's LSTM, gates in the order i, f, g, o
  w_ih, w_hh, b = p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"] + p["bias_hh_l0"]
  hidden = w_hh.shape[1]
  projected = jnp.einsum("btd,gd->tbg", x, w_ih) + b  # the input part of every step at once

  def step(carry, xt):
    h, c = carry
    i, f, g, o = jnp.split(xt + h @ w_hh.T, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h

  zeros = jnp.zeros((x.shape[0], hidden), x.dtype)
  _, hs = jax.lax.scan(step, (zeros, zeros), projected)
  return jnp.swapaxes(hs, 0, 1)


@jax.jit
def _forward(params, x):  # x [B, LENGTH, 35] -> [B, 512]
  conv1, conv2, lstm1, lstm2 = params
  h = _conv(_conv(jnp.swapaxes(x, 1, 2), conv1, 2), conv2, 2)  # [B, 32, 88]
  h = _lstm(jnp.flip(jnp.swapaxes(h, 1, 2), 1), lstm1)
  return _lstm(jnp.flip(h, 1), lstm2)[:, -1]


def activations(canonical_smiles: Sequence[str], batch_size: int = 500, path: Optional[str] = None) -> np.ndarray:
  """ChemNet's activations [N, 512] of RDKit-canonical SMILES (float32), in fixed-size batches (one compile)."""
  layers = load(path)
  params = tuple(jnp.asarray(p["weight"]) if kind == "Conv1d" else {k: jnp.asarray(v) for k, v in p.items()}
                 for kind, p, _, _ in layers)
  out = []
  for start in range(0, len(canonical_smiles), batch_size):
    chunk = list(canonical_smiles[start:start + batch_size])
    x = np.zeros((batch_size, LENGTH, len(VOCAB)), np.float32)
    x[:len(chunk)] = [one_hot(s) for s in chunk]
    out.append(np.asarray(_forward(params, jnp.asarray(x)))[:len(chunk)])
  return np.concatenate(out) if out else np.zeros((0, ACTIVATIONS), np.float32)
