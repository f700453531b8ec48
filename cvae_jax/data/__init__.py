"""Datasets: the spec and arrays every other module sees (spec.py), the registry by name (registry.py),
and one module per kind of source: TFDS images (images.py), ECG5000 signals (ecg5000.py), MOSES molecules
(moses.py, with smiles.py), dSprites rendered from its factors (dsprites.py), synthetic shapes at any size for tests
and benchmarks (synthetic.py). A new dataset is a module that calls `register` (docs/architecture.md)."""
from cvae_jax.data.files import MANUAL_DIR_ENV, VENDORED_DATA_DIR, find_manual_dir
from cvae_jax.data.registry import DATASETS, DatasetEntry, entry_for, fits_device, load, register
from cvae_jax.data.spec import (Condition, Dataset, DataError, DatasetSpec, Encoding, Modality, Split, exclude,
                                model_input, perturb, static_binarize)
from cvae_jax.data import dsprites, ecg5000, images, moses, synthetic  # noqa: F401  (each registers its entry)

__all__ = ["MANUAL_DIR_ENV", "VENDORED_DATA_DIR", "find_manual_dir", "DATASETS", "DatasetEntry", "entry_for", "fits_device", "load",
           "register", "Condition", "Dataset", "DataError", "DatasetSpec", "Encoding", "Modality", "Split", "exclude",
           "model_input", "perturb", "static_binarize"]
