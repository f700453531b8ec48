"""Training throughput of cvae_jax against the usual loops, on this machine, in one run.

  python scripts/benchmark.py                       # mlp (the Flax example's 784-500-20), batch 128
  python scripts/benchmark.py --arch mlp conv conv_deep --epochs 3
  python scripts/benchmark.py --sweep-runs 8        # also a batched sweep of 8 models vs separate runs
  python scripts/benchmark.py --iwae-images 200     # also the k=5000 bound's speed at a few chunk sizes

For each architecture it measures, on statically binarized MNIST:
  - cvae_jax: whole epochs as one compiled lax.scan over on-device data (conv models on CPU: a host loop
    of the jitted step, see training.uses_step_loop) (images/s, median over epochs after a warm-up) and
    the compile time (first epoch minus a median one); FLOPs per training image from XLA's cost analysis of one train step;
  - a conventional loop: a tf.data pipeline (shuffle, batch, prefetch) feeding the same train step,
    jitted, one Python call per step;
  - a PyTorch loop of the same MLP, if PyTorch happens to be installed (never a dependency);
  - the machine's float32 matmul rate at the model's shapes and for large matrices, and from it the
    throughput bound (rate / FLOPs per image) and the fraction of it reached.
Prints a markdown table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import OmegaConf

from cvae_jax import data
from cvae_jax.config import Config, DataConfig, Pixels
from cvae_jax.models import create_model
from cvae_jax.training import create_train_state, make_train_epoch, make_train_step, uses_step_loop

MODELS = {  # conf/model/*.yaml, as VAEs
    "mlp": {"arch": "mlp", "hidden": [500], "latent_size": 20},
    "conv": {"arch": "conv", "encoder_channels": [32], "decoder_channels": [], "latent_size": 2, "dense": 64},
    "conv_deep": {"arch": "conv", "encoder_channels": [32, 64], "decoder_channels": [64, 32], "conv_stride": 2,
                  "kernel_size": 4, "dense": 256, "latent_size": 10},
}


def config(arch: str, kind: str, batch_size: int) -> Config:
  cfg = OmegaConf.merge(OmegaConf.structured(Config), {"model": MODELS[arch] | {"kind": kind},
                                                        "data": {"pixels": "static_binary"},
                                                        "training": {"batch_size": batch_size}})
  return OmegaConf.to_object(cfg)


def matmul_rate(shapes, iters: int = 200) -> float:
  """GFLOP/s of float32 matmuls [m, k] x [k, n], chained so XLA cannot skip any."""
  rates = []
  for m, k, n in shapes:
    a = jnp.ones((m, k), jnp.float32) * 0.01
    w = jnp.ones((k, n), jnp.float32) * 0.01

    @jax.jit
    def run(a, w):
      def body(acc, _):
        return acc + jnp.dot(a + acc[:1, :1], w)[:1, :1], None
      return jax.lax.scan(body, jnp.zeros((1, 1)), None, length=iters)[0]

    run(a, w).block_until_ready()
    t = time.perf_counter()
    run(a, w).block_until_ready()
    rates.append(2 * m * k * n * iters / (time.perf_counter() - t) / 1e9)
  return float(statistics.median(rates))


def bench_project(cfg, ds, epochs: int) -> dict:
  model = create_model(cfg.model, ds.spec, cfg.objective.likelihood)
  state = create_train_state(cfg, model, ds.spec)
  images, labels = jax.device_put(ds.train.images), jax.device_put(ds.train.labels)
  epoch_fn = make_train_epoch(cfg, model, ds.spec, len(ds.train))
  # FLOPs of one train step (XLA counts a scan's body once, so ask the step itself).
  b = cfg.training.batch_size
  cost = jax.jit(make_train_step(cfg, model, ds.spec, len(ds.train) // cfg.training.batch_size)).lower(state, images[:b], labels[:b]).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  n = (len(ds.train) // b) * b
  times = []
  for e in range(epochs + 1):  # the first epoch compiles
    t = time.perf_counter()
    state, metrics = epoch_fn(state, images, labels, e)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  epoch_s = statistics.median(times[1:])
  return {"images_per_s": n / epoch_s, "compile_s": times[0] - epoch_s, "flops_per_image": float(cost["flops"]) / b,
          "step_loop": uses_step_loop(cfg)}


def bench_batched(cfg, ds, epochs: int, runs: int) -> dict:
  """A batched sweep: `runs` models (different seeds and betas) as one vmapped epoch. Images/s summed
  over the models, to set against `runs` separate epochs (cvae_jax img/s of one model)."""
  from cvae_jax.batched import stack, stack_states
  from cvae_jax.training import run_hyper
  model = create_model(cfg.model, ds.spec, cfg.objective.likelihood)
  configs = [OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg), {"seed": r, "objective": {"beta": 1.0 + r}}))
             for r in range(runs)]
  states = stack_states([create_train_state(c, model, ds.spec) for c in configs])
  hypers = stack([run_hyper(c) for c in configs])
  images, labels = jax.device_put(ds.train.images), jax.device_put(ds.train.labels)
  compiled = make_train_epoch(cfg, model, ds.spec, len(ds.train), batched=True)
  n = (len(ds.train) // cfg.training.batch_size) * cfg.training.batch_size
  states, _ = compiled(states, images, labels, 0, hypers)  # warm-up epoch (compiles)
  times = []
  for e in range(1, epochs + 1):
    t = time.perf_counter()
    states, metrics = compiled(states, images, labels, e, hypers)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return {"runs": runs, "images_per_s": runs * n / statistics.median(times)}


def bench_iwae(cfg, ds, images: int, k: int, chunks) -> list[dict]:
  """The k-sample importance-weighted bound (evaluation.make_iwae) on the first `images` test images of an
  untrained model (speed does not depend on the weights), for each (batch_size, sample_chunk): seconds,
  decoder passes per second and GFLOP/s of the whole bound (XLA's count for one chunk of the bound)."""
  from cvae_jax import evaluation
  model = create_model(cfg.model, ds.spec, cfg.objective.likelihood)
  params = create_train_state(cfg, model, ds.spec).params
  x, y = jax.device_put(ds.test.images[:images]), jax.device_put(ds.test.labels[:images])
  out = []
  for batch, chunk in chunks:
    iwae = evaluation.make_iwae(model, ds.spec, cfg.objective.likelihood, k, batch, chunk)
    compiled = iwae.lower(params, x, y, jax.random.key(0)).compile()
    one = evaluation.make_iwae(model, ds.spec, cfg.objective.likelihood, chunk, batch, chunk)
    cost = one.lower(params, x[:batch], y[:batch], jax.random.key(0)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_per_pass = float(cost["flops"]) / (batch * chunk)
    compiled(params, x, y, jax.random.key(0)).block_until_ready()  # warm-up
    t = time.perf_counter()
    compiled(params, x, y, jax.random.key(1)).block_until_ready()
    seconds = time.perf_counter() - t
    out.append({"batch_size": batch, "sample_chunk": chunk, "seconds": seconds, "passes_per_s": images * k / seconds,
                "flops_per_pass": flops_per_pass, "gflops": images * k * flops_per_pass / seconds / 1e9,
                "seconds_for_10000_images": seconds * 10000 / images})
  return out


def bench_tf_data_loop(cfg, ds, epochs: int) -> dict:
  import tensorflow as tf
  model = create_model(cfg.model, ds.spec, cfg.objective.likelihood)
  state = create_train_state(cfg, model, ds.spec)
  step = jax.jit(make_train_step(cfg, model, ds.spec, len(ds.train) // cfg.training.batch_size), donate_argnums=0)
  b = cfg.training.batch_size
  pipeline = (tf.data.Dataset.from_tensor_slices((ds.train.images, ds.train.labels))
              .shuffle(len(ds.train), seed=0).batch(b, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
  times = []
  for e in range(epochs + 1):  # the first epoch warms up (compile, pipeline)
    t = time.perf_counter()
    n = 0
    for x, y in pipeline.as_numpy_iterator():
      state, metrics = step(state, x, y)
      n += len(y)
    jax.block_until_ready(metrics)
    if e:
      times.append(time.perf_counter() - t)
  return {"images_per_s": n / statistics.median(times)}


def bench_torch(ds, batch_size: int, epochs: int) -> dict | None:
  """pytorch/examples-style loop for the MLP VAE (784-500-20), or None without PyTorch."""
  try:
    import torch
  except ImportError:
    return None
  torch.manual_seed(0)
  enc, mean, logvar = torch.nn.Linear(784, 500), torch.nn.Linear(500, 20), torch.nn.Linear(500, 20)
  dec1, dec2 = torch.nn.Linear(20, 500), torch.nn.Linear(500, 784)
  params = [p for m in (enc, mean, logvar, dec1, dec2) for p in m.parameters()]
  opt = torch.optim.Adam(params, lr=1e-3)
  x_all = torch.from_numpy(ds.train.images.reshape(len(ds.train), -1).astype(np.float32))
  times = []
  for e in range(epochs + 1):
    t = time.perf_counter()
    order = torch.randperm(len(x_all))
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
    if e:
      times.append(time.perf_counter() - t)
  return {"images_per_s": n / statistics.median(times), "threads": torch.get_num_threads()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--arch", nargs="+", default=["mlp"], choices=list(MODELS))
  parser.add_argument("--kind", default="vae", choices=["vae", "cvae"])
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--epochs", type=int, default=3, help="timed epochs per loop (after one warm-up)")
  parser.add_argument("--sweep-runs", type=int, default=0,
                      help="also time a batched sweep of this many models against separate runs (0: skip)")
  parser.add_argument("--iwae-images", type=int, default=0,
                      help="also time the k=5000 importance-weighted bound on this many test images (0: skip)")
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args(argv)
  ds = data.load(DataConfig(name="mnist", pixels=Pixels.static_binary))
  b = args.batch_size
  rate = matmul_rate([(b, 784, 500), (b, 500, 784), (b, 500, 40)])
  large = matmul_rate([(2048, 2048, 2048)], iters=10)
  result = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "cpu": platform.processor(),
            "batch_size": b, "matmul_gflops_model_shapes": rate, "matmul_gflops_large": large, "archs": {}}
  for arch in args.arch:
    cfg = config(arch, args.kind, b)
    row = {"cvae_jax": bench_project(cfg, ds, args.epochs), "tf_data_loop": bench_tf_data_loop(cfg, ds, args.epochs)}
    if arch == "mlp" and args.kind == "vae":
      row["pytorch_loop"] = bench_torch(ds, b, args.epochs)
    flops = row["cvae_jax"]["flops_per_image"]
    row["bound_images_per_s"] = rate * 1e9 / flops
    row["fraction_of_bound"] = row["cvae_jax"]["images_per_s"] / row["bound_images_per_s"]
    row["vs_tf_data_loop"] = row["cvae_jax"]["images_per_s"] / row["tf_data_loop"]["images_per_s"]
    if row.get("pytorch_loop"):
      row["vs_pytorch_loop"] = row["cvae_jax"]["images_per_s"] / row["pytorch_loop"]["images_per_s"]
    if args.sweep_runs and arch == args.arch[0]:  # the first architecture only: a sweep of conv models is long
      row["batched_sweep"] = bench_batched(cfg, ds, args.epochs, args.sweep_runs)
      row["batched_vs_separate"] = row["batched_sweep"]["images_per_s"] / row["cvae_jax"]["images_per_s"]
    result["archs"][arch] = row
  print(f"device: {result['device']} ({result['backend']}), batch {b}; matmul rate at the model's shapes "
        f"{rate:.1f} GFLOP/s, large matmuls {large:.1f} GFLOP/s\n")
  print("| arch | MFLOP/image | cvae_jax img/s | compile s | bound img/s | fraction | tf.data loop img/s | "
        "ratio | PyTorch loop img/s | ratio |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for arch, r in result["archs"].items():
    torch_row = r.get("pytorch_loop")
    print(f"| {arch} | {r['cvae_jax']['flops_per_image'] / 1e6:.2f} | {r['cvae_jax']['images_per_s']:,.0f} | "
          f"{r['cvae_jax']['compile_s']:.2f} | {r['bound_images_per_s']:,.0f} | {r['fraction_of_bound']:.2f} | "
          f"{r['tf_data_loop']['images_per_s']:,.0f} | {r['vs_tf_data_loop']:.2f} | "
          + (f"{torch_row['images_per_s']:,.0f} | {r['vs_pytorch_loop']:.2f} |" if torch_row else "n/a | |"))
  if args.iwae_images:
    result["iwae"] = bench_iwae(config("mlp", "vae", b), ds, args.iwae_images, 5000,
                                [(100, 500), (100, 100), (20, 250), (10, 100)])
    print(f"\nk=5000 importance-weighted bound, Flax example's MLP, {args.iwae_images} test images "
          f"(matmul rate for large matrices {large:.1f} GFLOP/s):")
    print("| batch | sample chunk | s | s for 10,000 images | decoder passes/s | MFLOP/pass | GFLOP/s | fraction of large-matmul rate |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["iwae"]:
      print(f"| {r['batch_size']} | {r['sample_chunk']} | {r['seconds']:.1f} | {r['seconds_for_10000_images']:.0f} | "
            f"{r['passes_per_s']:,.0f} | {r['flops_per_pass'] / 1e6:.3f} | {r['gflops']:.1f} | {r['gflops'] / large:.2f} |")
  for arch, r in result["archs"].items():
    if "batched_sweep" in r:
      print(f"\n{arch}: batched sweep of {r['batched_sweep']['runs']} models: "
            f"{r['batched_sweep']['images_per_s']:,.0f} img/s over all models vs {r['cvae_jax']['images_per_s']:,.0f} "
            f"for separate runs one after another: {r['batched_vs_separate']:.2f}x")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
