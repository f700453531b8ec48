"""Structured-output prediction: MNIST quadrant completion with the CVAE of Sohn, Lee & Yan 2015, trained
and scored as Pyro's `examples/cvae` replicates it (`python -m cvae_jax.train task=quadrants`).

The task: given 1, 2 or 3 quadrants of a digit (x), predict the other pixels (y). Two models:
  - the deterministic baseline NN, x -> y, trained by the binary cross-entropy on the output pixels;
  - the CVAE: recognition network q(z | x, y) (it sees the whole image), prior network p(z | x) (it sees
    x with the frozen baseline's prediction pasted into the hidden pixels), generation network p(y | z)
    (z only), Bernoulli likelihood on the output pixels only.
Pixels are grayscale in [0, 1]; hidden input pixels are -1, as in Pyro. Both models stop early (patience
`quadrants.patience`) on the validation split when there is one, else on the test split (Pyro's choice).

Reported per setting: the baseline's masked BCE and the CVAE's 10-sample negative ELBO (Pyro's table),
and the CVAE's importance-sampled conditional NLL -log p(y | x) (the paper's measure). On grayscale
targets the Bernoulli "likelihood" is the BCE, not a normalized density: these numbers compare models on
this task only.

Run directory: config.yaml, env.jsonl, results.json, figures/quadrants.png, and baseline/ and cvae/, each a
phase of the engine with its metrics.jsonl, tb/ and checkpoints/ (the early-stopping record in the state).
An interrupted run resumes; a finished phase is not retrained.
"""
from __future__ import annotations

import enum
import logging
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cvae_jax import data
from cvae_jax.config import Config, ConfigError, KLEstimator, Pixels, check, to_dict
from cvae_jax.data import Dataset
from cvae_jax.engine import epoch, loop, optim, preemption, rundir
from cvae_jax.estimators import importance_weighted_bound, map_over_split
from cvae_jax.figures import grid_figure
from cvae_jax.keys import Stream, fold, stream_key
from cvae_jax.models import init_params, reparameterize
from cvae_jax.models.mlp import MLPEncoder
from cvae_jax.objectives import gaussian_kl_between, log_importance_weights
from cvae_jax.tasks.base import Task, register

log = logging.getLogger(__name__)

HIDDEN = -1.0  # the value of input pixels to be predicted (and of target pixels that are given), as in Pyro


class Net(enum.IntEnum):
  """The two models, trained one after the other; the named part below each stream key of their training."""
  BASELINE = 0
  CVAE = 1


class InitPart(enum.IntEnum):
  """The named parts below the PARAMS key."""
  BASELINE = 0
  CVAE = 1
  CVAE_SAMPLE = 2  # the z drawn while the CVAE's parameters are initialized (it shapes none)


def output_mask(given: int, height: int, width: int) -> np.ndarray:
  """[H * W] bool, True on the pixels to predict. Given: 1 = bottom-left quadrant, 2 = the left half,
  3 = all but the bottom-right quadrant (Pyro's MaskImages)."""
  inputs = np.zeros((height, width), bool)
  h, w = height // 2, width // 2
  inputs[h:, :w] = True
  if given >= 2:
    inputs[:h, :w] = True
  if given == 3:
    inputs[:h, w:] = True
  return ~inputs.reshape(-1)


def hide(x: jax.Array, mask: jax.Array) -> jax.Array:
  """The model input: the image [B, D] with the pixels to predict set to -1."""
  return jnp.where(mask, HIDDEN, x)


def fill(inputs: jax.Array, completion: jax.Array, mask: jax.Array) -> jax.Array:
  """inputs with `completion` pasted into the hidden pixels: a whole image [B, D]."""
  return jnp.where(mask, completion, inputs)


def masked_log_likelihood(y: jax.Array, logits: jax.Array, mask: jax.Array) -> jax.Array:
  """sum over the output pixels of y log sigmoid(l) + (1 - y) log(1 - sigmoid(l)): minus Pyro's masked
  BCE. [..., D] -> [...]"""
  return jnp.sum(jnp.where(mask, y * logits - jax.nn.softplus(logits), 0.0), axis=-1)


class MLP(nn.Module):
  hidden: Sequence[int]
  outputs: int
  activation: Callable

  @nn.compact
  def __call__(self, h):
    for width in self.hidden:
      h = self.activation(nn.Dense(width)(h))
    return nn.Dense(self.outputs)(h)


class QuadrantCVAE(nn.Module):
  hidden: Sequence[int]
  latent_size: int
  num_pixels: int
  activation: Callable

  def setup(self):
    # The VAE's MLP encoder, image [B, D] -> (mean, logvar), serves as both Gaussian networks.
    self.recognition = MLPEncoder(self.hidden, self.latent_size, self.activation)  # q(z | x, y)
    self.prior = MLPEncoder(self.hidden, self.latent_size, self.activation)        # p(z | x)
    self.generation = MLP(self.hidden, self.num_pixels, self.activation)            # p(y | z): logits

  def __call__(self, image, prior_image, rng):  # for initialization: every sub-network once
    mean, logvar = self.recognition(image)
    self.prior(prior_image)
    return self.generation(reparameterize(rng, mean, logvar))


class Networks:
  """The networks, losses and metrics of one setting (number of given quadrants)."""

  def __init__(self, cfg: Config, height: int, width: int):
    m = cfg.model
    activation = getattr(nn, m.activation)
    self.mask = jnp.asarray(output_mask(cfg.quadrants.given, height, width))
    self.height, self.width, self.num_pixels = height, width, height * width
    self.baseline = MLP(tuple(m.hidden), self.num_pixels, activation)
    self.cvae = QuadrantCVAE(tuple(m.hidden), m.latent_size, self.num_pixels, activation)

  def images(self, images_uint8):  # [B, H, W, 1] uint8 -> [B, D] in [0, 1]
    return images_uint8.reshape(images_uint8.shape[0], -1).astype(jnp.float32) / 255.0

  def baseline_loss(self, params, x):
    """Masked BCE of the baseline's prediction, per example.  [B]"""
    return -masked_log_likelihood(x, self.baseline.apply({"params": params}, hide(x, self.mask)), self.mask)

  def prior(self, params, baseline_params, x):
    """p(z | x): the prior network on x completed by the frozen baseline's prediction."""
    inputs = hide(x, self.mask)
    guess = jax.nn.sigmoid(jax.lax.stop_gradient(self.baseline.apply({"params": baseline_params}, inputs)))
    return self.cvae.apply({"params": params}, fill(inputs, guess, self.mask), method=lambda m, i: m.prior(i))

  def log_likelihood_fn(self, params, x):
    """z [S, B, Z] -> log p(y | z) [S, B] on the output pixels."""
    def log_likelihood(z):
      logits = self.cvae.apply({"params": params}, z, method=lambda m, z: m.generation(z))
      return masked_log_likelihood(x, logits, self.mask)
    return log_likelihood

  def cvae_terms(self, params, baseline_params, x, key, samples: int, kl: KLEstimator = KLEstimator.analytic):
    """Per example: rec = -(1/S) sum_s log p(y | z_s), z_s ~ q(z | x, y); kl = KL(q || p(z | x)), in closed
    form or (kl=sampled, as Pyro's Trace_ELBO) as (1/S) sum_s log q(z_s) - log p(z_s) at the same draws;
    neg_elbo = rec + kl (Pyro's metric with S = 10).  [B] each"""
    q_mean, q_logvar = self.cvae.apply({"params": params}, x, method=lambda m, i: m.recognition(i))
    prior = self.prior(params, baseline_params, x)
    eps = jax.random.normal(key, (samples, *q_mean.shape))
    z = q_mean + jnp.exp(0.5 * q_logvar) * eps
    rec = -jnp.mean(self.log_likelihood_fn(params, x)(z), axis=0)
    if KLEstimator(kl) == KLEstimator.sampled:  # -log w with log p(y | z) = 0 is log q(z) - log p(z)
      kl_term = -jnp.mean(log_importance_weights(jnp.zeros(z.shape[:2]), z, eps, q_logvar, prior=prior), axis=0)
    else:
      kl_term = gaussian_kl_between(q_mean, q_logvar, *prior)
    return {"rec": rec, "kl": kl_term, "neg_elbo": rec + kl_term}

  def conditional_nll(self, params, baseline_params, x, key, samples: int, chunk: int):
    """-log p(y | x) by the k-sample importance-weighted bound, proposal q(z | x, y), prior p(z | x).  [B]"""
    q_mean, q_logvar = self.cvae.apply({"params": params}, x, method=lambda m, i: m.recognition(i))
    prior = self.prior(params, baseline_params, x)
    return -importance_weighted_bound(self.log_likelihood_fn(params, x), q_mean, q_logvar, key, samples, chunk,
                                      prior=prior)

  def sample_completions(self, params, baseline_params, x, key, samples: int):
    """[S, B, D]: the given pixels with the decoder's mean for z ~ p(z | x) in the hidden ones."""
    p_mean, p_logvar = self.prior(params, baseline_params, x)
    z = p_mean + jnp.exp(0.5 * p_logvar) * jax.random.normal(key, (samples, *p_mean.shape))
    probs = jax.nn.sigmoid(self.cvae.apply({"params": params}, z, method=lambda m, z: m.generation(z)))
    return fill(x, probs, self.mask)


def train_net(cfg: Config, directory: Path, params, loss: Callable, stopping_loss: Callable, train_images,
              net: Net) -> tuple[dict, dict]:
  """Trains one network by the engine on loss(params, uint8 images [B, ...], key) -> scalar (its keys below
  the stream keys' `net` part) until training.epochs or `quadrants.patience` epochs without a lower
  stopping_loss(params) -> float. Checkpoints every epoch (resumes). Returns (best params, {epochs,
  best_loss, stopped_early})."""

  def engine_loss(params, images, labels, keys: epoch.StepKeys, hyper):
    value = loss(params, images, keys(Stream.REPARAM))
    return value, {"loss": value}

  num_train = train_images.shape[0]
  steps = epoch.steps_per_epoch(cfg.training.batch_size, num_train)
  plan = epoch.Plan(engine_loss, epoch.run_hyper(cfg.seed, 1.0, cfg.optimizer.learning_rate), cfg.optimizer,
                    cfg.training, num_train, key_path=(net,))
  tx = optim.create_optimizer(cfg.optimizer)
  fresh = loop.EarlyStoppingState.start(params, tx)
  stopper = loop.EarlyStopping(cfg.quadrants.patience, stopping_loss)
  phase = loop.Phase(directory, cfg.training.max_checkpoints)
  try:
    state = phase.restore(fresh, legacy=[_legacy_layout(fresh)])
    state = state if state is not None else fresh
    phase.open_metrics(int(state.step))
    unlabelled = jnp.zeros(num_train, jnp.int32)  # the losses read the images alone
    every = cfg.training.checkpoint_every_steps
    with preemption.Watch(cfg.training.preemption_signals) as watch:
      state = loop.fit([phase], state, epoch.make_train_epoch(plan, chunk_steps=every), train_images, unlabelled,
                       epochs=cfg.training.epochs, steps=steps, checkpoint_every_steps=every, early_stopping=stopper,
                       preemption=watch)
  finally:
    phase.close()
  summary = {"epochs": int(state.step) // steps, "best_loss": float(state.best_loss), "stopped_early": stopper.done(state)}
  return state.best_params, summary


def _legacy_layout(state: loop.EarlyStoppingState):
  """Checkpoints of runs written by earlier versions, whose optimizer scaled by the learning rate itself (a
  chain ending in optax.scale): their layout, and the conversion to this one."""
  old = state.replace(opt_state=(state.opt_state, optax.ScaleState()))
  return old, lambda restored: restored.replace(opt_state=restored.opt_state[0])


class QuadrantTask(Task):
  name = "quadrants"
  headline = "cvae_neg_elbo"  # the CVAE's 10-sample negative ELBO, Pyro's table
  headline_sign = -1.0
  report_columns = ("baseline_bce", "cvae_neg_elbo", "cvae_conditional_nll", "wall_time")

  def check(self, cfg: Config) -> None:
    q = cfg.quadrants
    check(q.given in (1, 2, 3), "quadrants.given", q.given, "give 1, 2 or 3 quadrants as input")
    check(q.patience >= 1, "quadrants.patience", q.patience, "must be at least 1 epoch")
    check(q.elbo_samples >= 1, "quadrants.elbo_samples", q.elbo_samples, "must be at least 1")
    check(q.stopping_samples >= 1, "quadrants.stopping_samples", q.stopping_samples, "must be at least 1")
    pixels = getattr(cfg.data, "pixels", None)
    check(pixels == Pixels.grayscale, "data.pixels", pixels, "the quadrant task (Pyro's protocol) uses grayscale "
          "pixels in [0, 1] of an image dataset: set data.pixels=grayscale")
    check(cfg.model.arch == "mlp" and len(cfg.model.hidden) >= 1, "model.arch", cfg.model.arch,
          "the quadrant networks are MLPs: use model=mlp with at least one hidden layer")
    check(cfg.training.distributed == "none" and not cfg.training.data_parallel, "training.distributed",
          cfg.training.distributed, "the quadrant task trains its small networks in one process on one device: "
          "use training.distributed=none and training.data_parallel=false")
    check(cfg.data.in_memory is not False, "data.in_memory", cfg.data.in_memory, "the quadrant task keeps MNIST on "
          "the device: leave data.in_memory unset")

  def train(self, cfgs: Sequence[Config], workdirs: Sequence[Path], dataset: Optional[Dataset] = None,
            on_trace=None) -> list[dict]:
    if len(cfgs) != 1:
      raise ValueError("task=quadrants trains one run at a time")
    return [train_and_evaluate(cfgs[0], Path(workdirs[0]), dataset)]


def train_and_evaluate(cfg: Config, workdir: Path, dataset: Optional[Dataset] = None) -> dict:
  """Trains the baseline, then the CVAE on top of it (each resumes or is skipped when done), evaluates
  both on the test split and writes results.json and figures/quadrants.png."""
  config = to_dict(cfg)
  rundir.check_config(workdir, config)  # a directory of another run is refused before anything is written
  with rundir.RunLock(workdir):  # one process per run directory
    finished = rundir.finished_results(workdir, config)
    return finished if finished is not None else _train_and_evaluate(cfg, workdir, config, dataset)


def _train_and_evaluate(cfg: Config, workdir: Path, config: dict, dataset: Optional[Dataset]) -> dict:
  ds = dataset if dataset is not None else data.load(cfg.data)
  height, width, channels = ds.spec.shape
  if channels != 1 or height % 2 or width % 2:
    raise ConfigError(f"data.name={cfg.data.name!r} has images of shape {ds.spec.shape}; the quadrant task "
                      "needs one channel and an even height and width (MNIST, Fashion-MNIST).")
  rundir.init(workdir, config)
  nets = Networks(cfg, height, width)
  train_images = jnp.asarray(ds.train.images)
  stopping = ds.validation if ds.validation is not None else ds.test
  eval_batch = cfg.training.eval_batch_size
  q, ev = cfg.quadrants, cfg.evaluation
  eval_key = stream_key(cfg.seed, Stream.EVAL)
  x0 = jnp.zeros((1, nets.num_pixels))
  init_key = stream_key(cfg.seed, Stream.PARAMS)
  t0 = time.perf_counter()

  def mean_over(split, per_example):  # jitted, chunked mean over a split's examples
    over = map_over_split(lambda p, images, labels, key: per_example(p, nets.images(images), key), eval_batch)
    return lambda params: float(jnp.mean(over(params, jnp.asarray(split.images), jnp.asarray(split.labels), eval_key)))

  # 1. The deterministic baseline.
  baseline_params, baseline_fit = train_net(
      cfg, workdir / "baseline", init_params(nets.baseline, fold(init_key, InitPart.BASELINE), x0),
      lambda p, images, key: jnp.mean(nets.baseline_loss(p, nets.images(images))),
      mean_over(stopping, lambda p, x, key: nets.baseline_loss(p, x)), train_images, Net.BASELINE)

  # 2. The CVAE, its prior network fed the frozen baseline.
  cvae_init = init_params(nets.cvae, fold(init_key, InitPart.CVAE), x0, x0, fold(init_key, InitPart.CVAE_SAMPLE))
  cvae_params, cvae_fit = train_net(
      cfg, workdir / "cvae", cvae_init,
      lambda p, images, key: jnp.mean(nets.cvae_terms(p, baseline_params, nets.images(images), key, 1, q.kl)["neg_elbo"]),
      mean_over(stopping, lambda p, x, key: nets.cvae_terms(p, baseline_params, x, key, q.stopping_samples,
                                                            q.kl)["neg_elbo"]),
      train_images, Net.CVAE)

  # 3. Test metrics.
  test = ds.test
  log.info("Evaluating on %d test images (conditional NLL with k=%d)", len(test), ev.iwae_samples)
  results = {
      "given_quadrants": q.given,
      "baseline_bce": mean_over(test, lambda p, x, key: nets.baseline_loss(p, x))(baseline_params),
      "cvae_neg_elbo": mean_over(test, lambda p, x, key: nets.cvae_terms(p, baseline_params, x, key, q.elbo_samples)["neg_elbo"])(cvae_params),
      "cvae_elbo_samples": q.elbo_samples,
      "early_stopping_split": "validation" if ds.validation is not None else "test",
      "baseline_fit": baseline_fit, "cvae_fit": cvae_fit,
  }
  if ev.iwae_samples:
    results["cvae_conditional_nll"] = mean_over(test, lambda p, x, key: nets.conditional_nll(
        p, baseline_params, x, key, ev.iwae_samples, ev.sample_chunk))(cvae_params)
    results["nll_samples"] = ev.iwae_samples
  results["wall_time"] = time.perf_counter() - t0
  if cfg.training.figures:
    completion_figure(workdir / "figures" / "quadrants.png", nets, cvae_params, baseline_params, test,
                      stream_key(cfg.seed, Stream.FIGURES))
  rundir.write_json_atomic(workdir / "results.json", results)
  log.info("Finished %s: baseline BCE %.2f, CVAE -ELBO(%d) %.2f, CVAE NLL %s", workdir, results["baseline_bce"],
           q.elbo_samples, results["cvae_neg_elbo"], results.get("cvae_conditional_nll"))
  return results


def completion_figure(path: Path, nets: Networks, cvae_params, baseline_params, split, key, n: int = 8,
                      samples: int = 5) -> None:
  """Rows: test digits. Columns: the input (hidden pixels grey), the truth, the baseline's prediction,
  and `samples` CVAE completions with z ~ p(z | x)."""
  x = nets.images(jnp.asarray(split.images[:n]))
  inputs = jnp.where(nets.mask, 0.5, x)
  baseline = fill(x, jax.nn.sigmoid(nets.baseline.apply({"params": baseline_params}, hide(x, nets.mask))), nets.mask)
  completions = nets.sample_completions(cvae_params, baseline_params, x, key, samples)  # [S, n, D]
  columns = jnp.stack([inputs, x, baseline, *completions], axis=1)  # [n, 3 + S, D]
  path.parent.mkdir(parents=True, exist_ok=True)
  grid_figure(path, np.asarray(columns).reshape(n, 3 + samples, nets.height, nets.width, 1),
              "quadrant completion: input, truth, baseline NN, CVAE samples",
              col_labels=["input", "truth", "NN"] + [f"CVAE {i + 1}" for i in range(samples)])


register(QuadrantTask())
