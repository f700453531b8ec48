"""Where datasets' local files are looked for, and where prepared data and caches go.

Official files (for TFDS's offline preparation, ECG5000, MOSES) are looked for in `<root>/<dataset name>/`
under, in order: `data.manual_dir`, the environment variable CVAE_JAX_MANUAL_DIR, and the folder of files that
ship with us (MNIST), VENDORED_DATA_DIR: the repository's own `data/` in a clone or an editable install; in a
package installed from a wheel (`pip install .`, a git URL), the copy the wheel carries at
`cvae_jax/data/vendored/` (cvae_jax.resources decides which).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from cvae_jax import resources

MANUAL_DIR_ENV = "CVAE_JAX_MANUAL_DIR"
VENDORED_DATA_DIR = resources.vendored_data_dir()


def find_manual_dir(name: str, manual_dir: Optional[str]) -> tuple[Optional[Path], list[Path]]:
  """The first `<root>/<name>` folder that exists, and every folder that was looked at."""
  # An explicit data.manual_dir is the only place looked at; otherwise the environment, then the repository.
  roots = [manual_dir] if manual_dir else [r for r in (os.environ.get(MANUAL_DIR_ENV), VENDORED_DATA_DIR) if r]
  looked = [Path(r).expanduser() / name for r in roots]
  return next((p for p in looked if p.is_dir()), None), looked


def data_root(data_dir: Optional[str]) -> Path:
  """data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets: prepared datasets and our caches."""
  return Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()
