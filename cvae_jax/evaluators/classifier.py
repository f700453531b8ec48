"""A small CNN classifier that judges class-conditional samples: does a CVAE asked for a 7 draw a 7?

Trained by the engine on the same dataset's training images as intensities in [0, 1] (decoder means are in
[0, 1] too), in the run directory's classifier/ (checkpoints, metrics, results.json with its test accuracy,
which is reported beside the sample accuracy so that a reader knows how far to trust the judge). Its
penultimate layer (128 ReLU units) is the feature space of the sample-quality metrics (quality.py), as
Inception's pool features are FID's.
"""
from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from cvae_jax.config import OptimizerConfig, TrainingConfig
from cvae_jax.data import Dataset, Encoding, model_input
from cvae_jax.engine import epoch, loop, optim, rundir
from cvae_jax.keys import Stream, stream_key
from cvae_jax.models import init_params

EPOCHS, BATCH_SIZE, LEARNING_RATE = 3, 128, 1e-3
FEATURES = 128  # width of the penultimate layer (make_features)


class Classifier(nn.Module):
  """Two stride-2 convs, a dense layer, logits. Works for images [B, H, W, C] and signals [B, T, C]."""
  num_classes: int

  @nn.compact
  def __call__(self, x):
    spatial = x.ndim - 2
    h = x
    for ch in (32, 64):
      h = nn.relu(nn.Conv(ch, (3,) * spatial, strides=2, padding="SAME")(h))
    h = nn.relu(nn.Dense(FEATURES)(h.reshape(h.shape[0], -1)))  # [B, FEATURES]
    # Kept only when "intermediates" is mutable (make_features); parameters and outputs are unchanged, so
    # classifiers trained before this line still load.
    self.sow("intermediates", "features", h)
    return nn.Dense(self.num_classes)(h)


def intensities(images, encoding: Encoding) -> jax.Array:
  """A split's stored images as the classifier reads them, float32 in [0, 1]: uint8 intensities / 255, and
  binary images (stored as 0/1, or packed 8 to a byte) as 0/1. Dynamic binarization's input is its
  intensity, the value a binary draw has as its mean."""
  binary = (Encoding.static_binary, Encoding.packed_binary)
  stored = encoding if encoding in binary else Encoding.grayscale
  return model_input(jnp.asarray(images), stored)


def make_predict(model: Classifier, batch_size: int = 1000):
  """Returns predict(params, x float [N, ...]) -> labels [N], in chunks."""
  @jax.jit
  def predict_chunk(params, x):
    return jnp.argmax(model.apply({"params": params}, x), axis=-1)

  def predict(params, x):
    return np.concatenate([np.asarray(predict_chunk(params, x[i:i + batch_size]))
                           for i in range(0, len(x), batch_size)])
  return predict


def make_features(model: Classifier, batch_size: int = 1000):
  """Returns features(params, x float [N, ...]) -> the penultimate layer's activations [N, FEATURES]
  (float32 numpy), in chunks."""
  @jax.jit
  def features_chunk(params, x):
    _, state = model.apply({"params": params}, x, mutable=["intermediates"])
    return state["intermediates"]["features"][0]

  def features(params, x):
    return np.concatenate([np.asarray(features_chunk(params, x[i:i + batch_size]))
                           for i in range(0, len(x), batch_size)])
  return features


def _initial_state(model: Classifier, ds: Dataset, seed: int) -> train_state.TrainState:
  params = init_params(model, stream_key(seed, Stream.PARAMS), jnp.zeros((1, *ds.spec.shape)))
  return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                       tx=optim.create_optimizer(OptimizerConfig(learning_rate=LEARNING_RATE)))


def load_or_train(directory: Path, ds: Dataset, seed: int = 0) -> tuple[Classifier, dict, float]:
  """The classifier trained in `directory` (its results.json says it finished), or a new one trained there
  with Adam, cross-entropy, EPOCHS epochs of BATCH_SIZE; returns (model, params, test accuracy)."""
  model = Classifier(ds.spec.num_classes)
  directory = Path(directory).absolute()
  phase = loop.Phase(directory, max_checkpoints=1)
  try:
    state = phase.restore(_initial_state(model, ds, seed))
    finished = rundir.read_results(directory)
    if state is not None and finished is not None:
      return model, state.params, finished["test_accuracy"]

    def loss(params, images, labels, keys, hyper):
      logits = model.apply({"params": params}, intensities(images, ds.spec.encoding))
      value = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return value, {"loss": value}

    training = TrainingConfig(batch_size=BATCH_SIZE, epochs=EPOCHS, progress=False)
    plan = epoch.Plan(loss, epoch.run_hyper(seed, 1.0, LEARNING_RATE), OptimizerConfig(), training, len(ds.train))
    steps = epoch.steps_per_epoch(BATCH_SIZE, len(ds.train))
    state = state if state is not None else _initial_state(model, ds, seed)
    phase.open_metrics(int(state.step))
    state = loop.fit([phase], state, epoch.make_train_epoch(plan), jax.device_put(ds.train.images),
                     jax.device_put(ds.train.labels), epochs=EPOCHS, steps=steps)
  finally:
    phase.close()
  predicted = make_predict(model)(state.params, intensities(ds.test.images, ds.spec.encoding))
  accuracy = float(np.mean(predicted == ds.test.labels))
  rundir.write_json_atomic(directory / "results.json", {"test_accuracy": accuracy, "dataset": ds.spec.name,
                                                        "seed": seed, "epochs": EPOCHS})
  return model, state.params, accuracy
