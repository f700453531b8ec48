"""A registry: entries by name, each entry an object with a `name`. Datasets, model families, likelihoods and
tasks each keep one; a plug-in adds to it with `register` (docs/architecture.md)."""
from __future__ import annotations

from typing import Generic, TypeVar

from cvae_jax.config import ConfigError

Entry = TypeVar("Entry")


class Registry(dict, Generic[Entry]):
  def __init__(self, key: str, kind: str):
    super().__init__()
    self.key, self.kind = key, kind  # the config key that names an entry, and what an entry is

  def register(self, entry: Entry) -> Entry:
    self[entry.name] = entry
    return entry

  def lookup(self, name: str) -> Entry:
    """The entry of that name; a ConfigError naming the key and the choices otherwise."""
    if name not in self:
      raise ConfigError(f"{self.key}={name!r} is not {self.kind}: use one of {', '.join(self)}.")
    return self[name]
