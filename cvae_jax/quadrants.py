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

Run directory: config.yaml, results.json, figures/quadrants.png, and baseline/ and cvae/, each with its
metrics.jsonl, tb/, checkpoints/ and phase.json once that model is done. An interrupted run resumes.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cvae_jax import checkpoints, data, rundir
from cvae_jax.figures import grid_figure
from cvae_jax.config import Config, ConfigError, KLEstimator, to_dict, validate
from cvae_jax.data import Dataset
from cvae_jax.evaluation import importance_weighted_bound, map_over_split
from cvae_jax.keys import Stream, stream_key
from cvae_jax.models import MLPEncoder
from cvae_jax.objectives import gaussian_kl_between, log_importance_weights, reparameterize
from cvae_jax.training import NonFiniteLossError, create_optimizer

log = logging.getLogger(__name__)

HIDDEN = -1.0  # the value of input pixels to be predicted (and of target pixels that are given), as in Pyro


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


@flax.struct.dataclass
class FitState:
  """One model's training state with its early-stopping record; checkpointed each epoch."""
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  best_params: dict
  best_loss: jax.Array   # the lowest stopping loss so far
  bad_epochs: jax.Array  # epochs since it was reached


class Task:
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


def fit(cfg: Config, phase_dir: Path, params, loss_fn: Callable, stopping_loss: Callable, train_images,
        seed_stream: int) -> tuple[dict, dict]:
  """Adam on loss_fn(params, uint8 images [B, ...], key) -> scalar over minibatches, one jitted lax.scan per epoch,
  until training.epochs or `quadrants.patience` epochs without a lower stopping_loss(params) -> float.
  Checkpoints every epoch (resumes). Returns (best params, {epochs, best_loss, stopped_early})."""
  batch_size, patience = cfg.training.batch_size, cfg.quadrants.patience
  num_train = train_images.shape[0]
  steps = num_train // batch_size
  tx = optax.chain(create_optimizer(cfg.optimizer), optax.scale(cfg.optimizer.learning_rate))
  state = FitState(step=jnp.asarray(0), params=params, opt_state=tx.init(params), best_params=params,
                   best_loss=jnp.asarray(jnp.inf, jnp.float32), bad_epochs=jnp.asarray(0))
  order_key = jax.random.fold_in(stream_key(cfg.seed, Stream.DATA_ORDER), seed_stream)
  step_key = jax.random.fold_in(stream_key(cfg.seed, Stream.REPARAM), seed_stream)

  @jax.jit
  def train_epoch(state: FitState, images, epoch):
    order = jax.random.permutation(jax.random.fold_in(order_key, epoch), num_train)
    batches = order[: steps * batch_size].reshape(steps, batch_size)

    def step(s: FitState, idx):
      loss, grads = jax.value_and_grad(loss_fn)(s.params, images[idx], jax.random.fold_in(step_key, s.step))
      updates, opt_state = tx.update(grads, s.opt_state, s.params)
      return s.replace(step=s.step + 1, params=optax.apply_updates(s.params, updates), opt_state=opt_state), loss

    return jax.lax.scan(step, state, batches)

  ckpt = checkpoints.Checkpointer(phase_dir / "checkpoints", cfg.training.max_checkpoints)
  try:
    restored = ckpt.restore_latest_good(state)
    state = restored if restored is not None else state
    metrics_log = rundir.MetricsLog(phase_dir, int(state.step))
    wall_offset, t0 = metrics_log.wall_time, time.perf_counter()
    epoch = int(state.step) // steps
    while epoch < cfg.training.epochs and int(state.bad_epochs) < patience:
      state, losses = train_epoch(state, train_images, epoch)
      losses = np.asarray(losses)
      if not np.all(np.isfinite(losses)):
        raise NonFiniteLossError(f"The loss of {phase_dir.name} became non-finite in epoch {epoch + 1}. The last "
                                 "good checkpoint is kept. Lower optimizer.learning_rate and rerun.")
      stop = float(stopping_loss(state.params))
      better = stop < float(state.best_loss)
      state = state.replace(best_params=state.params if better else state.best_params,
                            best_loss=jnp.asarray(min(stop, float(state.best_loss)), jnp.float32),
                            bad_epochs=jnp.asarray(0 if better else int(state.bad_epochs) + 1))
      epoch += 1
      row = {"step": int(state.step), "epoch": epoch, "train/loss": float(losses.mean()), "stop/loss": stop,
             "stop/best": float(state.best_loss), "wall_time": wall_offset + time.perf_counter() - t0}
      metrics_log.write(row)
      log.info("%s epoch %d: train loss %.3f, stopping loss %.3f (best %.3f, %d epochs without)", phase_dir.name,
               epoch, row["train/loss"], stop, row["stop/best"], int(state.bad_epochs))
      ckpt.save(int(state.step), state)
    ckpt.wait()
    metrics_log.close()
  finally:
    ckpt.close()
  summary = {"epochs": int(state.step) // steps, "best_loss": float(state.best_loss),
             "stopped_early": int(state.bad_epochs) >= patience}
  return state.best_params, summary


def train_and_evaluate(cfg: Config, workdir: str | Path, dataset: Optional[Dataset] = None) -> dict:
  """Trains the baseline, then the CVAE on top of it (each resumes or is skipped when done), evaluates
  both on the test split and writes results.json and figures/quadrants.png."""
  validate(cfg)
  workdir, config = Path(workdir), to_dict(cfg)
  finished = rundir.finished_results(workdir, config)
  if finished is not None:
    return finished
  ds = dataset if dataset is not None else data.load(cfg.data)
  height, width, channels = ds.spec.image_shape
  if channels != 1 or height % 2 or width % 2:
    raise ConfigError(f"data.name={cfg.data.name!r} has images of shape {ds.spec.image_shape}; the quadrant task "
                      "needs one channel and an even height and width (MNIST, Fashion-MNIST).")
  rundir.init(workdir, config)
  task = Task(cfg, height, width)
  train_images = jnp.asarray(ds.train.images)
  stopping = ds.validation if ds.validation is not None else ds.test
  eval_batch = cfg.training.eval_batch_size
  q, ev = cfg.quadrants, cfg.evaluation
  eval_key = stream_key(cfg.seed, Stream.EVAL)
  x0 = jnp.zeros((1, task.num_pixels))
  init_key = stream_key(cfg.seed, Stream.PARAMS)
  t0 = time.perf_counter()

  def mean_over(split, per_example):  # jitted, chunked mean over a split's examples
    over = map_over_split(lambda p, images, labels, key: per_example(p, task.images(images), key), eval_batch)
    return lambda params: float(jnp.mean(over(params, jnp.asarray(split.images), jnp.asarray(split.labels), eval_key)))

  # 1. The deterministic baseline.
  baseline_params, baseline_fit = fit(
      cfg, workdir / "baseline", task.baseline.init(jax.random.fold_in(init_key, 0), x0)["params"],
      lambda p, images, key: jnp.mean(task.baseline_loss(p, task.images(images))),
      mean_over(stopping, lambda p, x, key: task.baseline_loss(p, x)), train_images, seed_stream=0)

  # 2. The CVAE, its prior network fed the frozen baseline.
  cvae_init = task.cvae.init(jax.random.fold_in(init_key, 1), x0, x0, jax.random.fold_in(init_key, 2))["params"]
  cvae_params, cvae_fit = fit(
      cfg, workdir / "cvae", cvae_init,
      lambda p, images, key: jnp.mean(task.cvae_terms(p, baseline_params, task.images(images), key, 1, q.kl)["neg_elbo"]),
      mean_over(stopping, lambda p, x, key: task.cvae_terms(p, baseline_params, x, key, q.stopping_samples,
                                                            q.kl)["neg_elbo"]),
      train_images, seed_stream=1)

  # 3. Test metrics.
  test = ds.test
  log.info("Evaluating on %d test images (conditional NLL with k=%d)", len(test), ev.iwae_samples)
  results = {
      "given_quadrants": q.given,
      "baseline_bce": mean_over(test, lambda p, x, key: task.baseline_loss(p, x))(baseline_params),
      "cvae_neg_elbo": mean_over(test, lambda p, x, key: task.cvae_terms(p, baseline_params, x, key, q.elbo_samples)["neg_elbo"])(cvae_params),
      "cvae_elbo_samples": q.elbo_samples,
      "early_stopping_split": "validation" if ds.validation is not None else "test",
      "baseline_fit": baseline_fit, "cvae_fit": cvae_fit,
  }
  if ev.iwae_samples:
    results["cvae_conditional_nll"] = mean_over(test, lambda p, x, key: task.conditional_nll(
        p, baseline_params, x, key, ev.iwae_samples, ev.sample_chunk))(cvae_params)
    results["nll_samples"] = ev.iwae_samples
  results["wall_time"] = time.perf_counter() - t0
  if cfg.training.figures:
    completion_figure(workdir / "figures" / "quadrants.png", task, cvae_params, baseline_params, test,
                      stream_key(cfg.seed, Stream.FIGURES))
  rundir.write_json_atomic(workdir / "results.json", results)
  log.info("Finished %s: baseline BCE %.2f, CVAE -ELBO(%d) %.2f, CVAE NLL %s", workdir, results["baseline_bce"],
           q.elbo_samples, results["cvae_neg_elbo"], results.get("cvae_conditional_nll"))
  return results


def completion_figure(path: Path, task: Task, cvae_params, baseline_params, split, key, n: int = 8,
                      samples: int = 5) -> None:
  """Rows: test digits. Columns: the input (hidden pixels grey), the truth, the baseline's prediction,
  and `samples` CVAE completions with z ~ p(z | x)."""
  x = task.images(jnp.asarray(split.images[:n]))
  inputs = jnp.where(task.mask, 0.5, x)
  baseline = fill(x, jax.nn.sigmoid(task.baseline.apply({"params": baseline_params}, hide(x, task.mask))), task.mask)
  completions = task.sample_completions(cvae_params, baseline_params, x, key, samples)  # [S, n, D]
  columns = jnp.stack([inputs, x, baseline, *completions], axis=1)  # [n, 3 + S, D]
  path.parent.mkdir(parents=True, exist_ok=True)
  grid_figure(path, np.asarray(columns).reshape(n, 3 + samples, task.height, task.width, 1),
              "quadrant completion: input, truth, baseline NN, CVAE samples",
              col_labels=["input", "truth", "NN"] + [f"CVAE {i + 1}" for i in range(samples)])
