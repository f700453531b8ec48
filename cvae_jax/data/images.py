"""TFDS image datasets (`data.name` = mnist, fashion_mnist, or any TFDS dataset with `image` and `label`).

Offline use: TFDS prepares a dataset from the official files when it finds them in a manual directory
(it checks each file's size and sha256), found as data/files.py says; the repository ships MNIST's. The
decoded splits are kept beside the prepared dataset, so every run after the first reads them in 0.1 s.

`data.resize=[H,W]` resizes every image once, by area averaging (`resize`), when a split is first read at that
size; the resized split is kept beside the stored-size one, in a folder named after the size. Any TFDS dataset
with `image` and `label` works where a network exists, e.g. `data.name=cifar10 data.download=true
data.resize=[64,64]`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import filelock
import numpy as np

from cvae_jax.config import Config, DataConfig, Pixels, check
from cvae_jax.data.files import MANUAL_DIR_ENV, data_root, find_manual_dir
from cvae_jax.data.registry import DEFAULT, DatasetEntry, register
from cvae_jax.data.spec import DataError, DatasetSpec, Encoding, Split

# The official files TFDS expects for the datasets we document; others are checked by TFDS itself.
OFFICIAL_FILES = {
    "mnist": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
OFFICIAL_FILES["fashion_mnist"] = OFFICIAL_FILES["mnist"]


@dataclass
class ImageDataConfig(DataConfig):
  name: str = "mnist"                # any TFDS dataset with `image` and `label` features
  pixels: Pixels = Pixels.grayscale  # how pixel intensities become model inputs
  binarization_seed: int = 0         # seed of the fixed sample for static binarization
  download: bool = False             # allow TFDS to download when no manual files are found
  resize: Optional[list[int]] = None  # [height, width] the images are resized to (area averaging); null: as stored


def _missing_help(name: str, looked: list[Path]) -> str:
  files = ", ".join(OFFICIAL_FILES.get(name, ("the files of the dataset's official download",)))
  where = " or ".join(str(p) for p in looked)
  return (f"Put {files} in {where}, set data.manual_dir (or {MANUAL_DIR_ENV}) to a folder holding "
          f"'{name}/', or pass data.download=true to let TFDS download it.")


def _builder(cfg: ImageDataConfig):
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


def prepare(cfg: ImageDataConfig):
  """Returns a prepared TFDS builder, preparing it from manual files (or a download) when needed."""
  builder = _builder(cfg)
  if builder.is_prepared():
    return builder
  # The jobs of a sweep start together and each finds the dataset unprepared: one prepares it while the
  # others wait, then find it prepared (TFDS would otherwise fail in all but one, at its final rename).
  if "://" in str(cfg.data_dir or os.environ.get("TFDS_DATA_DIR", "")):  # a bucket (gs://): no local lock
    return _prepare_unlocked(cfg, builder)
  root = data_root(cfg.data_dir)
  root.mkdir(parents=True, exist_ok=True)
  with filelock.FileLock(root / f".{cfg.name}.prepare.lock"):
    builder = _builder(cfg)  # anew: a builder reads the dataset's metadata when it is made
    if builder.is_prepared():  # another job prepared it while this one waited
      return builder
    return _prepare_unlocked(cfg, builder)


def _prepare_unlocked(cfg: ImageDataConfig, builder):
  import tensorflow_datasets as tfds
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


def area_weights(n_in: int, n_out: int) -> np.ndarray:
  """Row i holds the share of output pixel i's extent that each input pixel covers (rows sum to 1).
  [n_out, n_in] float32"""
  edges = np.arange(n_out + 1) * (n_in / n_out)  # output pixel edges, in input pixels
  j = np.arange(n_in)
  overlap = np.clip(np.minimum(edges[1:, None], j + 1) - np.maximum(edges[:-1, None], j), 0, None)
  return (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)


def resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Area averaging (PIL's BOX filter, OpenCV's INTER_AREA): each output pixel is the mean of the input area
  it covers, computed in float and rounded once. Chosen over Lanczos because it antialiases a downsampling
  without ringing (no value leaves the range of those averaged, a constant image stays constant) and
  enlarges by repeating pixels rather than inventing detail; rows and columns are two small matrix products.
  [N, H, W, C] uint8 -> [N, *size, C] uint8"""
  n, height, width, channels = images.shape
  rows, cols = area_weights(height, size[0]), area_weights(width, size[1])
  x = np.matmul(rows, np.asarray(images, np.float32).reshape(n, height, width * channels))  # [N, h, W * C]
  x = np.matmul(cols, x.reshape(n * size[0], width, channels))  # [N * h, w, C]
  return np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(n, *size, channels)


def check_resize(resize_to: Optional[list[int]]) -> Optional[tuple[int, int]]:
  """data.resize as (height, width), or None to keep the stored size; ConfigError unless two positive ints."""
  if resize_to is None:
    return None
  size = tuple(resize_to) if isinstance(resize_to, (list, tuple)) else (resize_to,)
  check(len(size) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size),
        "data.resize", resize_to,
        "pass [height, width], two positive integers (e.g. data.resize=[64,64]), or null for the stored size")
  return size


def _read_split(builder, split: str, memory_map: bool = False, size: Optional[tuple[int, int]] = None) -> Split:
  """A split as arrays. TFDS decodes every image of it (6.5 s for MNIST's 70,000 on 2 cores), and each run
  of a sweep would pay that again, so the arrays are kept beside the prepared dataset, one .npy file each
  (0.1 s to read), and a copy that is unreadable or of another size is rewritten. They are written batch by
  batch, so a split larger than the host's memory can be kept; `memory_map` reads the images as a memory
  map (data.in_memory=false: pages are read when a batch touches them). With `size`, the images are resized
  from the stored-size copy and kept in a folder of their own (split_cache), so runs at different sizes share
  the decoding and never read each other's copy."""
  import tensorflow_datasets as tfds
  if split not in builder.info.splits:
    raise DataError(f"Dataset {builder.name!r} has no {split!r} split (it has {list(builder.info.splits)}).")
  cache = split_cache(builder, split, size)
  num_examples = builder.info.splits[split].num_examples
  cached = _read_cached_split(cache, num_examples, memory_map, size)
  if cached is not None:
    return cached
  if size is not None:
    stored = _read_split(builder, split, memory_map=True)
    height, width, channels = stored.images.shape[1:]
    step = max(1, 2**25 // (max(height * width, size[0] * size[1]) * channels))  # <= 128 MB of float32 per batch
    batches = ({"image": resize(stored.images[i:i + step], size), "label": stored.labels[i:i + step]}
               for i in range(0, num_examples, step))
    _write_cached_split(cache, batches, num_examples, builder.name)
    cached = _read_cached_split(cache, num_examples, memory_map, size)
    return cached if cached is not None else Split(resize(stored.images, size), stored.labels)  # unwritable
  batches = tfds.as_numpy(builder.as_dataset(split=split, batch_size=4096))
  _write_cached_split(cache, batches, num_examples, builder.name)
  cached = _read_cached_split(cache, num_examples, memory_map)
  if cached is None:  # a data_dir that cannot be written: decode again, into memory
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    cached = Split(images=_pixels(arrays["image"], builder.name), labels=np.asarray(arrays["label"], np.int32))
  return cached


def _pixels(images, name: str) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise DataError(f"Dataset {name!r} images are {images.dtype}; expected uint8 pixels.")
  return images


def split_cache(builder, split: str, size: Optional[tuple[int, int]] = None) -> Path:
  """The folder holding a split's decoded images.npy and labels.npy: cvae_jax_<split>, or
  cvae_jax_<split>_<H>x<W> for its images resized to size (H, W)."""
  suffix = f"_{size[0]}x{size[1]}" if size is not None else ""
  return Path(builder.data_dir) / f"cvae_jax_{split}{suffix}"


def _read_cached_split(folder: Path, num_examples: int, memory_map: bool = False,
                       size: Optional[tuple[int, int]] = None) -> Optional[Split]:
  try:
    images = np.load(folder / "images.npy", mmap_mode="r" if memory_map else None)
    labels = np.load(folder / "labels.npy")
  except (OSError, ValueError, EOFError):  # absent, truncated or not ours
    return None
  if len(images) != num_examples or len(labels) != num_examples or images.dtype != np.uint8:
    return None
  if size is not None and tuple(images.shape[1:3]) != tuple(size):
    return None
  return Split(images=images, labels=labels.astype(np.int32))


def _write_cached_split(folder: Path, batches, num_examples: int, name: str) -> None:
  """Written batch by batch into a temporary folder that is renamed when complete, so a reader never sees
  half a split; a data_dir that cannot be written (read-only, remote) only means no cache."""
  temporary = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name, suffix=".tmp")) \
      if os.access(folder.parent, os.W_OK) else None
  if temporary is None:
    return
  try:
    images = labels = None
    filled = 0
    for batch in batches:
      pixels = _pixels(batch["image"], name)
      if images is None:
        images = np.lib.format.open_memmap(temporary / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(num_examples, *pixels.shape[1:]))
        labels = np.zeros(num_examples, np.int32)
      images[filled:filled + len(pixels)] = pixels
      labels[filled:filled + len(pixels)] = batch["label"]
      filled += len(pixels)
    if images is None or filled != num_examples:
      raise DataError(f"Dataset {name!r} gave {filled} examples; its metadata says {num_examples}.")
    images.flush()
    del images
    np.save(temporary / "labels.npy", labels)
    temporary.chmod(0o755)  # mkdtemp makes it private; the dataset's other files are not
    shutil.rmtree(folder, ignore_errors=True)  # an unreadable copy
    os.replace(temporary, folder)
  except OSError:
    pass
  finally:
    if temporary.exists():
      shutil.rmtree(temporary, ignore_errors=True)


def read(cfg: ImageDataConfig) -> tuple[Split, Split, DatasetSpec]:
  size = check_resize(cfg.resize)
  builder = prepare(cfg)
  train = _read_split(builder, "train", memory_map=cfg.in_memory is False, size=size)
  test = _read_split(builder, "test", size=size)
  label = builder.info.features["label"]
  spec = DatasetSpec(name=cfg.name, shape=tuple(train.images.shape[1:]), condition_size=int(label.num_classes),
                     encoding=Encoding(Pixels(cfg.pixels).value), condition_names=tuple(label.names))
  return train, test, spec


def check_config(cfg: Config) -> None:
  check_resize(cfg.data.resize)  # at start-up, before the dataset is prepared


register(DatasetEntry(DEFAULT, ImageDataConfig, read, encoding=lambda cfg: Encoding(Pixels(cfg.pixels).value),
                      check=check_config))
