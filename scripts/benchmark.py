"""Training throughput of cvae_jax against the usual loops, on this machine, in one run.

  python scripts/benchmark.py                       # mlp (the Flax example's 784-500-20), batch 128
  python scripts/benchmark.py --arch mlp conv conv_deep --kind vae cvae --epochs 3
  python scripts/benchmark.py --batch-size 128 4096 # several batch sizes (a GPU wants large ones too)
  python scripts/benchmark.py --sweep-runs 8        # also a batched sweep of 8 models vs separate runs
  python scripts/benchmark.py --iwae-images 200     # also the k=5000 bound's speed at a few chunk sizes
  python scripts/benchmark.py --streamed            # also streamed data (data.in_memory=false) against resident
  python scripts/benchmark.py --unroll 1 8 --flat-optimizer   # variants of the MLP's compiled epoch
  python scripts/benchmark.py --dsprites 6400       # also disentanglement_lib's 64x64 conv VAE on dSprites
  python scripts/benchmark.py --resolutions 32 64 128 256 --arch   # only the hierarchical VAE at these sizes

For each architecture, kind and batch size it measures, on statically binarized MNIST:
  - cvae_jax: whole epochs as one compiled lax.scan over on-device data (conv models on CPU: a host loop
    of the jitted step, see engine.epoch.uses_step_loop) (images/s, median over epochs after a warm-up) and
    the compile time (first epoch minus a median one); FLOPs per training image from XLA's cost analysis
    of one train step;
  - with --streamed, the same epoch with the training images memory-mapped from a .npy on the host
    (data.in_memory=false): batches gathered on the host, the whole epoch as one piece and in the pieces of
    STREAM_PIECE_STEPS steps that training uses (each gathered while the previous one runs), against the
    resident epoch, whole and in the same pieces;
  - a conventional loop: a tf.data pipeline (shuffle, batch, prefetch) feeding the same train step,
    jitted, one Python call per step (fed from NumPy where TensorFlow is not installed);
  - a PyTorch loop of the same MLP, if PyTorch happens to be installed (never a dependency), on the GPU
    when JAX runs on one;
  - the machine's float32 matmul rate at the MLP's shapes (timed between the epochs, with them) and for
    large matrices, and from it the throughput bound (rate / FLOPs per image) and the fraction reached;
  - each model's own bound: the train step's own matmuls and convolutions (forward and backward, at their
    shapes and layouts, from its jaxpr) run alone, as images/s, and the fraction of it reached. For the
    conv models this is the honest bound: their dense layer's shapes and their convolutions run at a
    fraction of the rate the MLP's shapes reach.
With --dsprites N, also disentanglement_lib's conv VAE (model=conv_dlib, 64x64x1 inputs, batch 64) on N
dSprites training images, trained as a run trains it, with its upsampling convs of kernel 3 (ours) and
of kernel 4 (the transposed convs' kernel), as images/s and FLOPs per image beside the MNIST models.
With --resolutions, also the hierarchical VAE (model=hvae, RESOLUTION_MODEL: stages halving down to 8 pixels,
one block and one latent group each) on synthetic RGB images (data=synthetic) at each size, batch 16, with and
without remat (and in bfloat16 on a GPU): images/s, its own-ops bound and the fraction reached, and the peak
memory of the train step's temporaries (activations and workspace) from XLA's buffer assignment, exact per
variant on any device.
The loops of a row (and the batched sweep against the same runs one after another) run round-robin, one
epoch of each in turn, so that drift in the machine's speed slows all of them alike.
Prints markdown tables and writes JSON (--out). Machines without TensorFlow Datasets (a bare GPU box) can
read the data from a file written beforehand with --save-data (--data FILE).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.extend.core  # the jaxpr types step_ops walks
import jax.numpy as jnp
import numpy as np

from cvae_jax import data, estimators, likelihoods, schema, xla_cpu
from cvae_jax.config import Config
from cvae_jax.data import Dataset, DatasetSpec, Encoding, Split
from cvae_jax.data.images import ImageDataConfig
from cvae_jax.engine import epoch, loop
from cvae_jax.models import family_of
from cvae_jax.tasks.density import STREAM_PIECE_STEPS, DensityTask

TASK = DensityTask()  # the density task's model, state and train step, as `python -m cvae_jax.train` builds them


def create_model(cfg: Config, spec: DatasetSpec):
  return TASK.build_model(cfg, spec)


def create_train_state(cfg: Config, model, spec: DatasetSpec):
  return TASK.initial_state(cfg, model, spec)


def make_train_step(cfg: Config, model, spec: DatasetSpec, num_train: int):
  return epoch.make_train_step(TASK.plan(cfg, model, spec, num_train))


def make_train_epoch(cfg: Config, model, spec: DatasetSpec, num_train: int, batched: bool = False, **options):
  return epoch.make_train_epoch(TASK.plan(cfg, model, spec, num_train), batched=batched, **options)


def uses_step_loop(cfg: Config) -> bool:
  return epoch.uses_step_loop(cfg.training, family_of(cfg.model).host_loop_on_cpu)

MODELS = {  # conf/model/*.yaml
    "mlp": {"arch": "mlp", "hidden": [500], "latent_size": 20},
    "conv": {"arch": "conv", "encoder_channels": [32], "decoder_channels": [], "latent_size": 2, "dense": 64},
    "conv_deep": {"arch": "conv", "encoder_channels": [32, 64], "decoder_channels": [64, 32], "conv_stride": 2,
                  "kernel_size": 4, "dense": 256, "latent_size": 10},
}
CONV_DLIB = {"arch": "conv", "kind": "vae", "encoder_channels": [32, 32, 64, 64], "decoder_channels": [64, 32, 32],
             "upsample_to_output": True, "conv_stride": 2, "kernel_size": 4, "decoder_kernel_size": 3, "dense": 256,
             "latent_size": 10}  # conf/model/conv_dlib.yaml


def dsprites_rows(images: int, epochs: int) -> list[dict]:
  """conv_dlib on the first `images` dSprites training images (a mix of every factor), decoder kernels 3 and 4."""
  cfgs = {k: schema.structured({"model": CONV_DLIB | {"decoder_kernel_size": k},
                                "data": {"name": "dsprites", "train_limit": images, "test_limit": 64},
                                "training": {"batch_size": 64}}) for k in (3, 4)}
  ds = data.load(cfgs[3].data)
  loops, infos = {}, {}
  for k, cfg in cfgs.items():
    loops[k], infos[k] = project_loop(cfg, ds)
  timed = interleaved(loops, epochs)
  return [{"arch": "conv_dlib", "decoder_kernel_size": k, "batch_size": 64, "image_shape": list(ds.spec.shape)}
          | timed[k] | infos[k] for k in cfgs]


RESOLUTION_MODEL = {"arch": "hvae", "kind": "vae", "width": 32, "bottleneck": 16, "latent_channels": 8,
                    "activation": "gelu"}  # + one stage per halving down to 8 pixels
RESOLUTION_BATCH = 16


def resolution_config(size: int, remat: bool, dtype: str, train: int) -> Config:
  stages = int(np.log2(size // 8)) + 1
  model = RESOLUTION_MODEL | {"encoder_blocks": [1] * stages, "decoder_groups": [1] * stages, "remat": remat,
                              "compute_dtype": dtype}
  return schema.structured({"model": model, "objective": {"likelihood": "discretized_logistic_mixture"},
                            "data": {"name": "synthetic", "size": size, "num_train": train, "num_test": 16},
                            "training": {"batch_size": RESOLUTION_BATCH}})


def step_memory(cfg, ds) -> dict:
  """The compiled train step's memory from XLA's buffer assignment: temporaries (activations kept for the
  backward pass and workspace) and arguments, bytes."""
  model = create_model(cfg, ds.spec)
  state = create_train_state(cfg, model, ds.spec)
  b = cfg.training.batch_size
  step = jax.jit(make_train_step(cfg, model, ds.spec, len(ds.train)))
  analysis = step.lower(state, jnp.asarray(ds.train.images[:b]), jnp.asarray(ds.train.labels[:b])).compile().memory_analysis()
  return {"temp_bytes": int(analysis.temp_size_in_bytes), "argument_bytes": int(analysis.argument_size_in_bytes)}


def resolution_rows(sizes: list[int], epochs: int) -> list[dict]:
  """The hierarchical VAE at each size, remat off and on (and bfloat16 on an accelerator), timed round-robin."""
  dtypes = ["float32"] + (["bfloat16"] if jax.default_backend() != "cpu" else [])
  rows = []
  for size in sizes:
    train = RESOLUTION_BATCH * max(1, 4096 // size)  # shorter epochs as the images grow
    variants = {(remat, dtype): resolution_config(size, remat, dtype, train) for dtype in dtypes for remat in (False, True)}
    ds = data.load(next(iter(variants.values())).data)
    loops, infos = {}, {}
    for key, cfg in variants.items():
      loops[key], infos[key] = project_loop(cfg, ds)
      loops[("own_ops",) + key] = step_ops_loop(cfg, ds, copies=1, steps=4)
      infos[key] |= step_memory(cfg, ds)
    timed = interleaved(loops, epochs)
    for (remat, dtype), cfg in variants.items():
      own = timed[("own_ops", remat, dtype)]["images_per_s"]
      rows.append({"size": size, "remat": remat, "compute_dtype": dtype, "batch_size": RESOLUTION_BATCH,
                   "params": int(sum(x.size for x in jax.tree.leaves(create_train_state(cfg, create_model(cfg, ds.spec), ds.spec).params)))}
                  | timed[(remat, dtype)] | infos[(remat, dtype)]
                  | {"own_ops_images_per_s": own, "fraction_of_own_ops": timed[(remat, dtype)]["images_per_s"] / own})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def config(arch: str, kind: str, batch_size: int, unroll: int = 1, flat_optimizer: bool = False) -> Config:
  return schema.structured({"model": MODELS[arch] | {"kind": kind}, "data": {"name": "mnist", "pixels": "static_binary"},
                            "training": {"batch_size": batch_size, "scan_unroll": unroll},
                            "optimizer": {"flatten": flat_optimizer}})


def load_dataset(path: str | None) -> Dataset:
  """Statically binarized MNIST through TFDS, or from a file written by --save-data."""
  if path is None:
    return data.load(ImageDataConfig(name="mnist", pixels="static_binary"))
  arrays = np.load(path)
  spec = DatasetSpec(name="mnist", shape=tuple(int(d) for d in arrays["image_shape"]), condition_size=10,
                     encoding=Encoding.static_binary)
  return Dataset(spec, Split(arrays["train_images"], arrays["train_labels"]),
                 Split(arrays["test_images"], arrays["test_labels"]))


def save_dataset(ds: Dataset, path: str) -> None:
  np.savez_compressed(path, image_shape=np.asarray(ds.spec.shape), train_images=ds.train.images,
                      train_labels=ds.train.labels, test_images=ds.test.images, test_labels=ds.test.labels)


def matmul_rate(shapes, iters: int = 200) -> float:
  """GFLOP/s of float32 matmuls [m, k] x [k, n] (matmul_loop), one timed pass after a warm-up."""
  run = matmul_loop(shapes, iters)
  run(0)
  t = time.perf_counter()
  flops = run(1)
  return flops / (time.perf_counter() - t) / 1e9


def matmul_loop(shapes, iters: int = 200):
  """float32 matmuls [m, k] x [k, n], each chained `iters` times so XLA cannot skip any; run_epoch returns
  the FLOPs done, so that `interleaved` reports FLOP/s measured between the epochs it sets them against."""
  runs = []
  for m, k, n in shapes:
    a = jnp.ones((m, k), jnp.float32) * 0.01
    w = jnp.ones((k, n), jnp.float32) * 0.01

    def run(a, w):
      def body(acc, _):
        return acc + jnp.dot(a + acc[:1, :1], w)[:1, :1], None
      return jax.lax.scan(body, jnp.zeros((1, 1)), None, length=iters)[0]

    runs.append((jax.jit(run), a, w))
  flops = sum(2 * m * k * n * iters for m, k, n in shapes)

  def run_epoch(e):
    for run, a, w in runs:
      run(a, w).block_until_ready()
    return flops

  return run_epoch


def xla_flops(jitted, *args) -> float:
  """XLA's FLOP count of a jitted function, compiled for the CPU whatever the default device: on GPUs the
  compiled module's count leaves out the matmuls and convolutions handed to cuBLAS and cuDNN."""
  cost = jitted.lower(*jax.device_put(args, jax.devices("cpu")[0])).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def step_flops(cfg, model, spec, state, images, labels) -> float:
  """FLOPs of one train step per image (XLA counts a scan's body once, so ask the step)."""
  b = cfg.training.batch_size
  step = jax.jit(make_train_step(cfg, model, spec, len(images)))
  return xla_flops(step, state, images[:b], labels[:b]) / b


def step_ops(cfg, ds) -> list:
  """The train step's matmuls and convolutions, forward and backward, as XLA is handed them: (primitive,
  params, operand avals) of each dot_general and conv_general_dilated in the step's jaxpr."""
  b = cfg.training.batch_size
  model = create_model(cfg, ds.spec)
  state = create_train_state(cfg, model, ds.spec)
  step = make_train_step(cfg, model, ds.spec, len(ds.train))
  ops = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        ops.append((eqn.primitive, eqn.params, [v.aval for v in eqn.invars]))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else [param]:
          if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
            walk(getattr(sub, "jaxpr", sub))

  walk(jax.make_jaxpr(step)(state, ds.train.images[:b], ds.train.labels[:b]).jaxpr)
  return ops


def step_ops_loop(cfg, ds, copies: int = 8, steps: int = 48):
  """The step's own matmuls and convolutions alone (step_ops, at their shapes and layouts; one program that
  runs them for `copies` steps' worth of distinct operands, so dispatch is amortized): run_epoch(e) ->
  images whose matmul and conv work it did. Timed by `interleaved`, that is the model's own bound in
  images/s: what the step would reach if everything but its matmuls and convolutions were free. Within a
  copy, the ops whose operands have the same shape share them (a deep model at 256 pixels would otherwise
  hold every activation of the step, 7 to 10 GiB, per copy)."""
  ops = step_ops(cfg, ds)
  avals = [a for _, _, op_avals in ops for a in op_avals]
  shapes = sorted({(a.shape, jnp.dtype(a.dtype).name) for a in avals})
  keys = jax.random.split(jax.random.key(0), (copies, len(shapes)))
  shared = [{s: jax.random.normal(k, s[0], s[1]) * 0.01 for k, s in zip(row, shapes)} for row in keys]
  operands = [[row[(a.shape, jnp.dtype(a.dtype).name)] for a in avals] for row in shared]
  arity = [len(op_avals) for _, _, op_avals in ops]

  @jax.jit
  def run(operands):
    outs = []
    for args in operands:
      it = iter(args)
      outs += [prim.bind(*[next(it) for _ in range(n)], **params) for (prim, params, _), n in zip(ops, arity)]
    return outs

  reps = max(1, steps // copies)

  def run_epoch(e):
    for _ in range(reps):
      jax.block_until_ready(run(operands))
    return reps * copies * cfg.training.batch_size

  return run_epoch


def images_per_epoch(cfg, ds) -> int:
  return (len(ds.train) // cfg.training.batch_size) * cfg.training.batch_size  # the last partial batch dropped


def project_loop(cfg, ds, hlo_path: str | None = None, streamed_from=None, chunk_steps: int | None = None):
  """cvae_jax's compiled epoch: (run_epoch(e) -> images, info), in pieces of `chunk_steps` steps (default:
  the whole epoch as one). The training split lives on the device (resident), or, given `streamed_from`
  (the host's training images, e.g. a memory map), each piece's batches are gathered from it on the host,
  as with data.in_memory=false. With several runs (a batched sweep), see batched_loop."""
  model = create_model(cfg, ds.spec)
  state = create_train_state(cfg, model, ds.spec)
  streamed = streamed_from is not None
  images, labels = ((streamed_from, ds.train.labels) if streamed
                    else (jax.device_put(ds.train.images), jax.device_put(ds.train.labels)))
  epoch_fn = make_train_epoch(cfg, model, ds.spec, len(ds.train), chunk_steps=chunk_steps, streamed=streamed)
  info = {"flops_per_image": step_flops(cfg, model, ds.spec, state, images, labels), "step_loop": uses_step_loop(cfg)}
  if hlo_path and not uses_step_loop(cfg):
    Path(hlo_path).write_text(epoch_fn.lower(state, images, labels, 0).compile().as_text())
  n = images_per_epoch(cfg, ds)

  def run_epoch(e):
    nonlocal state
    state, metrics = epoch_fn(state, images, labels, e)
    jax.block_until_ready(metrics)
    return n

  return run_epoch, info


def sweep_runs(cfg, ds, runs: int):
  """The `runs` models of a sweep (seeds 0.., betas 1..): their train states and RunHypers, and the model."""
  model = create_model(cfg, ds.spec)
  states, hypers = [], []
  for r in range(runs):
    c = config(cfg.model.arch, cfg.model.kind, cfg.training.batch_size, cfg.training.scan_unroll, cfg.optimizer.flatten)
    c.model, c.seed, c.objective.beta = cfg.model, r, 1.0 + r
    states.append(create_train_state(c, model, ds.spec))
    hypers.append(epoch.run_hyper(c.seed, c.objective.beta, c.optimizer.learning_rate))
  return model, states, hypers


def batched_loop(cfg, ds, runs: int):
  """A batched sweep: the runs as one program (engine.epoch.over_runs)."""
  model, states, hypers = sweep_runs(cfg, ds, runs)
  states, hypers = loop.stack_states(states), loop.stack(hypers)
  images, labels = jax.device_put(ds.train.images), jax.device_put(ds.train.labels)
  epoch_fn = make_train_epoch(cfg, model, ds.spec, len(ds.train), batched=True)
  n = runs * images_per_epoch(cfg, ds)

  def run_epoch(e):
    nonlocal states
    states, metrics = epoch_fn(states, images, labels, e, hypers)
    jax.block_until_ready(metrics)
    return n

  return run_epoch


def separate_loop(cfg, ds, runs: int):
  """The same runs trained one after another, as separate runs (one compiled epoch, reused)."""
  model, states, hypers = sweep_runs(cfg, ds, runs)
  images, labels = jax.device_put(ds.train.images), jax.device_put(ds.train.labels)
  epoch_fn = make_train_epoch(cfg, model, ds.spec, len(ds.train))
  n = runs * images_per_epoch(cfg, ds)

  def run_epoch(e):
    for r in range(runs):
      states[r], metrics = epoch_fn(states[r], images, labels, e, hypers[r])
      jax.block_until_ready(metrics)
    return n

  return run_epoch


def interleaved(loops: dict, epochs: int) -> dict:
  """Times each loop's epochs round-robin (one epoch of each in turn), so that a machine whose speed drifts
  (other jobs, clocks) slows every loop alike. The first epoch of each warms up (compiles); images/s is the
  median over the timed epochs; compile_s is the first epoch's excess over that median."""
  times = {name: [] for name in loops}
  images = {}
  for e in range(epochs + 1):
    for name, run_epoch in loops.items():
      t = time.perf_counter()
      images[name] = run_epoch(e)
      times[name].append(time.perf_counter() - t)
  return {name: {"images_per_s": images[name] / statistics.median(ts[1:]),
                 "compile_s": ts[0] - statistics.median(ts[1:])} for name, ts in times.items()}


def bench_iwae(cfg, ds, images: int, k: int, chunks) -> list[dict]:
  """The k-sample importance-weighted bound (estimators.make_iwae) on the first `images` test images of an
  untrained model (speed does not depend on the weights), for each (batch_size, sample_chunk): seconds,
  decoder passes per second and GFLOP/s of the whole bound (XLA's count for one chunk of the bound)."""
  model = create_model(cfg, ds.spec)
  params = create_train_state(cfg, model, ds.spec).params
  x, y = jax.device_put(ds.test.images[:images]), jax.device_put(ds.test.labels[:images])
  out = []
  for batch, chunk in chunks:
    lik = likelihoods.of(cfg.objective)
    iwae = estimators.make_iwae(model, ds.spec, lik, k, batch, chunk)
    compiled = iwae.lower(params, x, y, jax.random.key(0)).compile()
    one = estimators.make_iwae(model, ds.spec, lik, chunk, batch, chunk)
    flops_per_pass = xla_flops(one, params, x[:batch], y[:batch], jax.random.key(0)) / (batch * chunk)
    compiled(params, x, y, jax.random.key(0)).block_until_ready()  # warm-up
    t = time.perf_counter()
    compiled(params, x, y, jax.random.key(1)).block_until_ready()
    seconds = time.perf_counter() - t
    out.append({"batch_size": batch, "sample_chunk": chunk, "seconds": seconds, "passes_per_s": images * k / seconds,
                "flops_per_pass": flops_per_pass, "gflops": images * k * flops_per_pass / seconds / 1e9,
                "seconds_for_10000_images": seconds * 10000 / images})
  return out


def has_tensorflow() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def minibatches(ds, batch_size: int, epoch: int):
  """The conventional input pipeline: tf.data (shuffle, batch, prefetch), or NumPy without TensorFlow."""
  if not has_tensorflow():
    order = np.random.default_rng(epoch).permutation(len(ds.train))
    for i in range(0, len(order) - batch_size + 1, batch_size):
      idx = order[i:i + batch_size]
      yield ds.train.images[idx], ds.train.labels[idx]
    return
  import tensorflow as tf
  pipeline = (tf.data.Dataset.from_tensor_slices((ds.train.images, ds.train.labels))
              .shuffle(len(ds.train), seed=epoch).batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
  yield from pipeline.as_numpy_iterator()


def step_loop(cfg, ds):
  """The conventional loop: one Python call of the jitted step per minibatch from `minibatches`."""
  model = create_model(cfg, ds.spec)
  state = create_train_state(cfg, model, ds.spec)
  step = jax.jit(make_train_step(cfg, model, ds.spec, len(ds.train)), donate_argnums=0)

  def run_epoch(e):
    nonlocal state
    n = 0
    for x, y in minibatches(ds, cfg.training.batch_size, e):
      state, metrics = step(state, x, y)
      n += len(y)
    jax.block_until_ready(metrics)
    return n

  return run_epoch


def torch_loop(ds, batch_size: int):
  """pytorch/examples-style loop for the MLP VAE (784-500-20): (run_epoch, info), or None without PyTorch."""
  try:
    import torch
  except ImportError:
    return None
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  enc, mean, logvar = torch.nn.Linear(784, 500), torch.nn.Linear(500, 20), torch.nn.Linear(500, 20)
  dec1, dec2 = torch.nn.Linear(20, 500), torch.nn.Linear(500, 784)
  layers = [m.to(device) for m in (enc, mean, logvar, dec1, dec2)]
  params = [p for m in layers for p in m.parameters()]
  opt = torch.optim.Adam(params, lr=1e-3)
  x_all = torch.from_numpy(ds.train.images.reshape(len(ds.train), -1).astype(np.float32)).to(device)

  def run_epoch(e):
    order = torch.randperm(len(x_all), device=device)
    n = 0
    for i in range(0, len(x_all) - batch_size + 1, batch_size):
      x = x_all[order[i:i + batch_size]]
      h = torch.relu(enc(x))
      mu, lv = mean(h), logvar(h)
      z = mu + torch.exp(0.5 * lv) * torch.randn_like(mu)
      logits = dec2(torch.relu(dec1(z)))
      rec = torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")
      kl = -0.5 * torch.sum(1 + lv - mu.pow(2) - lv.exp())
      opt.zero_grad()
      ((rec + kl) / batch_size).backward()
      opt.step()
      n += batch_size
    if device == "cuda":
      torch.cuda.synchronize()
    return n

  return run_epoch, {"threads": torch.get_num_threads(), "device": device, "version": torch.__version__}


def print_tables(result: dict) -> None:
  print(f"device: {result['device']} ({result['backend']}), jax {result['jax']}; large matmuls "
        f"{result['matmul_gflops_large']:.1f} GFLOP/s\n")
  if not result["rows"]:
    return print_other_tables(result)
  print("| arch | kind | batch | MFLOP/image | cvae_jax img/s | compile s | matmul GFLOP/s at the MLP's shapes | "
        "bound img/s | fraction | own-ops bound img/s | fraction | per-step loop img/s | ratio | "
        "PyTorch loop img/s | ratio |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in result["rows"]:
    p, loop, torch_row = r["cvae_jax"], r.get("step_loop"), r.get("pytorch_loop")
    print(f"| {r['arch']} | {r['kind']} | {r['batch_size']} | {p['flops_per_image'] / 1e6:.2f} | "
          f"{p['images_per_s']:,.0f} | {p['compile_s']:.2f} | {r['matmul_gflops']:.1f} | "
          f"{r['bound_images_per_s']:,.0f} | {r['fraction_of_bound']:.2f} | "
          f"{r['own_ops_images_per_s']:,.0f} | {r['fraction_of_own_ops']:.2f} | "
          + (f"{loop['images_per_s']:,.0f} ({loop['feeder']}) | {r['vs_step_loop']:.2f} | " if loop else "n/a | | ")
          + (f"{torch_row['images_per_s']:,.0f} ({torch_row['device']}) | {r['vs_pytorch_loop']:.2f} |"
             if torch_row else "n/a | |"))
  print_other_tables(result)


def print_other_tables(result: dict) -> None:
  if result.get("dsprites"):
    print("\n64x64 dSprites, disentanglement_lib's conv VAE (model=conv_dlib), VAE, batch 64:")
    print("| decoder kernel | MFLOP/image | cvae_jax img/s | compile s |")
    print("| --- | --- | --- | --- |")
    for r in result["dsprites"]:
      print(f"| {r['decoder_kernel_size']} | {r['flops_per_image'] / 1e6:.2f} | {r['images_per_s']:,.0f} | "
            f"{r['compile_s']:.2f} |")
  if result.get("resolutions"):
    print(f"\nhierarchical VAE (model=hvae) on synthetic RGB images, batch {RESOLUTION_BATCH}:")
    print("| pixels | remat | dtype | MFLOP/image | img/s | own-ops bound img/s | fraction | step temporaries MiB | "
          "vs no remat |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = {(r["size"], r["compute_dtype"]): r["temp_bytes"] for r in result["resolutions"] if not r["remat"]}
    for r in result["resolutions"]:
      print(f"| {r['size']} | {r['remat']} | {r['compute_dtype']} | {r['flops_per_image'] / 1e6:,.0f} | "
            f"{r['images_per_s']:,.1f} | {r['own_ops_images_per_s']:,.1f} | {r['fraction_of_own_ops']:.2f} | "
            f"{r['temp_bytes'] / 2**20:,.1f} | {base[(r['size'], r['compute_dtype'])] / r['temp_bytes']:.2f}x |")
  if result.get("variants"):
    print("\nvariants of the compiled epoch (MLP VAE):")
    print("| batch | scan unroll | flat optimizer | img/s | compile s | batched sweep img/s | vs separate |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for v in result["variants"]:
      sweep = v.get("batched_sweep")
      print(f"| {v['batch_size']} | {v['unroll']} | {v['flat_optimizer']} | {v['images_per_s']:,.0f} | {v['compile_s']:.2f} | "
            + (f"{sweep['images_per_s']:,.0f} ({sweep['runs']} models) | "
               f"{sweep['images_per_s'] / v['separate_runs']['images_per_s']:.2f} |" if sweep else " | |"))
  if any("streamed" in r for r in result["rows"]):
    print("\nstreamed data (training images memory-mapped from a .npy) against resident, img/s and ratio to resident:")
    print(f"| arch | kind | batch | resident | streamed, {STREAM_PIECE_STEPS}-step pieces (as training) | ratio | "
          f"streamed, one piece | ratio | resident, {STREAM_PIECE_STEPS}-step pieces | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["rows"]:
      print(f"| {r['arch']} | {r['kind']} | {r['batch_size']} | {r['cvae_jax']['images_per_s']:,.0f} | "
            + " | ".join(f"{r[n]['images_per_s']:,.0f} | {r[n + '_vs_resident']:.2f}"
                         for n in ("streamed_pieces", "streamed", "resident_pieces")) + " |")
  for r in result["rows"]:
    if "batched_sweep" in r:
      s = r["batched_sweep"]
      print(f"\n{r['arch']} batch {r['batch_size']}: batched sweep of {s['runs']} models: {s['images_per_s']:,.0f} img/s "
            f"over all models (compile {s['compile_s']:.2f} s) vs {r['separate_runs']['images_per_s']:,.0f} for the "
            f"same {s['runs']} runs one after another: {r['batched_vs_separate']:.2f}x")
  if result.get("iwae"):
    print(f"\nk=5000 importance-weighted bound, Flax example's MLP, {result['iwae_images']} test images:")
    print("| batch | sample chunk | s | s for 10,000 images | decoder passes/s | MFLOP/pass | GFLOP/s | "
          "fraction of large-matmul rate |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["iwae"]:
      print(f"| {r['batch_size']} | {r['sample_chunk']} | {r['seconds']:.2f} | {r['seconds_for_10000_images']:.1f} | "
            f"{r['passes_per_s']:,.0f} | {r['flops_per_pass'] / 1e6:.3f} | {r['gflops']:.1f} | "
            f"{r['gflops'] / result['matmul_gflops_large']:.2f} |")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--arch", nargs="*", default=["mlp"], choices=list(MODELS),
                      help="the MNIST models to time (none: --arch with no names)")
  parser.add_argument("--kind", nargs="+", default=["vae"], choices=["vae", "cvae"])
  parser.add_argument("--batch-size", nargs="+", type=int, default=[128])
  parser.add_argument("--epochs", type=int, default=3, help="timed epochs per loop (after one warm-up)")
  parser.add_argument("--no-baselines", action="store_true", help="time cvae_jax alone (no per-step or PyTorch loop)")
  parser.add_argument("--streamed", action="store_true",
                      help="also time the epoch on streamed data (training images memory-mapped from a temporary "
                           ".npy, as data.in_memory=false) against resident data, whole and in training's pieces")
  parser.add_argument("--sweep-runs", type=int, default=0,
                      help="also time a batched sweep of this many models against separate runs (0: skip); "
                           "first architecture and kind, each batch size")
  parser.add_argument("--unroll", nargs="+", type=int, default=[],
                      help="also time the MLP VAE's epoch (and batched sweep) with these training.scan_unroll values")
  parser.add_argument("--flat-optimizer", action="store_true",
                      help="also time the variants with optimizer.flatten=true (one parameter vector)")
  parser.add_argument("--iwae-images", type=int, default=0,
                      help="also time the k=5000 importance-weighted bound on this many test images (0: skip)")
  parser.add_argument("--iwae-chunks", nargs="+", default=["100x500", "100x100", "20x250", "10x100"],
                      help="(images per chunk)x(samples per chunk) settings of the bound to time")
  parser.add_argument("--dsprites", type=int, default=0,
                      help="also time disentanglement_lib's 64x64 conv VAE on this many dSprites images (0: skip)")
  parser.add_argument("--resolutions", nargs="+", type=int, default=[],
                      help="also time the hierarchical VAE on synthetic RGB images of these sizes (powers of 2, >= 8)")
  parser.add_argument("--data", help="read the data from this file (written by --save-data) instead of TFDS")
  parser.add_argument("--save-data", help="write the benchmark's data to this .npz file and stop")
  parser.add_argument("--hlo-dir", help="write the MLP epoch's optimized HLO here, one file per batch size")
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args(argv)
  xla_cpu.use_fast_scheduler()  # as the command lines do, before the first computation
  ds = load_dataset(args.data)
  if args.save_data:
    save_dataset(ds, args.save_data)
    return
  mapped = None
  if args.streamed:  # the images as data.in_memory=false reads them: a memory map of a .npy file
    folder = tempfile.TemporaryDirectory()  # removed when the script ends
    np.save(f"{folder.name}/train_images.npy", ds.train.images)
    mapped = np.load(f"{folder.name}/train_images.npy", mmap_mode="r")
  result = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "cpu": platform.processor(), "matmul_gflops_large": matmul_rate([(2048, 2048, 2048)], iters=10),
            "rows": [], "variants": []}
  for b in args.batch_size:
    shapes = [(b, 784, 500), (b, 500, 784), (b, 500, 40)]  # the MLP's; the bound for every row
    for arch in args.arch:
      for kind in args.kind:
        cfg = config(arch, kind, b)
        hlo = f"{args.hlo_dir}/mlp_epoch_batch{b}.txt" if args.hlo_dir and arch == "mlp" and kind == "vae" else None
        project, info = project_loop(cfg, ds, hlo)
        loops = {"cvae_jax": project, "own_ops": step_ops_loop(cfg, ds)}
        if mapped is not None:
          loops["streamed"] = project_loop(cfg, ds, streamed_from=mapped)[0]
          for name, source in (("resident_pieces", None), ("streamed_pieces", mapped)):
            loops[name] = project_loop(cfg, ds, streamed_from=source, chunk_steps=STREAM_PIECE_STEPS)[0]
        torch_info = None
        if not args.no_baselines:
          loops["step_loop"] = step_loop(cfg, ds)
          made = torch_loop(ds, b) if arch == "mlp" and kind == "vae" else None
          if made:
            loops["pytorch_loop"], torch_info = made
        sweep = args.sweep_runs and arch == args.arch[0] and kind == args.kind[0]
        if sweep:
          loops["batched_sweep"] = batched_loop(cfg, ds, args.sweep_runs)
          loops["separate_runs"] = separate_loop(cfg, ds, args.sweep_runs)
        loops["matmul"] = matmul_loop(shapes)
        timed = interleaved(loops, args.epochs)
        rate = timed.pop("matmul")["images_per_s"] / 1e9  # its work is counted in FLOPs: GFLOP/s
        row = {"arch": arch, "kind": kind, "batch_size": b, "matmul_gflops": rate, "cvae_jax": timed["cvae_jax"] | info}
        row["bound_images_per_s"] = rate * 1e9 / info["flops_per_image"]
        row["fraction_of_bound"] = timed["cvae_jax"]["images_per_s"] / row["bound_images_per_s"]
        row["own_ops_images_per_s"] = timed["own_ops"]["images_per_s"]
        row["fraction_of_own_ops"] = timed["cvae_jax"]["images_per_s"] / row["own_ops_images_per_s"]
        if "step_loop" in timed:
          row["step_loop"] = timed["step_loop"] | {"feeder": "tf.data" if has_tensorflow() else "numpy"}
          row["vs_step_loop"] = timed["cvae_jax"]["images_per_s"] / timed["step_loop"]["images_per_s"]
        if "pytorch_loop" in timed:
          row["pytorch_loop"] = timed["pytorch_loop"] | torch_info
          row["vs_pytorch_loop"] = timed["cvae_jax"]["images_per_s"] / timed["pytorch_loop"]["images_per_s"]
        for name in ("streamed", "resident_pieces", "streamed_pieces"):
          if name in timed:
            row[name] = timed[name] | {"chunk_steps": STREAM_PIECE_STEPS if name.endswith("pieces") else None}
            row[f"{name}_vs_resident"] = timed[name]["images_per_s"] / timed["cvae_jax"]["images_per_s"]
        if sweep:
          row["batched_sweep"] = timed["batched_sweep"] | {"runs": args.sweep_runs}
          row["separate_runs"] = timed["separate_runs"]
          row["batched_vs_separate"] = timed["batched_sweep"]["images_per_s"] / timed["separate_runs"]["images_per_s"]
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    for unroll in args.unroll:
      for flat in ([False, True] if args.flat_optimizer else [False]):
        cfg = config("mlp", "vae", b, unroll, flat)
        project, info = project_loop(cfg, ds)
        loops = {"cvae_jax": project}
        if args.sweep_runs:
          loops["batched_sweep"] = batched_loop(cfg, ds, args.sweep_runs)
          loops["separate_runs"] = separate_loop(cfg, ds, args.sweep_runs)
        timed = interleaved(loops, args.epochs)
        variant = {"batch_size": b, "unroll": unroll, "flat_optimizer": flat} | timed["cvae_jax"] | info
        if args.sweep_runs:
          variant["batched_sweep"] = timed["batched_sweep"] | {"runs": args.sweep_runs}
          variant["separate_runs"] = timed["separate_runs"]
        result["variants"].append(variant)
        print(json.dumps(variant), flush=True)
  if args.resolutions:
    result["resolutions"] = resolution_rows(args.resolutions, args.epochs)
  if args.dsprites:
    result["dsprites"] = dsprites_rows(args.dsprites, args.epochs)
    for row in result["dsprites"]:
      print(json.dumps(row), flush=True)
  if args.iwae_images:
    chunks = [tuple(int(v) for v in c.split("x")) for c in args.iwae_chunks]
    result["iwae_images"] = args.iwae_images
    result["iwae"] = bench_iwae(config("mlp", "vae", 128), ds, args.iwae_images, 5000, chunks)
  print()
  print_tables(result)
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
