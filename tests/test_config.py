"""Every config composes; bad values stop at start-up with a clear message."""
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import cvae_jax.train  # noqa: F401  registers the schema
from cvae_jax.config import Config, ConfigError
from cvae_jax.experiment import validate

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_config(overrides, with_hydra=False):
  with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
    return compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)


def test_default_is_the_seed_article_cvae():
  cfg: Config = validate(OmegaConf.to_object(compose_config([])))
  assert (cfg.model.kind.value, cfg.model.arch, cfg.model.latent_size) == ("cvae", "conv", 2)
  assert (cfg.data.name, cfg.data.pixels.value) == ("mnist", "grayscale")
  assert (cfg.training.batch_size, cfg.training.epochs) == (32, 10)


def test_experiments_are_found():
  assert {"smoke", "beta_sweep", "latent_sweep", "arch_sweep", "flax_vae"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
  cfg = compose_config([f"+experiment={experiment}"])
  validate(OmegaConf.to_object(cfg))


@pytest.mark.parametrize("model", ["mlp", "conv", "conv_deep", "conv1d"])
def test_every_model_composes(model):
  validate(OmegaConf.to_object(compose_config([f"model={model}"])))


def test_remedies_set_the_objective():
  for remedy, expected in [("none", ("constant", 0.0)), ("warmup", ("linear", 0.0)),
                           ("cyclical", ("cyclical", 0.0)), ("free_bits", ("constant", 0.5))]:
    cfg = validate(OmegaConf.to_object(compose_config([f"remedy={remedy}"])))
    assert (cfg.objective.kl_schedule.value, cfg.objective.free_bits) == expected


def test_anomaly_sweeps_hold_out_every_class():
  for name in ("anomaly_mnist", "anomaly_fashion_mnist"):
    params = compose_config([f"+experiment={name}"], True).hydra.sweeper.params
    held_out = {tuple(yaml.safe_load(f"[{v}]")) for v in params["data.exclude_classes"][1:-1].split("],[")}
    assert held_out == {()} | {(k,) for k in range(10)}
    assert set(params["model.kind"].split(",")) == {"ae", "vae", "cvae"}


def test_sweeps_cover_the_asked_values():
  beta = compose_config(["+experiment=beta_sweep"], True).hydra.sweeper.params["objective.beta"]
  assert {0.5, 1, 2, 4, 8} <= {float(v) for v in beta.split(",")}
  latent = compose_config(["+experiment=latent_sweep"], True).hydra.sweeper.params["model.latent_size"]
  assert {2, 5, 10, 20, 50} <= {int(v) for v in latent.split(",")}
  arch = compose_config(["+experiment=arch_sweep"], True).hydra.sweeper.params
  assert set(arch["model"].split(",")) >= {"mlp", "conv"} and set(arch["model.kind"].split(",")) == {"vae", "cvae"}


@pytest.mark.parametrize("override, message", [
    ("model.latent_size=0", "model.latent_size=0"),
    ("objective.beta=-1", "objective.beta=-1"),
    ("training.batch_size=0", "training.batch_size=0"),
    ("optimizer.learning_rate=0", "optimizer.learning_rate"),
    ("model.activation=nonsense", "model.activation"),
    ("objective.kl_schedule=linear", "objective.kl_warmup_epochs=0.0"),
    ("objective.free_bits=-1", "objective.free_bits"),
    ("objective.kl_cycle_ratio=0", "objective.kl_cycle_ratio"),
    ("evaluation.anomaly_dataset=fashion_mnist", "needs evaluation.anomaly=true"),
    ("data.exclude_classes=[-1]", "data.exclude_classes"),
    ("data.calibration_size=-1", "data.calibration_size=-1"),
    ("seed=4294967296", "seed=4294967296"),
    ("model.arch=transformer", "model.arch='transformer' is not a model family"),
    ("model.arch=mlp", "choose the model family with model=NAME"),
    ("objective.likelihood=poisson", "objective.likelihood='poisson'"),
    ("task=nothing", "task='nothing'"),
    ("evaluation.anomaly=true", "needs anomalies"),
    ("evaluation.anomaly=true evaluation.anomaly_dataset=mnist", "is the training dataset"),
])
def test_bad_values_raise_config_error(override, message):
  with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
    validate(OmegaConf.to_object(compose_config(override.split())))


@pytest.mark.parametrize("override", ["model.no_such_key=1", "model.hidden=[64]", "model.latent_size=two",
                                      "data.pixels=color", "objective.kl_schedule=sometimes"])
def test_unknown_keys_and_wrong_types_fail_at_composition(override):
  with pytest.raises(ConfigCompositionException):
    compose_config([override])


EARLIER_MODEL = {"kind": "cvae", "arch": "conv", "latent_size": 2, "activation": "relu", "hidden": [500],
                 "encoder_channels": [32], "decoder_channels": [], "kernel_size": 3, "conv_stride": 1, "dense": 64,
                 "init_scale": None, "embedding_size": 32, "rnn_size": 256}  # one section for every family
EARLIER_DATA = {"name": "mnist", "pixels": "grayscale", "validation_size": 0, "train_limit": None, "test_limit": None,
                "binarization_seed": 0, "exclude_classes": [], "manual_dir": None, "data_dir": None, "download": False,
                "syntax": "smiles", "properties": ["mw", "logp", "tpsa", "hbd", "hba", "qed"]}


def test_a_config_of_the_earlier_layout_is_read_and_matches_the_same_command(tmp_path):
  from cvae_jax import schema
  from cvae_jax.config import to_dict
  from cvae_jax.engine import rundir
  current = validate(OmegaConf.to_object(compose_config([])))
  earlier = to_dict(current) | {"model": EARLIER_MODEL, "data": EARLIER_DATA}
  assert schema.structured(earlier) == current
  (tmp_path / "config.yaml").write_text(yaml.safe_dump(earlier))
  rundir.check_config(tmp_path, to_dict(current))  # the same run: it resumes
  with pytest.raises(rundir.RunDirError, match=r"model.dense: 64 -> 32"):
    rundir.check_config(tmp_path, to_dict(validate(OmegaConf.to_object(compose_config(["model.dense=32"])))))
  molecules = earlier | {"model": EARLIER_MODEL | {"arch": "gru", "latent_size": 64},
                         "data": EARLIER_DATA | {"name": "moses", "pixels": "tokens"},
                         "objective": earlier["objective"] | {"likelihood": "categorical"}}
  migrated = schema.structured(molecules)
  assert (migrated.task, type(migrated.model).__name__, type(migrated.data).__name__) == (
      "molecules", "GRUConfig", "MoleculeDataConfig")
  validate(migrated)
