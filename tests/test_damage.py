"""Every file of a run directory damaged three ways (cut short, filled with garbage, deleted), then every
command run on it (train with the same command, evaluate, generate, report): each combination recovers, or
stops with one clear `error:` line and a non-zero exit; never a traceback, never a file of the run lost
(a damaged file may be set aside as `.damaged` or `.corrupt`). For a finished run and for one stopped after
its first epoch. docs/reliability.md has the matrix this prints (`pytest -m slow tests/test_damage.py -s`).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

ARGS = ["+experiment=smoke", "data.train_limit=640", "data.test_limit=200", "training.epochs=2",
        "training.figures=false", "evaluation.iwae_samples=0", "training.progress=false"]
COMMANDS = ("train", "evaluate", "generate", "report")
SET_ASIDE = re.compile(r"\.(damaged|corrupt)\d*$")


def damage(path: Path, how: str) -> None:
  if how == "deleted":
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  elif how == "cut short":
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  else:  # garbage of the same length
    path.write_bytes(os.urandom(max(path.stat().st_size, 16)))


def targets(run: Path) -> list[tuple[str, tuple[str, ...]]]:
  """(relative path, the damages that apply) of every file kind the run directory holds."""
  latest = max((p for p in (run / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
  data_file = max((p for p in (latest / "default").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  files = ["config.yaml", "metrics.jsonl", "env.jsonl", "results.json", "eval.json",
           next(p for p in (run / "tb").iterdir()).relative_to(run).as_posix(),
           (latest / "_CHECKPOINT_METADATA").relative_to(run).as_posix(),
           (latest / "default" / "_METADATA").relative_to(run).as_posix(), data_file.relative_to(run).as_posix()]
  every = ("cut short", "garbage", "deleted")
  return [(f, every) for f in files if (run / f).exists()] + [(latest.relative_to(run).as_posix(), ("deleted",))]


def kept_files(run: Path) -> set[str]:
  """The run's files, with the suffix of a file set aside removed from every part of the path."""
  return {"/".join(SET_ASIDE.sub("", part) for part in p.relative_to(run).parts)
          for p in run.rglob("*") if p.is_file() and p.name != "train.log"}


def invoke(command: str, run: Path) -> tuple[int, str]:
  """One command in this process (their modules stay imported: one JAX start for the whole matrix)."""
  from hydra.core.global_hydra import GlobalHydra
  from cvae_jax import evaluate, generate, report, train
  calls = {"train": lambda: (setattr(sys, "argv", ["train", *ARGS, f"hydra.run.dir={run}"]), train.main()),
           "evaluate": lambda: evaluate.main([str(run), "--iwae-samples", "5", "--no-sample-accuracy"]),
           "generate": lambda: generate.main([str(run), "--figures", "samples", "--out", str(run.parent / "uses")]),
           "report": lambda: report.main([str(run.parent), "--out", str(run.parent.parent / "report")])}
  out = io.StringIO()
  code = 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
      calls[command]()
    except SystemExit as e:
      if isinstance(e.code, str):  # sys.exit("error: ...") prints its message
        print(e.code, file=sys.stderr)
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001  what a user would see as a traceback
      import traceback
      traceback.print_exc()
      code = 99
  GlobalHydra.instance().clear()
  return code, out.getvalue()


def outcome(code: int, text: str) -> str:
  if "Traceback" in text:
    return "TRACEBACK"
  if code == 0:
    return "recovers"
  lines = [line for line in text.splitlines() if line.startswith("error:")]
  return "stops: " + lines[0][7:90] if lines else f"NO MESSAGE (exit {code})"


def drive(base: Path) -> list[dict]:
  """The whole matrix, in this process: a pristine finished and unfinished run, damaged one file at a time."""
  from cvae_jax import xla_cpu
  xla_cpu.use_fast_scheduler()
  pristine = {"finished": base / "finished" / "job"}
  assert invoke("train", pristine["finished"])[0] == 0
  unfinished = base / "unfinished" / "job"
  shutil.copytree(pristine["finished"], unfinished)
  for name in ("results.json", "eval.json"):
    (unfinished / name).unlink()
  shutil.rmtree(unfinished / "checkpoints" / "20")
  pristine["unfinished"] = unfinished
  rows = []
  for state, source in pristine.items():
    for target, damages in targets(source):
      for how in damages:
        for command in COMMANDS:
          cell = base / "cells" / f"{len(rows)}" / "job"
          shutil.copytree(source, cell)
          damage(cell / target, how)
          before = kept_files(cell) - {target}
          code, text = invoke(command, cell)
          lost = sorted(p for p in before if p not in kept_files(cell) and not p.startswith(target + "/"))
          result = outcome(code, text) if not lost else f"LOST {lost[:2]}"
          rows.append({"state": state, "file": re.sub(r"checkpoints/\d+", "checkpoints/N", target), "damage": how,
                       "command": command, "outcome": result, "detail": text[-1500:] if "TRACE" in result else ""})
          shutil.rmtree(cell.parent)
  return rows


def matrix(rows: list[dict]) -> str:
  """The Markdown table of docs/reliability.md: one line per (run, file, damage), one column per command."""
  lines = ["| run | file | damage | " + " | ".join(COMMANDS) + " |", "|" + " --- |" * (3 + len(COMMANDS))]
  keys = list(dict.fromkeys((r["state"], r["file"], r["damage"]) for r in rows))
  for key in keys:
    cells = {r["command"]: r["outcome"] for r in rows if (r["state"], r["file"], r["damage"]) == key}
    short = lambda o: "recovers" if o == "recovers" else ("stops" if o.startswith("stops") else o)
    lines.append(f"| {key[0]} | `{key[1]}` | {key[2]} | " + " | ".join(short(cells[c]) for c in COMMANDS) + " |")
  return "\n".join(lines)


@pytest.mark.slow  # about 10 minutes: 200 commands
def test_no_damage_to_a_run_directory_gives_a_traceback_or_loses_a_file(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]), TF_CPP_MIN_LOG_LEVEL="2")
  script = f"import json, test_damage; print('ROWS' + json.dumps(test_damage.drive(__import__('pathlib').Path({str(tmp_path)!r}))))"
  proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=3600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(proc.stdout.split("ROWS", 1)[1])
  print("\n" + matrix(rows))
  counts = {o: sum(r["outcome"].split(":")[0] == o for r in rows) for o in ("recovers", "stops")}
  print(f"{len(rows)} cells: {counts['recovers']} recover, {counts['stops']} stop with one line")
  bad = [r for r in rows if r["outcome"].split(":")[0] not in ("recovers", "stops")]
  assert not bad, "\n".join(f"{r['state']} {r['file']} {r['damage']} {r['command']}: {r['outcome']}\n{r['detail']}"
                            for r in bad[:5])
