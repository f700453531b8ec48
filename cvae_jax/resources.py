"""Where the package's own files are: the Hydra configs and the vendored files (MNIST, MOSES's filter SMARTS).

They live at the top of the repository, `conf/` and `data/`, where users and the docs refer to them; a
clone and an editable install (`pip install -e .`) read them there. A wheel (`pip install .`, a git URL)
carries copies inside the package, `cvae_jax/conf/` and `cvae_jax/data/vendored/` (pyproject.toml maps
them with `package-dir`), because an installed package has no repository around it.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REPOSITORY = PACKAGE.parent  # the clone's root; site-packages when installed from a wheel


def _installed_or_repository(packaged: Path, in_repository: Path) -> Path:
  # Only a wheel puts the copy inside the package: a clone never has one, so its presence decides. (Asking
  # the other way round could pick up an unrelated site-packages/conf/ folder.)
  return packaged if packaged.is_dir() else in_repository


def conf_dir() -> Path:
  """Hydra's primary config directory: config.yaml and the groups (data, model, ..., experiment)."""
  return _installed_or_repository(PACKAGE / "conf", REPOSITORY / "conf")


def vendored_data_dir() -> Path:
  """The folder holding `<dataset name>/` folders of official files that ship with us (mnist/)."""
  return _installed_or_repository(PACKAGE / "data" / "vendored", REPOSITORY / "data")
