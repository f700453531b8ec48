"""The sweep report on hand-made run directories."""
import json

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
