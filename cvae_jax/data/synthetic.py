"""Synthetic RGB images (`data.name=synthetic`), rendered at any size: for tests and the resolution benchmark
only. It is not a benchmark of modelling quality: its numbers say nothing about a model on natural images.

Each image is a linear colour gradient (random direction and end colours) with up to MAX_DISTRACTORS small
shapes of random colours, and on top one larger "class shape" that the label decides: an ellipse for an even
label and a rectangle for an odd one, in the label's colour (num_classes evenly spaced hues; grey levels when
channels=1). Shapes are axis-aligned, their half-sizes span a decade (3% to 35% of the side), and their edges are
antialiased over one pixel, so there is structure from the whole image down to the pixel at every size.
Positions and sizes are fractions of the side: another `size` renders the same scenes at another resolution.

Everything is drawn from numpy's generator seeded with (seed, split): deterministic, and the test split does
not change with num_train. Rendering is vectorized over images (2048 at 256x256x3 take a few seconds), so
there is no disk cache: the splits are rendered on every read.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cvae_jax.config import DataConfig, check
from cvae_jax.data.registry import DatasetEntry, register
from cvae_jax.data.spec import DatasetSpec, Encoding, Modality, Split

MAX_DISTRACTORS = 3      # small shapes of random colours under the class shape
PIXELS_PER_CHUNK = 2**18  # pixels rendered together: 1 MB of float32 per plane stays in cache (fastest measured)


@dataclass
class SyntheticDataConfig(DataConfig):
  name: str = "synthetic"
  size: int = 32          # the images' height and width, pixels
  channels: int = 3       # 3: RGB; 1: grey levels
  num_train: int = 2048   # training images
  num_test: int = 256     # test images
  seed: int = 0           # the scenes drawn (train and test from their own streams of it)
  num_classes: int = 10   # labels 0..num_classes-1: the class shape's kind and colour


def check_node(cfg: SyntheticDataConfig) -> None:
  """The ranges types alone cannot express; ConfigError naming the key."""
  check(cfg.size >= 4, "data.size", cfg.size, "the side must be at least 4 pixels")
  check(cfg.channels in (1, 3), "data.channels", cfg.channels, "use 3 (RGB) or 1 (grey levels)")
  for key in ("num_train", "num_test", "num_classes"):
    check(getattr(cfg, key) >= 1, f"data.{key}", getattr(cfg, key), "must be at least 1")


def class_colours(num_classes: int, channels: int) -> np.ndarray:
  """The class shapes' colours: evenly spaced hues on a smooth colour wheel, or evenly spaced grey levels.
  [num_classes, channels] float32 in [0, 1]"""
  k = np.arange(num_classes)[:, None]
  if channels == 1:
    return (0.1 + 0.8 * (k + 0.5) / num_classes).astype(np.float32)
  phase = k / num_classes + np.arange(3) / 3
  return (0.5 + 0.45 * np.cos(2 * np.pi * phase)).astype(np.float32)


def _ramp(distance: np.ndarray, size: int) -> np.ndarray:
  """Coverage of a pixel whose centre is `distance` (fractions of the side, > 0 inside) from an edge: 0 to 1
  over one pixel, the antialiased edge."""
  return np.clip(0.5 + distance * size, 0.0, 1.0)


def render(rng: np.random.Generator, n: int, size: int, channels: int,
           num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """n scenes drawn from rng. Every parameter is drawn for all n before any is rendered, so the images do not
  depend on how rendering is chunked. -> images [n, size, size, channels] uint8, labels [n] int32"""
  f32 = np.float32
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  ends = rng.random((n, 2, channels), dtype=f32)              # the gradient's colours at its two ends
  angle = rng.uniform(0, 2 * np.pi, n)                        # the gradient's direction
  slots = MAX_DISTRACTORS + 1                                 # the distractors, then the class shape
  centre = rng.uniform(0.15, 0.85, (n, slots, 2)).astype(f32)  # (row, column), fractions of the side
  radius = np.exp(rng.uniform(np.log(0.03), np.log(0.15), (n, slots, 2))).astype(f32)  # half height, half width
  radius[:, -1] = rng.uniform(0.18, 0.35, (n, 2))
  rectangle = rng.random((n, slots)) < 0.5
  rectangle[:, -1] = labels % 2 == 1
  colour = rng.random((n, slots, channels), dtype=f32)
  colour[:, -1] = class_colours(num_classes, channels)[labels]
  shown = np.arange(slots) < rng.integers(0, MAX_DISTRACTORS + 1, (n, 1))  # the first 0..3 distractors
  shown[:, -1] = True

  grid = ((np.arange(size) + 0.5) / size).astype(f32)  # pixel centres, fractions of the side
  images = np.empty((n, size, size, channels), np.uint8)
  step = max(1, PIXELS_PER_CHUNK // (size * size))
  for start in range(0, n, step):
    part = slice(start, start + step)
    # The gradient: t = 0 at one corner of the square and 1 at the opposite one, along the direction;
    # separable in rows and columns, so one [m, size, size] sum.
    cos, sin = np.cos(angle[part]).astype(f32), np.sin(angle[part]).astype(f32)
    scale = 1 / (np.abs(cos) + np.abs(sin))
    t = (0.5 + (cos * scale)[:, None] * (grid - 0.5))[:, :, None] + ((sin * scale)[:, None] * (grid - 0.5))[:, None, :]
    low, high = ends[part, 0].T[:, :, None, None], ends[part, 1].T[:, :, None, None]  # [C, m, 1, 1]
    image = low + t * (high - low)  # [C, m, size, size]: channels first, so each plane is contiguous
    for k in range(slots):  # painted back to front
      r, c = radius[part, k, 0][:, None], radius[part, k, 1][:, None]
      dy = (grid - centre[part, k, 0][:, None]) / r  # [m, size]: rows, in radii
      dx = (grid - centre[part, k, 1][:, None]) / c  # [m, size]: columns, in radii
      alpha = np.empty(t.shape, f32)  # [m, size, size]
      box = rectangle[part, k]
      alpha[box] = (_ramp((1 - np.abs(dy[box])) * r[box], size)[:, :, None]
                    * _ramp((1 - np.abs(dx[box])) * c[box], size)[:, None, :])
      oval = ~box
      edge = np.minimum(r[oval], c[oval])[:, :, None]  # distance to the edge per radius unit, roughly
      alpha[oval] = _ramp((1 - np.sqrt(dy[oval, :, None] ** 2 + dx[oval, None, :] ** 2)) * edge, size)
      alpha[~shown[part, k]] = 0
      for ch in range(channels):
        image[ch] += alpha * (colour[part, k, ch][:, None, None] - image[ch])
    image *= 255
    image += 0.5  # the cast below truncates: round to the nearest
    images[part] = image.transpose(1, 2, 3, 0)
  return images, labels


def read(cfg: SyntheticDataConfig) -> tuple[Split, Split, DatasetSpec]:
  """Renders train and test: [N, size, size, channels] uint8, labels 0..num_classes-1."""
  check_node(cfg)
  splits = [Split(*render(np.random.default_rng([cfg.seed, stream]), n, cfg.size, cfg.channels, cfg.num_classes))
            for stream, n in enumerate((cfg.num_train, cfg.num_test))]
  spec = DatasetSpec(name="synthetic", shape=(cfg.size, cfg.size, cfg.channels), condition_size=cfg.num_classes,
                     encoding=Encoding.grayscale, modality=Modality.image,
                     condition_names=tuple(f"{('ellipse', 'rectangle')[k % 2]} {k}" for k in range(cfg.num_classes)))
  return splits[0], splits[1], spec


register(DatasetEntry("synthetic", SyntheticDataConfig, read, encoding=lambda cfg: Encoding.grayscale,
                      check=lambda cfg: check_node(cfg.data)))
