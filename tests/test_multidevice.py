"""Data-parallel training over 4 fake CPU devices matches one device, for the MLP and the hierarchical family
(a subprocess: the device count is fixed when JAX starts)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

SCRIPT = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from conftest import small_config, synthetic_dataset
from cvae_jax.experiment import restore_run, train_and_evaluate
out = {"devices": jax.device_count()}
HVAE = {"model.arch": "hvae", "model.width": 8, "model.bottleneck": 4, "model.latent_channels": 2,
        "model.encoder_blocks": [1, 1], "model.decoder_groups": [1, 1]}
for arch, model in (("mlp", {}), ("hvae", HVAE)):
  for parallel in (False, True):
    workdir = f"{sys.argv[1]}/{arch}/parallel={parallel}"
    cfg = small_config(**{"training.data_parallel": parallel, "training.epochs": 2, "model.kind": "cvae",
                          "data.pixels": "dynamic_binary"}, **model)
    ds = synthetic_dataset(pixels=cfg.data.pixels)
    results = train_and_evaluate(cfg, workdir, dataset=ds)
    params = restore_run(workdir, dataset=ds).params
    out[f"{arch} {parallel}"] = {"metrics": results["metrics"],
                                 "params": [np.asarray(p).tolist() for p in jax.tree.leaves(params)]}
cfg = small_config(**{"training.data_parallel": True, "model.kind": "cvae", "data.pixels": "dynamic_binary"})
# The compiled data-parallel epoch really splits the batch: gradients are summed across devices.
from jax.sharding import NamedSharding, PartitionSpec
from cvae_jax.engine import epoch as engine_epoch
from cvae_jax.tasks.density import DensityTask
mesh = engine_epoch.data_parallel_mesh()
task = DensityTask()
model = task.build_model(cfg, ds.spec)
epoch = engine_epoch.make_train_epoch(task.plan(cfg, model, ds.spec, len(ds.train)), mesh=mesh)
put = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
state = put(task.initial_state(cfg, model, ds.spec))
hlo = epoch.lower(state, put(ds.train.images), put(ds.train.labels), 0).compile().as_text()
out["all_reduce"] = "all-reduce" in hlo
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  """Both families trained on one device and on four (one subprocess), and whether the epoch all-reduces."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path_factory.mktemp("runs"))], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["mlp", "hvae"])
def test_four_devices_match_one(arch, four_devices):
  out = four_devices
  assert out["devices"] == 4 and out["all_reduce"]
  one, four = out[f"{arch} False"], out[f"{arch} True"]
  for key, value in one["metrics"].items():
    if isinstance(value, float):
      assert np.isclose(four["metrics"][key], value, rtol=1e-4, atol=1e-4), (key, value, four["metrics"][key])
  for a, b in zip(one["params"], four["params"]):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-5)
