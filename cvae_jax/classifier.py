"""A small CNN classifier that judges class-conditional samples: does a CVAE asked for a 7 draw a 7?

Trained on the same dataset's grayscale training images (decoder means are grayscale too); its own
test accuracy is reported beside the sample accuracy, so a reader knows how far to trust the judge.
"""
from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from cvae_jax.data import Dataset


class Classifier(nn.Module):
  """Two stride-2 convs, a dense layer, logits. Works for images [B, H, W, C] and signals [B, T, C]."""
  num_classes: int

  @nn.compact
  def __call__(self, x):
    spatial = x.ndim - 2
    h = x
    for ch in (32, 64):
      h = nn.relu(nn.Conv(ch, (3,) * spatial, strides=2, padding="SAME")(h))
    h = nn.relu(nn.Dense(128)(h.reshape(h.shape[0], -1)))
    return nn.Dense(self.num_classes)(h)


def _grayscale(images) -> jax.Array:
  return jnp.asarray(images, jnp.float32) / 255.0


def make_predict(model: Classifier, batch_size: int = 1000):
  """Returns predict(params, x float [N, ...]) -> labels [N], in chunks."""
  @jax.jit
  def predict_chunk(params, x):
    return jnp.argmax(model.apply({"params": params}, x), axis=-1)

  def predict(params, x):
    return np.concatenate([np.asarray(predict_chunk(params, x[i:i + batch_size]))
                           for i in range(0, len(x), batch_size)])
  return predict


def train_classifier(ds: Dataset, seed: int = 0, epochs: int = 3, batch_size: int = 128,
                     learning_rate: float = 1e-3) -> tuple[dict, float]:
  """Trains on ds.train (grayscale) with Adam; returns (params, test accuracy)."""
  model = Classifier(ds.spec.num_classes)
  key = jax.random.key(seed)
  params = model.init(key, jnp.zeros((1, *ds.spec.image_shape)))["params"]
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)
  images, labels = jax.device_put(ds.train.images), jax.device_put(ds.train.labels)
  steps = len(ds.train) // batch_size

  @jax.jit
  def epoch(params, opt_state, epoch_key):
    order = jax.random.permutation(epoch_key, images.shape[0])[: steps * batch_size].reshape(steps, batch_size)

    def step(carry, idx):
      params, opt_state = carry
      def loss_fn(p):
        logits = model.apply({"params": p}, _grayscale(images[idx]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()
      grads = jax.grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), order)
    return params, opt_state

  for e in range(epochs):
    params, opt_state = epoch(params, opt_state, jax.random.fold_in(key, e + 1))
  predicted = make_predict(model)(params, _grayscale(ds.test.images))
  return params, float(np.mean(predicted == ds.test.labels))


def load_or_train(directory: Path, ds: Dataset, seed: int = 0) -> tuple[Classifier, dict, float]:
  """The classifier saved in `directory`, or a new one trained and saved there."""
  model = Classifier(ds.spec.num_classes)
  directory = Path(directory).absolute()
  info_path = directory / "classifier.json"
  checkpointer = ocp.StandardCheckpointer()
  if info_path.exists():
    info = json.loads(info_path.read_text())
    like = model.init(jax.random.key(0), jnp.zeros((1, *ds.spec.image_shape)))["params"]
    params = checkpointer.restore(directory / "params", jax.tree.map(ocp.utils.to_shape_dtype_struct, like))
    return model, params, info["test_accuracy"]
  params, accuracy = train_classifier(ds, seed)
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer.save(directory / "params", params, force=True)
  checkpointer.wait_until_finished()
  info_path.write_text(json.dumps({"test_accuracy": accuracy, "dataset": ds.spec.name, "seed": seed}) + "\n")
  return model, params, accuracy
