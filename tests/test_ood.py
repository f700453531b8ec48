"""Input complexity and typicality (evaluators/ood.py) against hand cases."""
import io
import math
import zlib

import numpy as np
import pytest
from PIL import Image

from cvae_jax.evaluators import anomaly, ood


def test_png_takes_uint8_images_only():
  with pytest.raises(ValueError, match="use evaluation.compressor=zlib"):
    ood.compressed_bits(np.zeros((140, 1), np.float32), "png")


def test_the_complexity_of_a_signal_is_its_zlib_length_in_nats():
  signal = np.zeros((140, 1), np.float32)  # 560 zero bytes
  assert ood.compressed_bits(signal) == 8 * len(zlib.compress(bytes(560), 9))
  assert ood.complexity_nats(signal[None])[0] == 8 * len(zlib.compress(bytes(560), 9)) * math.log(2)


def test_the_complexity_of_an_image_is_its_png_length_and_grows_with_its_detail():
  rng = np.random.default_rng(0)
  flat = np.zeros((28, 28, 1), np.uint8)
  noise = rng.integers(0, 256, (28, 28, 1)).astype(np.uint8)
  bits = ood.compressed_bits(noise, "png")
  buffer = io.BytesIO()
  Image.fromarray(noise[..., 0]).save(buffer, format="PNG", compress_level=9)
  assert bits == 8 * len(buffer.getvalue())
  assert np.array_equal(np.asarray(Image.open(io.BytesIO(buffer.getvalue())))[..., None], noise)  # lossless
  # 784 random bytes cannot compress below their 6,272 bits; a blank image needs little beyond the PNG headers.
  assert bits > 6272 and ood.compressed_bits(flat, "png") < 6272 / 10
  assert ood.compressed_bits(noise) > 6272 and ood.compressed_bits(flat) < 6272 / 10  # zlib, the default


def test_input_complexity_subtracts_the_length_from_the_bound():
  scores = {"neg_elbo": np.array([10.0, 20.0]), "nll": np.array([9.0, 19.0])}
  out = anomaly.add_corrected_scores(scores, complexity=np.array([4.0, 1.0]), entropy=12.0)
  np.testing.assert_allclose(out["input_complexity"], [5.0, 18.0])
  np.testing.assert_allclose(out["typicality"], [3.0, 7.0])
  assert np.array_equal(out["neg_elbo"], scores["neg_elbo"])


def test_typicality_flags_a_batch_off_the_training_distribution_even_when_it_is_more_likely():
  rng = np.random.default_rng(0)
  normal = rng.normal(100.0, 5.0, 20000)  # training nll: H = 100 nats
  same = [ood.typicality_test(rng.normal(100.0, 5.0, 25), normal, alpha=0.01, seed=s)["atypical"] for s in range(200)]
  assert 0.0 <= np.mean(same) <= 0.04  # the false-positive rate is alpha, within sampling error
  likelier = ood.typicality_test(rng.normal(90.0, 5.0, 25), normal, alpha=0.01)  # higher likelihood, atypical
  assert likelier["atypical"] and likelier["statistic"] > likelier["epsilon"]
  # epsilon is the bootstrap quantile of |mean of 25 - H|: about 2.576 * 5 / sqrt(25) for a normal nll
  assert abs(likelier["epsilon"] - 2.576) < 0.3


def test_random_pixel_replacement_replaces_the_asked_fraction_with_uniform_values():
  from cvae_jax.data import Encoding, perturb
  images = np.full((200, 28, 28, 1), 7, np.uint8)
  assert np.array_equal(perturb(images, 0.0, 0, Encoding.grayscale), images)
  out = perturb(images, 0.2, 0, Encoding.grayscale)
  assert np.array_equal(out, perturb(images, 0.2, 0, Encoding.grayscale))  # a fixed copy per seed
  changed = out != 7  # a replacement draws 7 again with probability 1/256
  assert abs(changed.mean() - 0.2 * 255 / 256) < 0.005
  assert abs(out[changed].mean() - 127.5) < 2  # uniform on 0..255
  binary = perturb(np.zeros((200, 28, 28, 1), np.uint8), 0.2, 0, Encoding.static_binary)
  assert set(np.unique(binary)) == {0, 1} and abs(binary.mean() - 0.1) < 0.005
  with pytest.raises(ValueError, match="perturbs images"):
    perturb(np.zeros((2, 8, 1), np.float32), 0.1, 0, Encoding.real)


def test_the_likelihood_ratio_of_a_model_against_itself_is_zero():
  scores = {"neg_elbo": np.array([10.0, 20.0]), "nll": np.array([9.0, 19.0])}
  out = anomaly.add_corrected_scores(scores, np.zeros(2), 0.0, background=dict(scores))
  assert np.array_equal(out["likelihood_ratio"], np.zeros(2))
  out = anomaly.add_corrected_scores(scores, np.zeros(2), 0.0, background={"nll": np.array([4.0, 25.0])})
  np.testing.assert_allclose(out["likelihood_ratio"], [5.0, -6.0])  # nll - background nll
