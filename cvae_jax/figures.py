"""Figures written at the end of training: reconstructions, samples, and for 2-D latents the latent
scatter and the decoded manifold (as in the seed article). Fixed keys, so reruns draw the same z."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import norm  # noqa: E402

from cvae_jax.config import Likelihood  # noqa: E402
from cvae_jax.data import DatasetSpec, Split, model_input  # noqa: E402
from cvae_jax.evaluation import one_hot_condition  # noqa: E402
from cvae_jax.models import VAE  # noqa: E402
from cvae_jax.objectives import MEAN  # noqa: E402


def tile(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """[rows * cols, H, W, C] -> one [rows * H, cols * W] (or RGB) image."""
  n, h, w, c = images.shape
  grid = images.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
  return grid[..., 0] if c == 1 else grid


def _show(ax, image):
  ax.imshow(np.clip(image, 0, 1), cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
  ax.set_xticks([])
  ax.set_yticks([])


def _class_name(spec: DatasetSpec, k: int) -> str:
  return spec.class_names[k] if spec.class_names else str(k)


def reconstruction_grid(path, model, params, spec, likelihood, split: Split, key, n: int = 10):
  """Top row: inputs as the model sees them; bottom row: the decoder's mean for their encoded mean."""
  x = model_input(jnp.asarray(split.images[:n]), spec.pixels, key)
  c = one_hot_condition(model, jnp.asarray(split.labels[:n]))
  mean, _ = model.apply({"params": params}, x, c, method=VAE.encode)
  recon = MEAN[likelihood](model.apply({"params": params}, mean, c, method=VAE.decode))
  fig, ax = plt.subplots(figsize=(n, 2.2))
  _show(ax, tile(np.concatenate([np.asarray(x), np.asarray(recon)]), 2, n))
  ax.set_title("inputs (top) and reconstructions (bottom)")
  fig.savefig(path, bbox_inches="tight", dpi=80)
  plt.close(fig)


def sample_grid(path, model, params, spec, likelihood, key, per_row: int = 10):
  """CVAE: one labelled row per class, z ~ N(0, I). VAE: a square of prior samples."""
  if model.num_classes:
    rows = model.num_classes
    labels = jnp.repeat(jnp.arange(rows), per_row)
    logits = model.apply({"params": params}, key, jax.nn.one_hot(labels, rows), method=VAE.generate)
  else:
    rows = per_row
    logits = model.apply({"params": params}, key, None, rows * per_row, method=VAE.generate)
  images = np.asarray(MEAN[likelihood](logits))
  h = spec.image_shape[0]
  fig, ax = plt.subplots(figsize=(per_row * 0.8 + 1.5, rows * 0.8))
  _show(ax, tile(images, rows, per_row))
  if model.num_classes:
    ax.set_yticks([h * (k + 0.5) for k in range(rows)])
    ax.set_yticklabels([_class_name(spec, k) for k in range(rows)])
    ax.set_title("samples, one row per class")
  else:
    ax.set_title("samples from the prior")
  fig.savefig(path, bbox_inches="tight", dpi=80)
  plt.close(fig)


def latent_scatter(path, model, params, spec, split: Split, key, n: int = 5000):
  """Encoder means of n test images in the 2-D latent space, coloured by class."""
  x = model_input(jnp.asarray(split.images[:n]), spec.pixels, key)
  labels = split.labels[:n]
  mean, _ = jax.jit(lambda p, x, c: model.apply({"params": p}, x, c, method=VAE.encode))(
      params, x, one_hot_condition(model, jnp.asarray(labels)))
  mean = np.asarray(mean)
  fig, ax = plt.subplots(figsize=(7, 6))
  points = ax.scatter(mean[:, 0], mean[:, 1], c=labels, cmap="tab10", s=3)
  cbar = fig.colorbar(points, ticks=range(spec.num_classes))
  cbar.ax.set_yticklabels([_class_name(spec, k) for k in range(spec.num_classes)])
  ax.set_xlabel("z[0]")
  ax.set_ylabel("z[1]")
  ax.set_title("encoder means of test images" + (" (encoded with their labels)" if model.num_classes else ""))
  fig.savefig(path, bbox_inches="tight", dpi=80)
  plt.close(fig)


def manifold(path, model, params, spec, likelihood, n: int = 15):
  """Decodes a grid of z at Gaussian quantiles 0.05..0.95 of each axis. CVAE: one panel per class."""
  q = norm.ppf(np.linspace(0.05, 0.95, n)).astype(np.float32)
  z = np.stack(np.meshgrid(q, q[::-1]), axis=-1).reshape(-1, 2)  # rows: z[1] from high to low
  classes = range(model.num_classes) if model.num_classes else [None]
  panels = len(classes)
  cols = min(panels, 5)
  prows = -(-panels // cols)
  fig, axes = plt.subplots(prows, cols, figsize=(4 * cols, 4 * prows), squeeze=False)
  for ax in axes.flat:
    ax.set_visible(False)
  for ax, k in zip(axes.flat, classes):
    c = None if k is None else jax.nn.one_hot(jnp.full((len(z),), k), model.num_classes)
    images = MEAN[likelihood](model.apply({"params": params}, jnp.asarray(z), c, method=VAE.decode))
    ax.set_visible(True)
    _show(ax, tile(np.asarray(images), n, n))
    if k is not None:
      ax.set_title(f"class {_class_name(spec, k)}")
  fig.suptitle("decoded 2-D latent manifold (z at N(0,1) quantiles 0.05 to 0.95)")
  fig.savefig(path, bbox_inches="tight", dpi=80)
  plt.close(fig)


def write_all(directory: Path, model: VAE, params, spec: DatasetSpec, likelihood: Likelihood,
              split: Split, key) -> list[Path]:
  """Every end-of-training figure that applies to this model; returns the paths written."""
  if len(spec.image_shape) != 3:
    return []  # 1-D signals get their own plots
  directory.mkdir(parents=True, exist_ok=True)
  k_rec, k_sample, k_scatter = jax.random.split(key, 3)
  paths = [directory / "reconstructions.png", directory / "samples.png"]
  reconstruction_grid(paths[0], model, params, spec, likelihood, split, k_rec)
  sample_grid(paths[1], model, params, spec, likelihood, k_sample)
  if model.latent_size == 2:
    paths += [directory / "latent_scatter.png", directory / "manifold.png"]
    latent_scatter(paths[2], model, params, spec, split, k_scatter)
    manifold(paths[3], model, params, spec, likelihood)
  return paths
