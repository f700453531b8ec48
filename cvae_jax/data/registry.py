"""Datasets by name. Each entry reads its raw splits and states what it asks of the rest of the config;
`load` applies what every dataset shares (held-out classes, a validation split, limits, static
binarization). A name no entry claims is a TFDS image dataset (data/images.py)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from cvae_jax.config import Config, DataConfig
from cvae_jax.registry import Registry
from cvae_jax.data.factors import FactorTable
from cvae_jax.data.spec import Dataset, DataError, DatasetSpec, Encoding, Split, exclude, static_binarize


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
  name: str
  config: type  # its config node: a DataConfig subclass with the dataset's own keys
  read: Callable[[DataConfig], tuple[Split, Split, DatasetSpec]]  # the raw train and test splits and the spec
  encoding: Callable[[DataConfig], Encoding]  # how its values reach the model, known from the config alone
  check: Callable[[Config], None] = lambda cfg: None  # what it requires of the model, likelihood and task
  factors: Optional[Callable[[DataConfig], FactorTable]] = None  # its ground-truth factors, if it has them


DATASETS: Registry[DatasetEntry] = Registry("data.name", "a dataset")
register = DATASETS.register
DEFAULT = "tfds_images"  # the entry of every name not registered


def entry_for(name: str) -> DatasetEntry:
  return DATASETS.get(name, DATASETS[DEFAULT])


def load(cfg: DataConfig) -> Dataset:
  """Loads train and test, and carves from the end of train a validation split (the last
  data.validation_size examples) and a calibration split (the data.calibration_size before those). Classes
  in data.exclude_classes are removed from train, validation and calibration, never from test."""
  train, test, spec = entry_for(cfg.name).read(cfg)
  bad = [k for k in cfg.exclude_classes if not 0 <= k < spec.num_classes]
  if bad:
    raise DataError(f"data.exclude_classes={list(cfg.exclude_classes)}: {bad} not among the {spec.num_classes} "
                    f"classes of {cfg.name!r} (labels 0..{spec.num_classes - 1}).")
  held = {k: getattr(cfg, k) for k in ("validation_size", "calibration_size") if getattr(cfg, k)}
  if held and sum(held.values()) >= len(train):
    raise DataError(f"{' and '.join(f'data.{k}={v}' for k, v in held.items())} "
                    f"{'leaves' if len(held) == 1 else 'leave'} no training data (train has {len(train)} examples).")
  train, validation = _carve_end(train, cfg.validation_size)
  train, calibration = _carve_end(train, cfg.calibration_size)
  if cfg.exclude_classes:
    train, validation, calibration = (exclude(s, cfg.exclude_classes) for s in (train, validation, calibration))
    if len(train) == 0:
      raise DataError(f"data.exclude_classes={list(cfg.exclude_classes)} leaves no training examples.")
  if cfg.train_limit:
    train = Split(train.images[:cfg.train_limit], train.labels[:cfg.train_limit])
  if cfg.test_limit:
    test = Split(test.images[:cfg.test_limit], test.labels[:cfg.test_limit])
  return binarize(Dataset(spec, train, test, validation, calibration), getattr(cfg, "binarization_seed", 0))


def _carve_end(split: Split, n: int) -> tuple[Split, Optional[Split]]:
  """The split without its last n examples, and those n (None when n is 0)."""
  if not n:
    return split, None
  cut = len(split) - n
  return Split(split.images[:cut], split.labels[:cut]), Split(split.images[cut:], split.labels[cut:])


def binarize(ds: Dataset, seed: int) -> Dataset:
  """Applies static binarization (a no-op for the other encodings); each split gets its own stream."""
  if ds.spec.encoding != Encoding.static_binary:
    return ds

  def apply(split: Optional[Split], stream: int) -> Optional[Split]:
    if split is None:
      return None
    return Split(static_binarize(split.images, seed * 1000 + stream), split.labels)

  return Dataset(ds.spec, apply(ds.train, 0), apply(ds.test, 1), apply(ds.validation, 2), apply(ds.calibration, 3))


def fits_device(cfg: DataConfig, split: Split, device_bytes: int) -> bool:
  """Whether the training split lives on the device (data.in_memory): as asked, or, when not set, when it
  takes under a quarter of the device's memory (the rest is for the model, its activations and evaluation)."""
  if cfg.in_memory is not None:
    return bool(cfg.in_memory)
  return split.images.nbytes + split.labels.nbytes <= device_bytes // 4
