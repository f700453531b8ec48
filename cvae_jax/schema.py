"""A config as a whole: its typed form from plain data, its checks across sections, and the migration of
configs written in an earlier layout.

The dataset and the model family each bring their own config node (data/, models/), so the schema of a
run depends on its `data.name` and `model.arch`. `structured` builds the typed Config of a plain dict (a
run directory's config.yaml, a test's overrides); `validate` runs the shared checks, then each registry
entry's own; `migrate` maps a config of an earlier layout (one flat model and data section for every
family, molecules under task=density) to the current one, so old run directories resume and evaluate.
"""
from __future__ import annotations

import copy
from typing import Any

from omegaconf import OmegaConf

from cvae_jax import data, likelihoods, models
from cvae_jax.config import Config, check, to_dict, validate_common


def node_classes(config: dict) -> tuple[type, type]:
  """The (data, model) config node classes of a plain config: by data.name and model.arch."""
  model = config.get("model", {})
  arch = model.get("arch", "conv") if isinstance(model, dict) else "conv"
  family = models.FAMILIES.lookup(arch)
  name = config.get("data", {}).get("name", "mnist")
  return data.entry_for(name).config, family.config


def migrate(config: dict) -> dict:
  """A plain config of an earlier layout in the current one: each section keeps the keys its node has
  (the others belonged to other families and held their defaults), and molecules are task=molecules."""
  config = copy.deepcopy(config)
  if config.get("data", {}).get("pixels") == "tokens" and config.get("task", "density") == "density":
    config["task"] = "molecules"  # the earlier layout's molecule runs: token "pixels" under the density task
  data_node, model_node = node_classes(config)
  for section, node in (("data", data_node), ("model", model_node)):
    if isinstance(config.get(section), dict):
      fields = set(to_dict(OmegaConf.to_object(OmegaConf.structured(node))))
      config[section] = {k: v for k, v in config[section].items() if k in fields}
  return config


def defaults_like(config: dict) -> dict:
  """The schema's defaults for a config of these data and model nodes: what a key a run directory's
  config.yaml lacks (written before the key existed) held."""
  data_node, model_node = node_classes(config)
  return to_dict(OmegaConf.to_object(OmegaConf.merge(
      OmegaConf.structured(Config), {"data": OmegaConf.structured(data_node), "model": OmegaConf.structured(model_node)})))


def structured(config: dict | Any) -> Config:
  """The typed Config of a plain config (migrated first). Unknown keys and wrong types raise."""
  config = migrate(config)
  data_node, model_node = node_classes(config)
  schema = OmegaConf.merge(OmegaConf.structured(Config), {"data": OmegaConf.structured(data_node),
                                                          "model": OmegaConf.structured(model_node)})
  return OmegaConf.to_object(OmegaConf.merge(schema, config))


def validate(cfg: Config) -> Config:
  """The shared checks, then the dataset's, the model family's and the likelihood's: what each requires of
  the others is stated in its own module. The task's own checks are the task's (experiment.validate)."""
  validate_common(cfg)
  entry = data.entry_for(cfg.data.name)
  check(isinstance(cfg.data, entry.config), "data.name", cfg.data.name,
        f"it takes the {entry.config.__name__} node: choose the dataset with data=NAME")
  family = models.family_of(cfg.model)
  check(isinstance(cfg.model, family.config), "model.arch", cfg.model.arch,
        "choose the model family with model=NAME, not model.arch=NAME")
  likelihood = likelihoods.of(cfg.objective)
  encoding = entry.encoding(cfg.data)
  check(encoding in likelihood.encodings, "objective.likelihood", cfg.objective.likelihood,
        f"{cfg.data.name!r} gives {encoding.value} inputs, which the {likelihood.name} likelihood does not model: use "
        + " or ".join(f"objective={lk.name}" for lk in likelihoods.LIKELIHOODS.values() if encoding in lk.encodings))
  check(encoding in family.encodings, "model.arch", cfg.model.arch,
        f"the {family.name} family does not read {encoding.value} inputs ({cfg.data.name!r}): use "
        + " or ".join(f"model={f.name}" for f in models.FAMILIES.values() if encoding in f.encodings))
  models.registry.check_activation(cfg)
  family.check(cfg)
  entry.check(cfg)
  return cfg
