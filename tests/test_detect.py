"""`python -m cvae_jax.detect`: the threshold's false-positive rate, the per-input output, and bad inputs."""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pytest

import cvae_jax
from cvae_jax import data, detect
from conftest import REPO
from test_api import SMALL
from test_cli import run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  run = tmp_path_factory.mktemp("detect") / "run"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
  proc = run_cli([*SMALL, "model=mlp", "model.kind=vae", "model.hidden=[64]", "data.pixels=static_binary",
                  "data.validation_size=300", "data.exclude_classes=[1]", "training.epochs=2",
                  f"hydra.run.dir={run}"], env, run.parent)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return run


def test_the_threshold_flags_the_chosen_fraction_of_normal_scores():
  rng = np.random.default_rng(0)
  calibration = rng.normal(0.0, 1.0, 2000)
  threshold = detect.threshold_at(calibration, 0.05)
  assert np.mean(calibration > threshold) <= 0.05  # on the calibration data: at most the rate asked
  fresh = rng.normal(0.0, 1.0, 100_000)  # on new normal data: the rate within sampling error of 2,000 draws
  assert abs(np.mean(fresh > threshold) - 0.05) < 3 * np.sqrt(0.05 * 0.95 / 2000)
  assert detect.threshold_at([1.0, 2.0, 3.0, 4.0], 0.25) == 4.0  # by hand: nothing above the largest


def test_detect_scores_flags_and_reports_the_test_protocol(run, tmp_path):
  model = cvae_jax.load(run)
  inputs = tmp_path / "beats.npz"
  np.savez(inputs, x=model.dataset.test.images[:50])
  out = tmp_path / "flags.csv"
  assert detect.main([str(run), str(inputs), "--fpr", "0.1", "--k", "5", "--out", str(out),
                      "--score", "input_complexity"]) == 0
  rows = out.read_text().splitlines()
  assert rows[0] == "index,score,anomalous" and len(rows) == 51
  detector = detect.Detector(model, "input_complexity", fpr=0.1, k=5)
  scores = np.array([float(r.split(",")[1]) for r in rows[1:]])
  np.testing.assert_allclose(scores, detector.scores(model.dataset.test.images[:50]), rtol=1e-6)
  validation = model.dataset.validation  # the last 300 training images without the held-out class
  assert detector.calibration_split == "validation" and model.dataset.calibration is None
  assert len(detector.calibration_scores) == len(validation) > 200 and not np.any(validation.labels == 1)
  assert np.mean(detector.calibration_scores > detector.threshold) <= 0.1
  protocol = detector.test_protocol()
  assert protocol["num_anomalous"] == int(np.sum(model.dataset.test.labels == 1))
  assert 0 <= protocol["false_positive_rate"] <= 1 and 0 <= protocol["true_positive_rate"] <= 1


@pytest.mark.parametrize("content, message", [
    (np.zeros((5, 10), np.uint8), r"has shape \(5, 10\); this model takes \[N, 28, 28, 1\]"),
    (np.full((3, 28, 28), 300, np.int16), "holds values up to 300"),
    (np.full((3, 28, 28), np.nan, np.float32), "has dtype float32"),
    (b"not an array", "is not a .npy or .npz array file"),
])
def test_bad_inputs_get_a_clear_error_and_exit_2(run, tmp_path, capsys, content, message):
  path = tmp_path / "inputs.npy"
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    np.save(path, content)
  assert detect.main([str(run), str(path), "--k", "2"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and re.search(message, err), err


def test_a_calibration_split_sets_the_threshold_instead_of_the_validation_split(run):
  model = cvae_jax.load(run)
  normal = model.dataset.test.labels != 1
  calibration = data.Split(model.dataset.test.images[normal][:100], model.dataset.test.labels[normal][:100])
  model.dataset = dataclasses.replace(model.dataset, calibration=calibration)
  detector = detect.Detector(model, fpr=0.1, k=5)
  assert detector.calibration_split == "calibration" and len(detector.calibration_scores) == 100
  assert detector.threshold == detect.threshold_at(detector.scores(calibration.images), 0.1)
  assert np.mean(detector.calibration_scores > detector.threshold) <= 0.1


def test_a_run_without_a_calibration_or_validation_split_says_how_to_get_one(run):
  model = cvae_jax.load(run)
  model.dataset = dataclasses.replace(model.dataset, validation=None)
  with pytest.raises(ValueError, match="no calibration or validation split .* Train the run with "
                                       "data.calibration_size=N"):
    detect.Detector(model)


@pytest.mark.integration
def test_a_hierarchy_detects_with_llr_as_its_anomaly_evaluator_scored_the_test_split(tmp_path_factory, tmp_path):
  hvae = tmp_path_factory.mktemp("detect_hvae") / "run"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
  proc = run_cli([*SMALL, "model=hvae", "model.kind=vae", "model.width=8", "model.bottleneck=4",
                  "model.latent_channels=2", "model.patch=2", "model.encoder_blocks=[1,1]", "model.decoder_groups=[1,1]",
                  "data.validation_size=200", "data.exclude_classes=[1]", "evaluation.anomaly=true",
                  "evaluation.anomaly_samples=3", "evaluation.llr_groups=[1]", f"hydra.run.dir={hvae}"], env, hvae.parent)
  assert proc.returncode == 0, proc.stderr[-3000:]
  model = cvae_jax.load(hvae)
  inputs = tmp_path / "test.npy"
  np.save(inputs, model.dataset.test.images)
  out = tmp_path / "flags.csv"
  assert detect.main([str(hvae), str(inputs), "--score", "llr>1", "--k", "3", "--out", str(out)]) == 0
  scores = np.array([float(r.split(",")[1]) for r in out.read_text().splitlines()[1:]])
  np.testing.assert_allclose(scores, np.load(hvae / "anomaly_scores.npz")["held_out/llr>1"], rtol=1e-5, atol=1e-4)
  assert detect.main([str(hvae), str(inputs), "--score", "llr>2", "--k", "3"]) == 2  # two groups: only llr>1


@pytest.mark.parametrize("score, message", [("llr>1", "needs a hierarchy"), ("likelihood", "is not one of")])
def test_a_score_the_run_cannot_give_is_refused_with_exit_2(run, tmp_path, capsys, score, message):
  path = tmp_path / "inputs.npy"
  np.save(path, cvae_jax.load(run).dataset.test.images[:5])
  assert detect.main([str(run), str(path), "--score", score, "--k", "2"]) == 2
  assert message in capsys.readouterr().err
