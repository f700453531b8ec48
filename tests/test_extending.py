"""Extending the codebase without editing it: a toy dataset, a toy model family and a toy task, defined in
this file alone, trained from the command line (this module is the plug-in: CVAE_JAX_PLUGINS names it, and
its YAML files go in a config folder on Hydra's search path)."""
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax.training import train_state

from cvae_jax import data, models, tasks
from cvae_jax.config import DataConfig, ModelConfig, to_dict
from cvae_jax.data import DatasetSpec, Encoding, Split
from cvae_jax.engine import epoch, loop, optim, rundir
from cvae_jax.keys import Stream, stream_key


# The toy plug-ins: 60 non-blank lines in all, the task 30 of them (then registration, 4).
@dataclass
class StripesConfig(DataConfig):
  name: str = "stripes"
  size: int = 512  # training examples; the test split has a quarter as many


def read_stripes(cfg: StripesConfig):
  """8x8 images, class k lights row band k of 4."""
  rng = np.random.default_rng(0)
  def split(n):
    labels = rng.integers(0, 4, n).astype(np.int32)
    images = (np.arange(8)[None, :, None, None] // 2 == labels[:, None, None, None]) * 200 + rng.integers(0, 50, (n, 8, 8, 1))
    return Split(images.astype(np.uint8), labels)
  return split(cfg.size), split(cfg.size // 4), DatasetSpec("stripes", (8, 8, 1), 4)


@dataclass
class LinearConfig(ModelConfig):
  arch: str = "linear"


class LinearDecoder(nn.Module):
  shape: tuple
  @nn.compact
  def __call__(self, z, c=None):
    return nn.Dense(int(np.prod(self.shape)))(models.concat(z, c)).reshape(z.shape[0], *self.shape)


class LinearEncoder(nn.Module):
  latent_size: int
  @nn.compact
  def __call__(self, x, c=None):
    h = models.concat(x.reshape(x.shape[0], -1), c)
    return nn.Dense(self.latent_size)(h), nn.Dense(self.latent_size)(h)


class Reconstruction(tasks.Task):
  """The mean squared error between an image and the decoding of its code: an autoencoder task on the engine."""
  name, headline, headline_sign, report_columns = "reconstruction", "mse", -1.0, ("mse",)

  def train(self, cfgs, workdirs, dataset=None, on_trace=None):
    cfg, workdir = cfgs[0], Path(workdirs[0])
    ds = dataset or data.load(cfg.data)
    model = models.create_model(cfg.model, ds.spec)
    x0, key = jnp.zeros((1, *ds.spec.shape)), stream_key(cfg.seed, Stream.PARAMS)
    state = train_state.TrainState.create(apply_fn=model.apply, params=model.init(key, x0, None, key)["params"],
                                          tx=optim.create_optimizer(cfg.optimizer))

    def mse(params, images):
      x = images / 255.0
      code = model.apply({"params": params}, x, method=model.encode)[0]
      return jnp.mean((model.apply({"params": params}, code, method=model.decode) - x) ** 2)

    def loss(params, images, labels, keys, hyper):
      value = mse(params, images)
      return value, {"loss": value}

    plan = epoch.Plan(loss, epoch.run_hyper(cfg.seed, 1.0, cfg.optimizer.learning_rate), cfg.optimizer,
                      cfg.training, len(ds.train))
    rundir.init(workdir, to_dict(cfg))
    phase = loop.Phase(workdir, cfg.training.max_checkpoints)
    restored = phase.restore(state)
    state = state if restored is None else restored
    phase.open_metrics(int(state.step))
    state = loop.fit([phase], state, epoch.make_train_epoch(plan), ds.train.images, ds.train.labels,
                     epochs=cfg.training.epochs, steps=epoch.steps_per_epoch(cfg.training.batch_size, len(ds.train)))
    phase.close()
    results = {"mse": float(mse(state.params, ds.test.images))}
    rundir.write_json_atomic(workdir / "results.json", results)
    return [results]


data.register(data.DatasetEntry("stripes", StripesConfig, read_stripes, encoding=lambda cfg: Encoding.grayscale))
models.register(models.ModelFamily("linear", LinearConfig, lambda cfg, spec, shape: (LinearEncoder(cfg.latent_size),
                                   LinearDecoder(shape)), encodings=frozenset({Encoding.grayscale})))
tasks.register(Reconstruction())
# (end of the toy plug-ins)


def test_a_toy_task_model_and_dataset_train_from_the_command_line(tmp_path, env_for_cli):
  conf = tmp_path / "conf"
  (conf / "data").mkdir(parents=True)
  (conf / "model").mkdir()
  (conf / "data" / "stripes.yaml").write_text("defaults: [stripes_schema, _self_]\nname: stripes\nsize: 640\n")
  (conf / "model" / "linear.yaml").write_text("defaults: [linear_schema, _self_]\nkind: vae\nlatent_size: 3\n")
  env = dict(env_for_cli, CVAE_JAX_PLUGINS="test_extending",
             PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), env_for_cli["PYTHONPATH"]]))
  run = tmp_path / "run"
  command = [sys.executable, "-m", "cvae_jax.train", "task=reconstruction", "data=stripes", "model=linear",
             "training.epochs=3", "training.batch_size=64", "optimizer.learning_rate=0.01", f"hydra.run.dir={run}",
             f"hydra.searchpath=[file://{conf}]", "training.progress=false"]
  done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [10, 20, 30]  # 640 // 64 steps per epoch
  assert rows[-1]["train/loss"] < rows[0]["train/loss"]  # it learns
  mse = json.loads((run / "results.json").read_text())["mse"]
  assert 0 < mse < rows[0]["train/loss"]
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["10", "20", "30"]
