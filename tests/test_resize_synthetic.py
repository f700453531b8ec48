"""data.resize for TFDS images (area averaging, its own cache per size) and the synthetic dataset."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cvae_jax import data, schema
from cvae_jax.config import ConfigError
from cvae_jax.data import Encoding, images, synthetic
from cvae_jax.data.images import ImageDataConfig
from cvae_jax.data.synthetic import SyntheticDataConfig
from conftest import small_config


# The resize function on known arrays.

def test_area_weights_are_the_covered_shares():
  np.testing.assert_allclose(images.area_weights(3, 2), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]], rtol=1e-6)
  for n_in, n_out in ((28, 14), (28, 56), (28, 20), (7, 3)):
    np.testing.assert_allclose(images.area_weights(n_in, n_out).sum(axis=1), 1, rtol=1e-6)


def test_a_2x2_downsample_is_the_mean_of_each_block():
  rng = np.random.default_rng(0)
  x = (4 * rng.integers(0, 64, (2, 6, 8, 3))).astype(np.uint8)  # blocks of four multiples of 4: integer means
  means = x.reshape(2, 3, 2, 4, 2, 3).mean(axis=(2, 4))  # [2, 3, 4, 3]
  out = images.resize(x, (3, 4))
  assert out.shape == (2, 3, 4, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, means)
  y = rng.integers(0, 256, (2, 6, 8, 3)).astype(np.uint8)  # any means: rounded once, to the nearest
  assert np.abs(images.resize(y, (3, 4)) - y.reshape(2, 3, 2, 4, 2, 3).mean(axis=(2, 4))).max() <= 0.5


@pytest.mark.parametrize("size", [(14, 14), (20, 20), (56, 56), (9, 40)])
def test_a_constant_image_stays_constant(size):
  out = images.resize(np.full((3, 28, 28, 1), 137, np.uint8), size)
  assert out.shape == (3, *size, 1) and out.dtype == np.uint8 and (out == 137).all()


def test_enlarging_by_two_repeats_each_pixel():
  x = np.random.default_rng(1).integers(0, 256, (2, 5, 7, 3)).astype(np.uint8)
  np.testing.assert_array_equal(images.resize(x, (10, 14)), x.repeat(2, axis=1).repeat(2, axis=2))


# data.resize through data.load, on MNIST.

@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
  """A data_dir holding a copy of the prepared MNIST (its TFRecords and decoded stored-size splits, 70 MB),
  so that the resized copies start absent; removed afterwards."""
  builder = images.prepare(ImageDataConfig(name="mnist"))
  data.load(ImageDataConfig(name="mnist"))  # the stored-size splits decoded and kept, if not yet
  root = tmp_path_factory.mktemp("tfds")
  source = Path(builder.data_dir)
  shutil.copytree(source, root / source.relative_to(source.parents[1]), ignore=shutil.ignore_patterns("cvae_jax_*_*x*"))
  yield str(root)
  shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mnist_stored(mnist_dir):
  return data.load(ImageDataConfig(name="mnist", data_dir=mnist_dir))


@pytest.mark.parametrize("side", [14, 56])
def test_mnist_resized_through_load(mnist_dir, mnist_stored, side):
  ds = data.load(ImageDataConfig(name="mnist", data_dir=mnist_dir, resize=[side, side]))
  assert ds.spec.shape == (side, side, 1) and ds.spec.num_classes == 10
  assert ds.train.images.shape == (60000, side, side, 1) and ds.test.images.shape == (10000, side, side, 1)
  assert ds.train.images.dtype == np.uint8 and ds.test.images.dtype == np.uint8
  np.testing.assert_array_equal(ds.train.labels, mnist_stored.train.labels)
  stored = mnist_stored.test.images
  if side == 56:  # twice the size: each pixel repeated
    np.testing.assert_array_equal(ds.test.images, stored.repeat(2, axis=1).repeat(2, axis=2))
  else:  # half: the mean of each 2x2 block, rounded
    means = stored.reshape(10000, 14, 2, 14, 2, 1).mean(axis=(2, 4))
    assert np.abs(ds.test.images - means).max() <= 0.5
  builder = images.prepare(ImageDataConfig(name="mnist", data_dir=mnist_dir))
  assert images.split_cache(builder, "train", (side, side)).name == f"cvae_jax_train_{side}x{side}"
  assert np.load(images.split_cache(builder, "test", (side, side)) / "images.npy").shape == (10000, side, side, 1)


def test_a_resized_split_is_read_from_its_cache_and_a_damaged_one_is_rewritten(mnist_dir, monkeypatch):
  cfg = ImageDataConfig(name="mnist", data_dir=mnist_dir, resize=[14, 14], test_limit=100)
  first = data.load(cfg)
  with monkeypatch.context() as patch:
    patch.setattr(images, "resize", lambda *args: pytest.fail("resized again instead of read from the cache"))
    again = data.load(cfg)
  np.testing.assert_array_equal(again.test.images, first.test.images)
  np.testing.assert_array_equal(again.train.images, first.train.images)
  folder = images.split_cache(images.prepare(cfg), "test", (14, 14))
  np.save(folder / "images.npy", np.zeros((10000, 28, 28, 1), np.uint8))  # another size under this size's name
  np.testing.assert_array_equal(data.load(cfg).test.images, first.test.images)
  (folder / "images.npy").write_bytes(b"truncated")
  np.testing.assert_array_equal(data.load(cfg).test.images, first.test.images)
  assert np.load(folder / "images.npy").shape == (10000, 14, 14, 1)


@pytest.mark.parametrize("resize", [[14], [14, 0], [-3, 14], [14, 14, 14], 14])
def test_a_bad_resize_says_what_to_pass(resize):
  with pytest.raises(ConfigError, match=r"data.resize=.*\[height, width\], two positive integers"):
    images.check_resize(resize)
  with pytest.raises(ConfigError, match="data.resize"):
    data.load(ImageDataConfig(name="mnist", resize=resize))
  if isinstance(resize, list):  # at start-up too, through the dataset's check
    with pytest.raises(ConfigError, match="data.resize"):
      schema.validate(small_config(**{"data.resize": resize}))


# The synthetic dataset.

def small(**keys) -> SyntheticDataConfig:
  return SyntheticDataConfig(**({"num_train": 16, "num_test": 8} | keys))


def test_synthetic_is_deterministic_for_a_seed():
  a, b = data.load(small()), data.load(small())
  assert a.train.images.tobytes() == b.train.images.tobytes() and a.test.images.tobytes() == b.test.images.tobytes()
  assert np.array_equal(a.train.labels, b.train.labels)
  other = data.load(small(seed=1))
  assert other.train.images.tobytes() != a.train.images.tobytes()
  more = data.load(small(num_train=32))  # the test split has its own stream
  assert more.test.images.tobytes() == a.test.images.tobytes()


@pytest.mark.parametrize("size, channels", [(32, 3), (256, 3), (32, 1)])
def test_synthetic_shapes_labels_and_intensities(size, channels):
  ds = data.load(small(size=size, channels=channels))
  assert ds.spec.shape == (size, size, channels) and ds.spec.encoding == Encoding.grayscale
  assert ds.spec.num_classes == 10 and len(ds.spec.condition_names) == 10
  for split, n in ((ds.train, 16), (ds.test, 8)):
    assert split.images.shape == (n, size, size, channels) and split.images.dtype == np.uint8
    assert split.labels.shape == (n,) and split.labels.dtype == np.int32
    assert split.labels.min() >= 0 and split.labels.max() < 10
  x = ds.train.images
  assert x.max() - x.min() > 200 and x.std() > 30  # a wide range of intensities
  assert (x.reshape(16, -1).std(axis=1) > 5).all()  # no image is flat
  labels = data.load(SyntheticDataConfig(num_train=256, num_test=1, num_classes=4)).train.labels
  assert set(labels.tolist()) == {0, 1, 2, 3}


def test_synthetic_renders_the_same_scenes_at_every_size():
  small_side = synthetic.render(np.random.default_rng([0, 0]), 16, 32, 3, 10)[0]
  large_side = synthetic.render(np.random.default_rng([0, 0]), 16, 128, 3, 10)[0]
  assert np.abs(images.resize(large_side, (32, 32)).astype(int) - small_side).mean() < 1  # 0.15 measured


@pytest.mark.parametrize("key, value", [("size", 3), ("channels", 2), ("num_train", 0), ("num_test", 0),
                                        ("num_classes", 0)])
def test_a_bad_synthetic_key_is_named(key, value):
  with pytest.raises(ConfigError, match=f"data.{key}={value}"):
    data.load(small(**{key: value}))
  with pytest.raises(ConfigError, match=f"data.{key}={value}"):
    schema.validate(small_config(**{"data.name": "synthetic", f"data.{key}": value,
                                    "objective.likelihood": "gaussian"}))


def test_the_synthetic_config_composes_from_the_command_line():
  from hydra import compose, initialize_config_dir
  from omegaconf import OmegaConf
  import cvae_jax.train  # noqa: F401  registers the schema
  from conftest import REPO
  with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
    cfg = compose(config_name="config", overrides=["data=synthetic", "data.size=64", "objective=gaussian"])
  cfg = schema.validate(OmegaConf.to_object(cfg))
  assert isinstance(cfg.data, SyntheticDataConfig) and (cfg.data.size, cfg.data.channels) == (64, 3)


@pytest.mark.parametrize("arch, likelihood", [("mlp", "gaussian"), ("conv", "continuous_bernoulli")])
def test_a_tiny_run_on_synthetic_trains_and_evaluates(tmp_path, arch, likelihood):
  from cvae_jax.experiment import train_and_evaluate
  model = {"model.encoder_channels": [8, 8], "model.conv_stride": 2, "model.dense": 16} if arch == "conv" else {}
  cfg = small_config(**{"data.name": "synthetic", "data.size": 16, "data.num_train": 64, "data.num_test": 32,
                        "model.arch": arch, **model, "objective.likelihood": likelihood, "training.epochs": 2,
                        "evaluation.iwae_samples": 0})
  results = train_and_evaluate(cfg, tmp_path / "run")
  assert np.isfinite(results["elbo"]) and results["steps"] == 4  # 64 // 32 steps per epoch, 2 epochs
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in rows] == [1, 2]
