"""Datasets from TensorFlow Datasets, loaded whole into memory (MNIST-sized data lives on the device).

Offline use: TFDS prepares a dataset from the official files when it finds them in a manual
directory (it checks each file's size and sha256). We look for `<root>/<dataset name>/` under, in
order: `data.manual_dir`, the environment variable CVAE_JAX_MANUAL_DIR, and the repository's own
`data/` folder (which ships MNIST).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cvae_jax.config import DataConfig, Pixels

MANUAL_DIR_ENV = "CVAE_JAX_MANUAL_DIR"
VENDORED_DATA_DIR = Path(__file__).resolve().parents[1] / "data"

# The official files TFDS expects for the datasets we document; others are checked by TFDS itself.
OFFICIAL_FILES = {
    "mnist": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
OFFICIAL_FILES["fashion_mnist"] = OFFICIAL_FILES["mnist"]


class DataError(RuntimeError):
  """The dataset cannot be found, prepared or read; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What models need to know about the data; shapes never come from anywhere else."""
  name: str
  image_shape: tuple[int, ...]  # (H, W, C) for images, (T, C) for sequences
  num_classes: int
  pixels: Pixels
  class_names: tuple[str, ...] = ()  # for figure labels; empty: the class index is shown

  @property
  def num_pixels(self) -> int:
    return int(np.prod(self.image_shape))


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # [N, *image_shape] uint8: intensities 0..255, or 0/1 after static binarization
  labels: np.ndarray  # [N] int32

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
  spec: DatasetSpec
  train: Split
  test: Split
  validation: Optional[Split] = None


def model_input(images: jax.Array, pixels: Pixels, key: Optional[jax.Array] = None) -> jax.Array:
  """uint8 images -> float32 model inputs in [0, 1]; dynamic binarization samples with `key`."""
  if pixels == Pixels.static_binary:
    return images.astype(jnp.float32)  # already 0/1
  x = images.astype(jnp.float32) / 255.0
  if pixels == Pixels.dynamic_binary:
    if key is None:
      raise ValueError("dynamic binarization needs a PRNG key")
    x = jax.random.bernoulli(key, x).astype(jnp.float32)
  return x


def static_binarize(images: np.ndarray, seed: int) -> np.ndarray:
  """One fixed Bernoulli(intensity) sample per pixel, as the classic binarized MNIST."""
  rng = np.random.default_rng(seed)
  return (rng.random(images.shape, dtype=np.float32) * 255.0 < images).astype(np.uint8)


def find_manual_dir(name: str, manual_dir: Optional[str]) -> tuple[Optional[Path], list[Path]]:
  """The first `<root>/<name>` folder that exists, and every folder that was looked at."""
  # An explicit data.manual_dir is the only place looked at; otherwise the environment, then the repository.
  roots = [manual_dir] if manual_dir else [r for r in (os.environ.get(MANUAL_DIR_ENV), VENDORED_DATA_DIR) if r]
  looked = [Path(r).expanduser() / name for r in roots]
  return next((p for p in looked if p.is_dir()), None), looked


def _missing_help(name: str, looked: list[Path]) -> str:
  files = ", ".join(OFFICIAL_FILES.get(name, ("the files of the dataset's official download",)))
  where = " or ".join(str(p) for p in looked)
  return (f"Put {files} in {where}, set data.manual_dir (or {MANUAL_DIR_ENV}) to a folder holding "
          f"'{name}/', or pass data.download=true to let TFDS download it.")


def _builder(cfg: DataConfig):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF only decodes images here; silences its notice
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f"data.name={cfg.name!r} is not a TFDS dataset. Use mnist, fashion_mnist or "
                    f"another name from `tfds.list_builders()`.") from e
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise DataError(f"data.name={cfg.name!r} has features {list(features)}; "
                    "cvae_jax needs a dataset with 'image' and 'label' features.")
  return builder


def prepare(cfg: DataConfig):
  """Returns a prepared TFDS builder, preparing it from manual files (or a download) when needed."""
  import tensorflow_datasets as tfds
  builder = _builder(cfg)
  if builder.is_prepared():
    return builder
  folder, looked = find_manual_dir(cfg.name, cfg.manual_dir)
  expected = OFFICIAL_FILES.get(cfg.name)
  if folder is not None and expected and not cfg.download:
    missing = [f for f in expected if not (folder / f).is_file()]
    if missing:
      raise DataError(f"Dataset {cfg.name!r} is not prepared and {folder} lacks {', '.join(missing)}. "
                      + _missing_help(cfg.name, looked))
  if folder is None and not cfg.download:
    raise DataError(f"Dataset {cfg.name!r} is not prepared in {builder.data_dir} and no manual files "
                    "were found. " + _missing_help(cfg.name, looked))
  config = tfds.download.DownloadConfig(manual_dir=str(folder) if folder else None)
  try:
    builder.download_and_prepare(download_config=config)
  except Exception as e:  # TFDS raises many types: checksum mismatch, truncated gzip, network
    raise DataError(f"TFDS could not prepare {cfg.name!r} from {folder or 'the internet'}: "
                    f"{type(e).__name__}: {e}. Check that the files are the official, complete ones "
                    "(TFDS verifies size and sha256), or remove them and pass data.download=true.") from e
  return builder


def _read_split(builder, split: str) -> Split:
  import tensorflow_datasets as tfds
  if split not in builder.info.splits:
    raise DataError(f"Dataset {builder.name!r} has no {split!r} split (it has {list(builder.info.splits)}).")
  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  images = np.asarray(arrays["image"])
  if images.dtype != np.uint8:
    raise DataError(f"Dataset {builder.name!r} images are {images.dtype}; expected uint8 pixels.")
  return Split(images=images, labels=np.asarray(arrays["label"], dtype=np.int32))


def load(cfg: DataConfig) -> Dataset:
  """Loads train and test (and a validation split carved from train) as uint8 arrays."""
  builder = prepare(cfg)
  train, test = _read_split(builder, "train"), _read_split(builder, "test")
  validation = None
  if cfg.validation_size:
    if cfg.validation_size >= len(train):
      raise DataError(f"data.validation_size={cfg.validation_size} leaves no training data "
                      f"(train has {len(train)} examples).")
    cut = len(train) - cfg.validation_size
    validation = Split(train.images[cut:], train.labels[cut:])
    train = Split(train.images[:cut], train.labels[:cut])
  if cfg.train_limit:
    train = Split(train.images[:cfg.train_limit], train.labels[:cfg.train_limit])
  if cfg.test_limit:
    test = Split(test.images[:cfg.test_limit], test.labels[:cfg.test_limit])
  label = builder.info.features["label"]
  spec = DatasetSpec(name=cfg.name, image_shape=tuple(train.images.shape[1:]),
                     num_classes=int(label.num_classes), pixels=cfg.pixels, class_names=tuple(label.names))
  return binarize(Dataset(spec, train, test, validation), cfg.binarization_seed)


def binarize(ds: Dataset, seed: int) -> Dataset:
  """Applies static binarization (a no-op for the other pixel modes); each split gets its own stream."""
  if ds.spec.pixels != Pixels.static_binary:
    return ds
  def apply(split: Optional[Split], stream: int) -> Optional[Split]:
    if split is None:
      return None
    return Split(static_binarize(split.images, seed * 1000 + stream), split.labels)
  return Dataset(ds.spec, apply(ds.train, 0), apply(ds.test, 1), apply(ds.validation, 2))
