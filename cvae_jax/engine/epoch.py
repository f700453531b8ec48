"""The compiled epoch: `train_step` (one update of any task's loss) and `train_epoch` (a lax.scan of it over
minibatches of data already on the device, or a host loop of the jitted step), for one run, for a batched
sweep of runs, or data parallel over a device mesh. The engine knows the loss only as a function.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cvae_jax.config import ConfigError, EpochLoop, OptimizerConfig, TrainingConfig
from cvae_jax.engine.optim import learning_rate_factor
from cvae_jax.keys import Stream, stream_key


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


@flax.struct.dataclass
class RunHyper:
  """The scalar hyperparameters a batched sweep varies between its runs (cvae_jax/batched.py): arguments
  of the step rather than constants, so one program trains runs that differ only in them."""
  seed: jax.Array
  beta: jax.Array
  learning_rate: jax.Array


def run_hyper(seed: int, beta: float, learning_rate: float) -> RunHyper:
  return RunHyper(seed=jnp.asarray(seed, jnp.int32), beta=jnp.asarray(beta, jnp.float32),
                  learning_rate=jnp.asarray(learning_rate, jnp.float32))


@dataclasses.dataclass(frozen=True)
class StepKeys:
  """The random keys of one training step: keys(stream) = fold_in(stream_key(seed, stream, *path), step),
  a pure function of the step, so the same step of a resumed run draws the same numbers."""
  seed: Any
  step: Any
  path: tuple = ()  # named parts below each stream key (one per model, when a task trains several)

  def __call__(self, stream: Stream) -> jax.Array:
    return jax.random.fold_in(stream_key(self.seed, stream, *self.path), self.step)


# loss(params, images [B, ...], labels [B, ...], keys: StepKeys, hyper: RunHyper) -> (loss, metrics): the
# per-batch objective a task gives the engine; metrics is a dict of scalars and holds "loss".
LossFn = Callable[..., tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything the engine needs to train one model but its state and data."""
  loss: LossFn
  hyper: RunHyper             # the run's seed, beta and learning rate (a batched sweep passes its own)
  optimizer: OptimizerConfig  # the learning-rate schedule (the state carries the optimizer itself)
  training: TrainingConfig    # batch size, skipping non-finite updates, the epoch loop
  num_train: int              # training examples; the last partial batch of an epoch is dropped
  host_loop_on_cpu: bool = False  # training.epoch_loop=auto: loop over jitted steps on CPU (conv models)
  key_path: tuple = ()        # named parts below each stream key (StepKeys.path)

  @property
  def steps_per_epoch(self) -> int:
    return self.num_train // self.training.batch_size


def steps_per_epoch(batch_size: int, num_train: int) -> int:
  steps = num_train // batch_size
  if steps == 0:
    raise ConfigError(f"training.batch_size={batch_size} is larger than the training set ({num_train} examples). "
                      "Lower it.")
  return steps


def make_train_step(plan: Plan) -> Callable:
  """Returns train_step(state, images, labels, hyper=None) -> (state, metrics), not jitted. Pure: the keys
  and any schedule are functions of state.step. The update is the optimizer's unit-rate direction times
  hyper.learning_rate (times the schedule), so runs of a batched sweep may differ in their rate."""
  lr_factor = learning_rate_factor(plan.optimizer, plan.steps_per_epoch, plan.training.epochs)
  skip_nonfinite = plan.training.skip_nonfinite
  skip_grad_norm = plan.training.skip_grad_norm
  aggressive = plan.training.aggressive_encoder_steps
  aggressive_steps = plan.training.aggressive_epochs * plan.steps_per_epoch

  def train_step(state, images, labels, hyper: Optional[RunHyper] = None):
    hyper = plan.hyper if hyper is None else hyper
    keys = StepKeys(hyper.seed, state.step, plan.key_path)
    grad_fn = jax.value_and_grad(plan.loss, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, images, labels, keys, hyper)
    if aggressive:
      encoder_turn = state.step % (aggressive + 1) < aggressive
      in_phase = state.step < aggressive_steps
      turns = (~in_phase | encoder_turn, ~in_phase | ~encoder_turn)  # (update the encoder, the decoder)
      grads = select_parts(turns, grads, jax.tree.map(jnp.zeros_like, grads))
    direction, opt_state = state.tx.update(grads, state.opt_state, state.params)  # -Adam step for rate 1
    rate = hyper.learning_rate * lr_factor(state.step)
    updates = jax.tree.map(lambda d: d * rate, direction)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    if aggressive:  # the part not trained this step keeps its parameters and its optimizer moments
      new_state = new_state.replace(params=select_parts(turns, new_state.params, state.params),
                                    opt_state=select_parts(turns, new_state.opt_state, state.opt_state))
    if skip_nonfinite or skip_grad_norm is not None:
      # Keep the old parameters and optimizer state when this step's numbers are not finite, or (VDVAE's
      # outlier skipping) its gradient's global norm is above training.skip_grad_norm; the step still counts.
      ok = jnp.asarray(True)
      if skip_nonfinite:
        ok = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
      if skip_grad_norm is not None:
        grad_norm = optax.tree.norm(grads)
        metrics["grad_norm"] = grad_norm
        ok = ok & (grad_norm <= skip_grad_norm)  # a NaN norm fails too
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
      new_state = new_state.replace(params=keep(new_state.params, state.params),
                                    opt_state=keep(new_state.opt_state, state.opt_state))
      metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
    return new_state, metrics

  return train_step


def model_part(path) -> Optional[str]:
  """'encoder' or 'decoder' when a leaf's path holds that name (the VAE's submodules; the optimizer's
  moments mirror the parameters), else None (a step count)."""
  names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
  return next((part for part in ("encoder", "decoder") if part in names), None)


def select_parts(turns: tuple, new, old):
  """new where this step trains the part a leaf belongs to (model_part), else old; leaves of neither part are
  always new. turns = (encoder?, decoder?), scalar booleans."""
  if not any(model_part(path) == "encoder" for path, _ in jax.tree_util.tree_leaves_with_path(new)):
    raise ConfigError("training.aggressive_encoder_steps needs a model whose parameters have an 'encoder' and a "
                      "'decoder' part (the VAE's); set it to 0 for this model")
  turn = {"encoder": turns[0], "decoder": turns[1]}
  return jax.tree_util.tree_map_with_path(
      lambda path, a, b: a if model_part(path) is None else jnp.where(turn[model_part(path)], a, b), new, old)


def data_parallel_mesh() -> Mesh:
  """A 1-D mesh over every device (of every process, when several run together); axis "data" splits the batch."""
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def uses_step_loop(training: TrainingConfig, host_loop_on_cpu: bool) -> bool:
  """Whether an epoch runs as a host loop of jitted steps instead of one lax.scan. On XLA:CPU,
  convolutions inside a loop body run about 10x slower than at top level (measured: the conv1d ECG model,
  16 s against 1.6 s per epoch), so families that say so (conv) loop on the host on CPU; the per-step
  dispatch (tens of microseconds) is small beside their steps. Everything else scans."""
  loop = EpochLoop(training.epoch_loop)
  if loop == EpochLoop.auto:
    return host_loop_on_cpu and jax.default_backend() == "cpu"
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


class TrainEpoch:
  """The compiled epoch (make_train_epoch): `runner(state, images, labels, epoch, hyper=None, start=0, stop=None)`
  trains steps [start, stop) of the epoch and returns (state, their per-step metrics); the whole epoch by
  default. `images`, `labels`: the training data on the device (resident), or the host arrays batches are
  gathered from (streamed; numpy arrays or memory maps). A call runs the steps in pieces of `chunk_steps`,
  each one compiled call; a short last piece is padded with steps that are skipped, so there is one program
  for every piece. The order of an epoch is a pure function of the seed and the epoch: a run resumed at a
  piece boundary sees the batches an uninterrupted one would."""

  def __init__(self, order: Callable, piece: Callable, chunk_steps: int, steps: int, streamed: bool,
               put_order: Callable, put_batches: Callable, batched: bool):
    self.order, self.piece, self.chunk_steps, self.steps = order, piece, chunk_steps, steps
    self.streamed, self.put_order, self.put_batches, self.batched = streamed, put_order, put_batches, batched
    self._orders: dict = {}

  def batches(self, epoch: int, hyper) -> np.ndarray:
    """[steps, B] example indices of the epoch ([runs, steps, B] batched), computed once per epoch."""
    key = (epoch, None if hyper is None else np.asarray(hyper.seed).tobytes())
    if key not in self._orders:
      self._orders = {key: np.asarray(self.order(jnp.asarray(epoch), hyper))}
    return self._orders[key]

  def _piece_inputs(self, batches: np.ndarray, images, labels, lo: int, hi: int):
    """The piece's rows [lo, hi) padded to chunk_steps: example indices (resident), or the gathered
    batches themselves (streamed); and which rows are real steps."""
    rows = batches[..., lo:hi, :]
    pad = self.chunk_steps - (hi - lo)
    if pad:
      widths = [(0, 0)] * rows.ndim
      widths[-2] = (0, pad)
      rows = np.pad(rows, widths)
    valid = np.arange(self.chunk_steps) < hi - lo
    if not self.streamed:
      return self.put_order(rows), valid
    return self.put_batches((np.asarray(images[rows.reshape(-1)]).reshape(*rows.shape, *images.shape[1:]),
                             np.asarray(labels[rows.reshape(-1)]).reshape(*rows.shape, *labels.shape[1:]))), valid

  def __call__(self, state, images, labels, epoch, hyper=None, start: int = 0, stop: Optional[int] = None):
    stop = self.steps if stop is None else stop
    batches = self.batches(int(epoch), hyper)
    bounds = [(lo, min(lo + self.chunk_steps, stop)) for lo in range(start, stop, self.chunk_steps)]
    parts = []
    data = (None, None) if self.streamed else (images, labels)
    upcoming = self._piece_inputs(batches, images, labels, *bounds[0])
    for n, (lo, hi) in enumerate(bounds):
      xs, valid = upcoming
      state, metrics = self.piece(state, *data, xs, valid, hyper)  # dispatched; runs while the next piece is
      if n + 1 < len(bounds):                                     # gathered on the host
        upcoming = self._piece_inputs(batches, images, labels, *bounds[n + 1])
      parts.append(jax.tree.map(lambda m: m[..., : hi - lo], metrics))
    axis = 1 if self.batched else 0
    return state, jax.tree.map(lambda *m: jnp.concatenate(m, axis=axis), *parts) if len(parts) > 1 else parts[0]

  def lower(self, state, images, labels, epoch, hyper=None):
    """The compiled program of one piece (its HLO: benchmarks and tests)."""
    if not hasattr(self.piece, "lower"):
      raise NotImplementedError("an epoch of host-looped steps (training.epoch_loop=steps) is no single program")
    xs, valid = self._piece_inputs(self.batches(int(epoch), hyper), images, labels, 0,
                                   min(self.chunk_steps, self.steps))
    data = (None, None) if self.streamed else (images, labels)
    return self.piece.lower(state, *data, xs, valid, hyper)


def make_train_epoch(plan: Plan, on_trace: Optional[Callable[[], None]] = None, mesh: Optional[Mesh] = None,
                     batched: bool = False, chunk_steps: Optional[int] = None, streamed: bool = False,
                     put_order: Callable = jnp.asarray, put_batches: Callable = None) -> TrainEpoch:
  """Returns the epoch runner (TrainEpoch): its pieces of `chunk_steps` steps (the whole epoch by default)
  are each one compiled lax.scan of train_step over minibatches (or, see uses_step_loop, a host loop over
  the same jitted step). Resident data lives on the device and each step gathers its minibatch there;
  streamed data (data.in_memory=false) is gathered on the host, one piece at a time, while the device runs
  the previous piece. Traced once; `on_trace` is called each time JAX traces (tests count retraces with it).
  With a `mesh` (data parallelism, one or several processes), state and resident data are replicated and
  each minibatch is split over the mesh's "data" axis; XLA partitions the step and all-reduces the
  gradients. batched: state and hyper carry a leading axis of runs; the data is shared. `put_order`,
  `put_batches`: how a piece's indices and streamed batches reach the devices (sharded over several
  processes by the caller).
  """
  batch_size = plan.training.batch_size
  steps, num_train = plan.steps_per_epoch, plan.num_train
  put_batches = put_batches or (lambda tree: jax.tree.map(jnp.asarray, tree))
  chunk_steps = min(chunk_steps or steps, steps)
  masked = chunk_steps != steps  # pieces may be short: padded rows are skipped
  train_step = make_train_step(plan)

  def epoch_batches(epoch, hyper):  # [steps, batch_size] example indices; the last partial batch dropped
    seed = plan.hyper.seed if hyper is None else hyper.seed
    order = jax.random.permutation(jax.random.fold_in(stream_key(seed, Stream.DATA_ORDER, *plan.key_path), epoch),
                                   num_train)
    return order[: steps * batch_size].reshape(steps, batch_size)

  def step_on(state, images, labels, x, hyper):
    batch_images, batch_labels = (images[x], labels[x]) if images is not None else x
    if mesh is not None:
      split = NamedSharding(mesh, PartitionSpec("data"))
      batch_images = jax.lax.with_sharding_constraint(batch_images, split)
      batch_labels = jax.lax.with_sharding_constraint(batch_labels, split)
    return train_step(state, batch_images, batch_labels, hyper)

  def scan_piece(state, images, labels, xs, valid, hyper=None):
    names = []

    def packed_step(s, x):  # the step's metrics packed into one vector: one write per step, not one per metric
      s, metrics = step_on(s, images, labels, x, hyper)
      names[:] = sorted(metrics)
      return s, jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in names])

    def body(s, x_ok):
      x, ok = x_ok
      if not masked:
        return packed_step(s, x)
      width = jax.eval_shape(packed_step, s, x)[1].shape
      return jax.lax.cond(ok, lambda s: packed_step(s, x), lambda s: (s, jnp.zeros(width, jnp.float32)), s)

    state, packed = jax.lax.scan(body, state, (xs, valid), unroll=plan.training.scan_unroll)
    return state, {k: packed[:, i] for i, k in enumerate(names)}

  def traced(fn, batched_axes):
    def wrapped(*args):
      if on_trace is not None:
        on_trace()
      return over_runs(fn, batched_axes)(*args) if batched else fn(*args)
    return wrapped

  order = jax.jit(jax.vmap(epoch_batches, in_axes=(None, 0)) if batched else epoch_batches)
  args = dict(order=order, chunk_steps=chunk_steps, steps=steps, streamed=streamed, put_order=put_order,
              put_batches=put_batches, batched=batched)
  if not uses_step_loop(plan.training, plan.host_loop_on_cpu):
    piece = jax.jit(traced(scan_piece, (0, None, None, 0, None, 0)), donate_argnums=0)
    return TrainEpoch(piece=piece, **args)

  step = jax.jit(traced(step_on, (0, None, None, 0, 0)), donate_argnums=0)
  pick = (lambda xs, i: jax.tree.map(lambda a: a[:, i], xs)) if batched else (lambda xs, i: jax.tree.map(lambda a: a[i], xs))

  def loop_piece(state, images, labels, xs, valid, hyper: Optional[RunHyper] = None):
    per_step = []
    for i in range(int(np.sum(valid))):  # padded rows are not run
      state, metrics = step(state, images, labels, pick(xs, i), hyper)
      per_step.append(metrics)
    return state, jax.tree.map(lambda *m: jnp.stack(m, axis=1 if batched else 0), *per_step)

  return TrainEpoch(piece=loop_piece, **args)


def check_finite(step_metrics: dict, first_step: int) -> None:
  skipped = step_metrics.get("skipped", np.zeros_like(step_metrics["loss"])) > 0
  bad = np.flatnonzero(~np.isfinite(step_metrics["loss"]) & ~skipped)
  if bad.size:
    raise NonFiniteLossError(
        f"The loss became {step_metrics['loss'][bad[0]]} at step {first_step + int(bad[0]) + 1}. "
        "The run stopped; the last good checkpoint is kept. Lower optimizer.learning_rate or set "
        "optimizer.grad_clip_norm, then rerun (or set training.skip_nonfinite=true to skip such updates).")


def epoch_row(step_metrics: dict, step: int, epoch: int) -> dict:
  """The train/* part of an epoch's metrics line: means over the steps whose update was applied."""
  row = {"step": step, "epoch": epoch + 1}
  applied = step_metrics.get("skipped", np.zeros_like(step_metrics["loss"])) == 0
  row |= {f"train/{k}": float(np.mean(v[applied])) if applied.any() else float("nan")
          for k, v in step_metrics.items() if k != "skipped"}
  if "skipped" in step_metrics:
    row["train/skipped"] = int(step_metrics["skipped"].sum())
  return row
