"""The time to initialize a model's parameters at the start of a run: Flax's init run op by op against
`models.init_params` (one compiled program), each in a fresh process as a run starts, with XLA's default
optimizations, on MNIST's shape with each family's default config.

  python scripts/startup_time.py                 # mlp conv hvae, 3 fresh processes each way
  python scripts/startup_time.py --arch hvae --repeats 5

Prints a Markdown table: the median seconds each way, their ratio, and whether the parameters are the same
bit for bit.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import hashlib, json, sys, time
import jax, jax.numpy as jnp, numpy as np
from cvae_jax import schema, xla_cpu
xla_cpu.use_fast_scheduler()
from cvae_jax.data import DatasetSpec
from cvae_jax.models import create_model, init_params
arch, way = sys.argv[1], sys.argv[2]
cfg = schema.structured({"model": {"arch": arch, "kind": "vae"}, "data": {"name": "mnist"}})
model = create_model(cfg.model, DatasetSpec("mnist", (28, 28, 1), 10))
args = ({"params": jax.random.key(0)}, jnp.zeros((1, 28, 28, 1)), None, jax.random.key(1))
t = time.perf_counter()
params = model.init(*args)["params"] if way == "eager" else init_params(model, *args)
leaves = [np.asarray(leaf) for leaf in jax.block_until_ready(jax.tree.leaves(params))]
seconds = time.perf_counter() - t
digest = hashlib.sha256(b"".join(leaf.tobytes() for leaf in leaves)).hexdigest()
print(json.dumps({"seconds": seconds, "digest": digest}))
"""


def timed(arch: str, way: str) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)  # as a user's run compiles
  out = subprocess.run([sys.executable, "-c", CHILD, arch, way], env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--arch", nargs="+", default=["mlp", "conv", "hvae"])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print("| arch | Flax init, op by op (s) | init_params (s) | ratio | same parameters |")
  print("| --- | --- | --- | --- | --- |")
  for arch in args.arch:
    runs = {way: [] for way in ("eager", "compiled")}
    for _ in range(args.repeats):  # alternating, so a busy moment falls on both ways
      for way in runs:
        runs[way].append(timed(arch, way))
    eager, compiled = (statistics.median(r["seconds"] for r in runs[w]) for w in ("eager", "compiled"))
    same = len({r["digest"] for rs in runs.values() for r in rs}) == 1
    print(f"| {arch} | {eager:.2f} | {compiled:.2f} | {eager / compiled:.1f}x | {'yes' if same else 'no'} |")


if __name__ == "__main__":
  main()
