"""The sweep report on hand-made run directories."""
import json
from pathlib import Path

import yaml

from cvae_jax import report
from cvae_jax.config import to_dict
from conftest import small_config


def write_run(folder, beta, drop=(), task="density", **results):
  folder.mkdir(parents=True)
  config = to_dict(small_config(task=task))
  config["objective"]["beta"] = beta
  for key in drop:
    del config[key]
  (folder / "config.yaml").write_text(yaml.safe_dump(config))
  (folder / "results.json").write_text(json.dumps(results))


def test_keys_missing_from_old_configs_count_as_their_default(tmp_path):
  write_run(tmp_path / "old", 1.0, drop=("task", "quadrants"), elbo=-100.0, rec=80.0, kl=20.0)
  write_run(tmp_path / "new", 4.0, elbo=-110.0, rec=100.0, kl=10.0)
  out = report.write_report(tmp_path)
  assert out["varying"] == ["objective.beta"]
  assert "| objective.beta | status | elbo |" in out["markdown"].read_text()


def test_quadrant_sweeps_get_their_own_columns(tmp_path):
  write_run(tmp_path / "q1", 1.0, task="quadrants", baseline_bce=99.9, cvae_neg_elbo=68.6, cvae_conditional_nll=64.4,
            wall_time=1.0)
  write_run(tmp_path / "q2", 2.0, task="quadrants", baseline_bce=61.9, cvae_neg_elbo=48.0, cvae_conditional_nll=44.8,
            wall_time=1.0)
  text = report.write_report(tmp_path)["markdown"].read_text()
  assert "| baseline_bce | cvae_neg_elbo | cvae_conditional_nll | wall_time |" in text
  assert "| 2.00 | finished | 61.90 | 48.00 | 44.80 | 1.00 |" in text


def test_a_damaged_file_marks_its_job_and_the_others_are_reported(tmp_path):
  write_run(tmp_path / "good", 1.0, elbo=-100.0, rec=80.0, kl=20.0)
  write_run(tmp_path / "cut", 2.0, elbo=-110.0, rec=100.0, kl=10.0)
  text = (tmp_path / "cut" / "results.json").read_text()
  (tmp_path / "cut" / "results.json").write_text(text[:10])
  write_run(tmp_path / "noise", 4.0, elbo=-120.0, rec=110.0, kl=10.0)
  (tmp_path / "noise" / "config.yaml").write_bytes(b"\x00\xff[: garbage")
  out = report.write_report(tmp_path)
  status = {r["run"]: r["status"] for r in out["rows"]}
  assert status == {"good": "finished", "cut": "damaged", "noise": "finished"}
  text = out["markdown"].read_text()
  assert "- `cut` damaged: results.json unreadable" in text and "- `noise` finished: config.yaml unreadable" in text


# A command line past the 255 bytes of a file name, with values a sweep writes back as typed (not true:
# True).
LONG = ["model=conv1d", "model.kind=vae", "data.validation_size=500", "data.calibration_size=500",
        "model.encoder_channels=[64,128]", "model.decoder_channels=[128,64]", "model.dense=128",
        "training.eval_batch_size=500", "training.checkpoint_every_epochs=5", "training.batch_size=256",
        "training.epochs=200"]


def test_a_long_command_line_names_a_short_directory_and_the_same_one_each_time():
  from cvae_jax.engine.rundir import NAME_BYTES, directory_name
  assert directory_name("objective.beta=4,seed=1") == "objective.beta=4,seed=1"  # short names unchanged
  name = ",".join(LONG + ["seed=0"])
  short = directory_name(name)
  assert len(name.encode()) > 255 >= NAME_BYTES == len(short.encode()) and short.startswith(name[:150])
  assert directory_name(name) == short  # the same command resumes the same run
  assert directory_name(name.replace("seed=0", "seed=1")) != short  # names that differ past the cut stay apart


def test_the_config_resolves_run_directories_through_the_same_name():
  from omegaconf import OmegaConf
  from cvae_jax import train  # noqa: F401  registers the resolver conf/config.yaml uses
  from cvae_jax.engine.rundir import directory_name
  name = ",".join(LONG + ["seed=0"])
  node = OmegaConf.create({"overrides": name, "dir": "${run_dirname:${overrides}}"})
  assert node.dir == directory_name(name)
  conf = yaml.safe_load((Path(train.CONF_DIR) / "config.yaml").read_text())
  assert conf["hydra"]["sweep"]["subdir"] == "${run_dirname:${hydra.job.override_dirname}}"
  assert conf["hydra"]["run"]["dir"].endswith("/${run_dirname:${hydra.job.override_dirname}}")


def test_the_report_finds_the_jobs_of_a_sweep_whose_names_were_cut(tmp_path):
  from cvae_jax.engine.rundir import directory_name
  hydra = {"overrides": {"task": LONG}, "sweeper": {"params": {"seed": "0,1"}},
           "job": {"config": {"override_dirname": {"exclude_keys": ["experiment", "name"]}}}}
  (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
  ran = directory_name(",".join(sorted(LONG + ["seed=0"])))
  write_run(tmp_path / ran, 1.0, elbo=-100.0, rec=80.0, kl=20.0)
  status = {r["run"]: r["status"] for r in report.collect(tmp_path)}
  assert status == {ran: "finished", directory_name(",".join(sorted(LONG + ["seed=1"]))): "not started"}
