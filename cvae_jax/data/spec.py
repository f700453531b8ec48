"""What a dataset is to the rest of the code: its arrays (Split, Dataset) and its DatasetSpec.

Shapes, the condition and the input encoding come from the spec, never from constants: a model, a
likelihood, a figure or an evaluator asks the spec what the data is.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


class DataError(RuntimeError):
  """The dataset cannot be found, prepared or read; the message says what to do."""


class Encoding(str, enum.Enum):
  """How the stored values become model inputs (model_input)."""
  grayscale = "grayscale"            # uint8 intensities -> [0, 1]
  static_binary = "static_binary"    # 0/1, one fixed Bernoulli(intensity) sample drawn once at loading
  dynamic_binary = "dynamic_binary"  # uint8 intensities -> a fresh Bernoulli(intensity) sample per draw
  real = "real"                      # float32 values used as they are (1-D signals)
  tokens = "tokens"                  # uint8 token ids -> int32 (strings: molecules)
  packed_binary = "packed_binary"    # 0/1 pixels stored 8 to a byte along the width, [N, H, W / 8, C] uint8
                                     # (np.packbits, axis=-2): binary images 8x smaller in memory (dSprites)


class Modality(str, enum.Enum):
  """What an example is, for figures and generation: an image [H, W, C], a signal [T, C], token ids [T]."""
  image = "image"
  signal = "signal"
  tokens = "tokens"


class Condition(str, enum.Enum):
  """What a CVAE conditions on, as Split.labels holds it."""
  classes = "classes"  # int class labels [N], one-hot encoded for the model
  vector = "vector"    # float vectors [N, P] used as they are (z-scored molecular properties)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What models need to know about the data."""
  name: str
  shape: tuple[int, ...]       # one example: (H, W, C) image, (T, C) signal, (T,) token ids
  condition_size: int          # the number of classes, or the condition vector's width
  encoding: Encoding = Encoding.grayscale
  modality: Modality = Modality.image
  condition: Condition = Condition.classes
  condition_names: tuple[str, ...] = ()  # class names, or the vector's components (figure labels)
  vocab: tuple[str, ...] = ()            # token data: id -> token (data/smiles.py)
  condition_mean: tuple[float, ...] = ()  # vector condition: the z-scoring that maps values to the condition
  condition_std: tuple[float, ...] = ()

  def __post_init__(self):
    for name, kind in (("encoding", Encoding), ("modality", Modality), ("condition", Condition)):
      object.__setattr__(self, name, kind(getattr(self, name)))
    object.__setattr__(self, "shape", tuple(self.shape))

  @property
  def num_dims(self) -> int:
    """Dimensions of one example: what nats per dimension (bits per dimension) divide by."""
    return int(np.prod(self.shape))

  @property
  def num_classes(self) -> int:
    """The number of classes of a class-labelled dataset; 0 for a vector condition."""
    return self.condition_size if self.condition == Condition.classes else 0

  def condition_input(self, labels: jax.Array) -> jax.Array:
    """The CVAE's condition c [B, condition_size]: one-hot classes, or the float vectors as they are."""
    if self.condition == Condition.classes:
      return jax.nn.one_hot(labels, self.condition_size)
    return jnp.asarray(labels, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # [N, *shape] uint8: intensities 0..255, 0/1 after static binarization, or token ids;
                      # float32 for real-valued signals
  labels: np.ndarray  # [N] int32 class labels, or [N, P] float32 condition vectors

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
  spec: DatasetSpec
  train: Split
  test: Split
  validation: Optional[Split] = None
  calibration: Optional[Split] = None  # normal inputs for an anomaly detector's threshold (data.calibration_size)


def model_input(images: jax.Array, encoding: Encoding, key: Optional[jax.Array] = None) -> jax.Array:
  """Stored values -> model inputs: uint8 images as float32 in [0, 1] (dynamic binarization samples with
  `key`), packed binary images unpacked to 0/1, real-valued signals as float32, token ids as int32."""
  if encoding == Encoding.tokens:
    return images.astype(jnp.int32)
  if encoding in (Encoding.static_binary, Encoding.real):
    return images.astype(jnp.float32)  # already 0/1, or real values
  if encoding == Encoding.packed_binary:
    return jnp.unpackbits(images, axis=-2).astype(jnp.float32)  # [B, H, W / 8, C] -> [B, H, W, C]
  x = images.astype(jnp.float32) / 255.0
  if encoding == Encoding.dynamic_binary:
    if key is None:
      raise ValueError("dynamic binarization needs a PRNG key")
    x = jax.random.bernoulli(key, x).astype(jnp.float32)
  return x


def static_binarize(images: np.ndarray, seed: int) -> np.ndarray:
  """One fixed Bernoulli(intensity) sample per pixel, as the classic binarized MNIST."""
  rng = np.random.default_rng(seed)
  return (rng.random(images.shape, dtype=np.float32) * 255.0 < images).astype(np.uint8)


def exclude(split: Optional[Split], classes) -> Optional[Split]:
  """The split without the examples of the given classes (None stays None)."""
  if split is None:
    return None
  keep = ~np.isin(split.labels, np.asarray(list(classes)))
  return Split(split.images[keep], split.labels[keep])


def perturb(images: np.ndarray, rate: float, seed: int, encoding: Encoding) -> np.ndarray:
  """Each pixel replaced, with probability `rate`, by a uniform random value: 0..255, or 0/1 for statically
  binarized images (Ren et al. 2019's background inputs)."""
  if encoding not in (Encoding.grayscale, Encoding.static_binary, Encoding.dynamic_binary):
    raise ValueError(f"random pixel replacement perturbs images, not {encoding.value} data")
  rng = np.random.default_rng(seed)
  top = 1 if encoding == Encoding.static_binary else 255
  replace = rng.random(images.shape) < rate
  return np.where(replace, rng.integers(0, top + 1, images.shape), images).astype(np.uint8)
