"""The disentanglement scores (evaluators/factor_scores.py) against known answers, on a synthetic FactorTable whose
examples are the factor values themselves, and the evaluator (evaluators/disentanglement.py) on an untrained conv VAE.

Codes: `perfect` puts each factor, rescaled to [-1, 1], in a dimension of its own; `rotated` mixes the same by a
fixed random rotation; `noisy` adds to the perfect code a fixed random offset per factor setting (sd 0.3: an
imprecise deterministic encoder). Sample counts are below dlib's where the answer does not depend on them.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvae_jax import data, likelihoods
from cvae_jax.config import ConfigError, Kind
from cvae_jax.data import Dataset, DatasetSpec, Encoding, Split
from cvae_jax.data.factors import FactorTable
from cvae_jax.data.images import ImageDataConfig
from cvae_jax.evaluators import EvalContext
from cvae_jax.evaluators import disentanglement
from cvae_jax.evaluators import factor_scores as fs
from cvae_jax.models import create_model, init_params

from conftest import small_config

SIZES = (3, 4, 5, 10)
VALUES = tuple(np.linspace(0.0, 1.0, k) for k in SIZES)
TABLE = FactorTable(("a", "b", "c", "d"), SIZES, VALUES,
                    lambda idx: np.stack([VALUES[f][idx[:, f]] for f in range(len(SIZES))], axis=1).astype(np.float32))
ROTATION = np.linalg.qr(np.random.default_rng(0).standard_normal((4, 4)))[0]
OFFSETS = np.random.default_rng(1).standard_normal((int(np.prod(SIZES)), 4))


def perfect(x):
  return (np.asarray(x, np.float64) - 0.5) * 2.0


def rotated(x):
  return perfect(x) @ ROTATION


def noisy(x):
  setting = np.ravel_multi_index(tuple(np.rint(np.asarray(x) * (np.array(SIZES) - 1)).astype(int).T), SIZES)
  return perfect(x) + 0.3 * OFFSETS[setting]


def with_constant(represent):
  return lambda x: np.c_[represent(x), np.full(len(x), 0.7)]


def scores(represent, seed: int = 0) -> dict:
  """Every score of one code at small counts, each from the same seed (so two codes see the same factors)."""
  rng = lambda: np.random.default_rng(seed)
  beta = fs.beta_vae_score(TABLE, represent, rng(), num_train=300, num_eval=200)
  factor = fs.factor_vae_score(TABLE, represent, rng(), num_train=300, num_eval=200, num_variance_estimate=2000)
  mig = fs.mig(TABLE, represent, rng())
  dci = fs.dci(TABLE, represent, rng(), num_train=1000, num_test=500, n_estimators=20)
  sap = fs.sap(TABLE, represent, rng(), num_train=2000, num_test=1000)
  return {"beta_vae": beta["eval_accuracy"], "factor_vae": factor["eval_accuracy"],
          "num_active_dims": factor["num_active_dims"], "mig": mig["mig"], "mig_per_factor": mig["per_factor"],
          "dci_disentanglement": dci["disentanglement"], "dci_completeness": dci["completeness"],
          "dci_informativeness": dci["informativeness_test"], "sap": sap["sap"], "sap_per_factor": sap["per_factor"],
          "sap_score_matrix": sap["score_matrix"]}


@pytest.fixture(scope="module")
def perfect_scores():
  return scores(perfect)


@pytest.fixture(scope="module")
def noisy_scores():
  return scores(noisy)


def test_a_perfect_code_scores_1(perfect_scores):
  s = perfect_scores
  # The fixed factor's dimension differs by exactly 0 within pairs (beta-VAE) and has variance 0 in the batch
  # (FactorVAE): both classifiers are exact.
  assert s["beta_vae"] == 1.0 and s["factor_vae"] == 1.0 and s["num_active_dims"] == 4
  # MIG: each factor's K <= 20 equally spaced values fall in distinct bins, so its own dimension holds all of H(v);
  # the second best is an independent dimension, whose plug-in MI is biased up by about (K1 - 1)(K2 - 1) / 2N
  # <= 9 * 9 / 20,000 nats, over H >= log 3: a gap of at least 0.996.
  assert s["mig"] > 0.996 and min(s["mig_per_factor"]) > 0.996
  # DCI: the trees use only each factor's own dimension; the 1e-11 that dlib adds against log 0 leaves 1 - 1e-9.
  assert s["dci_disentanglement"] == pytest.approx(1.0, abs=1e-6)
  assert s["dci_completeness"] == pytest.approx(1.0, abs=1e-6)
  assert s["dci_informativeness"] == 1.0


def test_the_sap_of_a_perfect_code_is_1_minus_chance_for_few_values(perfect_scores):
  # dlib's discrete SAP scores a dimension by a one-feature linear SVM (one-vs-rest, C = 0.01): a factor's own
  # dimension classifies it exactly when it has few values (3 and 4 here), and an uninformative dimension does no
  # better than predicting one class, about 1 / K. So the gap of a perfect code is about 1 - 1/K, not 1 ...
  matrix = np.array(perfect_scores["sap_score_matrix"])
  gap = perfect_scores["sap_per_factor"]
  for k, size in enumerate(SIZES[:2]):
    assert matrix[k, k] == 1.0
    assert 1 - 1 / size - 0.06 < gap[k] <= 1 - 1 / size + 0.02  # the best uninformative dimension: chance + noise
  # ... and a factor of 10 values is beyond one linear threshold per class: its own dimension predicts a few of its
  # values only (SAP's known limit with many-valued discrete factors, e.g. dSprites' positions).
  assert matrix[3, 3] < 0.5 and gap[3] < 0.3


def test_a_rotated_code_scores_low_on_mig_dci_and_sap(perfect_scores):
  s = scores(rotated)
  # Measured on this rotation over 4 seeds: MIG 0.40-0.41, DCI disentanglement 0.35-0.39, SAP 0.22-0.24 (perfect
  # code: 1, 1, 0.46). The beta-VAE and FactorVAE scores stay 1: they ask only that a classifier tell the factors
  # apart, which a rotation allows.
  assert s["mig"] < 0.6 and s["dci_disentanglement"] < 0.6 and s["sap"] < 0.35
  assert perfect_scores["sap"] - s["sap"] > 0.15
  assert s["dci_informativeness"] > 0.8  # the information is all there, only spread over the dimensions


@pytest.mark.parametrize("order", [[2, 0, 3, 1], [3, 2, 1, 0]])
def test_a_permutation_of_the_units_changes_no_score(noisy_scores, order):
  s = scores(lambda x: noisy(x)[:, order])
  for name in ("beta_vae", "factor_vae", "sap", "sap_per_factor"):
    assert s[name] == noisy_scores[name], name
  assert s["mig"] == pytest.approx(noisy_scores["mig"], abs=1e-12)
  # DCI's trees visit the features in a random order and keep the first of equally good splits (two dimensions
  # that cut a small node's examples the same way): a permutation moves that split, its importance and its test
  # predictions to the other dimension. Measured over all 24 permutations: at most 0.0017 on disentanglement,
  # 0.0016 on completeness, 0.002 on informativeness (one test prediction in 500 per factor).
  for name in ("dci_disentanglement", "dci_completeness", "dci_informativeness"):
    assert s[name] == pytest.approx(noisy_scores[name], abs=5e-3), name


def test_a_constant_unit_changes_no_score(perfect_scores, noisy_scores):
  s = scores(with_constant(perfect))
  for name in ("beta_vae", "factor_vae", "mig", "sap", "dci_informativeness"):
    assert s[name] == perfect_scores[name], name
  assert s["num_active_dims"] == 4  # FactorVAE prunes it
  for name in ("dci_disentanglement", "dci_completeness"):
    assert s[name] == pytest.approx(1.0, abs=1e-6), name
  # An imperfect code: MIG (the constant's MI is 0), the beta-VAE (its feature is 0) and FactorVAE (pruned) scores
  # are unchanged, SAP too (a constant dimension scores 0). DCI completeness is normalized by log Z, the number of
  # units: with the same importances, 1 - C becomes (1 - C) log 4 / log 5. The trees never split on the constant,
  # but its place in their random feature order changes which of two equal splits they keep (as a permutation does).
  s = scores(with_constant(noisy))
  for name in ("beta_vae", "factor_vae", "mig", "sap"):
    assert s[name] == noisy_scores[name], name
  assert s["dci_disentanglement"] == pytest.approx(noisy_scores["dci_disentanglement"], abs=5e-3)
  assert s["dci_informativeness"] == pytest.approx(noisy_scores["dci_informativeness"], abs=5e-3)
  expected = 1 - (1 - noisy_scores["dci_completeness"]) * math.log(4) / math.log(5)
  assert s["dci_completeness"] == pytest.approx(expected, abs=5e-3)
  assert s["dci_completeness"] > noisy_scores["dci_completeness"] + 0.03


def test_mig_by_hand():
  # Factors v1, v2 uniform on {0, 1}^2; z1 = v1, z2 = v1 AND v2 (each code has 2 values: the first and last bin).
  factors = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
  codes = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
  # I(v1; z1) = log 2, I(v2; z1) = 0; I(v1; z2) = I(v2; z2) = H(z2) - H(z2 | v) = H(1/4) - log(2) / 2 = a.
  a = 1.5 * math.log(2) - 0.75 * math.log(3)
  result = fs.mig_from_codes(codes, factors)
  np.testing.assert_allclose(result["entropy"], [math.log(2)] * 2)
  np.testing.assert_allclose(result["normalized_mutual_info"], np.array([[math.log(2), 0], [a, a]]) / math.log(2),
                             atol=1e-12)
  np.testing.assert_allclose(result["per_factor"], [1 - a / math.log(2), a / math.log(2)])
  assert result["mig"] == pytest.approx(0.5)  # (log 2 - a + a - 0) / (2 log 2)


def test_histogram_discretization_is_dlibs():
  # 20 equal-width bins numbered 1..20 against their left edges: the maximum falls in the last bin, so 21 equally
  # spaced values share it at the top (20 values would not).
  assert fs.histogram_discretize(np.arange(21.0)[:, None])[:, 0].tolist() == list(range(1, 21)) + [20]
  assert len(set(fs.histogram_discretize(np.linspace(-3, 5, 20)[:, None])[:, 0])) == 20
  assert len(set(fs.histogram_discretize(np.full((5, 1), 0.7))[:, 0])) == 1  # a constant: one bin


def test_dci_of_hand_importance_matrices():
  assert fs.dci_disentanglement(np.eye(4)) == pytest.approx(1.0)
  assert fs.dci_completeness(np.eye(4)) == pytest.approx(1.0)
  assert fs.dci_disentanglement(np.eye(3)[[2, 0, 1]]) == pytest.approx(1.0)
  assert fs.dci_disentanglement(np.ones((4, 4))) == pytest.approx(0.0, abs=1e-9)
  assert fs.dci_completeness(np.ones((4, 4))) == pytest.approx(0.0, abs=1e-9)
  # Two codes both about factor 0: each code is about one factor (D = 1), factor 0 is spread evenly (C = 0; factor
  # 1 has no importance, so no weight).
  both = np.array([[1.0, 0.0], [1.0, 0.0]])
  assert fs.dci_disentanglement(both) == pytest.approx(1.0)
  assert fs.dci_completeness(both) == pytest.approx(0.0, abs=1e-9)
  # Code 0 split evenly (1 - H2 = 0), code 1 about factor 1 only (1), each half the importance: D = 1/2. Factor 0 in
  # code 0 only (1, a quarter of the importance), factor 1 split 1:2 (1 - H2(1/3), three quarters): C as below.
  hand = np.array([[0.5, 0.5], [0.0, 1.0]])
  h = -(1 / 3) * math.log2(1 / 3) - (2 / 3) * math.log2(2 / 3)
  assert fs.dci_disentanglement(hand) == pytest.approx(0.5)
  assert fs.dci_completeness(hand) == pytest.approx(0.25 + 0.75 * (1 - h))


def test_majority_vote_by_hand():
  votes = np.array([[5, 0, 1],   # votes[factor, dim]
                    [2, 3, 0]])
  classifier, accuracy = fs.majority_vote(votes)
  assert classifier.tolist() == [0, 1, 0]
  assert accuracy == pytest.approx((5 + 3 + 1) / 11)
  assert fs.vote_accuracy(np.array([[1, 1, 1], [1, 1, 1]]), classifier) == pytest.approx(3 / 6)


def test_sap_top_two_gap_by_hand():
  assert fs.top_two_gap(np.array([[0.9, 0.2], [0.3, 0.6], [0.1, 0.5]])).tolist() == pytest.approx([0.6, 0.1])


# The evaluator ------------------------------------------------------------------------------------------------

IMAGE_SIZES = (4, 4, 3)  # a 2x2 square's column, row and brightness on an 8x8 image
BRIGHTNESS = np.array([85, 170, 255], np.uint8)


def squares(idx: np.ndarray) -> np.ndarray:
  images = np.zeros((len(idx), 8, 8, 1), np.uint8)
  for i, (col, row, level) in enumerate(idx):
    images[i, 2 * row:2 * row + 2, 2 * col:2 * col + 2] = BRIGHTNESS[level]
  return images


SQUARES = FactorTable(("x", "y", "brightness"), IMAGE_SIZES, (np.arange(4), np.arange(4), BRIGHTNESS / 255), squares)
TINY = disentanglement.Protocol(beta_vae_train=40, beta_vae_eval=20, factor_vae_train=40, factor_vae_eval=20,
                                variance_estimate=500, mig_train=1000, dci_train=300, dci_test=200, dci_trees=5,
                                sap_train=300, sap_test=200)


@pytest.fixture
def squares_dataset():
  entry = data.register(data.DatasetEntry("squares", ImageDataConfig, lambda cfg: None,
                                          lambda cfg: Encoding.grayscale, factors=lambda cfg: SQUARES))
  yield entry
  data.DATASETS.pop("squares")


def context(tmp_path, kind=Kind.vae, name="squares") -> EvalContext:
  cfg = small_config(**{"model.arch": "conv", "model.kind": kind, "model.latent_size": 3,
                        "model.encoder_channels": [4], "model.dense": 16})
  cfg.data.name = name
  spec = DatasetSpec(name, (8, 8, 1), 0, Encoding.grayscale)
  model = create_model(cfg.model, spec)
  params = init_params(model, {"params": jax.random.key(0)}, jnp.zeros((1, 8, 8, 1)), None, jax.random.key(1))
  images = squares(SQUARES.sample(16, np.random.default_rng(0)))
  split = Split(images, np.zeros(16, np.int32))
  return EvalContext(cfg, Dataset(spec, split, split), model, params, tmp_path, likelihoods.get("bernoulli"))


def test_the_evaluator_scores_an_untrained_vae_and_draws_its_traversals(tmp_path, squares_dataset):
  ctx = context(tmp_path)
  out = disentanglement.evaluator(ctx, TINY)["disentanglement"]
  for name in ("beta_vae", "factor_vae", "mig", "dci_disentanglement", "dci_completeness", "dci_informativeness",
               "sap", "wall_time"):
    assert np.isfinite(out[name]) and out[name] >= 0, name
  assert out["factors"] == ["x", "y", "brightness"] and set(out["mig_per_factor"]) == {"x", "y", "brightness"}
  assert len(out["unit_factor"]) == 3 and set(out["unit_factor"]) <= {"x", "y", "brightness", None}
  assert np.array(out["dci_importance"]).shape == (3, 3) and out["protocol"]["dci_trees"] == 5
  assert (tmp_path / "figures" / "traversals.png").stat().st_size > 0
  again = disentanglement.evaluator(ctx, TINY)["disentanglement"]  # reproducible: every draw from the run's seed
  drop = lambda d: {k: v for k, v in d.items() if k not in ("wall_time", "wall_times")}
  assert drop(again) == drop(out)


def test_the_evaluator_refuses_data_without_factors_and_a_cvae(tmp_path, squares_dataset):
  with pytest.raises(ConfigError, match="data.name='mnist' has none"):
    disentanglement.check(context(tmp_path, name="mnist").cfg)
  with pytest.raises(ConfigError, match="model.kind=cvae"):
    disentanglement.check(small_config(**{"model.kind": Kind.cvae, "data.name": "squares"}))


@pytest.mark.parametrize("name, expected", [("fast", disentanglement.FAST), ("dlib", disentanglement.DLIB)])
def test_evaluation_disentanglement_protocol_chooses_the_sample_counts(tmp_path, squares_dataset, monkeypatch,
                                                                       name, expected):
  used = []
  monkeypatch.setattr(disentanglement, "score_all", lambda table, represent, seed, protocol: used.append(protocol)
                      or {"unit_factor": [None] * 3, "normalized_mutual_info": np.zeros((3, 3))})
  ctx = context(tmp_path)
  ctx.cfg.evaluation.disentanglement_protocol = name
  disentanglement.evaluator(ctx)
  assert used == [expected]
  assert expected.dci_trees == (100 if name == "dlib" else 20)
