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

from cvae_jax import generation  # noqa: E402
from cvae_jax.data import DatasetSpec, Modality, Split, model_input  # noqa: E402
from cvae_jax.estimators import condition  # noqa: E402
from cvae_jax.likelihoods import Likelihood  # noqa: E402
from cvae_jax.models import VAE  # noqa: E402


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
  return spec.condition_names[k] if spec.condition_names else str(k)


def reconstructions(model, params, spec, likelihood, split: Split, key, n: int) -> np.ndarray:
  """[2 * n, *shape]: the first n inputs as the model sees them, then the decoder's mean for their encoded mean."""
  x = model_input(jnp.asarray(split.images[:n]), spec.encoding, key)
  labels = split.labels[:n]
  recon = generation.decode_mean(model, params, spec, generation.encode_mean(model, params, spec, x, labels), labels,
                                 likelihood)
  return np.concatenate([np.asarray(x), np.asarray(recon)])


def prior_samples(model, params, spec, likelihood, key, per_row: int, temperature: float = 1.0) -> np.ndarray:
  """[rows, per_row, *shape]: a CVAE of classes, per_row samples of each class; otherwise per_row x per_row
  samples of the prior (its scale times the temperature)."""
  if model.condition_size and spec.num_classes:
    return np.asarray(generation.class_conditional(model, params, spec, key, np.arange(spec.num_classes), per_row,
                                                   likelihood, temperature))
  logits = model.apply({"params": params}, key, None, per_row * per_row, temperature, method="generate")
  return np.asarray(likelihood.mean(logits)).reshape(per_row, per_row, *spec.shape)


def reconstruction_grid(path, model, params, spec, likelihood, split: Split, key, n: int = 10):
  """Top row: inputs as the model sees them; bottom row: the decoder's mean for their encoded mean."""
  fig, ax = plt.subplots(figsize=(n, 2.2))
  _show(ax, tile(reconstructions(model, params, spec, likelihood, split, key, n), 2, n))
  ax.set_title("inputs (top) and reconstructions (bottom)")
  fig.savefig(path, bbox_inches="tight", dpi=80)
  plt.close(fig)


def grid_figure(path, images, title: str, row_labels=None, col_labels=None, cell: float = 0.8):
  """One labelled PNG of images [R, C, H, W, ch]: rows and columns named by tick labels."""
  images = np.asarray(images)
  rows, cols, h, w = images.shape[:4]
  fig, ax = plt.subplots(figsize=(cols * cell + 1.5, rows * cell + 0.8))
  _show(ax, tile(images.reshape(rows * cols, *images.shape[2:]), rows, cols))
  if row_labels is not None:
    ax.set_yticks([h * (k + 0.5) for k in range(rows)])
    ax.set_yticklabels(row_labels)
  if col_labels is not None:
    ax.set_xticks([w * (k + 0.5) for k in range(cols)])
    ax.set_xticklabels(col_labels, rotation=90 if max(len(str(c)) for c in col_labels) > 3 else 0)
    ax.xaxis.tick_top()
  ax.set_title(title, pad=24 if col_labels is not None else 6)
  fig.savefig(path, bbox_inches="tight", dpi=80)
  plt.close(fig)


def sample_grid(path, model, params, spec, likelihood, key, per_row: int = 10, temperature: float = 1.0):
  """CVAE: one labelled row per class, z ~ p(z). VAE: a square of prior samples. The prior's scale times the
  temperature."""
  images = prior_samples(model, params, spec, likelihood, key, per_row, temperature)
  if model.condition_size:
    grid_figure(path, images, "samples, one row per class",
                row_labels=[_class_name(spec, k) for k in range(spec.num_classes)])
  else:
    grid_figure(path, images, "samples from the prior")


SAMPLE_TEMPERATURES = (1.0, 0.8, 0.6)  # VDVAE shows its samples at t < 1 (Child 2021, Fig. 1)


def temperature_grid(path, model, params, spec, likelihood, key, per_row: int = 10):
  """Prior samples at each of SAMPLE_TEMPERATURES, one block of rows per temperature, from the same key."""
  rows = per_row if not (model.condition_size and spec.num_classes) else spec.num_classes
  images = np.concatenate([prior_samples(model, params, spec, likelihood, key, per_row, t)[:min(rows, 4)]
                           for t in SAMPLE_TEMPERATURES])
  grid_figure(path, images, "samples at temperature " + ", ".join(f"{t}" for t in SAMPLE_TEMPERATURES) +
              " (4 rows each)", row_labels=[f"t={t}" for t in SAMPLE_TEMPERATURES for _ in range(min(rows, 4))])


def latent_scatter(path, model, params, spec, split: Split, key, n: int = 5000):
  """Encoder means of n test images in the 2-D latent space, coloured by class."""
  x = model_input(jnp.asarray(split.images[:n]), spec.encoding, key)
  labels = split.labels[:n]
  mean, _ = jax.jit(lambda p, x, c: model.apply({"params": p}, x, c, method="encode"))(
      params, x, condition(model, spec, jnp.asarray(labels)))
  mean = np.asarray(mean)
  fig, ax = plt.subplots(figsize=(7, 6))
  points = ax.scatter(mean[:, 0], mean[:, 1], c=labels, cmap="tab10", s=3)
  cbar = fig.colorbar(points, ticks=range(spec.num_classes))
  cbar.ax.set_yticklabels([_class_name(spec, k) for k in range(spec.num_classes)])
  ax.set_xlabel("z[0]")
  ax.set_ylabel("z[1]")
  ax.set_title("encoder means of test images" + (" (encoded with their labels)" if model.condition_size else ""))
  fig.savefig(path, bbox_inches="tight", dpi=80)
  plt.close(fig)


def manifold(path, model, params, spec, likelihood, n: int = 15):
  """Decodes a grid of z at Gaussian quantiles 0.05..0.95 of each axis. CVAE: one panel per class."""
  q = norm.ppf(np.linspace(0.05, 0.95, n)).astype(np.float32)
  z = np.stack(np.meshgrid(q, q[::-1]), axis=-1).reshape(-1, 2)  # rows: z[1] from high to low
  classes = range(spec.num_classes) if model.condition_size else [None]
  panels = len(classes)
  cols = min(panels, 5)
  prows = -(-panels // cols)
  fig, axes = plt.subplots(prows, cols, figsize=(4 * cols, 4 * prows), squeeze=False)
  for ax in axes.flat:
    ax.set_visible(False)
  for ax, k in zip(axes.flat, classes):
    c = None if k is None else spec.condition_input(jnp.full((len(z),), k))
    images = likelihood.mean(model.apply({"params": params}, jnp.asarray(z), c, method="decode"))
    ax.set_visible(True)
    _show(ax, tile(np.asarray(images), n, n))
    if k is not None:
      ax.set_title(f"class {_class_name(spec, k)}")
  fig.suptitle("decoded 2-D latent manifold (z at N(0,1) quantiles 0.05 to 0.95)")
  fig.savefig(path, bbox_inches="tight", dpi=80)
  plt.close(fig)


def translation_figure(path, model, params, spec, likelihood, split: Split, key, n: int = 8):
  """Rows: test images; first column the input, then its code decoded under every class."""
  x = model_input(jnp.asarray(split.images[:n]), spec.encoding, key)
  labels = split.labels[:n]
  out = generation.translate(model, params, spec, x, labels, likelihood)
  images = np.concatenate([np.asarray(x)[:, None], np.asarray(out)], axis=1)
  grid_figure(path, images, "image-to-image translation: each input's code decoded as every class",
              row_labels=[f"a {_class_name(spec, k)}" for k in labels],
              col_labels=["input"] + [_class_name(spec, k) for k in range(spec.num_classes)])


def style_transfer_figure(path, model, params, spec, likelihood, split: Split, key, n_style: int = 8,
                          n_content: int = 10):
  """Top row: content images (their class is used); left column: style images (their code is used)."""
  x = np.asarray(model_input(jnp.asarray(split.images[:n_style + n_content]), spec.encoding, key))
  labels = split.labels[:n_style + n_content]
  style_x, style_labels = x[:n_style], labels[:n_style]
  content_x, content_labels = x[n_style:], labels[n_style:]
  out = np.asarray(generation.style_transfer(model, params, spec, jnp.asarray(style_x), style_labels,
                                             content_labels, likelihood))
  blank = np.zeros_like(x[:1])
  top = np.concatenate([blank, content_x])[None]                               # [1, 1 + C, ...]
  body = np.concatenate([style_x[:, None], out], axis=1)                       # [S, 1 + C, ...]
  grid_figure(path, np.concatenate([top, body]),
              "style transfer: the style (left) of one image, the class of another (top)",
              row_labels=["class from"] + [f"style of a {_class_name(spec, k)}" for k in style_labels],
              col_labels=["style from"] + [_class_name(spec, k) for k in content_labels])


def interpolation_figure(path, model, params, spec, likelihood, split: Split, key, pairs: int = 6, steps: int = 10):
  """Each row: decoded points between the codes (and labels) of two test images, the inputs at the ends."""
  x = model_input(jnp.asarray(split.images[:2 * pairs]), spec.encoding, key)
  labels = split.labels[:2 * pairs]
  rows = []
  for p in range(pairs):
    a, b = 2 * p, 2 * p + 1
    path_images = np.asarray(generation.interpolate(model, params, spec, x[a], labels[a], x[b], labels[b], steps,
                                                    likelihood))
    rows.append(np.concatenate([np.asarray(x[a])[None], path_images, np.asarray(x[b])[None]]))
  grid_figure(path, np.stack(rows), "interpolation between two test images (inputs at both ends)",
              row_labels=[f"{_class_name(spec, labels[2 * p])} to {_class_name(spec, labels[2 * p + 1])}"
                          for p in range(pairs)],
              col_labels=["input"] + [f"{t:.2f}" for t in np.linspace(0, 1, steps)] + ["input"])


def traversal_figure(path, model, params, spec, likelihood, split: Split, key, values=np.linspace(-3, 3, 11),
                     max_dims: int = 20):
  """Row d: the code of one test image with dimension d set to each value (others unchanged)."""
  x = model_input(jnp.asarray(split.images[:1]), spec.encoding, key)[0]
  images = np.asarray(generation.traverse(model, params, spec, x, int(split.labels[0]), values, likelihood))[:max_dims]
  grid_figure(path, images, f"latent traversal around a test image (a {_class_name(spec, int(split.labels[0]))})",
              row_labels=[f"z[{d}]" for d in range(len(images))], col_labels=[f"{v:+.1f}" for v in values])


def factor_traversals(path, model, params, spec, likelihood, x, unit_labels, values=np.linspace(-2, 2, 9)):
  """Row d: latent unit d set to each value around the code of each input x [E, *shape] (the other units at the
  posterior mean), decoded to the likelihood's mean; one block of columns per input, the input first. Rows are
  named by unit_labels (the factor each unit captures: evaluators/disentanglement.py)."""
  blocks = []
  for xi in np.asarray(x):
    # label 0: the model is a VAE, which ignores it  [Z, V, ...]
    swept = np.asarray(generation.traverse(model, params, spec, jnp.asarray(xi), 0, values, likelihood))
    blocks += [np.broadcast_to(xi, (len(swept), 1, *xi.shape)), swept]
  grid_figure(path, np.concatenate(blocks, axis=1),
              f"latent traversals: each unit from {values[0]:+.0f} to {values[-1]:+.0f}, the others at the posterior "
              f"mean of the input (left of each block)",
              row_labels=unit_labels, col_labels=(["input"] + [f"{v:+.1f}" for v in values]) * len(x))


USE_FIGURES = {
    "translation": translation_figure,
    "style_transfer": style_transfer_figure,
    "interpolation": interpolation_figure,
    "traversal": traversal_figure,
}


def signal_reconstructions(path, model, params, spec, likelihood, split: Split, key, per_class: int = 2):
  """1-D signals: test signals of each class (input, black) and the decoder's mean for their encoded mean."""
  picks = [i for k in range(spec.num_classes) for i in np.flatnonzero(split.labels == k)[:per_class]]
  x = model_input(jnp.asarray(split.images[picks]), spec.encoding, key)
  labels = split.labels[picks]
  recon = np.asarray(generation.decode_mean(model, params, spec, generation.encode_mean(model, params, spec, x, labels),
                                            labels, likelihood))
  fig, axes = plt.subplots(1, len(picks), figsize=(2.2 * len(picks), 2.2), sharey=True, squeeze=False)
  for ax, signal, rec, k in zip(axes[0], np.asarray(x), recon, labels):
    ax.plot(signal[:, 0], "k", lw=1, label="input")
    ax.plot(rec[:, 0], "C3", lw=1, label="reconstruction")
    ax.set_title(_class_name(spec, int(k)), fontsize=8)
    ax.set_xticks([])
  axes[0, 0].legend(fontsize=6)
  fig.savefig(path, bbox_inches="tight", dpi=80)
  plt.close(fig)


def epoch_grids(model, params, spec, likelihood, split: Split, key, per_row: int = 8) -> dict[str, np.ndarray]:
  """The images TensorBoard shows each epoch (fixed inputs and z, so epochs compare): [H, W, C] in [0, 1].
  `reconstructions`: per_row test inputs over their reconstructions; `samples` (not for a plain
  autoencoder): a row per class for a CVAE of classes, else per_row x per_row prior samples."""
  k_rec, k_sample = jax.random.split(key)
  with_channels = lambda grid: grid[..., None] if grid.ndim == 2 else grid
  grids = {"reconstructions": with_channels(tile(reconstructions(model, params, spec, likelihood, split, k_rec,
                                                                 per_row), 2, per_row))}
  if model.stochastic:
    images = prior_samples(model, params, spec, likelihood, k_sample, per_row)
    grids["samples"] = with_channels(tile(images.reshape(-1, *spec.shape), len(images), per_row))
  return {name: np.clip(grid, 0.0, 1.0) for name, grid in grids.items()}


def write_all(directory: Path, model: VAE, params, spec: DatasetSpec, likelihood: Likelihood,
              split: Split, key) -> list[Path]:
  """Every end-of-training figure that applies to this model and data (images and 1-D signals; other
  modalities draw their own); returns the paths written."""
  directory.mkdir(parents=True, exist_ok=True)
  k_rec, k_sample, k_scatter = jax.random.split(key, 3)
  if spec.modality not in (Modality.image, Modality.signal):
    return []
  if spec.modality == Modality.signal:
    path = directory / "reconstructions.png"
    signal_reconstructions(path, model, params, spec, likelihood, split, k_rec)
    return [path]
  paths = [directory / "reconstructions.png"]
  reconstruction_grid(paths[0], model, params, spec, likelihood, split, k_rec)
  if not model.stochastic:
    return paths  # a plain autoencoder has no prior to sample from
  paths.append(directory / "samples.png")
  sample_grid(paths[1], model, params, spec, likelihood, k_sample)
  if model.group_sizes is not None:  # a hierarchy: its samples at temperatures below 1
    paths.append(directory / "samples_temperature.png")
    temperature_grid(paths[-1], model, params, spec, likelihood, k_sample)
  if model.latent_size == 2:
    paths += [directory / "latent_scatter.png", directory / "manifold.png"]
    latent_scatter(paths[-2], model, params, spec, split, k_scatter)
    manifold(paths[-1], model, params, spec, likelihood)
  return paths
