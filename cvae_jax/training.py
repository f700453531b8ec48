"""Training: create_train_state, the jitted epoch (a lax.scan of train_step over on-device data),
and train_and_evaluate(cfg, workdir), the one function the command line, tests and notebooks call."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import flax.struct
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from cvae_jax import anomaly, annealing, checkpoints, data, figures, moses, rundir
from cvae_jax.config import (Arch, Config, ConfigError, EpochLoop, Estimator, LRSchedule, OptimizerConfig,
                             OptimizerName, Pixels, to_dict, validate)
from cvae_jax.data import Dataset, DatasetSpec, model_input
from cvae_jax.evaluate import evaluate_model
from cvae_jax.evaluation import decoder_log_likelihood, make_diagnostics, make_evaluate, one_hot_condition
from cvae_jax.keys import Stream, stream_key
from cvae_jax.models import VAE, create_model
from cvae_jax.objectives import elbo_terms, free_bits_kl, gaussian_kl_per_dim, k_sample_terms, loss_and_metrics

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


@flax.struct.dataclass
class RunHyper:
  """The scalar hyperparameters a batched sweep varies between its runs (cvae_jax/batched.py): arguments
  of the step rather than constants, so one vmapped program trains runs that differ only in them."""
  seed: jax.Array
  beta: jax.Array
  learning_rate: jax.Array


def run_hyper(cfg: Config) -> RunHyper:
  return RunHyper(seed=jnp.asarray(cfg.seed, jnp.int32), beta=jnp.asarray(cfg.objective.beta, jnp.float32),
                  learning_rate=jnp.asarray(cfg.optimizer.learning_rate, jnp.float32))


def create_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """Adam or Adagrad (after optional weight decay and global-norm clipping) with a unit step: the train
  step multiplies the update by the run's learning rate, so it can vary across a batched sweep. Both are
  linear in the rate, so this equals optax.adam(rate) / optax.adagrad(rate)."""
  if OptimizerName(cfg.name) == OptimizerName.adagrad:
    base = optax.adagrad(1.0)
  else:
    base = optax.adam(1.0, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm is not None else []
  if cfg.weight_decay:  # the gradient of weight_decay/2 |theta|^2, before the adaptive scaling (an L2 prior)
    parts.append(optax.add_decayed_weights(cfg.weight_decay))
  tx = optax.chain(*parts, base) if parts else base
  # Elementwise updates give the same numbers on one concatenated vector; the global norm may round differently.
  return optax.flatten(tx) if cfg.flatten else tx


def learning_rate_factor(cfg: OptimizerConfig, steps_per_epoch: int) -> Callable:
  """factor(step) multiplying the learning rate. burda: epochs [(3^i - 1)/2, (3^(i+1) - 1)/2) form stage
  i, at 10^(-i/7) (Burda et al. 2016: 3^i passes at 0.001 * 10^(-i/7), i = 0..7, 3280 passes in all)."""
  if LRSchedule(cfg.schedule) == LRSchedule.constant:
    return lambda step: 1.0
  starts = jnp.asarray([(3**i - 1) // 2 for i in range(1, 21)])  # first epoch of stages 1, 2, ...

  def factor(step):
    stage = jnp.sum(step // steps_per_epoch >= starts)
    return 10.0 ** (-stage / 7.0)

  return factor


def create_train_state(cfg: Config, model: VAE, spec: DatasetSpec) -> train_state.TrainState:
  """The one place the train state is built: parameters from the PARAMS stream, Adam state, step 0."""
  x = jnp.zeros((1, *spec.image_shape), jnp.float32)
  c = jnp.zeros((1, spec.num_classes), jnp.float32) if model.num_classes else None
  key = stream_key(cfg.seed, Stream.PARAMS)
  params = model.init({"params": key}, x, c, jax.random.fold_in(key, 1))["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=create_optimizer(cfg.optimizer))


def make_train_step(cfg: Config, model: VAE, spec: DatasetSpec, steps_per_epoch: int) -> Callable:
  """Returns train_step(state, images uint8 [B, ...], labels [B], hyper=None) -> (state, metrics), not jitted.

  Pure: the reparameterization and binarization keys and the KL weight are functions of state.step,
  so the same step of a resumed run draws the same numbers. `hyper` (a RunHyper) overrides the
  config's seed, beta and learning rate.
  """
  objective = cfg.objective
  likelihood, free_bits = objective.likelihood, objective.free_bits
  iwae = Estimator(objective.estimator) == Estimator.iwae
  multi_sample = iwae or objective.samples > 1  # k draws per example; k = 1 keeps the one-pass step
  lr_factor = learning_rate_factor(cfg.optimizer, steps_per_epoch)
  kl_weight = annealing.kl_weight_schedule(cfg.objective, steps_per_epoch, steps_per_epoch * cfg.training.epochs)
  skip_nonfinite = cfg.training.skip_nonfinite

  def train_step(state, images, labels, hyper: Optional[RunHyper] = None):
    hyper = run_hyper(cfg) if hyper is None else hyper
    binarize_key = stream_key(hyper.seed, Stream.BINARIZE)
    x = model_input(images, spec.pixels, jax.random.fold_in(binarize_key, state.step))  # [B, *shape]
    c = one_hot_condition(model, labels)  # [B, K] or None
    rng = jax.random.fold_in(stream_key(hyper.seed, Stream.REPARAM), state.step)
    beta = kl_weight(state.step, hyper.beta)

    def loss_fn(params):
      if multi_sample:
        mean, logvar = model.apply({"params": params}, x, c, method=VAE.encode)
        log_likelihood = decoder_log_likelihood(model, params, x, c, likelihood)
        terms = k_sample_terms(log_likelihood, mean, logvar, rng, objective.samples)
        if iwae:  # the loss is -L_k; rec, kl and elbo are still reported
          loss, metrics = loss_and_metrics(terms, beta, spec.num_pixels)
          metrics["loss"] = -metrics["iwae"]
          return metrics["loss"], metrics
      else:
        out = state.apply_fn({"params": params}, x, c, rng)
        terms = elbo_terms(x, out.logits, out.mean, out.logvar, likelihood)
        mean, logvar = out.mean, out.logvar
      penalty = None
      if free_bits > 0 and logvar is not None:
        penalty = free_bits_kl(gaussian_kl_per_dim(mean, logvar), free_bits)
      return loss_and_metrics(terms, beta, spec.num_pixels, penalty)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics["kl_weight"] = jnp.asarray(beta, jnp.float32)
    direction, opt_state = state.tx.update(grads, state.opt_state, state.params)  # -Adam step for rate 1
    rate = hyper.learning_rate * lr_factor(state.step)
    updates = jax.tree.map(lambda d: d * rate, direction)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    if skip_nonfinite:  # keep the old parameters and optimizer state when this step's numbers are not finite
      finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      new_state = new_state.replace(params=keep(new_state.params, state.params),
                                    opt_state=keep(new_state.opt_state, state.opt_state))
      metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics

  return train_step


def data_parallel_mesh() -> Mesh:
  """A 1-D mesh over every local device; axis "data" splits the batch."""
  return jax.make_mesh((jax.local_device_count(),), ("data",), axis_types=(AxisType.Auto,))


def uses_step_loop(cfg: Config) -> bool:
  """Whether an epoch runs as a host loop of jitted steps instead of one lax.scan. On XLA:CPU,
  convolutions inside a loop body run about 10x slower than at top level (measured: the conv1d ECG model,
  16 s against 1.6 s per epoch), so conv models on CPU loop on the host; the per-step dispatch
  (tens of microseconds) is small beside their steps. Everything else scans."""
  loop = EpochLoop(cfg.training.epoch_loop)
  if loop == EpochLoop.auto:
    return Arch(cfg.model.arch) == Arch.conv and jax.default_backend() == "cpu"
  return loop == EpochLoop.steps


def over_runs(fn: Callable, in_axes: tuple) -> Callable:
  """fn over a leading axis of runs (a batched sweep), for arguments whose in_axes entry is 0 (None:
  shared). Accelerators vmap: one wide step for all runs fills a device that one small model leaves idle.
  XLA:CPU runs the batched matmuls of a vmap slower than plain ones, so there the runs follow one another
  (lax.map) inside the one program, each with plain matmuls (8 MLP runs: 1.00-1.02x separate runs with
  the map, 0.88-0.95x with vmap)."""
  if jax.default_backend() != "cpu":
    return jax.vmap(fn, in_axes=in_axes)

  def mapped(*args):
    def one(run_args):
      it = iter(run_args)
      return fn(*[next(it) if axis == 0 else a for a, axis in zip(args, in_axes)])
    return jax.lax.map(one, [a for a, axis in zip(args, in_axes) if axis == 0])

  return mapped


def make_train_epoch(cfg: Config, model: VAE, spec: DatasetSpec, num_train: int,
                     on_trace: Optional[Callable[[], None]] = None, mesh: Optional[Mesh] = None,
                     batched: bool = False) -> Callable:
  """Returns train_epoch(state, images, labels, epoch, hyper=None) -> (state, per-step metrics).

  The epoch is one compiled lax.scan of train_step over minibatches of data already on the device:
  no host round trip per step (or, see uses_step_loop, a host loop over the same jitted step). Either
  is traced once; `on_trace` is called each time JAX traces it (tests count retraces with it). With a
  `mesh` (data parallelism), state and data are replicated and each minibatch is split over the mesh's
  "data" axis; XLA partitions the step and all-reduces the gradients. batched: state and hyper carry a
  leading axis of runs, vmapped over; the data is shared.
  """
  batch_size = cfg.training.batch_size
  steps = num_train // batch_size
  train_step = make_train_step(cfg, model, spec, steps)

  def epoch_batches(epoch, hyper):  # [steps, batch_size] example indices; the last partial batch dropped
    order_key = stream_key(cfg.seed if hyper is None else hyper.seed, Stream.DATA_ORDER)
    order = jax.random.permutation(jax.random.fold_in(order_key, epoch), num_train)
    return order[: steps * batch_size].reshape(steps, batch_size)

  def step_on(state, images, labels, idx, hyper):
    batch_images, batch_labels = images[idx], labels[idx]
    if mesh is not None:
      split = NamedSharding(mesh, PartitionSpec("data"))
      batch_images = jax.lax.with_sharding_constraint(batch_images, split)
      batch_labels = jax.lax.with_sharding_constraint(batch_labels, split)
    return train_step(state, batch_images, batch_labels, hyper)

  def scan_epoch(state, images, labels, epoch, hyper=None):
    batches = epoch_batches(epoch, hyper)
    names = []

    def body(s, idx):  # the step's metrics packed into one vector: one write per step, not one per metric
      s, metrics = step_on(s, images, labels, idx, hyper)
      names[:] = sorted(metrics)
      return s, jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in names])

    state, packed = jax.lax.scan(body, state, batches, unroll=cfg.training.scan_unroll)
    return state, {k: packed[:, i] for i, k in enumerate(names)}

  def traced(fn, batched_axes):
    def wrapped(*args):
      if on_trace is not None:
        on_trace()
      return over_runs(fn, batched_axes)(*args) if batched else fn(*args)
    return wrapped

  if not uses_step_loop(cfg):
    return jax.jit(traced(scan_epoch, (0, None, None, None, 0)), donate_argnums=0)

  order = jax.jit(jax.vmap(epoch_batches, in_axes=(None, 0)) if batched else epoch_batches)
  step = jax.jit(traced(step_on, (0, None, None, 0, 0)), donate_argnums=0)

  def loop_epoch(state, images, labels, epoch, hyper: Optional[RunHyper] = None):
    batches = order(epoch, hyper)  # [steps, B] ([runs, steps, B] batched)
    per_step = []
    for i in range(steps):
      state, metrics = step(state, images, labels, batches[:, i] if batched else batches[i], hyper)
      per_step.append(metrics)
    return state, jax.tree.map(lambda *m: jnp.stack(m, axis=1 if batched else 0), *per_step)

  return loop_epoch


def check_finite(step_metrics: dict, first_step: int) -> None:
  skipped = step_metrics.get("skipped", np.zeros_like(step_metrics["loss"])) > 0
  bad = np.flatnonzero(~np.isfinite(step_metrics["loss"]) & ~skipped)
  if bad.size:
    raise NonFiniteLossError(
        f"The loss became {step_metrics['loss'][bad[0]]} at step {first_step + int(bad[0]) + 1}. "
        "The run stopped; the last good checkpoint is kept. Lower optimizer.learning_rate or set "
        "optimizer.grad_clip_norm, then rerun (or set training.skip_nonfinite=true to skip such updates).")


def steps_per_epoch(cfg: Config, num_train: int) -> int:
  steps = num_train // cfg.training.batch_size
  if steps == 0:
    raise ConfigError(f"training.batch_size={cfg.training.batch_size} is larger than the training set "
                      f"({num_train} examples). Lower it.")
  return steps


def epoch_row(step_metrics: dict, step: int, epoch: int) -> dict:
  """The train/* part of an epoch's metrics line: means over the steps whose update was applied."""
  row = {"step": step, "epoch": epoch + 1}
  applied = step_metrics.get("skipped", np.zeros_like(step_metrics["loss"])) == 0
  row |= {f"train/{k}": float(np.mean(v[applied])) if applied.any() else float("nan")
          for k, v in step_metrics.items() if k != "skipped"}
  if "skipped" in step_metrics:
    row["train/skipped"] = int(step_metrics["skipped"].sum())
  return row


def make_epoch_evaluation(cfg: Config, model: VAE, spec: DatasetSpec, eval_arrays: dict) -> Callable:
  """Returns evaluate_all(params, key) -> {"test/elbo": ..., "val/...": ..., diagnostics}: the test/* and
  val/* part of an epoch's metrics line, with the posterior-collapse diagnostics on the test split."""
  evaluate = make_evaluate(model, spec, cfg.objective.likelihood, cfg.training.eval_batch_size)
  diagnose = None
  if cfg.evaluation.diagnostics and model.stochastic:
    diagnose = make_diagnostics(model, spec, cfg.training.eval_batch_size, cfg.evaluation.mi_examples)

  def evaluate_all(params, key) -> dict:
    row = {f"{name}/{k}": float(v) for name, (images, labels) in eval_arrays.items()
           for k, v in jax.device_get(evaluate(params, images, labels, key)).items()}
    if diagnose is not None:
      row |= {f"test/{k}": v for k, v in diagnose(params, *eval_arrays["test"], key).items()}
    return row

  return evaluate_all


def log_epoch(row: dict, epochs: int, workdir: Path) -> None:
  log.info("%s epoch %d/%d step %d: train loss %.3f, test elbo %.3f (rec %.3f, kl %.3f)", workdir.name,
           row["epoch"], epochs, row["step"], row["train/loss"], row["test/elbo"], row["test/rec"], row["test/kl"])


def finish_run(cfg: Config, ds: Dataset, model: VAE, params, workdir: Path, metrics_log: rundir.MetricsLog,
               steps: int) -> dict:
  """After the last epoch: figures, the end-of-training evaluation (eval.json) and results.json."""
  # The last epoch's row already holds the test (and validation) metrics of the final parameters.
  final = {k: v for k, v in metrics_log.rows[-1].items() if k.startswith(("test/", "val/"))}
  figure_paths = []
  tokens = Pixels(ds.spec.pixels) == Pixels.tokens
  if cfg.training.figures and not tokens:  # molecules draw their own figures (cvae_jax/molecules.py)
    figure_paths = figures.write_all(workdir / "figures", model, params, ds.spec, cfg.objective.likelihood,
                                     ds.test, stream_key(cfg.seed, Stream.FIGURES))
  evaluated = evaluate_model(cfg, ds, model, params, workdir, cfg.evaluation.iwae_samples,
                             cfg.evaluation.sample_accuracy)
  results = {
      "elbo": final["test/elbo"], "rec": final["test/rec"], "kl": final["test/kl"], "bpd": final["test/bpd"],
      "normalized_likelihood": evaluated["normalized_likelihood"],
      "active_units": evaluated.get("active_units"),
      "metrics": final, "steps": steps, "epochs": cfg.training.epochs,
      "wall_time": metrics_log.wall_time, "figures": [p.name for p in figure_paths],
      "num_params": int(sum(math.prod(p.shape) for p in jax.tree.leaves(params))),
  }
  if "iwae" in evaluated:
    results |= {"nll": evaluated["iwae"]["nll"], "iwae_samples": evaluated["iwae"]["k"]}
  if "anomaly_auroc" in evaluated:
    results["anomaly_auroc"] = evaluated["anomaly_auroc"]
  if "test/mutual_information" in final:
    results["mutual_information"] = final["test/mutual_information"]
  if tokens and model.stochastic:  # sample molecules: validity, uniqueness, novelty, property control
    from cvae_jax import molecules
    generated = molecules.evaluate_generation(cfg, ds, model, params, workdir, cfg.evaluation.molecules)
    results["molecules"] = {k: generated[k] for k in ("conditional", "unconditional", "mae_ratio") if k in generated}
  rundir.write_json_atomic(workdir / "results.json", results)
  log.info("Finished %s: test ELBO %.3f nats (rec %.3f, kl %.3f) after %d steps, %.1f s", workdir, results["elbo"],
           results["rec"], results["kl"], results["steps"], results["wall_time"])
  return results


def train_and_evaluate(cfg: Config, workdir: str | Path, dataset: Optional[Dataset] = None,
                       on_trace: Optional[Callable[[], None]] = None) -> dict:
  """Trains (resuming from workdir's latest checkpoint), evaluates, writes figures and results.json.

  Returns the final results. A finished run (results.json present) is not retrained.
  """
  validate(cfg)
  workdir, config = Path(workdir), to_dict(cfg)
  finished = rundir.finished_results(workdir, config)
  if finished is not None:
    return finished

  ds = dataset if dataset is not None else data.load(cfg.data)  # before writing: bad data writes nothing
  spec, epochs = ds.spec, cfg.training.epochs
  steps = steps_per_epoch(cfg, len(ds.train))
  mesh = data_parallel_mesh() if cfg.training.data_parallel else None
  if mesh is not None and cfg.training.batch_size % mesh.size:
    raise ConfigError(f"training.batch_size={cfg.training.batch_size} does not split over {mesh.size} devices "
                      "(training.data_parallel=true): use a multiple of the device count.")
  model = create_model(cfg.model, spec, cfg.objective.likelihood)
  if cfg.evaluation.anomaly_dataset:
    anomaly.load_anomaly_dataset(cfg, spec)  # a wrong name or shape stops us before any training
  state = create_train_state(cfg, model, spec)
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", cfg.training.max_checkpoints)
  try:
    restored = ckpt.restore_latest_good(state)  # a checkpoint of another model stops us here
  except BaseException:
    ckpt.close()
    raise
  rundir.init(workdir, config)
  if spec.vocab:  # token data: the ids the checkpoint was trained with, beside it
    moses.save_or_check_vocabulary(workdir, spec, cfg.data.syntax)
  if restored is not None:
    state = restored
    log.info("Resumed from step %d in %s", int(state.step), workdir)
  start_epoch = int(state.step) // steps
  metrics_log = rundir.MetricsLog(workdir, int(state.step))

  # The whole dataset lives on the device as uint8; each step converts its minibatch. Data parallel:
  # data and state are replicated on every device of the mesh.
  put = jax.device_put if mesh is None else lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
  state = put(state)
  train_images, train_labels = put(ds.train.images), put(ds.train.labels)
  eval_splits = {"test": ds.test} | ({"val": ds.validation} if ds.validation is not None else {})
  evaluate_all = make_epoch_evaluation(cfg, model, spec, {k: (put(s.images), put(s.labels)) for k, s in eval_splits.items()})
  train_epoch = make_train_epoch(cfg, model, spec, len(ds.train), on_trace, mesh)
  eval_key = stream_key(cfg.seed, Stream.EVAL)

  wall_offset, t0 = metrics_log.wall_time, time.perf_counter()
  bar = tqdm(range(start_epoch, epochs), initial=start_epoch, total=epochs, unit="epoch",
             disable=not cfg.training.progress, desc=f"train {workdir.name}")
  try:
    for epoch in bar:
      first_step = int(state.step)
      state, step_metrics = train_epoch(state, train_images, train_labels, epoch)
      step_metrics = jax.device_get(step_metrics)
      check_finite(step_metrics, first_step)
      row = epoch_row(step_metrics, int(state.step), epoch) | evaluate_all(state.params, eval_key)
      row["wall_time"] = wall_offset + time.perf_counter() - t0
      metrics_log.write(row)
      bar.set_postfix({"test/elbo": f"{row['test/elbo']:.2f}"})
      log_epoch(row, epochs, workdir)
      if (epoch + 1) % cfg.training.checkpoint_every_epochs == 0 or epoch + 1 == epochs:
        ckpt.save(int(state.step), state)
    ckpt.wait()
  finally:
    ckpt.close()
    metrics_log.close()
  params = state.params if mesh is None else jax.device_get(state.params)  # figures and eval on one device
  return finish_run(cfg, ds, model, params, workdir, metrics_log, int(state.step))
