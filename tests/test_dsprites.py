"""dSprites rendered from its specification: the factor table against the images, the cache, the splits."""
import json
import logging
import shutil

import numpy as np
import pytest

from cvae_jax import data
from cvae_jax.data import Encoding, dsprites
from cvae_jax.data.dsprites import DSpritesDataConfig

# The sha256 of the full set's bytes ([737280, 64, 8, 1] uint8, canonical order) as rendered at FORMAT_VERSION 1.
# A change of the rendering changes it: raise FORMAT_VERSION (old caches are then rendered again) and record it.
FULL_SHA256 = "00af0c24e7b4b89de9216e4340277b785fc12d8a2208577a4202cc57c66c296a"
N = 737_280
SCALES = np.linspace(0.5, 1.0, 6)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A data_dir holding the rendered and cached full set (about 2 s), removed afterwards: pytest keeps the
  temporary folders of its last three runs, and each copy of the set is 377 MB."""
  folder = tmp_path_factory.mktemp("dsprites_data")
  dsprites.cached_images(str(folder))
  yield str(folder)
  shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def scratch(tmp_path):
  """tmp_path, emptied after the test (it holds a 377 MB copy of the set)."""
  yield tmp_path
  shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def table(data_dir):
  return dsprites.factor_table(DSpritesDataConfig(data_dir=data_dir))


def unpack(packed: np.ndarray) -> np.ndarray:
  """[N, 64, 8, 1] packed -> [N, 64, 64] 0/1"""
  return np.unpackbits(packed[..., 0], axis=-1)


def settings(**fixed) -> np.ndarray:
  """Every combination of the factors not fixed, with the fixed ones at the given indices.  [M, 5]"""
  ranges = [np.atleast_1d(fixed.get(name, np.arange(size))) for name, size in zip(dsprites.FACTOR_NAMES,
                                                                                 dsprites.FACTOR_SIZES)]
  return np.stack([g.ravel() for g in np.meshgrid(*ranges, indexing="ij")], axis=1)


def centroids(images: np.ndarray) -> np.ndarray:
  """The (row, column) centroid of each image's on pixels.  [N, 64, 64] -> [N, 2]"""
  rows, cols = np.mgrid[:images.shape[1], :images.shape[2]]
  area = images.sum(axis=(1, 2))
  return np.stack([(images * rows).sum(axis=(1, 2)) / area, (images * cols).sum(axis=(1, 2)) / area], axis=1)


def test_the_factor_table_holds_every_combination_once_in_canonical_order(table):
  assert table.names == ("shape", "scale", "orientation", "x", "y") and table.sizes == (3, 6, 40, 32, 32)
  every = np.stack(np.unravel_index(np.arange(N), table.sizes), axis=1)  # [N, 5]
  assert np.array_equal(table.index(every), np.arange(N))  # the last factor fastest
  for factor, size in enumerate(table.sizes):
    assert np.bincount(every[:, factor], minlength=size).tolist() == [N // size] * size
  np.testing.assert_allclose(table.values[1], [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
  np.testing.assert_allclose(table.values[2], 2 * np.pi * np.arange(40) / 40)  # [0, 2 pi): 0 and 2 pi are one angle
  np.testing.assert_allclose(table.values[3], np.arange(32) / 31)
  np.testing.assert_allclose(table.values[4], np.arange(32) / 31)
  assert [len(v) for v in table.values] == list(table.sizes)


def test_areas_grow_as_scale_squared_and_match_the_shapes(table):
  areas = unpack(table.examples(settings(x=5, y=20))).sum(axis=(1, 2)).reshape(3, 6, 40)  # every orientation
  mean = areas.mean(axis=2)  # [shape, scale]
  assert (np.diff(mean, axis=1) > 0).all()
  np.testing.assert_allclose(mean / mean[:, -1:], np.broadcast_to(SCALES ** 2, mean.shape), rtol=0.04)
  # At scale 1: the square's side, the ellipse's long axis and the heart's width are 64/5 = 12.8 pixels.
  side = 12.8 / (1 + 1 / np.sqrt(2))  # the heart's diamond; discs of diameter `side` on its upper sides
  exact = np.array([12.8 ** 2, np.pi * 6.4 * 3.2, side ** 2 * (1 + np.pi / 4)])
  np.testing.assert_allclose(areas[:, -1, :], np.broadcast_to(exact[:, None], (3, 40)), rtol=0.11)
  assert areas[0, -1, 0] == 13 * 13  # upright square: pixels -6..6 are more than half covered


def test_orientation_turns_the_shape_counterclockwise_about_its_centre(table):
  sprites = unpack(table.examples(settings(x=0, y=0)))[:, :33, :33].reshape(3, 6, 40, 33, 33)
  # A quarter turn is exact on the pixel grid (the centre is a pixel centre): orientation k + 10 is
  # orientation k turned a quarter counterclockwise as the image is shown, to the pixel.
  assert np.array_equal(sprites[:, :, 10:], np.rot90(sprites[:, :, :30], axes=(-2, -1)))
  areas = sprites.sum(axis=(-2, -1))
  np.testing.assert_allclose(areas[:, -1], np.broadcast_to(areas[:, -1, :1], (3, 40)), rtol=0.2)  # nearly equal
  np.testing.assert_allclose(areas[:, 2:], np.broadcast_to(areas[:, 2:, :1], (3, 4, 40)), rtol=0.25)
  widths, heights = (sprites.any(axis=axis).sum(axis=-1) for axis in (-2, -1))  # [3, 6, 40]
  assert (widths[1, :, 0] > heights[1, :, 0]).all() and (widths[1, :, 10] < heights[1, :, 10]).all()  # ellipse
  square = sprites[0, -1]
  assert square[0].sum() == widths[0, -1, 0] * heights[0, -1, 0]  # upright: fills its box
  assert square[5].sum() < 0.7 * widths[0, -1, 5] * heights[0, -1, 5]  # 45 degrees: a diamond
  # The heart stands on its tip at orientation 0 (its lowest row is its narrowest), and a quarter turn
  # counterclockwise points the tip right.
  heart = sprites[2, -1, 0]
  rows = np.nonzero(heart.any(axis=1))[0]
  assert heart[rows[-1]].sum() <= 3 and heart[rows[0]].sum() > 3
  assert sprites[2, -1, 10, :, np.nonzero(sprites[2, -1, 10].any(axis=0))[0][-1]].sum() <= 3
  # Each sprite is centred on its centroid: the canvas centre (16, 16), to within the pixels' rounding.
  np.testing.assert_allclose(centroids(sprites.reshape(-1, 33, 33)), 16, atol=0.35)


def test_a_position_step_moves_the_sprite_one_pixel_x_along_columns_y_along_rows(table):
  for shape, scale, orientation in ((0, 5, 3), (1, 2, 17), (2, 0, 29)):
    along_x = centroids(unpack(table.examples(settings(shape=shape, scale=scale, orientation=orientation, y=7))))
    along_y = centroids(unpack(table.examples(settings(shape=shape, scale=scale, orientation=orientation, x=25))))
    np.testing.assert_allclose(np.diff(along_x[:, 1]), 1.0, atol=1e-9)
    np.testing.assert_allclose(np.diff(along_x[:, 0]), 0.0, atol=1e-9)
    np.testing.assert_allclose(np.diff(along_y[:, 0]), 1.0, atol=1e-9)  # y = 0 at the top, as in the original
    np.testing.assert_allclose(np.diff(along_y[:, 1]), 0.0, atol=1e-9)
    np.testing.assert_allclose(along_x[0], [16 + 7, 16], atol=0.35)  # the centre of position (x, y) is (16 + y, 16 + x)


def test_every_sprite_stays_inside_the_frame_with_a_margin(data_dir):
  union = unpack(np.bitwise_or.reduce(dsprites.cached_images(data_dir), axis=0)[None])[0]  # [64, 64]
  inside = np.nonzero(union.any(axis=1))[0], np.nonzero(union.any(axis=0))[0]
  assert [(i.min(), i.max()) for i in inside] == [(8, 55), (8, 55)]  # 8 empty pixels on every side


def test_rendering_is_deterministic_and_the_full_set_is_stable(data_dir, table):
  first = dsprites.sprites().copy()
  dsprites.sprites.cache_clear()
  assert first.tobytes() == dsprites.sprites().tobytes()
  full = dsprites.generate()
  assert dsprites.sha256(full) == FULL_SHA256
  path, info = dsprites.cache_paths(data_dir)
  assert json.loads(info.read_text())["sha256"] == FULL_SHA256 and dsprites.sha256(np.load(path)) == FULL_SHA256
  some = settings(scale=3, x=np.arange(0, 32, 9), y=np.arange(0, 32, 7))  # the one-at-a-time placement agrees
  assert np.array_equal(np.packbits(dsprites.render(some), axis=-1)[..., None], full[table.index(some)])


def test_load_gives_the_splits_labelled_by_shape_and_model_inputs_are_the_rendered_pixels(data_dir):
  ds = data.load(DSpritesDataConfig(data_dir=data_dir))
  assert (len(ds.train), len(ds.test)) == (727_280, 10_000)
  assert ds.spec.shape == (64, 64, 1) and ds.spec.encoding == Encoding.packed_binary and ds.spec.num_classes == 3
  assert ds.spec.condition_names == ("square", "ellipse", "heart")
  assert ds.train.images.shape == (727_280, 64, 8, 1) and ds.train.images.dtype == np.uint8
  assert ds.train.labels.dtype == np.int32
  assert (np.bincount(ds.train.labels) + np.bincount(ds.test.labels)).tolist() == [N // 3] * 3
  # test: the first 10,000 of a fixed permutation of the canonical order; the label is the shape.
  order = np.random.default_rng(0).permutation(N)
  factors = np.stack(np.unravel_index(order[:10_000], dsprites.FACTOR_SIZES), axis=1)
  assert np.array_equal(ds.test.labels, factors[:, 0])
  x = np.asarray(data.model_input(ds.test.images[:16], ds.spec.encoding))
  assert x.shape == (16, 64, 64, 1) and x.dtype == np.float32 and set(np.unique(x)) == {0.0, 1.0}
  assert np.array_equal(x[..., 0], dsprites.render(factors[:16]))
  train_factors = np.stack(np.unravel_index(order[10_000:10_016], dsprites.FACTOR_SIZES), axis=1)
  assert np.array_equal(np.asarray(data.model_input(ds.train.images[:16], ds.spec.encoding))[..., 0],
                        dsprites.render(train_factors))
  limited = data.load(DSpritesDataConfig(data_dir=data_dir, train_limit=3000, validation_size=1000))
  assert (len(limited.train), len(limited.validation)) == (3000, 1000)
  assert np.bincount(limited.train.labels).min() > 900  # the first images of train mix every shape


@pytest.mark.parametrize("damage", ["truncated", "flipped_byte", "other_shape", "description_garbled"])
def test_a_damaged_cache_is_rendered_again(data_dir, scratch, caplog, damage):
  shutil.copytree(dsprites.cache_paths(data_dir)[0].parent, scratch / "dsprites")
  path, info = dsprites.cache_paths(str(scratch))
  if damage == "truncated":
    path.write_bytes(path.read_bytes()[:1000])
  elif damage == "flipped_byte":
    with open(path, "r+b") as f:
      f.seek(200_000_000)
      byte = f.read(1)
      f.seek(200_000_000)
      f.write(bytes([byte[0] ^ 1]))
  elif damage == "other_shape":  # a well-formed array of another shape, described as such
    small = np.zeros((10, 64, 8, 1), np.uint8)
    np.save(path, small)
    info.write_text(json.dumps({"format_version": dsprites.FORMAT_VERSION, "shape": list(small.shape),
                                "sha256": dsprites.sha256(small)}))
  else:
    info.write_text("{not json")
  with caplog.at_level(logging.WARNING, logger="cvae_jax.data.dsprites"):
    images = dsprites.cached_images(str(scratch))
  assert "damaged" in caplog.text and "rendering it again" in caplog.text
  assert isinstance(images, np.memmap) and images.shape == (N, 64, 8, 1)
  assert dsprites.sha256(np.load(path, mmap_mode="r")) == FULL_SHA256
  assert json.loads(info.read_text())["sha256"] == FULL_SHA256
  assert sorted(p.name for p in path.parent.iterdir()) == ["images.json", "images.npy"]  # no temporary left


def test_an_interrupted_write_leaves_no_cache_and_an_unwritable_folder_keeps_the_set_in_memory(tmp_path, monkeypatch,
                                                                                              caplog):
  small = np.ones((4, 64, 8, 1), np.uint8)  # stands for the full set: what is tested is the writing
  monkeypatch.setattr(dsprites, "generate", lambda: small)

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt  # after the images' temporary file is written, before the description is

  monkeypatch.setattr(dsprites.json, "dumps", interrupted)
  with pytest.raises(KeyboardInterrupt):
    dsprites.cached_images(str(tmp_path))
  assert list((tmp_path / "dsprites").iterdir()) == []
  monkeypatch.undo()
  monkeypatch.setattr(dsprites, "generate", lambda: small)
  (tmp_path / "a_file").write_text("")  # a data_dir that cannot hold a folder
  with caplog.at_level(logging.WARNING, logger="cvae_jax.data.dsprites"):
    images = dsprites.cached_images(str(tmp_path / "a_file"))
  assert images is small and "Cannot write the dSprites cache" in caplog.text


def test_a_run_on_dsprites_trains_evaluates_and_reads_unpacked_pixels_from_python(data_dir, tmp_path):
  """The command line's path on the packed data: a conv VAE trains and is scored (eval.json holds the
  disentanglement block); `cvae_jax.load` takes the images as 0/1 pixels [N, 64, 64, 1], as a user has them,
  and encodes them as the run's own (packed) test split."""
  import jax
  import cvae_jax
  from cvae_jax.experiment import train_and_evaluate
  from cvae_jax.models import VAE
  from conftest import small_config
  cfg = small_config(**{"data.name": "dsprites", "data.data_dir": str(data_dir), "data.train_limit": 256,
                        "data.test_limit": 64, "model.arch": "conv", "model.encoder_channels": [8, 8],
                        "model.conv_stride": 4, "model.dense": 16, "training.epochs": 1,
                        "evaluation.iwae_samples": 0, "evaluation.disentanglement": True})
  train_and_evaluate(cfg, tmp_path / "run")
  assert {"mig", "factor_vae", "dci_disentanglement"} <= set(json.loads((tmp_path / "run" / "eval.json").read_text())
                                                            ["disentanglement"])
  run = cvae_jax.load(tmp_path / "run")
  stored = run.dataset.test.images[:8]
  codes = run.encode(unpack(stored))
  expected = run.network.apply({"params": run.params}, data.model_input(stored, Encoding.packed_binary), None,
                               method=VAE.encode)[0]
  np.testing.assert_allclose(codes, np.asarray(expected), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="0 or 1"):
    run.encode(unpack(stored) * 255)
