"""TFDS loading from the official files, pixel modes, and the offline error."""
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cvae_jax import data
from cvae_jax.data import Encoding, images
from cvae_jax.data.images import ImageDataConfig as DataConfig
from conftest import require_fashion_mnist

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # data/mnist/README.md


def test_mnist_loads_from_the_vendored_files(mnist):
  assert mnist.spec.shape == (28, 28, 1) and mnist.spec.num_classes == 10
  assert mnist.train.images.shape == (60000, 28, 28, 1) and mnist.test.images.shape == (10000, 28, 28, 1)
  assert mnist.train.images.dtype == np.uint8
  assert np.bincount(mnist.train.labels).tolist() == MNIST_TRAIN_COUNTS
  assert mnist.train.images.mean() == pytest.approx(33.318, abs=1e-3)


def test_decoded_splits_are_kept_beside_the_dataset_and_a_bad_copy_is_rewritten(mnist):
  builder = images.prepare(DataConfig(name="mnist"))
  folder = images.split_cache(builder, "test")
  assert folder.parent == Path(builder.data_dir)
  for bad in (b"\x93NUMPY cut short", None):  # a truncated file, then one of another size
    if bad is None:
      np.save(folder / "images.npy", mnist.test.images[:10])
    else:
      (folder / "images.npy").write_bytes(bad)
    again = data.load(DataConfig(name="mnist"))
    assert np.array_equal(again.test.images, mnist.test.images) and np.array_equal(again.test.labels, mnist.test.labels)
    kept_images, kept_labels = np.load(folder / "images.npy"), np.load(folder / "labels.npy")  # rewritten whole
    assert np.array_equal(kept_images, mnist.test.images) and np.array_equal(kept_labels, mnist.test.labels)
  # No temporary file is left behind. A test in another process may be rewriting the same split at this moment
  # (it found the bad copy above), so its temporary file may exist for a while, never for good.
  deadline = time.monotonic() + 60
  while list(folder.parent.glob("*.tmp")) and time.monotonic() < deadline:
    time.sleep(0.2)
  assert not list(folder.parent.glob("*.tmp"))
  assert np.array_equal(data.load(DataConfig(name="mnist")).train.images, mnist.train.images)  # read back as decoded


def test_a_dataset_is_prepared_once_when_jobs_ask_for_it_together(tmp_path, monkeypatch):
  """Four jobs find the dataset unprepared at once: one prepares it while the others wait on the lock in the
  data dir, then each finds it prepared (a fresh builder, which reads the prepared metadata)."""
  marker, prepared_by = tmp_path / "prepared", []

  class Builder:
    def is_prepared(self):
      return marker.exists()

  def prepare_slowly(cfg, builder):
    prepared_by.append(threading.get_ident())
    time.sleep(0.5)  # long enough for every other job to find the dataset unprepared
    marker.touch()
    return builder

  monkeypatch.setattr(images, "_builder", lambda cfg: Builder())
  monkeypatch.setattr(images, "_prepare_unlocked", prepare_slowly)
  cfg = DataConfig(name="mnist", data_dir=str(tmp_path / "tfds"))
  builders = []
  jobs = [threading.Thread(target=lambda: builders.append(images.prepare(cfg))) for _ in range(4)]
  for job in jobs:
    job.start()
  for job in jobs:
    job.join()
  assert len(prepared_by) == 1 and len(builders) == 4 and all(b.is_prepared() for b in builders)
  assert (tmp_path / "tfds" / ".mnist.prepare.lock").exists()


@pytest.mark.integration
def test_jobs_that_start_together_prepare_an_empty_data_dir_once(mnist, tmp_path, env_for_cli):
  """Two processes load MNIST into the same empty data_dir at once (a sweep's first jobs): both get the
  dataset, and it is prepared once (TFDS alone fails the second at its final rename)."""
  code = ("import sys, numpy as np; from cvae_jax import data; from cvae_jax.data.images import ImageDataConfig; "
          "d = data.load(ImageDataConfig(name='mnist', data_dir=sys.argv[1])); "
          "print(int(d.train.images.sum(dtype=np.int64)), int(d.test.labels.sum()))")
  jobs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env_for_cli, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outputs = [job.communicate(timeout=600) for job in jobs]
  expected = f"{int(mnist.train.images.sum(dtype=np.int64))} {int(mnist.test.labels.sum())}"
  for job, (out, err) in zip(jobs, outputs):
    assert job.returncode == 0, err[-2000:]
    assert out.strip().splitlines()[-1] == expected  # TFDS prints its progress above
  assert [p.name for p in (tmp_path / "mnist").iterdir()] == ["3.0.1"]  # one version folder, no leftovers


def test_a_split_kept_out_of_memory_is_a_memory_map_of_the_same_pixels(mnist):
  streamed = data.load(DataConfig(name="mnist", in_memory=False, train_limit=1000))
  assert isinstance(streamed.train.images, np.memmap)
  assert np.array_equal(streamed.train.images, mnist.train.images[:1000])
  assert not isinstance(data.load(DataConfig(name="mnist", train_limit=10)).train.images, np.memmap)


def test_the_training_split_lives_on_the_device_when_it_fits_a_quarter_of_its_memory():
  split = data.Split(np.zeros((100, 10), np.uint8), np.zeros(100, np.int32))  # 1,000 + 400 bytes
  assert data.fits_device(DataConfig(name="mnist"), split, device_bytes=4 * 1400)
  assert not data.fits_device(DataConfig(name="mnist"), split, device_bytes=4 * 1400 - 4)
  assert not data.fits_device(DataConfig(name="mnist", in_memory=False), split, device_bytes=10**12)
  assert data.fits_device(DataConfig(name="mnist", in_memory=True), split, device_bytes=1)


def test_static_binarization_is_one_fixed_sample(mnist):
  images = mnist.test.images[:500]
  a, b = data.static_binarize(images, seed=0), data.static_binarize(images, seed=0)
  assert np.array_equal(a, b) and set(np.unique(a)) <= {0, 1}
  assert a.mean() == pytest.approx(images.mean() / 255, abs=0.005)  # P(1) = intensity
  assert not np.array_equal(a, data.static_binarize(images, seed=1))


def test_pixel_modes():
  import jax
  images = np.array([[0, 128, 255]], dtype=np.uint8)
  np.testing.assert_allclose(data.model_input(images, Encoding.grayscale), [[0, 128 / 255, 1]], rtol=1e-6)
  key = jax.random.key(0)
  many = np.repeat(np.array([[0, 51, 255]], dtype=np.uint8), 20000, axis=0)
  dyn = np.asarray(data.model_input(many, Encoding.dynamic_binary, key))
  assert set(np.unique(dyn)) <= {0.0, 1.0}
  np.testing.assert_allclose(dyn.mean(0), [0, 0.2, 1], atol=0.01)
  other = np.asarray(data.model_input(many, Encoding.dynamic_binary, jax.random.key(1)))
  assert not np.array_equal(dyn, other)  # resampled with each key


def test_validation_split_and_limits():
  cfg = DataConfig(name="mnist", validation_size=5000, train_limit=1000, test_limit=300,
                   pixels="static_binary")
  ds = data.load(cfg)
  assert (len(ds.train), len(ds.validation), len(ds.test)) == (1000, 5000, 300)
  assert set(np.unique(ds.train.images)) <= {0, 1}
  # Validation is the last 5,000 training images, train the first (disjoint); each split gets its own
  # binarization stream (seed * 1000 + 0 train, 1 test, 2 validation).
  gray = data.load(DataConfig(name="mnist", validation_size=5000))
  full = data.load(DataConfig(name="mnist"))
  np.testing.assert_array_equal(gray.validation.images, full.train.images[-5000:])
  np.testing.assert_array_equal(gray.train.images, full.train.images[:-5000])
  np.testing.assert_array_equal(ds.validation.images, data.static_binarize(gray.validation.images, 2))
  np.testing.assert_array_equal(ds.train.images, data.static_binarize(gray.train.images[:1000], 0))
  np.testing.assert_array_equal(ds.test.images, data.static_binarize(gray.test.images[:300], 1))


def test_a_calibration_split_comes_before_the_validation_split_and_loses_the_excluded_classes():
  full = data.load(DataConfig(name="mnist"))
  ds = data.load(DataConfig(name="mnist", validation_size=5000, calibration_size=2000, exclude_classes=[3]))
  keep = lambda labels: labels != 3  # noqa: E731
  val_labels, cal_labels = full.train.labels[-5000:], full.train.labels[-7000:-5000]
  np.testing.assert_array_equal(ds.validation.images, full.train.images[-5000:][keep(val_labels)])
  np.testing.assert_array_equal(ds.calibration.images, full.train.images[-7000:-5000][keep(cal_labels)])
  np.testing.assert_array_equal(ds.train.images, full.train.images[:-7000][keep(full.train.labels[:-7000])])
  assert len(ds.calibration) == 2000 - int(np.sum(cal_labels == 3)) < 2000
  binary = data.load(DataConfig(name="mnist", calibration_size=2000, pixels="static_binary"))
  np.testing.assert_array_equal(binary.calibration.images,  # its own binarization stream, 3
                                data.static_binarize(full.train.images[-2000:], 3))
  assert binary.validation is None and len(binary.train) == 58000
  with pytest.raises(data.DataError, match="data.validation_size=30000 and data.calibration_size=30000 leave no "
                                           "training data"):
    data.load(DataConfig(name="mnist", validation_size=30000, calibration_size=30000))


@pytest.mark.fashion_mnist
def test_fashion_mnist_through_the_manual_dir_setting(mnist):  # MNIST prepared first, in the same data_dir
  require_fashion_mnist()
  ds = data.load(DataConfig(name="fashion_mnist", test_limit=100))
  assert ds.spec.shape == (28, 28, 1) and ds.spec.condition_names[0] == "T-shirt/top"
  assert len(ds.train) == 60000
  # Fashion-MNIST's own pixels, not MNIST's: mean train intensities 72.94 (Fashion, 0.2860 * 255) and
  # 33.32 (MNIST, 0.1307 * 255). TFDS once prepared Fashion-MNIST from MNIST's extracted files.
  assert abs(ds.train.images.mean() - 72.94) < 0.05, ds.train.images.mean()
  assert abs(mnist.train.images.mean() - 33.32) < 0.05


def test_missing_offline_files_say_where_to_put_them(tmp_path, monkeypatch):
  monkeypatch.delenv(data.MANUAL_DIR_ENV, raising=False)
  monkeypatch.setattr(data.files, "VENDORED_DATA_DIR", tmp_path / "nowhere")
  cfg = DataConfig(name="fashion_mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"))
  with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz.*manual/fashion_mnist"):
    data.load(cfg)
  (tmp_path / "manual" / "fashion_mnist").mkdir(parents=True)
  (tmp_path / "manual" / "fashion_mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
  with pytest.raises(data.DataError, match="lacks train-labels-idx1-ubyte.gz"):
    data.load(cfg)


def test_unknown_dataset_is_a_clear_error():
  with pytest.raises(data.DataError, match="not a TFDS dataset"):
    data.load(DataConfig(name="no_such_dataset_xyz"))
