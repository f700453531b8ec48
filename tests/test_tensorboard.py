"""TensorBoard as users expect it, read back with TensorBoard's own event reader: a sweep's runs in the
HParams view (one entry per run with its beta and test ELBO), sample and reconstruction grids every epoch."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from cvae_jax import figures, generation, likelihoods
from cvae_jax.keys import Stream, stream_key
from conftest import small_config, synthetic_dataset, model_and_state
from test_cli import run_cli


def hparams_session(directory) -> tuple[dict, dict]:
  """(hyperparameters, metrics) of the one session written in `directory` (a run's tb/hparams)."""
  events = EventAccumulator(str(directory), size_guidance={"tensors": 0, "scalars": 0})
  events.Reload()
  content = events.PluginTagToContent("hparams")
  start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
  hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
             for k, v in start.session_start_info.hparams.items()}
  metrics = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
  return hparams, metrics


@pytest.mark.integration
def test_a_sweep_s_runs_and_their_epochs_read_back_from_the_event_files(tmp_path, env_for_cli):
  sweep = tmp_path / "sweep"
  args = ["--multirun", "+experiment=smoke", "data.train_limit=640", "data.test_limit=200", "training.epochs=2",
          "evaluation.iwae_samples=0", "training.progress=false", "objective.beta=1,4", f"hydra.sweep.dir={sweep}"]
  proc = run_cli(args, env_for_cli, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  runs = sorted(p for p in sweep.iterdir() if p.is_dir())
  assert len(runs) == 2
  for run in runs:
    results = json.loads((run / "results.json").read_text())
    hparams, metrics = hparams_session(run / "tb" / "hparams")
    assert hparams["objective.beta"] == (1.0 if "beta=1" in run.name else 4.0)
    assert hparams["model.latent_size"] == 2 and hparams["data.name"] == "mnist"
    assert metrics["test/elbo"] == np.float32(results["elbo"]) and metrics["test/kl"] == np.float32(results["kl"])

    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()
    for tag in ("images/samples", "images/reconstructions"):
      images = events.Images(tag)
      assert [i.step for i in images] == [10, 20]  # one per epoch of 10 steps
    samples = events.Images("images/samples")[-1]
    assert (samples.height, samples.width) == (10 * 28, 8 * 28)  # a row per class, 8 per row


def test_the_epoch_grids_hold_the_reconstructions_and_a_row_per_class():
  cfg = small_config(**{"model.kind": "cvae"})
  ds = synthetic_dataset()
  model, state = model_and_state(cfg, ds.spec)
  lik = likelihoods.of(cfg.objective)
  key = stream_key(0, Stream.FIGURES)
  grids = figures.epoch_grids(model, state.params, ds.spec, lik, ds.test, key, per_row=3)
  h, w, c = ds.spec.shape
  assert grids["reconstructions"].shape == (2 * h, 3 * w, c)
  k_rec, k_sample = jax.random.split(key)
  x = ds.test.images[:3].astype(np.float32) / 255.0  # grayscale: the inputs as the model reads them
  recon = generation.decode_mean(model, state.params, ds.spec, generation.encode_mean(model, state.params, ds.spec, x,
                                 ds.test.labels[:3]), ds.test.labels[:3], lik)
  np.testing.assert_allclose(grids["reconstructions"][:h, 2 * w:3 * w], x[2], rtol=1e-6)  # top row: inputs
  np.testing.assert_allclose(grids["reconstructions"][h:, 2 * w:3 * w], np.asarray(recon[2]), rtol=1e-6)
  assert grids["samples"].shape == (ds.spec.num_classes * h, 3 * w, c)
  expected = generation.class_conditional(model, state.params, ds.spec, k_sample, np.arange(3), 3, lik)
  np.testing.assert_allclose(grids["samples"][h:2 * h, w:2 * w], np.asarray(expected[1, 1]), rtol=1e-6)  # class 1
