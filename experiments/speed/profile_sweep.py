"""Why a batched sweep of 8 MLP VAEs (batch 128) reaches 3.1-3.7x, not 4x, one model's throughput on a GPU.

  python experiments/speed/profile_sweep.py DATA.npz time [EPOCHS]      # images/s, three loops round-robin
  python experiments/speed/profile_sweep.py DATA.npz profile [EPOCHS]   # and each loop's kernels per step

DATA.npz comes from `python scripts/benchmark.py --save-data DATA.npz`. The loops: one model; the batched
sweep as cvae_jax runs it (each run its own minibatches); and a sweep whose runs share their minibatches
(a beta or learning-rate sweep: one gather, the data unbatched in the vmap). UNROLL=n sets
training.scan_unroll; XLA_FLAGS applies as usual. The profile is read with jaxlib's ProfileData.
"""
import collections, glob, json, os, sys
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import jax
import benchmark as B
from cvae_jax import xla_cpu
from cvae_jax.engine.loop import stack, stack_states
from cvae_jax.keys import Stream, stream_key

xla_cpu.use_fast_scheduler()  # as the command lines do, before the first computation
data_path, mode = sys.argv[1], sys.argv[2]
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 5
unroll = int(os.environ.get("UNROLL", "1"))
ds = B.load_dataset(data_path)
cfg = B.config("mlp", "vae", 128, unroll)
RUNS = 8


def shared_loop(cfg, ds, runs):
  """The runs share their minibatches (one gather, data unbatched in the vmap): a beta or learning-rate sweep."""
  model, states, hypers = B.sweep_runs(cfg, ds, runs)
  states, hypers = stack_states(states), stack(hypers)
  b = cfg.training.batch_size
  steps = len(ds.train) // b
  step = B.make_train_step(cfg, model, ds.spec, len(ds.train))
  images, labels = jax.device_put(ds.train.images), jax.device_put(ds.train.labels)

  def epoch(states, e, hypers):
    order = jax.random.permutation(jax.random.fold_in(stream_key(0, Stream.DATA_ORDER), e), len(images))
    def body(s, idx):
      s, m = jax.vmap(step, in_axes=(0, None, None, 0))(s, images[idx], labels[idx], hypers)
      return s, m["loss"]
    return jax.lax.scan(body, states, order[: steps * b].reshape(steps, b), unroll=cfg.training.scan_unroll)

  epoch = jax.jit(epoch, donate_argnums=0)
  n = runs * B.images_per_epoch(cfg, ds)

  def run_epoch(e):
    nonlocal states
    states, m = epoch(states, e, hypers)
    jax.block_until_ready(m)
    return n
  return run_epoch


loops = {"single": B.project_loop(cfg, ds)[0], "batched": B.batched_loop(cfg, ds, RUNS),
         "shared": shared_loop(cfg, ds, RUNS)}
timed = B.interleaved(loops, epochs)
single = timed["single"]["images_per_s"]
print(json.dumps({"mode": mode, "flags": os.environ.get("XLA_FLAGS", ""), "unroll": unroll,
                  **{k: round(v["images_per_s"]) for k, v in timed.items()},
                  **{f"{k}_compile": round(v["compile_s"], 2) for k, v in timed.items()},
                  "batched_x": round(timed["batched"]["images_per_s"] / single, 3),
                  "shared_x": round(timed["shared"]["images_per_s"] / single, 3)}), flush=True)

if mode == "profile":
  from jax._src.lib import _profile_data
  steps = len(ds.train) // 128
  for name, run in loops.items():
    path = f"/tmp/trace_{name}"
    jax.profiler.start_trace(path)
    run(epochs + 1)
    jax.profiler.stop_trace()
    f = sorted(glob.glob(f"{path}/**/*.xplane.pb", recursive=True))[-1]
    pd = _profile_data.ProfileData.from_file(f)
    tot, cnt = collections.Counter(), collections.Counter()
    for plane in pd.planes:
      if "GPU" not in plane.name:
        continue
      for line in plane.lines:
        for ev in line.events:
          tot[(line.name[:18], ev.name[:90])] += ev.duration_ns
          cnt[(line.name[:18], ev.name[:90])] += 1
    print(f"== {name}: per step (us), {steps} steps")
    lines = collections.Counter()
    for (ln, ev), v in tot.items():
      lines[ln] += v
    for ln, v in lines.most_common(8):
      print(f"  line {ln!r}: {v / 1e3 / steps:8.1f} us/step")
    for k, v in tot.most_common(45):
      print(f"  {v / 1e3 / steps:8.2f} {cnt[k] / steps:6.1f}x  {k}")
