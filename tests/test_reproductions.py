"""Every paper-reproduction config composes and runs a few steps on the real data, with the most
expensive value of each swept key (k = 50, latent 200, ...), shrunk to a few hundred images."""
import json

import pytest
from omegaconf import OmegaConf

from cvae_jax.config import Config
from cvae_jax.experiment import restore_run, train_and_evaluate, validate
from conftest import REPO, require_fashion_mnist
from test_config import compose_config

# experiment -> its page under experiments/
REPRODUCTIONS = {"iwae": "iwae", "sohn_quadrants": "sohn_quadrants", "flax_vae": "flax_vae",
                 "kingma_welling": "kingma_welling", "fashion_flax": "fashion_mnist", "fashion_iwae": "fashion_mnist"}
SHRINK = ["data.train_limit=256", "data.test_limit=100", "training.epochs=1", "evaluation.iwae_samples=4",
          "evaluation.sample_chunk=4", "evaluation.mi_examples=50", "training.progress=false", "training.figures=false",
          "evaluation.quality_samples=0"]


def last_sweep_values(experiment: str) -> list[str]:
  params = compose_config([f"+experiment={experiment}"], with_hydra=True).hydra.sweeper.params or {}
  return [f"{key}={str(values).split(',')[-1]}" for key, values in params.items()]


@pytest.mark.integration
@pytest.mark.parametrize("experiment", [pytest.param(e, marks=pytest.mark.fashion_mnist) if e.startswith("fashion")
                                        else e for e in sorted(REPRODUCTIONS)])
def test_reproduction_config_runs_a_few_steps(experiment, tmp_path):
  if experiment.startswith("fashion"):
    require_fashion_mnist()
  overrides = [f"+experiment={experiment}", *last_sweep_values(experiment), *SHRINK]
  cfg: Config = validate(OmegaConf.to_object(compose_config(overrides)))
  results = train_and_evaluate(cfg, tmp_path)
  if cfg.task == "quadrants":
    assert results["baseline_bce"] > 0 and results["cvae_neg_elbo"] > 0 and results["cvae_conditional_nll"] > 0
  else:
    assert results["elbo"] < 0 and results["nll"] > 0 and results["iwae_samples"] == 4
    # The restored checkpoint evaluated again gives the same numbers: training reported its final parameters.
    restored = restore_run(tmp_path)
    evaluated = restored.task.evaluate(restored, tmp_path)
    assert (evaluated["elbo"], evaluated["iwae"]["nll"]) == (results["elbo"], results["nll"])
  assert json.loads((tmp_path / "results.json").read_text()) == results
  assert (REPO / "experiments" / REPRODUCTIONS[experiment] / "README.md").exists()


def test_reproduction_configs_follow_their_protocols():
  iwae = validate(OmegaConf.to_object(compose_config(["+experiment=iwae"])))
  assert (iwae.model.hidden, iwae.model.latent_size, iwae.model.activation) == ([200, 200], 50, "tanh")
  assert (iwae.training.batch_size, iwae.optimizer.eps, iwae.optimizer.schedule.value) == (20, 1e-4, "burda")
  assert iwae.data.pixels.value == "dynamic_binary" and iwae.evaluation.iwae_samples == 5000
  sweep = compose_config(["+experiment=iwae"], with_hydra=True).hydra.sweeper.params
  assert set(sweep["objective.estimator"].split(",")) == {"elbo", "iwae"}
  assert set(sweep["objective.samples"].split(",")) == {"1", "5", "50"}
  sohn = validate(OmegaConf.to_object(compose_config(["+experiment=sohn_quadrants"])))
  assert (sohn.model.hidden, sohn.model.latent_size, sohn.training.batch_size) == ([500, 500], 200, 128)
  assert (sohn.quadrants.patience, sohn.quadrants.elbo_samples, sohn.data.pixels.value) == (3, 10, "grayscale")
  kw = compose_config(["+experiment=kingma_welling"], with_hydra=True).hydra.sweeper.params
  assert {int(v) for v in kw["model.latent_size"].split(",")} == {3, 5, 10, 20, 200}
