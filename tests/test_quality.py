"""Sample quality (evaluators/quality.py): the Fréchet distance against closed forms and SciPy, precision,
recall, density and coverage against hand computations and their expectations, the evaluator on a tiny
trained model, and the sweep report's columns."""
import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest
import scipy.linalg
import yaml

from cvae_jax import likelihoods, report
from cvae_jax.config import ConfigError, to_dict, validate_common
from cvae_jax.data import Encoding
from cvae_jax.evaluators import EvalContext, classifier, quality
from cvae_jax.experiment import train_and_evaluate
from cvae_jax.tasks.density import DensityTask
from conftest import small_config, synthetic_dataset


def random_covariance(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


# The Fréchet distance.

def test_frechet_distance_of_a_set_with_itself_is_zero():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16)) + 3.0  # correlated features
  assert quality.frechet_distance(x, x) <= 1e-6 * np.trace(np.cov(x, rowvar=False))
  few = rng.normal(size=(10, 128))  # fewer points than dimensions: a singular covariance
  assert quality.frechet_distance(few, few) <= 1e-6 * np.trace(np.cov(few, rowvar=False))


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
  shift = rng.normal(size=8)
  assert quality.frechet_distance(x, x + shift) == pytest.approx(np.sum(shift ** 2), rel=1e-6)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
  mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
  s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)  # 1 + 6.25 + 4 + 1 = 12.25
  assert expected == 12.25
  assert quality.gaussian_frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)
  # 1-D: the Wasserstein-2 distance of two normals, (m1 - m2)^2 + (sigma1 - sigma2)^2
  assert quality.gaussian_frechet_distance([2.0], [[4.0]], [-1.0], [[1.0]]) == pytest.approx(9 + 1, rel=1e-12)


def test_frechet_distance_of_full_covariances_matches_scipy_sqrtm():
  rng = np.random.default_rng(2)
  for d in (2, 5, 32):
    s1, s2 = random_covariance(rng, d), random_covariance(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))
    assert quality.gaussian_frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
  # 2-D by hand: S1 = I, S2 = [[2, 1], [1, 2]] (eigenvalues 1 and 3): Tr(S2^(1/2)) = 1 + sqrt(3)
  by_hand = 2 + 4 - 2 * (1 + np.sqrt(3))
  assert quality.gaussian_frechet_distance([0, 0], np.eye(2), [0, 0], [[2, 1], [1, 2]]) == pytest.approx(by_hand)


# k-NN radii, precision, recall, density, coverage.

def test_knn_radii_on_a_line_are_known():
  line = np.arange(10.0)[:, None]
  r3, r5 = quality.knn_radii(line, 3, 5)  # squared distances to the 3rd and 5th nearest other point
  np.testing.assert_array_equal(r3, np.array([3, 2, 2, 2, 2, 2, 2, 2, 2, 3]) ** 2)
  np.testing.assert_array_equal(r5, np.array([5, 4, 3, 3, 3, 3, 3, 3, 4, 5]) ** 2)
  # Copies are other points: four copies of 0 are each other's 3 nearest neighbours.
  np.testing.assert_array_equal(quality.knn_radii(np.array([[0.0], [0], [0], [0], [5]]), 3)[0], [0, 0, 0, 0, 25])
  with pytest.raises(ValueError, match="need more than 5 points"):
    quality.knn_radii(line[:5], 5)


def test_hand_made_line_with_k_1():
  """real 0, 1, 2, 4 (1-NN radii 1, 1, 1, 2); fake 0.5, 1, 10, 11 (1-NN radii 0.5, 0.5, 1, 1). Balls are
  closed: real 2 is covered by fake 1 at exactly its radius, real 0 recalled by fake 0.5's ball edge."""
  real, fake = np.array([[0.0], [1], [2], [4]]), np.array([[0.5], [1], [10], [11]])
  got = quality.manifold_metrics(real, fake, k_pr=1, k_dc=1)
  # precision: 0.5 and 1 lie in the real balls, 10 and 11 do not             -> 2/4
  # recall: fake balls [0, 1], [0.5, 1.5], [9, 11], [10, 12] hold reals 0, 1   -> 2/4
  # density: 0.5 is in the balls of reals 0, 1; 1 in those of 0, 1, 2          -> (2 + 3) / (1 * 4)
  # coverage: reals 0, 1, 2 have a fake within radius 1; real 4 (radius 2) not -> 3/4
  assert got == {"precision": 0.5, "recall": 0.5, "density": 1.25, "coverage": 0.75}


def test_collapse_to_one_point_on_a_line():
  """real 0..9, every sample at 0 (default k: 3 and 5). The 5-NN radii are 5, 4, 3, 3, ..., 4, 5, so 0 lies in
  the balls of reals 0, 1, 2, 3 only; the samples' own radii are 0 (copies), recalling real 0 only."""
  got = quality.manifold_metrics(np.arange(10.0)[:, None], np.zeros((100, 1)))
  assert got == {"precision": 1.0, "recall": 0.1, "density": pytest.approx(0.8), "coverage": 0.4}


def test_identical_sets_have_precision_recall_coverage_one():
  x = np.random.default_rng(3).normal(size=(400, 6))
  got = quality.metrics(x, x)
  assert (got["precision"], got["recall"], got["coverage"]) == (1.0, 1.0, 1.0)
  assert got["fd"] <= 1e-6 * 6


def test_same_distribution_has_density_one_and_coverage_one_minus_two_to_minus_k():
  """Naeem et al. 2020: for fake ~ real, E[density] = 1 (a new point is among a real point's k nearest with
  probability k / N) and E[coverage] = 1 - prod_i (N - i) / (N + M - i), i = 1..k: 1 - 2^-5 for M = N."""
  rng = np.random.default_rng(4)
  n, k = 1000, quality.K_DENSITY_COVERAGE
  densities, coverages = [], []
  for _ in range(5):
    got = quality.manifold_metrics(rng.normal(size=(n, 4)), rng.normal(size=(n, 4)))
    densities.append(got["density"])
    coverages.append(got["coverage"])
  expected_coverage = 1 - np.prod([(n - i) / (2 * n - i) for i in range(1, k + 1)])
  assert np.mean(densities) == pytest.approx(1.0, abs=0.03)
  assert np.mean(coverages) == pytest.approx(expected_coverage, abs=0.01)


def test_disjoint_far_apart_sets_score_zero():
  rng = np.random.default_rng(5)
  real, fake = rng.normal(size=(300, 5)), rng.normal(size=(200, 5)) + 100.0
  got = quality.metrics(real, fake)
  assert {k: got[k] for k in ("precision", "recall", "density", "coverage")} == dict.fromkeys(
      ("precision", "recall", "density", "coverage"), 0.0)
  assert got["fd"] == pytest.approx(5 * 100.0 ** 2, rel=0.01)


def clusters(rng, which, per_cluster):
  """per_cluster points around each chosen centre of 10 on a circle of radius 100 (unit spread)."""
  centres = 100 * np.stack([np.cos(np.arange(10) * 2 * np.pi / 10), np.sin(np.arange(10) * 2 * np.pi / 10)], 1)
  return np.concatenate([centres[c] + rng.normal(size=(per_cluster, 2)) for c in which])


def test_a_mode_dropping_generator_keeps_precision_and_halves_recall_and_coverage():
  rng = np.random.default_rng(6)
  real = clusters(rng, range(10), 100)
  half = quality.metrics(real, clusters(rng, range(5), 200))  # as many samples, from 5 of the 10 clusters
  full = quality.metrics(real, clusters(rng, range(10), 100))
  assert half["precision"] > 0.9 and full["precision"] > 0.9
  assert 0.45 < half["recall"] <= 0.5 and 0.45 < half["coverage"] <= 0.5  # the dropped half is never reached
  assert full["recall"] > 0.9 and full["coverage"] > 0.9
  assert half["fd"] > 10 * full["fd"]


def test_chunking_changes_nothing(monkeypatch):
  rng = np.random.default_rng(7)
  real, fake = rng.normal(size=(150, 3)), rng.normal(size=(130, 3)) + 0.3
  whole = quality.manifold_metrics(real, fake)
  monkeypatch.setattr(quality, "CHUNK_ENTRIES", 1000)  # chunks of 6 and 7 rows, the last one short
  assert quality.manifold_metrics(real, fake) == whole
  np.testing.assert_array_equal(quality.knn_radii(real, 3), quality.knn_radii(real, 3))


# The evaluator on a tiny trained model.

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A CVAE and a VAE trained an epoch on the synthetic blobs (3 classes), restored from their directories,
  with one classifier (the one either would train: same data, same seed) copied into both."""
  ds = synthetic_dataset()
  runs = {}
  for kind in ("cvae", "vae"):
    cfg = small_config(**{"model.kind": kind, "training.epochs": 1, "evaluation.iwae_samples": 0,
                          "evaluation.quality_samples": 0})
    workdir = tmp_path_factory.mktemp(kind)
    train_and_evaluate(cfg, workdir, dataset=ds)
    model, state = DensityTask().restore(cfg, ds, workdir)
    cfg.evaluation = dataclasses.replace(cfg.evaluation, quality_samples=150)
    runs[kind] = EvalContext(cfg, ds, model, state.params, workdir, likelihoods.of(cfg.objective))
  classifier.load_or_train(runs["cvae"].workdir / "classifier", ds, runs["cvae"].cfg.seed)
  shutil.copytree(runs["cvae"].workdir / "classifier", runs["vae"].workdir / "classifier")
  return runs


def test_features_are_the_layer_the_logits_are_computed_from(trained):
  ds = trained["cvae"].dataset
  judge, params, _ = classifier.load_or_train(trained["cvae"].workdir / "classifier", ds)
  x = classifier.intensities(ds.test.images, ds.spec.encoding)
  features = classifier.make_features(judge, batch_size=10)(params, x)  # 7 chunks, the last one short
  assert features.shape == (64, classifier.FEATURES) and features.min() >= 0  # after the ReLU
  head = params["Dense_1"]
  logits = judge.apply({"params": params}, x)
  np.testing.assert_allclose(features @ np.asarray(head["kernel"]) + np.asarray(head["bias"]), logits,
                             rtol=1e-5, atol=1e-5)


def test_classifier_inputs_are_intensities_in_0_1():
  stored = np.array([0, 1, 255], np.uint8)
  np.testing.assert_allclose(classifier.intensities(stored, Encoding.grayscale), [0, 1 / 255, 1])
  np.testing.assert_allclose(classifier.intensities(stored, Encoding.dynamic_binary), [0, 1 / 255, 1])
  np.testing.assert_array_equal(classifier.intensities(np.array([0, 1], np.uint8), Encoding.static_binary), [0, 1])


def test_cvae_sample_quality_overall_per_class_and_reference(trained):
  ctx = trained["cvae"]
  got = quality.sample_quality(ctx)["sample_quality"]
  assert set(quality.NAMES) <= set(got) and set(quality.NAMES) <= set(got["reference"])
  assert got["samples"] == 150 and got["test_images"] == 64 and got["per_class_by"] == "condition"
  assert got["features"] == "classifier penultimate (128)" and 0 <= got["classifier_test_accuracy"] <= 1
  assert len(got["per_class"]) == 3 and len(got["reference"]["per_class"]) == 3
  assert [c["samples"] for c in got["per_class"]] == [50, 50, 50]
  assert [c["test_images"] for c in got["per_class"]] == np.bincount(ctx.dataset.test.labels).tolist()
  # The reference: 50 training images of each class, a perfect generator of this many samples.
  assert [c["samples"] for c in got["reference"]["per_class"]] == [50, 50, 50] and got["reference"]["samples"] == 150
  for numbers in [got, got["reference"], *got["per_class"], *got["reference"]["per_class"]]:
    assert np.isfinite(numbers["fd"]) and numbers["fd"] >= 0
    assert all(0 <= numbers[k] <= 1 for k in ("precision", "recall", "coverage")) and numbers["density"] >= 0
  # Training images score as the same distribution; an epoch's smooth decoder means, against noisy test
  # images, are far from them (precision 0 here) and at 60 times the reference's distance.
  assert got["reference"]["precision"] > 0.8 and got["reference"]["coverage"] > 0.8
  assert got["reference"]["fd"] < 0.1 * got["fd"]
  json.dumps(got)  # eval.json takes it as it is
  assert quality.sample_quality(ctx)["sample_quality"] == got  # fixed keys: the same numbers again


def test_a_generator_that_draws_the_reference_images_scores_the_reference(trained, monkeypatch):
  """The samples' path (features, per-class grouping) and the reference's agree: samples that are the
  reference's own training images get exactly its numbers."""
  ctx = trained["cvae"]
  classes = np.repeat(np.arange(3), 50)
  picked = quality._reference(ctx, 150, classes)
  images = np.asarray(classifier.intensities(ctx.dataset.train.images[picked], ctx.dataset.spec.encoding))
  monkeypatch.setattr(quality, "_generated", lambda ctx, n: (images, ctx.dataset.train.labels[picked]))
  got = quality.sample_quality(ctx)["sample_quality"]
  assert {k: got[k] for k in quality.NAMES} == {k: got["reference"][k] for k in quality.NAMES}
  assert got["per_class"] == got["reference"]["per_class"]


def test_vae_per_class_groups_by_the_classifiers_prediction(trained):
  got = quality.sample_quality(trained["vae"])["sample_quality"]
  assert got["per_class_by"] == "classifier prediction" and len(got["per_class"]) == 3
  assert sum(c["samples"] for c in got["per_class"]) == got["samples"] == 150
  assert sum(c["samples"] for c in got["reference"]["per_class"]) == got["reference"]["samples"] == 150
  for c in got["per_class"]:  # a class drawn fewer than 6 times has no numbers, never a wrong one
    assert (c["fd"] is None) == (c["samples"] <= quality.K_DENSITY_COVERAGE)


def test_sample_quality_is_skipped_where_it_cannot_be_measured(trained):
  ctx = trained["cvae"]
  off = dataclasses.replace(ctx.cfg.evaluation, quality_samples=0)
  assert quality.sample_quality(dataclasses.replace(ctx, cfg=dataclasses.replace(ctx.cfg, evaluation=off))) == {}
  held_out = dataclasses.replace(ctx.cfg, data=dataclasses.replace(ctx.cfg.data, exclude_classes=[1]))
  assert quality.sample_quality(dataclasses.replace(ctx, cfg=held_out)) == {}
  signal = dataclasses.replace(ctx.dataset, spec=dataclasses.replace(ctx.dataset.spec, shape=(64, 1),
                                                                     modality="signal"))
  assert quality.sample_quality(dataclasses.replace(ctx, dataset=signal)) == {}


def test_a_sample_count_too_small_for_the_radii_stops_at_start_up():
  validate_common(small_config(**{"evaluation.quality_samples": 0}))  # 0 skips
  with pytest.raises(ConfigError, match="evaluation.quality_samples=3 is invalid"):
    validate_common(small_config(**{"evaluation.quality_samples": 3}))


# The sweep report.

def test_report_shows_fd_recall_coverage_and_the_reference(tmp_path):
  for name, beta, fd in (("b1", 1.0, 12.5), ("b4", 4.0, 30.25)):
    run = tmp_path / name
    run.mkdir()
    config = to_dict(small_config())
    config["objective"]["beta"] = beta
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "results.json").write_text(json.dumps({"elbo": -100.0 * beta, "rec": 80.0, "kl": 20.0}))
    reference = {"fd": 1.5 + beta / 100, "precision": 0.9, "recall": 0.91, "density": 1.0, "coverage": 0.97}
    (run / "eval.json").write_text(json.dumps({"sample_quality": {
        "fd": fd, "precision": 0.8, "recall": 0.25 * beta, "density": 0.7, "coverage": 0.5, "samples": 5000,
        "reference": reference}}))
  (tmp_path / "old").mkdir()  # a run evaluated before sample quality existed: blanks in its columns
  config = to_dict(small_config())
  config["objective"]["beta"] = 2.0
  (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(config))
  (tmp_path / "old" / "results.json").write_text(json.dumps({"elbo": -150.0, "rec": 80.0, "kl": 20.0}))
  out = report.write_report(tmp_path)
  text = out["markdown"].read_text()
  assert "| wall_time | fd | precision | recall | coverage |" in text
  assert "| 1.00 | finished | -100.00 | 80.00 | 20.00 |  |  |  |  |  | 12.50 | 0.80 | 0.25 | 0.50 |" in text
  assert "| 2.00 | finished | -150.00 | 80.00 | 20.00 |  |  |  |  |  |  |  |  |  |" in text
  assert ("5000 prior samples" in text and "Reference, as many training images: fd 1.51-1.54, precision 0.90, "
          "recall 0.91, coverage 0.97." in text)
  rows = list(csv.DictReader(out["csv"].open()))
  assert [(r["fd"], r["fd_reference"]) for r in rows] == [("12.5", "1.51"), ("", ""), ("30.25", "1.54")]


def test_too_few_points_give_null_numbers_not_an_error():
  from cvae_jax.evaluators.quality import NAMES, measured
  rng = np.random.default_rng(0)
  real, fake = rng.normal(size=(5, 3)), rng.normal(size=(40, 3))  # 5 points: no 5th neighbour of one's own
  assert measured(real, fake) == dict.fromkeys(NAMES)
  assert measured(rng.normal(size=(6, 3)), fake)["fd"] > 0


def test_the_classifier_reads_every_stored_encoding_as_the_pixels_it_holds():
  """The judge's input: intensities / 255, binary pixels as 0/1, packed binary pixels unpacked (dSprites)."""
  rng = np.random.default_rng(0)
  bits = (rng.random((3, 16, 16, 1)) < 0.3).astype(np.uint8)
  np.testing.assert_array_equal(classifier.intensities(np.packbits(bits, axis=2), Encoding.packed_binary), bits)
  np.testing.assert_array_equal(classifier.intensities(bits, Encoding.static_binary), bits)
  grey = rng.integers(0, 256, (3, 16, 16, 1)).astype(np.uint8)
  for encoding in (Encoding.grayscale, Encoding.dynamic_binary):
    np.testing.assert_allclose(classifier.intensities(grey, encoding), grey / 255.0, rtol=1e-6)
