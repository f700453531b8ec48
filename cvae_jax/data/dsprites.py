"""dSprites (`data.name=dsprites`): binary 64x64 sprites generated from five known factors, regenerated here.

dSprites (Matthey, Higgins, Hassabis and Lerchner 2017, github.com/deepmind/dsprites-dataset) is every
combination of shape 3 (square, ellipse, heart), scale 6 (linspace(0.5, 1, 6)), orientation 40, position x 32
and position y 32 (linspace(0, 1, 32) each): 737,280 images in canonical order, the last factor fastest.
The original file is not available offline, so this module renders the set from that specification; it is
not pixel-identical to the original. Two differences are deliberate: orientation is 2 pi k / 40 for
k = 0..39, [0, 2 pi), where the original's 40 values are linspace(0, 2 pi, 40), both ends included (its
first and last orientation are the same image); and a position step moves the sprite exactly one pixel.

Rendering (numpy only, deterministic): each of the 3 * 6 * 40 = 720 (shape, scale, orientation) sprites is
drawn once, centred on a 33x33 canvas, and placed at the 32 x 32 positions by integer shifts. A pixel is on
when at least half of its area is inside the shape, counted on 4x4 subpixel samples. At scale 1 the square's
side, the ellipse's long axis and the heart's width are SPRITE_SIZE = 64 / 5 pixels (the original's sprites
are about a fifth of the frame); each shape is centred on its centroid and rotated about it, counterclockwise
as the image is viewed. Position x moves the sprite along the columns and y along the rows (y = 0 at the top),
the sprite's centre going from pixel 16 to 47: every sprite stays inside the frame, at least 8 pixels from
its edge. As in the original, the square repeats every quarter turn and the ellipse every half turn.

The full set (377 MB as packed bits) renders in a few seconds; it is cached once in
`<data.data_dir or $TFDS_DATA_DIR or ~/tensorflow_datasets>/dsprites/` with a JSON file holding its sha256,
and a cache that is damaged is rendered again. There is no official split: test is a fixed random 10,000
images (seed 0), train the other 727,280; the label is the shape, so a CVAE can condition on it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from cvae_jax.config import DataConfig
from cvae_jax.data.factors import FactorTable
from cvae_jax.data.files import data_root
from cvae_jax.data.registry import DatasetEntry, register
from cvae_jax.data.spec import DatasetSpec, Encoding, Modality, Split

log = logging.getLogger(__name__)

SHAPES = ("square", "ellipse", "heart")
FACTOR_NAMES = ("shape", "scale", "orientation", "x", "y")
FACTOR_SIZES = (3, 6, 40, 32, 32)
FACTOR_VALUES = (np.arange(3, dtype=np.float64),  # the shape's index (the original file says 1, 2, 3)
                 np.linspace(0.5, 1.0, 6),
                 2 * np.pi * np.arange(40) / 40,
                 np.linspace(0.0, 1.0, 32),
                 np.linspace(0.0, 1.0, 32))
NUM_IMAGES = int(np.prod(FACTOR_SIZES))  # 737,280
FRAME = 64                # image height and width
POSITIONS = 32            # positions along x and along y, one pixel apart
CANVAS = FRAME - POSITIONS + 1  # 33: the largest odd canvas whose 32 shifts stay in the frame; its centre is a pixel
SPRITE_SIZE = FRAME / 5   # at scale 1: the square's side, the ellipse's long axis, the heart's width (pixels)
SUBSAMPLES = 4            # subpixel samples per pixel side: a pixel is on when >= half of its 16 fall inside
TEST_SIZE = 10_000
FORMAT_VERSION = 1        # raise when the rendering changes, so that older caches are rendered again
STORED_SHAPE = (NUM_IMAGES, FRAME, FRAME // 8, 1)  # packed bits along the width


@dataclass
class DSpritesDataConfig(DataConfig):
  name: str = "dsprites"


# The heart: a square of side H standing on a corner (a diamond), with a disc on each of its two upper sides
# (diameter H, centred on the side's midpoint). Its width is H (1 + 1/sqrt 2); H is chosen so it is 1 in shape
# units. The centroid lies above the diamond's centre: the two outer half-discs (pi H^2 / 8 each) have their
# centroids 4r / (3 pi) beyond the sides' midpoints along the outward normal, r = H / 2.
HEART_SIDE = 1 / (1 + 1 / np.sqrt(2))
_HALF_DISC_Y = HEART_SIDE / (2 * np.sqrt(2)) + 4 * (HEART_SIDE / 2) / (3 * np.pi) / np.sqrt(2)
HEART_CENTROID_Y = 2 * (np.pi / 8) * _HALF_DISC_Y / (1 + np.pi / 4)


def inside(shape: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Whether points (x right, y up, in shape units: the scale-1 sprite is 1 wide) are inside the upright
  shape centred on its centroid."""
  if shape == 0:  # square of side 1
    return (np.abs(x) <= 0.5) & (np.abs(y) <= 0.5)
  if shape == 1:  # ellipse, semi-axes 1/2 (along x) and 1/4
    return (2 * x) ** 2 + (4 * y) ** 2 <= 1
  y = y + HEART_CENTROID_Y  # into the diamond's frame
  diamond = np.abs(x) + np.abs(y) <= HEART_SIDE / np.sqrt(2)
  centre = HEART_SIDE / (2 * np.sqrt(2))  # the discs are centred at (+-centre, centre); |x| takes the nearer
  return diamond | ((np.abs(x) - centre) ** 2 + (y - centre) ** 2 <= (HEART_SIDE / 2) ** 2)


@functools.lru_cache(maxsize=1)
def sprites() -> np.ndarray:
  """Every (shape, scale, orientation) sprite, centred on a CANVAS x CANVAS grid.  [3, 6, 40, 33, 33] uint8 0/1"""
  # Subpixel sample offsets from the canvas centre, in pixels: x along the columns, y up (rows go down).
  offsets = (np.arange(CANVAS * SUBSAMPLES) + 0.5) / SUBSAMPLES - CANVAS / 2  # [132]
  x, y = offsets[None, :], -offsets[:, None]  # [132, 132] by broadcasting: x by column, y by row
  scale, angle = np.meshgrid(FACTOR_VALUES[1], FACTOR_VALUES[2], indexing="ij")
  scale, angle = scale.reshape(-1, 1, 1), angle.reshape(-1, 1, 1)  # [240, 1, 1]
  # A shape turned counterclockwise by `angle` holds a point when the point turned back (clockwise) lies in the
  # upright shape; dividing by the size brings pixels to shape units.
  cos, sin = np.cos(angle), np.sin(angle)
  u = (cos * x + sin * y) / (scale * SPRITE_SIZE)  # [240, 132, 132]
  v = (cos * y - sin * x) / (scale * SPRITE_SIZE)
  out = np.empty((3, 6 * 40, CANVAS, CANVAS), np.uint8)
  for shape in range(3):
    hits = inside(shape, u, v).reshape(-1, CANVAS, SUBSAMPLES, CANVAS, SUBSAMPLES).sum(axis=(2, 4))
    out[shape] = hits * 2 >= SUBSAMPLES ** 2
  return out.reshape(3, 6, 40, CANVAS, CANVAS)


def render(factors: np.ndarray) -> np.ndarray:
  """The images of the given factor settings (indices, in FACTOR_NAMES order), one sprite placed at a time:
  the unpacked reference the full set is checked against.  [N, 5] int -> [N, 64, 64] uint8 0/1"""
  factors = np.asarray(factors).reshape(-1, len(FACTOR_SIZES))
  table = sprites()
  images = np.zeros((len(factors), FRAME, FRAME), np.uint8)
  for image, (shape, scale, orientation, x, y) in zip(images, factors):
    image[y:y + CANVAS, x:x + CANVAS] = table[shape, scale, orientation]  # centre at row 16 + y, column 16 + x
  return images


def generate() -> np.ndarray:
  """The full set in canonical order, as packed bits.  [737280, 64, 8, 1] uint8"""
  out = np.empty(STORED_SHAPE, np.uint8)
  per_sprite = POSITIONS * POSITIONS
  shift = np.arange(POSITIONS)[::-1, None] + np.arange(FRAME)[None, :]  # [32, 64]: position p reads 31 - p + k
  for i, sprite in enumerate(sprites().reshape(-1, CANVAS, CANVAS)):
    # The sprite on a canvas large enough for every shift; the image at position (x, y) is the 64x64 window
    # whose top-left corner is (31 - y, 31 - x). Columns are packed first (one window per x), after which a row
    # shift is a shift of packed rows.
    padded = np.zeros((FRAME + POSITIONS - 1, FRAME + POSITIONS - 1), np.uint8)  # [95, 95]
    padded[POSITIONS - 1:POSITIONS - 1 + CANVAS, POSITIONS - 1:POSITIONS - 1 + CANVAS] = sprite
    bands = np.packbits(padded[:, shift].transpose(1, 0, 2), axis=-1)  # [32 x, 95, 8]
    out[i * per_sprite:(i + 1) * per_sprite, :, :, 0] = bands[:, shift].reshape(per_sprite, FRAME, FRAME // 8)
  return out


def sha256(images: np.ndarray) -> str:
  """The sha256 of the array's bytes (C order), read in pieces so that a memory map is not copied whole."""
  digest = hashlib.sha256()
  for start in range(0, len(images), 65536):
    digest.update(np.ascontiguousarray(images[start:start + 65536]).data)
  return digest.hexdigest()


def cache_paths(data_dir: Optional[str]) -> tuple[Path, Path]:
  """The cached full set (.npy) and its description (format version, shape, sha256)."""
  folder = data_root(data_dir) / "dsprites"
  return folder / "images.npy", folder / "images.json"


def _read_cache(path: Path, info: Path) -> tuple[Optional[np.ndarray], str]:
  """The cached set as a memory map, or None and why it cannot be used."""
  if not path.exists() and not info.exists():
    return None, "absent"
  try:
    meta = json.loads(info.read_text())
    images = np.load(path, mmap_mode="r")
  except (OSError, ValueError, EOFError) as e:  # absent, truncated, not JSON, not .npy
    return None, f"unreadable: {type(e).__name__}: {e}"
  if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
    return None, f"format {meta.get('format_version') if isinstance(meta, dict) else meta!r}, not {FORMAT_VERSION}"
  if images.shape != STORED_SHAPE or images.dtype != np.uint8:
    return None, f"{images.dtype} {images.shape}, not uint8 {STORED_SHAPE}"
  if sha256(images) != meta.get("sha256"):
    return None, "its sha256 differs from the one recorded"
  return images, ""


def _write_cache(path: Path, info: Path, images: np.ndarray) -> None:
  """Each file is written under a temporary name in the same folder and renamed when complete, so an
  interrupted generation never leaves half a cache."""
  path.parent.mkdir(parents=True, exist_ok=True)
  meta = {"format_version": FORMAT_VERSION, "shape": list(images.shape), "sha256": sha256(images)}
  temporaries = []
  try:
    for target, write in ((path, lambda f: np.save(f, images)), (info, lambda f: f.write(json.dumps(meta).encode()))):
      fd, name = tempfile.mkstemp(dir=path.parent, prefix=target.name + ".", suffix=".tmp")
      temporaries.append(name)
      with os.fdopen(fd, "wb") as f:
        write(f)
      os.chmod(name, 0o644)  # mkstemp makes it private; a shared data_dir's other files are not
    os.replace(temporaries[0], path)  # the images first: a new .npy beside an old description is rendered again
    os.replace(temporaries[1], info)
  finally:
    for name in temporaries:
      if os.path.exists(name):
        os.unlink(name)


def cached_images(data_dir: Optional[str]) -> np.ndarray:
  """The full set in canonical order, read from the cache as a memory map (rendered and cached when absent or
  damaged; held in memory when the folder cannot be written).  [737280, 64, 8, 1] uint8"""
  path, info = cache_paths(data_dir)
  images, why = _read_cache(path, info)
  if images is not None:
    return images
  if why == "absent":
    log.info("Rendering dSprites (737,280 images, 377 MB), cached in %s", path.parent)
  else:
    log.warning("The dSprites cache %s is damaged (%s); rendering it again", path, why)
  images = generate()
  try:
    _write_cache(path, info, images)
  except OSError as e:
    log.warning("Cannot write the dSprites cache in %s (%s); keeping the images in memory for this run. Set "
                "data.data_dir (or $TFDS_DATA_DIR) to a writable folder with 400 MB free.", path.parent, e)
    return images
  return np.load(path, mmap_mode="r")


def shape_labels(index: np.ndarray) -> np.ndarray:
  """The shape (0 square, 1 ellipse, 2 heart) of images at canonical positions.  [N] int32"""
  return (np.asarray(index) // (NUM_IMAGES // FACTOR_SIZES[0])).astype(np.int32)


def read(cfg: DataConfig) -> tuple[Split, Split, DatasetSpec]:
  """dSprites as train 727,280 / test 10,000 packed images [N, 64, 8, 1], labelled by shape.

  The split is a fixed permutation (seed 0) of the canonical order: test is its first 10,000 images and
  train the rest, in that order, so that data.train_limit and data.validation_size take a uniform mix of
  factors rather than one corner of the canonical order. Both are gathered into memory (372 MB)."""
  images = cached_images(cfg.data_dir)
  order = np.random.default_rng(0).permutation(NUM_IMAGES)
  test, train = order[:TEST_SIZE], order[TEST_SIZE:]
  spec = DatasetSpec(name="dsprites", shape=(FRAME, FRAME, 1), condition_size=len(SHAPES),
                     encoding=Encoding.packed_binary, modality=Modality.image, condition_names=SHAPES)
  return Split(images[train], shape_labels(train)), Split(images[test], shape_labels(test)), spec


def factor_table(cfg: DataConfig) -> FactorTable:
  """The five factors, and their images read from the cached full set by canonical position."""
  images = cached_images(cfg.data_dir)

  def examples(factors: np.ndarray) -> np.ndarray:  # [N, 5] int -> [N, 64, 8, 1] uint8
    return np.asarray(images[table.index(factors)])

  table = FactorTable(FACTOR_NAMES, FACTOR_SIZES, FACTOR_VALUES, examples)
  return table


register(DatasetEntry("dsprites", DSpritesDataConfig, read, encoding=lambda cfg: Encoding.packed_binary,
                      factors=factor_table))
