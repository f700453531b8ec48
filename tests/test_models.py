"""Model interface: every family and kind gives the right shapes; shapes come from the data spec."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvae_jax.config import Kind
from cvae_jax.data import DatasetSpec
from cvae_jax.models import VAE, create_model, init_params
from cvae_jax.models.conv import ConvConfig
from cvae_jax.models.hvae import HVAEConfig
from cvae_jax.models.mlp import MLPConfig

MNIST = DatasetSpec("mnist", (28, 28, 1), 10)
CIFAR = DatasetSpec("cifar10", (32, 32, 3), 10)

CONFIGS = {
    "mlp": MLPConfig(hidden=[64, 32], latent_size=5),
    "seed_conv": ConvConfig(latent_size=2),
    "deep_conv": ConvConfig(latent_size=6, encoder_channels=[8, 16], decoder_channels=[16, 8], conv_stride=2,
                            kernel_size=4, dense=32),
}


@pytest.mark.parametrize("spec", [MNIST, CIFAR], ids=["mnist", "cifar"])
@pytest.mark.parametrize("kind", [Kind.vae, Kind.cvae])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_interface_shapes(name, kind, spec):
  cfg = CONFIGS[name]
  cfg.kind = kind
  model = create_model(cfg, spec)
  batch = 3
  x = jnp.ones((batch, *spec.shape))
  c = jax.nn.one_hot(jnp.array([0, 1, 9]), spec.condition_size) if kind == Kind.cvae else None
  params = init_params(model, {"params": jax.random.key(0)}, x, c, jax.random.key(1))
  out = model.apply({"params": params}, x, c, jax.random.key(2))
  assert out.mean.shape == out.logvar.shape == out.z.shape == (batch, cfg.latent_size)
  assert out.logits.shape == (batch, *spec.shape)
  mean, logvar = model.apply({"params": params}, x, c, method=VAE.encode)
  assert mean.shape == (batch, cfg.latent_size)
  assert model.apply({"params": params}, mean, c, method=VAE.decode).shape == (batch, *spec.shape)
  samples = model.apply({"params": params}, jax.random.key(3), c, batch, method=VAE.generate)
  assert samples.shape == (batch, *spec.shape)


def test_cvae_uses_the_condition_and_vae_ignores_it():
  cvae = create_model(MLPConfig(kind=Kind.cvae, hidden=[16], latent_size=2), MNIST)
  x = jnp.ones((2, 28, 28, 1))
  c0, c1 = jax.nn.one_hot(jnp.array([0, 0]), 10), jax.nn.one_hot(jnp.array([3, 3]), 10)
  params = init_params(cvae, {"params": jax.random.key(0)}, x, c0, jax.random.key(1))
  z = jnp.zeros((2, 2))
  decoded = [cvae.apply({"params": params}, z, c, method=VAE.decode) for c in (c0, c1)]
  assert not jnp.allclose(decoded[0], decoded[1])  # same z, another label: another image
  with pytest.raises(ValueError, match="condition"):
    cvae.apply({"params": params}, x, None, jax.random.key(1))
  vae = create_model(MLPConfig(kind=Kind.vae, hidden=[16], latent_size=2), MNIST)
  vparams = init_params(vae, {"params": jax.random.key(0)}, x, None, jax.random.key(1))
  same = [vae.apply({"params": vparams}, z, c, method=VAE.decode) for c in (c0, c1)]
  assert jnp.array_equal(same[0], same[1])


def test_seed_article_conv_cvae_layers():
  model = create_model(ConvConfig(), MNIST)  # the defaults are the seed article's CVAE
  x = jnp.ones((1, 28, 28, 1))
  c = jax.nn.one_hot(jnp.array([4]), 10)
  params = init_params(model, {"params": jax.random.key(0)}, x, c, jax.random.key(1))
  shapes = jax.tree.map(lambda a: a.shape, params)
  enc, dec = shapes["encoder"], shapes["decoder"]
  assert enc["Conv_0"]["kernel"] == (3, 3, 1, 32)
  assert enc["Dense_0"]["kernel"] == (28 * 28 * 32, 64)  # 'same' padding, stride 1, then flatten
  assert enc["mean"]["kernel"] == (64 + 10, 2)             # label concatenated after dense 64
  assert dec["Dense_0"]["kernel"] == (2 + 10, 64)          # concat(z, label), dense 64
  assert dec["Dense_1"]["kernel"] == (64, 784)             # dense to the image


def test_disentanglement_lib_conv_vae_layers():
  """model=conv_dlib: disentanglement_lib's conv_encoder layer for layer (382,932 parameters, counted by hand:
  convs 544 + 16,416 + 32,832 + 65,600, dense 262,400, mean and log-variance 2 x 2,570) and a decoder of its
  shapes: dense 256, dense 4x4x64, upsamplings to 8x8x64, 16x16x32, 32x32x32 and the 64x64 image."""
  cfg = ConvConfig(kind=Kind.vae, latent_size=10, encoder_channels=[32, 32, 64, 64], decoder_channels=[64, 32, 32],
                   kernel_size=4, decoder_kernel_size=3, conv_stride=2, dense=256, upsample_to_output=True)
  spec = DatasetSpec("dsprites", (64, 64, 1), 3)
  model = create_model(cfg, spec)
  params = init_params(model, {"params": jax.random.key(0)}, jnp.ones((1, 64, 64, 1)), None, jax.random.key(1))
  shapes = jax.tree.map(lambda a: a.shape, params)
  enc, dec = shapes["encoder"], shapes["decoder"]
  assert [enc[f"Conv_{i}"]["kernel"] for i in range(4)] == [(4, 4, 1, 32), (4, 4, 32, 32), (4, 4, 32, 64),
                                                            (4, 4, 64, 64)]
  assert enc["Dense_0"]["kernel"] == (4 * 4 * 64, 256)
  assert sum(a.size for a in jax.tree.leaves(params["encoder"])) == 382_932
  assert dec["Dense_0"]["kernel"] == (10, 256) and dec["Dense_1"]["kernel"] == (256, 4 * 4 * 64)
  # Sub-pixel upsampling: a stride-1 conv to 4x the channels, then depth_to_space doubles the side.
  assert [dec[f"Conv_{i}"]["kernel"] for i in range(4)] == [(3, 3, 64, 4 * 64), (3, 3, 64, 4 * 32),
                                                            (3, 3, 32, 4 * 32), (3, 3, 32, 4 * 1)]
  assert model.apply({"params": params}, jnp.zeros((2, 10)), None, method=VAE.decode).shape == (2, 64, 64, 1)


def test_decoder_upsampling_must_divide_the_image():
  cfg = ConvConfig(encoder_channels=[8], decoder_channels=[8, 8, 8], conv_stride=2)
  with pytest.raises(ValueError, match="does not divide"):
    create_model(cfg, MNIST)  # 28 is not divisible by 2^3


def test_depth_to_space_matches_tensorflow():
  import tensorflow as tf
  from cvae_jax.models.conv import depth_to_space
  x = np.arange(2 * 3 * 4 * 12, dtype=np.float32).reshape(2, 3, 4, 12)  # block 2: 12 = 4 * 3 channels
  np.testing.assert_array_equal(depth_to_space(jnp.asarray(x), 2), tf.nn.depth_to_space(x, 2).numpy())
  signal = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)  # 1-D, block 3: 6 = 3 * 2 channels
  out = np.asarray(depth_to_space(jnp.asarray(signal), 3))
  assert out.shape == (2, 15, 2)
  np.testing.assert_array_equal(out[:, 3 * 4 + 1], signal[:, 4, 2:4])  # position t*s + i <- channels i*C:(i+1)*C


def test_a_shared_gaussian_scale_is_one_learned_value_per_position_whatever_the_input():
  import math
  from cvae_jax import likelihoods
  from cvae_jax.data import Encoding
  signal = DatasetSpec("beats", (12, 1), 0, Encoding.real)
  model = create_model(MLPConfig(hidden=[16], latent_size=2), signal, outputs_per_channel=2, shared_scale=True)
  x = jax.random.normal(jax.random.key(0), (3, 12, 1))
  params = init_params(model, {"params": jax.random.key(1)}, x, None, jax.random.key(2))
  assert params["shared_scale"]["raw_scale"].shape == (12, 1)
  params = {**params, "shared_scale": {"raw_scale": jnp.linspace(-1.0, 1.0, 12).reshape(12, 1)}}
  z = jax.random.normal(jax.random.key(3), (3, 2))
  out = model.apply({"params": params}, z, method="decode")
  mean, sigma = likelihoods.gaussian_mean_scale(out)
  expected_sigma = jax.nn.softplus(jnp.linspace(-1.0, 1.0, 12)) + likelihoods.GAUSSIAN_MIN_SCALE
  np.testing.assert_allclose(sigma, jnp.broadcast_to(expected_sigma.reshape(12, 1), (3, 12, 1)), rtol=1e-6)
  assert float(jnp.max(jnp.abs(mean[0] - mean[1]))) > 1e-3  # the means still depend on z
  by_hand = jnp.sum(-0.5 * ((x - mean) / sigma) ** 2 - jnp.log(sigma) - 0.5 * math.log(2 * math.pi), axis=(1, 2))
  np.testing.assert_allclose(likelihoods.get("gaussian").log_prob(x, out), by_hand, rtol=1e-5)


def test_a_shared_scale_is_refused_where_there_is_no_gaussian_scale_to_share():
  from cvae_jax.config import ConfigError
  from cvae_jax.experiment import validate
  from conftest import small_config
  with pytest.raises(ConfigError, match=r"objective\.shared_scale.*objective=gaussian"):
    validate(small_config(**{"objective.shared_scale": True}))


INIT_CONFIGS = {"mlp": MLPConfig(kind=Kind.vae, hidden=[16], latent_size=3),
                "conv": ConvConfig(kind=Kind.vae, latent_size=2),
                "hvae": HVAEConfig(kind=Kind.vae, width=8, bottleneck=4, latent_channels=2, encoder_blocks=[1, 1],
                                   decoder_groups=[1, 1])}


@pytest.mark.parametrize("name", list(INIT_CONFIGS))
def test_init_params_is_flax_s_init_compiled_once_for_every_seed(name):
  """The known answer is Flax's own init run op by op. With XLA's optimizations off (as in this suite) the
  fused program may round differently in the last place; with them on (a user's run) they are bit-identical."""
  spec = DatasetSpec("tiny", (8, 8, 1), 10)
  model = create_model(INIT_CONFIGS[name], spec)
  x = jnp.ones((2, *spec.shape))
  for seed in (0, 1):
    rngs = {"params": jax.random.key(seed)}
    eager = model.init(rngs, x, None, jax.random.key(9))["params"]
    compiled = init_params(model, rngs, x, None, jax.random.key(9))
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(compiled), strict=True):
      np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=2)
  from cvae_jax.models.initialize import _shared_init
  before = _shared_init._cache_size()
  init_params(create_model(INIT_CONFIGS[name], spec), {"params": jax.random.key(5)}, x, None, jax.random.key(9))
  assert _shared_init._cache_size() == before  # an equal model and another seed: the same program


def test_init_params_of_a_module_holding_a_list_compiles_it_for_the_call():
  class Listed(nn.Module):
    widths: list

    @nn.compact
    def __call__(self, x):
      for w in self.widths:
        x = nn.Dense(w)(x)
      return x

  module, rngs, x = Listed([3, 2]), jax.random.key(0), jnp.ones((1, 4))
  eager = module.init(rngs, x)["params"]
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(init_params(module, rngs, x)), strict=True):
    np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=2)
