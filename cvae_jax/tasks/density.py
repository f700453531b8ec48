"""Density modelling (`task=density`, the default): a VAE of p(x), a CVAE of p(x | c) or a plain
autoencoder, on images or 1-D signals, trained on the ELBO (or the k-sample objectives) by the engine.

One run, or several runs that differ only in seed, beta and learning rate as one program (batched.py).
Every epoch logs the train means, the test (and validation) ELBO and the posterior-collapse diagnostics;
the end of training draws the figures, runs the evaluators the config lists and writes results.json.
Variants change the hook methods (the molecule task: tasks/molecules.py).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import logging
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax.training import train_state

from cvae_jax import annealing, data, estimators, figures, likelihoods
from cvae_jax.config import Config, ConfigError, Estimator, Regularizer, flatten, to_dict
from cvae_jax.data import Dataset, DatasetSpec, model_input
from cvae_jax.engine import distributed, epoch, loop, memory, optim, preemption, rundir
from cvae_jax.estimators import condition
from cvae_jax.evaluators import (EvalContext, Evaluator, anomaly, disentanglement, evaluate, likelihood, quality,
                                 samples)
from cvae_jax.keys import Stream, fold, stream_key
from cvae_jax.models import VAE, create_model, family_of, init_params
from cvae_jax.objectives import (decoder_log_likelihood, elbo_terms, free_bits_kl, joint_k_sample_terms, k_sample_terms,
                                 kl_per_dim, kl_per_group, loss_and_metrics, total_correlation)
from cvae_jax.tasks.base import Restored, RestoreError, Task, register

log = logging.getLogger(__name__)


STREAM_PIECE_STEPS = 64  # streamed data: steps gathered on the host per compiled piece (bounds host memory)


class InitPart(enum.IntEnum):
  SAMPLE = 1  # below the PARAMS key: the z drawn while the parameters are initialized (it shapes none)


def make_loss(cfg: Config, model: VAE, spec: DatasetSpec, steps_per_epoch: int) -> epoch.LossFn:
  """The per-batch loss of the engine's train step: loss = rec + beta * kl (the KL weight following
  objective.kl_schedule, free bits replacing the KL in the loss), rec + kl + (beta - 1) * tc (beta-TCVAE),
  rec + beta * |kl - C| (the capacity objective), or -L_k for objective.estimator=iwae.
  Inputs are binarized and z drawn from the step's BINARIZE and REPARAM keys."""
  objective, lik = cfg.objective, likelihoods.of(cfg.objective)
  free_bits = objective.free_bits
  iwae = Estimator(objective.estimator) == Estimator.iwae
  regularizer = Regularizer(objective.regularizer)
  multi_sample = iwae or objective.samples > 1  # k draws per example; k = 1 keeps the one-pass step
  kl_weight = annealing.kl_weight_schedule(objective, steps_per_epoch, steps_per_epoch * cfg.training.epochs)
  hierarchical = model.group_sizes is not None

  def loss(params, images, labels, keys: epoch.StepKeys, hyper: epoch.RunHyper):
    x = model_input(images, spec.encoding, keys(Stream.BINARIZE))  # [B, *shape]
    c = condition(model, spec, labels)  # [B, K] or None
    rng = keys(Stream.REPARAM)
    beta = kl_weight(keys.step, hyper.beta)
    prior = None
    if multi_sample:
      if hierarchical:  # k joint draws of every group, each a full pass
        terms = joint_k_sample_terms(model, params, x, c, rng, objective.samples, lik)
      else:
        mean, logvar = model.apply({"params": params}, x, c, method="encode")
        terms = k_sample_terms(decoder_log_likelihood(model, params, x, c, lik), mean, logvar, rng, objective.samples)
      if iwae:  # the loss is -L_k; rec, kl and elbo are still reported
        _, metrics = loss_and_metrics(terms, beta, spec.num_dims)
        metrics["loss"] = -metrics["iwae"]
        metrics["kl_weight"] = jnp.asarray(beta, jnp.float32)
        return metrics["loss"], metrics
    else:
      out = model.apply({"params": params}, x, c, rng, rngs={"dropout": keys(Stream.DROPOUT)})  # (word dropout)
      terms = elbo_terms(x, out.logits, out.mean, out.logvar, lik, out.prior)
      mean, logvar, prior = out.mean, out.logvar, out.prior
    penalty = None
    if free_bits > 0 and logvar is not None:  # per latent dimension, or per group of a hierarchy
      penalty = free_bits_kl(kl_per_group(kl_per_dim(mean, logvar, prior), model.group_sizes), free_bits)
    value, metrics = loss_and_metrics(terms, beta, spec.num_dims, penalty)
    if regularizer == Regularizer.tcvae:  # Chen et al. 2018 with alpha = gamma = 1, as disentanglement_lib
      metrics["tc"] = total_correlation(out.z, mean, logvar)
      value = metrics["rec"] + metrics["kl"] + (beta - 1.0) * metrics["tc"]
    elif regularizer == Regularizer.capacity:
      metrics["capacity"] = annealing.capacity_at(keys.step, objective.capacity, objective.capacity_steps)
      value = metrics["rec"] + beta * jnp.abs(metrics["kl"] - metrics["capacity"])
    metrics["loss"] = value
    metrics["kl_weight"] = jnp.asarray(beta, jnp.float32)
    return value, metrics

  return loss


HPARAM_METRICS = ("elbo", "rec", "kl", "nll", "active_units")  # results.json's numbers in TensorBoard's HParams view


def hyperparameters(cfg: Config) -> dict:
  """Every setting of the run but its evaluation, as a dotted name (objective.beta, model.latent_size, ...);
  lists as text, unset ones left out."""
  settings = flatten({k: v for k, v in to_dict(cfg).items() if k != "evaluation"})
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in settings.items() if v is not None}


class DensityTask(Task):
  name = "density"
  headline = "elbo"
  report_columns = ("elbo", "rec", "kl", "nll", "active_units", "mutual_information", "steps", "wall_time")
  batchable = True

  # The parts a variant may change.

  def build_model(self, cfg: Config, spec: DatasetSpec) -> VAE:
    return create_model(cfg.model, spec, likelihoods.of(cfg.objective).outputs_per_channel, cfg.objective.shared_scale)

  def initial_state(self, cfg: Config, model: VAE, spec: DatasetSpec) -> train_state.TrainState:
    """The one place the train state is built: parameters from the PARAMS stream, the optimizer, step 0."""
    x = jnp.zeros((1, *spec.shape), jnp.float32)
    c = jnp.zeros((1, spec.condition_size), jnp.float32) if model.condition_size else None
    key = stream_key(cfg.seed, Stream.PARAMS)
    params = init_params(model, {"params": key}, x, c, fold(key, InitPart.SAMPLE))
    tx = optim.create_optimizer(cfg.optimizer)
    if cfg.training.select_on_validation:  # the best parameters so far live in the state, so checkpoints keep them
      return loop.EarlyStoppingState.start(params, tx)
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  def plan(self, cfg: Config, model: VAE, spec: DatasetSpec, num_train: int) -> epoch.Plan:
    steps = epoch.steps_per_epoch(cfg.training.batch_size, num_train)
    return epoch.Plan(make_loss(cfg, model, spec, steps),
                      epoch.run_hyper(cfg.seed, cfg.objective.beta, cfg.optimizer.learning_rate), cfg.optimizer,
                      cfg.training, num_train, host_loop_on_cpu=family_of(cfg.model).host_loop_on_cpu)

  def evaluators(self, cfg: Config) -> list[Evaluator]:
    """The end-of-training evaluation the config asks for (eval.json)."""
    ev = cfg.evaluation
    chosen = [likelihood.test_elbo, likelihood.posterior]
    chosen += [likelihood.iwae(ev.iwae_samples)] if ev.iwae_samples else []
    chosen += [anomaly.evaluator] if ev.anomaly else []
    chosen += [samples.sample_accuracy] if ev.sample_accuracy else []
    chosen += [quality.sample_quality] if ev.quality_samples else []
    chosen += [disentanglement.evaluator] if ev.disentanglement else []
    return chosen

  def check_data(self, cfg: Config, ds: Dataset) -> None:
    """Before any training: what the evaluators will need (a wrong anomaly dataset stops the run now)."""
    if cfg.evaluation.anomaly_dataset:
      anomaly.load_anomaly_dataset(cfg, ds.spec)
    if cfg.evaluation.disentanglement:
      disentanglement.check(cfg)
    if cfg.evaluation.background_rate and ds.spec.modality != data.Modality.image:
      raise ConfigError(f"evaluation.background_rate={cfg.evaluation.background_rate}: random pixel replacement "
                        f"perturbs images; {ds.spec.name} holds {ds.spec.modality.value}s. Set it to 0.")
    if cfg.evaluation.anomaly and cfg.evaluation.compressor == "png" and ds.spec.modality != data.Modality.image:
      raise ConfigError(f"evaluation.compressor=png compresses images; {ds.spec.name} holds {ds.spec.modality.value}s: "
                        "use evaluation.compressor=zlib")

  def on_start(self, workdir: Path, cfg: Config, ds: Dataset) -> None:
    """Called when a run directory is initialized or restored (the molecule task saves its vocabulary)."""

  def figures(self, cfg: Config, ds: Dataset, model: VAE, params, workdir: Path) -> list[Path]:
    return figures.write_all(workdir / "figures", model, params, ds.spec, likelihoods.of(cfg.objective),
                             ds.test, stream_key(cfg.seed, Stream.FIGURES))

  def extend_results(self, cfg: Config, ds: Dataset, model: VAE, params, workdir: Path, results: dict) -> None:
    """Adds a variant's own end-of-training numbers to results.json."""

  # The flow, the same for every variant.

  def epoch_metrics(self, cfgs: Sequence[Config], model: VAE, ds: Dataset, put: Callable) -> Callable[[int, object], dict]:
    """Returns metrics(run index, params) -> the test/* and val/* part of an epoch's line: the ELBO and its
    terms per split, and the posterior-collapse diagnostics on the test split."""
    cfg, spec = cfgs[0], ds.spec
    lik = likelihoods.of(cfg.objective)
    splits = {"test": ds.test} | ({"val": ds.validation} if ds.validation is not None else {})
    arrays = {name: (put(s.images), put(s.labels)) for name, s in splits.items()}
    evaluate_split = estimators.make_evaluate(model, spec, lik, cfg.training.eval_batch_size)
    diagnose = None
    if cfg.evaluation.diagnostics and model.stochastic:
      diagnose = estimators.make_diagnostics(model, spec, cfg.training.eval_batch_size, cfg.evaluation.mi_examples)
    keys = [stream_key(c.seed, Stream.EVAL) for c in cfgs]

    def metrics(i: int, params) -> dict:
      row = {f"{name}/{k}": float(v) for name, (images, labels) in arrays.items()
             for k, v in jax.device_get(evaluate_split(params, images, labels, keys[i])).items()}
      if diagnose is not None:
        row |= {f"test/{k}": v for k, v in diagnose(params, *arrays["test"], keys[i]).items()}
      return row

    return metrics

  def selection(self, cfg: Config, model: VAE, ds: Dataset) -> Optional[loop.EarlyStopping]:
    """With training.select_on_validation: the hook that keeps the parameters of the best validation ELBO (the
    same number as the epoch's val/elbo) and never stops training early."""
    if not cfg.training.select_on_validation:
      return None
    evaluate_split = estimators.make_evaluate(model, ds.spec, likelihoods.of(cfg.objective), cfg.training.eval_batch_size)
    val = jax.device_put(ds.validation.images), jax.device_put(ds.validation.labels)
    key = stream_key(cfg.seed, Stream.EVAL)
    return loop.EarlyStopping(cfg.training.epochs + 1, lambda params: -float(evaluate_split(params, *val, key)["elbo"]))

  def epoch_images(self, cfgs: Sequence[Config], model: VAE, ds: Dataset) -> Optional[Callable[[int, object], dict]]:
    """Returns images(run index, params) -> the epoch's sample and reconstruction grids for TensorBoard (image
    data with training.figures), with each run's fixed figure key; None otherwise."""
    if ds.spec.modality != data.Modality.image or not cfgs[0].training.figures:
      return None
    lik = likelihoods.of(cfgs[0].objective)
    keys = [stream_key(c.seed, Stream.FIGURES) for c in cfgs]
    return lambda i, params: figures.epoch_grids(model, params, ds.spec, lik, ds.test, keys[i])

  def train(self, cfgs: Sequence[Config], workdirs: Sequence[Path], dataset: Optional[Dataset] = None,
            on_trace: Optional[Callable[[], None]] = None) -> list[dict]:
    workdirs = [Path(w) for w in workdirs]
    if not distributed.is_primary():  # the first process owns the run directory; the others train beside it
      return self._train(cfgs, workdirs, dataset, on_trace)
    for cfg, workdir in zip(cfgs, workdirs):  # a directory of another run is refused before anything is written
      rundir.check_config(workdir, to_dict(cfg))
    with rundir.locked(workdirs):  # one process per run directory
      return self._train(cfgs, workdirs, dataset, on_trace)

  def _train(self, cfgs: Sequence[Config], workdirs: Sequence[Path], dataset: Optional[Dataset],
             on_trace: Optional[Callable[[], None]]) -> list[dict]:
    configs = [to_dict(c) for c in cfgs]
    primary = distributed.is_primary()
    results = {}
    for r, (workdir, config) in enumerate(zip(workdirs, configs)):
      finished = rundir.finished_results(workdir, config)
      if finished is not None:
        results[r] = finished
    todo = [r for r in range(len(cfgs)) if r not in results]
    if not todo:
      return [results[r] for r in range(len(cfgs))]
    batched = len(todo) > 1
    cfg0 = cfgs[todo[0]]
    if batched and cfg0.training.select_on_validation:  # the selection hook acts on one run's state
      log.info("training.select_on_validation: training the %d runs one after another.", len(todo))
      for r in todo:
        results[r] = self.train([cfgs[r]], [workdirs[r]], dataset)[0]
      return [results[r] for r in range(len(cfgs))]
    parallel = cfg0.training.data_parallel or jax.process_count() > 1
    if batched and parallel:
      raise ValueError("Batched runs train on one device: data-parallel runs (training.data_parallel=true, or "
                       "several processes) train one by one.")
    ds = dataset if dataset is not None else data.load(cfg0.data)  # before writing: bad data writes nothing
    steps = epoch.steps_per_epoch(cfg0.training.batch_size, len(ds.train))
    mesh = epoch.data_parallel_mesh() if parallel else None
    if mesh is not None and cfg0.training.batch_size % mesh.size:
      raise ConfigError(f"training.batch_size={cfg0.training.batch_size} does not split over {mesh.size} devices "
                        "(data parallel): use a multiple of the device count.")
    model = self.build_model(cfg0, ds.spec)
    self.check_data(cfg0, ds)
    # A state that cannot fit the device is refused before anything is allocated or written.
    memory.check_fits(jax.eval_shape(lambda: self.initial_state(cfg0, model, ds.spec)), runs=len(todo))
    phases = [loop.Phase(workdirs[r], cfgs[r].training.max_checkpoints) for r in todo]
    try:
      fresh = [self.initial_state(cfgs[r], model, ds.spec) for r in todo]
      restored = [phase.restore(state) for phase, state in zip(phases, fresh)]  # another model's stops us here
      start_steps = {0 if s is None else int(s.step) for s in restored}
      if len(start_steps) > 1:  # resumed at different points: train them one after another
        log.warning("Batched runs resume from different steps %s; training them one after another.",
                    sorted(start_steps))
        for phase in phases:
          phase.close()
        phases = []
        for r in todo:
          results[r] = self.train([cfgs[r]], [workdirs[r]], ds)[0]
        return [results[r] for r in range(len(cfgs))]
      states = [s if s is not None else f for s, f in zip(restored, fresh)]
      for r, phase, state in zip(todo, phases, states):
        if primary:
          rundir.init(workdirs[r], configs[r])
          self.on_start(workdirs[r], cfgs[r], ds)
          phase.open_metrics(int(state.step))
      if restored[0] is not None:
        log.info("Resumed from step %d in %s", int(states[0].step), ", ".join(str(workdirs[r]) for r in todo))
      # Resident data lives on the device as stored (uint8 for images); each step converts its minibatch.
      # Data parallel: data and state are replicated on every device of the mesh.
      put = jax.device_put if mesh is None else distributed.replicate(mesh)
      state = loop.stack_states(states) if batched else put(states[0])
      hypers = loop.stack([epoch.run_hyper(cfgs[r].seed, cfgs[r].objective.beta, cfgs[r].optimizer.learning_rate)
                           for r in todo]) if batched else None
      if batched:
        log.info("Training %d runs as one batched program: %s", len(todo), ", ".join(str(workdirs[r]) for r in todo))
      resident = data.fits_device(cfg0.data, ds.train, memory.device_memory())
      every = cfg0.training.checkpoint_every_steps
      train_epoch = epoch.make_train_epoch(
          self.plan(cfg0, model, ds.spec, len(ds.train)), on_trace, mesh, batched,
          chunk_steps=every if resident else min(every or STREAM_PIECE_STEPS, STREAM_PIECE_STEPS), streamed=not resident,
          put_order=put if mesh is not None else jnp.asarray,
          put_batches=distributed.split_batches(mesh, batched) if mesh is not None else None)
      images, labels = (put(ds.train.images), put(ds.train.labels)) if resident else (ds.train.images, ds.train.labels)
      if not resident:
        log.info("Streaming the training split from the host (data.in_memory=false, or larger than a quarter of "
                 "the device's memory), %d steps per piece.", min(every or STREAM_PIECE_STEPS, STREAM_PIECE_STEPS, steps))
      # Evaluation runs on one local device, on the first process only.
      evaluation_params = (lambda p: p) if mesh is None else jax.device_get
      metrics_fn = self.epoch_metrics([cfgs[r] for r in todo], model, ds, jax.device_put) if primary else None
      images_fn = self.epoch_images([cfgs[r] for r in todo], model, ds) if primary else None
      with preemption.Watch(cfg0.training.preemption_signals) as watch:
        state = loop.fit(phases, state, train_epoch, images, labels, epochs=cfg0.training.epochs, steps=steps,
                         checkpoint_every=cfg0.training.checkpoint_every_epochs, checkpoint_every_steps=every,
                         hypers=hypers,
                         epoch_metrics=metrics_fn and (lambda i, p: metrics_fn(i, evaluation_params(p))),
                         epoch_images=images_fn and (lambda i, p: images_fn(i, evaluation_params(p))),
                         early_stopping=self.selection(cfg0, model, ds),
                         progress=cfg0.training.progress and primary, preemption=watch)
    finally:
      for phase in phases:
        phase.close()
    if not primary:
      return [{} for _ in cfgs]
    for i, r in enumerate(todo):
      params = loop.index(state.params, i) if batched else loop.selected_params(state)
      params = params if mesh is None else jax.device_get(params)  # figures and evaluation on one device
      results[r] = self.finish(cfgs[r], ds, model, params, workdirs[r], phases[i].metrics, cfg0.training.epochs * steps)
    return [results[r] for r in range(len(cfgs))]

  def finish(self, cfg: Config, ds: Dataset, model: VAE, params, workdir: Path, metrics_log: rundir.MetricsLog,
             steps: int) -> dict:
    """After the last epoch: figures, the end-of-training evaluation (eval.json) and results.json."""
    # The epoch's line of the parameters evaluated already holds their test (and validation) metrics: the last
    # epoch's, or with training.select_on_validation the first with the best validation loss (stop/loss).
    selected = metrics_log.rows[-1]
    if cfg.training.select_on_validation:
      selected = min(metrics_log.rows, key=lambda row: row["stop/loss"])
    final = {k: v for k, v in selected.items() if k.startswith(("test/", "val/"))}
    figure_paths = self.figures(cfg, ds, model, params, workdir) if cfg.training.figures else []
    evaluated = evaluate(self.context(cfg, ds, model, params, workdir), self.evaluators(cfg))
    results = {
        "elbo": final["test/elbo"], "rec": final["test/rec"], "kl": final["test/kl"], "bpd": final["test/bpd"],
        "normalized_likelihood": evaluated["normalized_likelihood"],
        "active_units": evaluated.get("active_units"),
        "metrics": final, "steps": steps, "epochs": cfg.training.epochs, "selected_epoch": selected["epoch"],
        "wall_time": metrics_log.wall_time, "figures": [p.name for p in figure_paths],
        "num_params": int(sum(math.prod(p.shape) for p in jax.tree.leaves(params))),
    }
    if "iwae" in evaluated:
      results |= {"nll": evaluated["iwae"]["nll"], "iwae_samples": evaluated["iwae"]["k"]}
    if "anomaly_auroc" in evaluated:
      results["anomaly_auroc"] = evaluated["anomaly_auroc"]
    if "test/mutual_information" in final:
      results["mutual_information"] = final["test/mutual_information"]
    self.extend_results(cfg, ds, model, params, workdir, results)
    quality = evaluated.get("sample_quality", {})  # sample diversity beside the bound, for the sweep's comparison
    rundir.write_hparams(workdir, hyperparameters(cfg), {"test/" + k: results.get(k) for k in HPARAM_METRICS} |
                         {f"samples/{k}": quality.get(k) for k in ("fd", "recall", "coverage")})
    rundir.write_json_atomic(workdir / "results.json", results)
    log.info("Finished %s: test ELBO %.3f nats (rec %.3f, kl %.3f) after %d steps, %.1f s", workdir, results["elbo"],
             results["rec"], results["kl"], results["steps"], results["wall_time"])
    return results

  def report_row(self, workdir: Path, results: dict) -> dict:
    """results.json's numbers, with the NLL of eval.json when `python -m cvae_jax.evaluate` wrote one (a
    larger k than training's)."""
    row = super().report_row(workdir, results)
    evaluated = rundir.read_json(Path(workdir) / "eval.json") or {}
    if "iwae" in evaluated:
      row["nll"], row["iwae_k"] = evaluated["iwae"]["nll"], evaluated["iwae"]["k"]
    return row

  def context(self, cfg: Config, ds: Dataset, model: VAE, params, workdir: Path) -> EvalContext:
    background = self.background_params(cfg, ds, Path(workdir)) if cfg.evaluation.background_rate else None
    return EvalContext(cfg, ds, model, params, Path(workdir), likelihoods.of(cfg.objective), background)

  def background_params(self, cfg: Config, ds: Dataset, workdir: Path):
    """The parameters of the run's background model (Ren et al. 2019): the same model and schedule trained on the
    training images with a fraction evaluation.background_rate of their pixels replaced by random values (one
    fixed perturbed copy, from the run's seed), in <run>/background/ (resumed and kept like any run)."""
    background = copy.deepcopy(cfg)
    ev, background.training.figures = background.evaluation, False
    ev.anomaly, ev.anomaly_dataset, ev.background_rate, ev.iwae_samples, ev.quality_samples = False, None, 0.0, 0, 0
    ev.sample_accuracy = False
    train = data.Split(data.perturb(ds.train.images, cfg.evaluation.background_rate, cfg.seed, ds.spec.encoding),
                       ds.train.labels)
    perturbed = dataclasses.replace(ds, train=train)
    self.train([background], [workdir / "background"], perturbed)
    return self.restore(background, perturbed, workdir / "background")[1].params

  def restore(self, cfg: Config, dataset: Dataset, workdir: Path):
    ckpt_dir = Path(workdir) / "checkpoints"
    if not ckpt_dir.is_dir():
      raise RestoreError(f"{ckpt_dir} does not exist: train the run first (rerun its training command).")
    # Restoring tidies the checkpoints (interrupted saves removed, unreadable ones set aside): not while a
    # training process owns the directory, whose save in progress would look interrupted.
    with contextlib.ExitStack() as stack:
      try:
        stack.enter_context(rundir.RunLock(workdir))
      except rundir.RunDirError as e:
        raise RestoreError(str(e)) from None
      phase = loop.Phase(workdir, cfg.training.max_checkpoints)
      stack.callback(phase.close)
      if phase.checkpointer.latest_step() is None:
        raise RestoreError(f"{ckpt_dir} holds no checkpoint: train the run first (rerun its training command).")
      self.on_start(workdir, cfg, dataset)
      model = self.build_model(cfg, dataset.spec)
      state = phase.restore(self.initial_state(cfg, model, dataset.spec))
      if state is None:
        raise RestoreError(f"No checkpoint in {ckpt_dir} is readable (see the warnings above): retrain the run.")
      return model, state

  def evaluate(self, restored: Restored, workdir: Path) -> dict:
    return evaluate(self.context(restored.cfg, restored.dataset, restored.model, restored.params, workdir),
                    self.evaluators(restored.cfg))


register(DensityTask())
