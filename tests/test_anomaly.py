"""Anomaly detection: each score against its definition, the metrics against hand-computed values, the
held-out-class protocol end to end, and the 1-D signal path (Gaussian likelihood, MLP and 1-D conv)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from cvae_jax import data, estimators, likelihoods
from cvae_jax.config import Kind
from cvae_jax.data import Dataset, DatasetSpec, Encoding, Modality, Split
from cvae_jax.data.images import ImageDataConfig
from cvae_jax.evaluators import anomaly
from cvae_jax.evaluators import EvalContext
from cvae_jax.experiment import restore_run, train_and_evaluate, validate
from cvae_jax.models import create_model, init_params
from cvae_jax.models.mlp import MLPConfig

from conftest import small_config, synthetic_dataset

SPEC = DatasetSpec("toy", (4, 4, 1), 3, Encoding.static_binary)
BERNOULLI = likelihoods.get("bernoulli")


def toy_model(kind):
  model = create_model(MLPConfig(kind=kind, hidden=[16], latent_size=3), SPEC)
  c = jnp.zeros((1, 3)) if kind == Kind.cvae else None
  params = init_params(model, {"params": jax.random.key(0)}, jnp.zeros((1, 4, 4, 1)), c, jax.random.key(1))
  images = jax.random.bernoulli(jax.random.key(2), 0.4, (6, 4, 4, 1)).astype(jnp.uint8)
  return model, params, images, jnp.zeros(6, jnp.int32)


def test_infinite_scores_rank_and_nan_scores_are_counted():
  m = anomaly.detection_metrics(np.array([0.1, np.inf, 0.2, np.nan, 0.3]), np.array([0, 1, 0, 1, 1]))
  assert m["auroc"] == 1.0 and m["nan_scores"] == 1
  assert m["mean_normal"] == pytest.approx(0.15) and m["mean_anomalous"] == pytest.approx(0.3)  # finite only


def test_infinite_scores_keep_the_order_of_the_finite_ones():
  # Clipping the infinities to just outside the finite range must not tie any finite scores.
  assert anomaly.detection_metrics(np.array([-np.inf, 3.0, 0.0, 10.0]), np.array([0, 1, 0, 1]))["auroc"] == 1.0
  assert anomaly.detection_metrics(np.array([0.0, 10.0, 5.0, np.inf]), np.array([0, 1, 0, 1]))["auroc"] == 1.0
  assert anomaly.detection_metrics(np.array([np.inf, -np.inf, np.inf]), np.array([1, 0, 1]))["auroc"] == 1.0


def test_metrics_by_hand():
  # Pairs (anomaly, normal) ranked correctly: (0.35 > 0.1), (0.8 > 0.1), (0.8 > 0.4); wrong: (0.35 < 0.4).
  m = anomaly.detection_metrics(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
  assert m["auroc"] == pytest.approx(0.75)
  assert m["auprc"] == pytest.approx((1 / 1 + 2 / 3) / 2)  # precision at each anomaly's rank
  assert m["anomaly_fraction"] == 0.5
  assert m["mean_normal"] == pytest.approx(0.25) and m["mean_anomalous"] == pytest.approx(0.575)


def test_vae_scores_with_one_sample_agree():
  model, params, images, labels = toy_model(Kind.vae)
  scores = anomaly.make_scores(model, SPEC, BERNOULLI, 1, 3, 1)(params, images, labels, jax.random.key(3))
  np.testing.assert_allclose(scores["nll"], scores["neg_elbo"], rtol=1e-6)  # L_1 is the one-sample ELBO
  many = anomaly.make_scores(model, SPEC, BERNOULLI, 64, 3, 16)(params, images, labels, jax.random.key(3))
  assert np.all(np.asarray(many["nll"]) <= np.asarray(many["neg_elbo"]) + 1e-4)  # L_k >= ELBO


def test_cvae_marginal_and_best_label_scores():
  model, params, images, labels = toy_model(Kind.cvae)
  log_prior = np.array([np.log(0.25), np.log(0.75), -np.inf])  # class 2 never trained on: left out of the marginal
  key = jax.random.key(4)
  scores = anomaly.make_scores(model, SPEC, BERNOULLI, 8, 6, 8, log_prior)(params, images, labels, key)
  x = images.astype(jnp.float32)
  bounds = [estimators.iwae_bound(model, params, x, jax.nn.one_hot(jnp.full(6, k), 3),
                                  jax.random.fold_in(jax.random.fold_in(key, 0), 0), 8, 8, BERNOULLI, with_elbo=True)
            for k in (0, 1)]  # chunk 0's key, as map_over_split folds it
  for score, i in (("nll", 0), ("neg_elbo", 1)):  # the bound L_k, and the k-sample ELBO of the same draws
    per_class = np.stack([np.asarray(b[i]) for b in bounds])
    expected = -np.logaddexp(np.log(0.25) + per_class[0], np.log(0.75) + per_class[1])
    np.testing.assert_allclose(scores[f"marginal_{score}"], expected, rtol=1e-5)
    np.testing.assert_allclose(scores[f"best_label_{score}"], -per_class.max(axis=0), rtol=1e-5)


def test_autoencoder_score_is_its_reconstruction_loss():
  model, params, images, labels = toy_model(Kind.ae)
  scores = anomaly.make_scores(model, SPEC, BERNOULLI, 1, 6, 1)(params, images, labels, jax.random.key(5))
  x = images.astype(jnp.float32)
  mean, _ = model.apply({"params": params}, x, None, method=model.encode)
  logits = model.apply({"params": params}, mean, None, method=model.decode)
  expected = -np.sum(np.asarray(x * logits - jax.nn.softplus(logits)).reshape(6, -1), axis=1)
  np.testing.assert_allclose(scores["reconstruction"], expected, rtol=1e-5)


def test_excluded_classes_leave_train_and_validation_but_not_test():
  ds = data.load(ImageDataConfig(name="mnist", exclude_classes=[3, 7], validation_size=1000, test_limit=500))
  assert not np.isin([3, 7], ds.train.labels).any() and not np.isin([3, 7], ds.validation.labels).any()
  assert np.isin([3, 7], ds.test.labels).all() and len(ds.test) == 500
  with pytest.raises(data.DataError, match="not among the 10 classes"):
    data.load(ImageDataConfig(name="mnist", exclude_classes=[10]))


def other_dataset(monkeypatch, ds):
  """evaluation.anomaly_dataset loads this dataset: the same shape, every row lit (unlike any class)."""
  rng = np.random.default_rng(1)
  images = np.clip(rng.integers(150, 256, ds.test.images.shape), 0, 255).astype(np.uint8)
  other = Dataset(ds.spec, ds.test, Split(images, ds.test.labels))
  monkeypatch.setattr(anomaly.data, "load", lambda cfg: other)


@pytest.mark.parametrize("kind", ["vae", pytest.param("cvae", marks=pytest.mark.slow), "ae"])
def test_held_out_class_and_other_dataset_are_found(tmp_path, monkeypatch, kind):
  # Each synthetic class lights its own band of rows; trained without class 2, its images are anomalous.
  ds = synthetic_dataset(n_train=1024, n_test=300)
  other_dataset(monkeypatch, ds)
  cfg = small_config(**{"model.kind": kind, "data.exclude_classes": [2], "evaluation.anomaly": True,
                        "evaluation.anomaly_samples": 8, "training.epochs": 5, "evaluation.anomaly_dataset": "other"})
  ds = Dataset(ds.spec, data.exclude(ds.train, [2]), ds.test)  # as data.load does for data.exclude_classes
  results = train_and_evaluate(cfg, tmp_path, dataset=ds)
  protocols = json.loads((tmp_path / "anomaly.json").read_text())["protocols"]
  num_held_out = int(np.sum(ds.test.labels == 2))
  assert (protocols["held_out"]["num_anomalous"], protocols["held_out"]["num_normal"]) == (num_held_out, 300 - num_held_out)
  assert (protocols["cross_dataset"]["num_anomalous"], protocols["cross_dataset"]["num_normal"]) == (300, 300 - num_held_out)
  expected = {"vae": {"neg_elbo", "nll"}, "ae": {"reconstruction"},
              "cvae": {"marginal_nll", "best_label_nll", "marginal_neg_elbo", "best_label_neg_elbo"}}[kind]
  for protocol in protocols.values():
    assert set(protocol["scores"]) == expected | {"input_complexity", "typicality"}
    for name, metrics in protocol["scores"].items():
      assert metrics["auroc"] > 0.95, (name, metrics)
  assert results["anomaly_auroc"] == anomaly.auroc_summary({"protocols": protocols})
  assert (tmp_path / "anomaly_scores.npz").exists() and (tmp_path / "figures" / "anomaly_scores.png").exists()


def signal_dataset(n_train=2048, n_test=200, length=32, seed=0) -> Dataset:
  """Generated 1-D signals [N, T, 1]: class 0 a sine of period 16, class 1 period 8, plus noise."""
  rng = np.random.default_rng(seed)
  t = np.arange(length)

  def split(n):
    labels = rng.integers(0, 2, n).astype(np.int32)
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    signals = np.sin(2 * np.pi * t / np.where(labels[:, None] == 0, 16, 8) + phase) + 0.1 * rng.normal(size=(n, length))
    return Split(signals[..., None].astype(np.float32), labels)

  return Dataset(DatasetSpec("signals", (length, 1), 2, Encoding.real, Modality.signal), split(n_train), split(n_test))


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_signals_with_a_gaussian_likelihood(tmp_path, arch):
  ds = signal_dataset()
  overrides = {"data.name": "ecg5000", "objective.likelihood": "gaussian", "model.arch": arch, "training.epochs": 8,
               "data.exclude_classes": [1], "evaluation.anomaly": True, "evaluation.anomaly_samples": 8,
               "training.figures": True, "optimizer.learning_rate": 3e-3}
  if arch == "conv":
    overrides |= {"model.encoder_channels": [8, 8], "model.decoder_channels": [8, 8], "model.conv_stride": 2,
                  "model.kernel_size": 5, "model.dense": 32}
  cfg = small_config(**overrides)
  ds = Dataset(ds.spec, data.exclude(ds.train, [1]), ds.test)
  results = train_and_evaluate(cfg, tmp_path, dataset=ds)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["train/elbo"] > rows[0]["train/elbo"] + 5  # it learns
  assert results["anomaly_auroc"]["held_out/nll"] > 0.9   # the other frequency is anomalous
  assert results["figures"] == ["reconstructions.png"]


def test_real_valued_data_needs_the_gaussian_likelihood():
  from cvae_jax.config import ConfigError
  with pytest.raises(ConfigError, match="objective=gaussian"):
    validate(small_config(**{"data.name": "ecg5000"}))


def test_missing_ecg_files_say_how_to_fetch_them(tmp_path):
  from cvae_jax.data.ecg5000 import ECG5000_FILES, SignalDataConfig
  with pytest.raises(data.DataError, match="fetch_ecg5000.py"):
    data.load(SignalDataConfig(manual_dir=str(tmp_path)))
  (tmp_path / "ecg5000").mkdir()
  for name in ECG5000_FILES:
    (tmp_path / "ecg5000" / name).write_text("1\t0.5\n")  # not the UCR file
  with pytest.raises(data.DataError, match="sha256 differs"):
    data.load(SignalDataConfig(manual_dir=str(tmp_path)))


def test_the_class_prior_is_the_normalized_label_frequency():
  log_prior = anomaly.class_log_prior(np.array([0, 0, 1, 0, 1, 3], np.int32), 4)
  np.testing.assert_allclose(np.exp(log_prior), [3 / 6, 2 / 6, 0.0, 1 / 6])
  assert log_prior[2] == -np.inf  # a held-out class: left out of the marginal


def test_the_background_model_trains_beside_the_run_and_gives_the_likelihood_ratio(tmp_path):
  ds = synthetic_dataset(n_train=512, n_test=200)
  cfg = small_config(**{"data.exclude_classes": [2], "evaluation.anomaly": True, "evaluation.anomaly_samples": 4,
                        "evaluation.background_rate": 0.2, "training.epochs": 2})
  ds = Dataset(ds.spec, data.exclude(ds.train, [2]), ds.test)
  train_and_evaluate(cfg, tmp_path, dataset=ds)
  scores = json.loads((tmp_path / "anomaly.json").read_text())["protocols"]["held_out"]["scores"]
  assert {"likelihood_ratio", "input_complexity", "typicality"} <= set(scores)
  background = yaml.safe_load((tmp_path / "background" / "config.yaml").read_text())
  assert background["evaluation"]["background_rate"] == 0.0 and not background["evaluation"]["anomaly"]
  assert (tmp_path / "background" / "results.json").exists()
  # The same model as its own background: the ratio is 0 for every input.
  restored = restore_run(tmp_path, dataset=ds)
  ctx = EvalContext(restored.cfg, ds, restored.model, restored.params, tmp_path,
                    likelihoods.of(restored.cfg.objective), background_params=restored.params)
  itself = anomaly.score_anomalies(ctx)["protocols"]["held_out"]["scores"]["likelihood_ratio"]
  assert itself["auroc"] == 0.5  # all scores tie at 0
  saved = np.load(tmp_path / "anomaly_scores.npz")
  assert np.array_equal(saved["held_out/likelihood_ratio"], np.zeros(len(ds.test)))
