"""Every file of a run directory damaged three ways (cut short, filled with garbage, deleted), then every
command run on it (train with the same command, evaluate, generate, report): each combination recovers, or
stops with one clear `error:` line and a non-zero exit; never a traceback, never a file of the run lost
(a damaged file may be set aside as `.damaged` or `.corrupt`). For a finished run and for one stopped after
its first epoch; and for a molecule run, whose one file of its own is the vocabulary (`vocab.json`), with the
molecule command added. docs/reliability.md has the matrix this prints (`pytest -m slow tests/test_damage.py -s`).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
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
MOLECULE_ARGS = ["+experiment=molecules_cvae", "data.train_limit=null", "data.test_limit=null", "training.epochs=2",
                 "training.batch_size=8", "model.rnn_size=16", "model.embedding_size=8", "model.latent_size=4",
                 "evaluation.molecules=20", "training.figures=false", "training.progress=false"]
COMMANDS = ("train", "evaluate", "generate", "report", "molecules")
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
           *sorted(p.relative_to(run).as_posix() for p in (run / "tb").rglob("events.out.tfevents.*")),
           (latest / "_CHECKPOINT_METADATA").relative_to(run).as_posix(),
           (latest / "default" / "_METADATA").relative_to(run).as_posix(), data_file.relative_to(run).as_posix()]
  every = ("cut short", "garbage", "deleted")
  return [(f, every) for f in files if (run / f).exists()] + [(latest.relative_to(run).as_posix(), ("deleted",))]


def shown(target: str) -> str:
  """The file's name as the matrix shows it: the step, the event file's time and the data file's hash elided."""
  target = re.sub(r"checkpoints/\d+", "checkpoints/N", target)
  target = re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents.*", target)
  return re.sub(r"/d/[0-9a-f]+$", "/d/(largest array file)", target)


def kept_files(run: Path) -> set[str]:
  """The run's files, with the suffix of a file set aside removed from every part of the path."""
  return {"/".join(SET_ASIDE.sub("", part) for part in p.relative_to(run).parts)
          for p in run.rglob("*") if p.is_file() and p.name != "train.log"}


def invoke(command: str, run: Path, args: list[str] = ARGS) -> tuple[int, str]:
  """One command in this process (their modules stay imported: one JAX start for the whole matrix)."""
  from hydra.core.global_hydra import GlobalHydra
  from cvae_jax import evaluate, generate, molecules, report, train
  calls = {"train": lambda: (setattr(sys, "argv", ["train", *args, f"hydra.run.dir={run}"]), train.main()),
           "evaluate": lambda: evaluate.main([str(run), "--iwae-samples", "5", "--no-sample-accuracy",
                                              "--quality-samples", "0"]),
           "generate": lambda: generate.main([str(run), "--figures", "samples", "--out", str(run.parent / "uses")]),
           "report": lambda: report.main([str(run.parent), "--out", str(run.parent.parent / "report")]),
           "molecules": lambda: molecules.main([str(run), "--samples", "4"])}
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
  for handler in [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]:
    logging.getLogger().removeHandler(handler)  # Hydra's train.log of this cell: a process of its own would end here
    handler.close()
  return code, out.getvalue()


def outcome(code: int, text: str) -> str:
  if "Traceback" in text:
    return "TRACEBACK"
  if code == 0:
    return "recovers"
  lines = [line for line in text.splitlines() if line.startswith("error:")]
  return "stops: " + lines[0][7:] if lines else f"NO MESSAGE (exit {code})"


def finished_and_unfinished(base: Path, name: str, args: list[str]) -> dict[str, Path]:
  """A run trained to the end, and a copy of it as a kill after the first epoch would leave it."""
  finished = base / f"finished {name}".strip() / "job"
  assert invoke("train", finished, args)[0] == 0
  unfinished = base / f"unfinished {name}".strip() / "job"
  shutil.copytree(finished, unfinished)
  for result in ("results.json", "eval.json", "molecules.json", "samples.csv"):
    (unfinished / result).unlink(missing_ok=True)
  shutil.rmtree(max((p for p in (unfinished / "checkpoints").iterdir()), key=lambda p: int(p.name)))
  return {f"finished {name}".strip(): finished, f"unfinished {name}".strip(): unfinished}


def write_small_moses(folder: Path) -> None:
  """A MOSES-format manual dir of 40 + 10 molecules (the molecule tests' own), for the molecule run."""
  import gzip
  from test_molecules import SMILES
  (folder / "moses").mkdir(parents=True)
  for name, rows in (("train.csv.gz", SMILES), ("test.csv.gz", SMILES[:10])):
    with gzip.open(folder / "moses" / name, "wt") as f:
      f.write("SMILES\n" + "".join(f"{s}\n" for s in rows))


def drive(base: Path) -> list[dict]:
  """The whole matrix, in this process: pristine finished and unfinished runs, damaged one file at a time."""
  from cvae_jax import xla_cpu
  xla_cpu.use_fast_scheduler()
  write_small_moses(base / "manual")
  os.environ.update(CVAE_JAX_MANUAL_DIR=str(base / "manual"), TFDS_DATA_DIR=str(base / "cache"))
  pristine = finished_and_unfinished(base, "", ARGS)
  molecule_runs = finished_and_unfinished(base, "molecules", MOLECULE_ARGS)
  plan = [(state, source, ARGS, targets(source), COMMANDS[:4]) for state, source in pristine.items()]
  plan += [(state, source, MOLECULE_ARGS, [("vocab.json", ("cut short", "garbage", "deleted"))], COMMANDS)
           for state, source in molecule_runs.items()]
  rows = []
  for state, source, args, files, commands in plan:
    for target, damages in files:
      for how in damages:
        for command in commands:
          cell = base / "cells" / f"{len(rows)}" / "job"
          shutil.copytree(source, cell)
          damage(cell / target, how)
          before = kept_files(cell) - {target}
          code, text = invoke(command, cell, args)
          lost = sorted(p for p in before if p not in kept_files(cell) and not p.startswith(target + "/"))
          result = outcome(code, text) if not lost else f"LOST {lost[:2]}"
          rows.append({"state": state, "file": shown(target), "damage": how,
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
    lines.append(f"| {key[0]} | `{key[1]}` | {key[2]} | " +
                 " | ".join(short(cells[c]) if c in cells else "" for c in COMMANDS) + " |")
  return "\n".join(lines)


@pytest.mark.slow  # about 4 minutes: 254 commands
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
  messages = sorted({re.sub(r"\S*/cells/\d+/job", "RUN", r["outcome"][7:])[:240] for r in rows
                     if r["outcome"].startswith("stops")})
  print("the lines they stop with:\n" + "\n".join(messages))
  bad = [r for r in rows if r["outcome"].split(":")[0] not in ("recovers", "stops")]
  assert not bad, "\n".join(f"{r['state']} {r['file']} {r['damage']} {r['command']}: {r['outcome']}\n{r['detail']}"
                            for r in bad[:5])
