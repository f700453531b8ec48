"""An installed wheel is complete: the configs and MNIST travel with it, the command line runs from any
folder, and a user's own config folder adds experiments on top of ours."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from cvae_jax import resources
from cvae_jax.data import files

REPO = Path(__file__).resolve().parents[1]
# What the build does not read, and what a working tree may hold besides the sources.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "outputs", "multirun", "*.egg-info",
                                     "__pycache__", ".pytest_cache")
# A short run: 10 steps (640 images at the smoke experiment's batch of 64), no IWAE bound, no figures.
SHORT = ["data.train_limit=640", "data.test_limit=200", "training.epochs=1", "evaluation.iwae_samples=0",
         "training.figures=false", "training.progress=false"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
  # Built from a copy of the working tree: setuptools writes build/ and *.egg-info/ into the tree it builds.
  tmp = tmp_path_factory.mktemp("wheel")
  shutil.copytree(REPO, tmp / "src", ignore=NOT_SOURCES)
  # Offline with this venv's setuptools; a venv without setuptools (Python 3.12+) lets pip fetch it as
  # `pip install -e .` does.
  isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
  done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(tmp / "dist"),
                         str(tmp / "src")], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  (built,) = (tmp / "dist").glob("cvae_jax-*.whl")
  return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
  """The python of a fresh venv holding only the wheel, which sees this venv's dependencies."""
  env_dir = tmp_path_factory.mktemp("venv") / "env"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
  python = env_dir / "bin" / "python"
  done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                         str(wheel)], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip())
  # Plain path lines, appended after the new venv's own site-packages: its cvae_jax comes first. This venv's
  # .pth files are not run from there, so its editable install of the clone (a meta-path finder) stays out.
  ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  (site / "project_dependencies.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))
  return python


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> dict:
  """Environment of a user outside the clone: nothing on PYTHONPATH, no manual dir, an empty TFDS folder
  (shared by the runs of this module, so MNIST is prepared once)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "CVAE_JAX_MANUAL_DIR", "CVAE_JAX_PLUGINS")}
  return env | {"TFDS_DATA_DIR": str(tmp_path_factory.mktemp("tfds")), "TF_CPP_MIN_LOG_LEVEL": "2"}


def run_installed(python: Path, args, env, cwd: Path):
  return subprocess.run([str(python), "-m", "cvae_jax.train", *args], env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=300)


def test_a_clone_reads_the_repository_folders():
  assert resources.conf_dir() == REPO / "conf"
  assert files.VENDORED_DATA_DIR == REPO / "data"
  assert (files.VENDORED_DATA_DIR / "mnist" / "train-images-idx3-ubyte.gz").is_file()


@pytest.mark.integration
def test_the_wheel_holds_the_code_the_configs_and_mnist(wheel):
  source = wheel.parents[1] / "src"  # the copy of the working tree it was built from
  with zipfile.ZipFile(wheel) as archive:
    sizes = {info.filename: info.file_size for info in archive.infolist()}
  assert "cvae_jax/conf/config.yaml" in sizes and "cvae_jax/conf/experiment/smoke.yaml" in sizes
  expected = {f"cvae_jax/conf/{p.relative_to(source / 'conf')}": p for p in (source / "conf").rglob("*.yaml")}
  expected |= {f"cvae_jax/data/vendored/mnist/{p.name}": p for p in (source / "data" / "mnist").glob("*.gz")}
  # Every module of every package: setuptools leaves out a subpackage that pyproject.toml does not list.
  modules = [p for folder in ("cvae_jax", "hydra_plugins") for p in (source / folder).rglob("*.py")]
  expected |= {str(p.relative_to(source)): p for p in modules}
  assert len([name for name in expected if name.startswith("cvae_jax/conf/experiment/")]) >= 10
  assert len([name for name in expected if name.endswith(".gz")]) == 4
  missing = sorted(name for name in expected if name not in sizes)
  assert not missing, f"not in the wheel: {missing}"
  for name, path in expected.items():
    assert sizes[name] == path.stat().st_size, name


@pytest.mark.integration
def test_the_installed_package_finds_its_own_files(installed):
  where = subprocess.run(
      [str(installed), "-c", "import cvae_jax, cvae_jax.resources as r, cvae_jax.data.files as f; "
       "print(cvae_jax.__file__); print(r.conf_dir()); print(f.VENDORED_DATA_DIR)"],
      cwd=installed.parents[2], capture_output=True, text=True, timeout=120)
  assert where.returncode == 0, where.stderr[-3000:]
  package, conf, vendored = map(Path, where.stdout.split())
  env_dir = installed.parents[1]
  assert env_dir in package.parents and REPO not in package.parents  # the wheel's copy, not the clone
  assert conf == package.parent / "conf" and (conf / "experiment" / "smoke.yaml").is_file()
  assert vendored == package.parent / "data" / "vendored"
  assert (vendored / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file()


@pytest.mark.integration
def test_the_installed_command_line_trains_outside_the_clone(installed, outside, tmp_path):
  run = tmp_path / "run"
  done = run_installed(installed, ["+experiment=smoke", *SHORT, f"hydra.run.dir={run}"], outside, tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((run / "results.json").read_text())
  assert results["steps"] == 10 and results["elbo"] < 0
  assert yaml.safe_load((run / "config.yaml").read_text())["name"] == "smoke"
  # MNIST was prepared from the files inside the wheel, in the empty TFDS folder.
  assert (Path(outside["TFDS_DATA_DIR"]) / "mnist").is_dir()


@pytest.mark.integration
def test_a_users_config_folder_adds_an_experiment_on_top_of_ours(installed, outside, tmp_path):
  # The user's folder holds only their experiment: it builds on our smoke experiment and our mlp model,
  # which come from the installed package.
  mine = tmp_path / "my_conf"
  (mine / "experiment").mkdir(parents=True)
  (mine / "experiment" / "my_exp.yaml").write_text(
      "# @package _global_\ndefaults:\n  - smoke\n  - override /model: mlp\n"
      "name: my_exp\nmodel:\n  latent_size: 3\n  hidden: [16]\n")
  run = tmp_path / "run"
  done = run_installed(installed, ["+experiment=my_exp", f"hydra.searchpath=[file://{mine}]", *SHORT,
                                   f"hydra.run.dir={run}"], outside, tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  config = yaml.safe_load((run / "config.yaml").read_text())
  assert config["name"] == "my_exp"
  assert (config["model"]["arch"], config["model"]["latent_size"], config["model"]["hidden"]) == ("mlp", 3, [16])
  assert config["training"]["batch_size"] == 64  # from our smoke experiment
  assert json.loads((run / "results.json").read_text())["steps"] == 10
