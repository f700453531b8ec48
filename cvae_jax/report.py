"""`python -m cvae_jax.report MULTIRUN_DIR`: one table and a few plots for a whole sweep.

Writes into MULTIRUN_DIR (or --out): `report.csv`, `report.md` (the overrides that vary, status, and the
numbers the runs' task reports: test ELBO, rec, KL, active units, NLL, wall time for the density tasks; and
where runs have it, eval.json's sample quality: Fréchet distance, precision, recall, coverage, with a perfect
generator's values in the header and the CSV), best headline first, and plots of ELBO, rec and KL against
each numeric hyperparameter that varies (beta gives the rate-distortion view) and per architecture. Every job
the sweep defines appears: finished, failed (with its error), incomplete, or not started.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from cvae_jax import experiment, schema, tasks  # noqa: E402
from cvae_jax.config import flatten  # noqa: E402
from cvae_jax.engine import rundir  # noqa: E402
from cvae_jax.tasks import Task  # noqa: E402

PLOTTED = ("elbo", "rec", "kl")  # the numbers plotted against hyperparameters, where the task reports them
QUALITY = ("fd", "precision", "recall", "coverage")  # eval.json's sample_quality numbers (evaluators/quality.py)


def expected_jobs(sweep_dir: Path) -> Optional[dict[str, dict]]:
  """Every job the sweep defines: its directory name, computed as Hydra does, and its override values
  ({key: value}); None when the sweep has no multirun.yaml."""
  path = sweep_dir / "multirun.yaml"
  if not path.exists():
    return None
  from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
  from hydra.core.override_parser.overrides_parser import OverridesParser
  try:
    cfg = yaml.safe_load(path.read_text())["hydra"]
  except Exception as e:  # noqa: BLE001  a damaged multirun.yaml: report the directories found
    print(f"warning: {path} is unreadable ({type(e).__name__}); reporting the run directories found",
          file=sys.stderr)
    return None
  params = cfg.get("sweeper", {}).get("params") or {}
  given = list(cfg["overrides"]["task"])
  given_keys = {line.split("=", 1)[0].lstrip("+~") for line in given}
  lines = given + [f"{k}={v}" for k, v in params.items() if k not in given_keys]  # the command line wins
  parser = OverridesParser.create()
  batches = BasicSweeper.split_arguments(parser.parse_overrides(lines), None)
  exclude = set(cfg["job"]["config"]["override_dirname"]["exclude_keys"])
  jobs = {}
  for job in (job for batch in batches for job in batch):
    kept = [o for o in parser.parse_overrides(job) if o.key_or_group not in exclude]
    name = rundir.directory_name(",".join(sorted(o.input_line for o in kept)))
    jobs[name] = {o.key_or_group: o.value() for o in kept}
  return jobs


def collect(sweep_dir: Path) -> list[dict]:
  """One row per job: status, its flattened config (where written) and its results."""
  dirs = {p.name: p for p in sorted(sweep_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")}
  jobs = expected_jobs(sweep_dir) or {}
  names = list(jobs) + [n for n in dirs if n not in jobs]
  rows = []
  for name in names:
    run = dirs.get(name)
    row: dict[str, Any] = {"run": name, "overrides": jobs.get(name, {})}
    if run is None:
      rows.append(row | {"status": "not started"})
      continue
    damaged = []
    if (run / "config.yaml").exists():
      try:
        row["config"] = schema.migrate(yaml.safe_load((run / "config.yaml").read_text()))
      except Exception as e:  # noqa: BLE001  any content: the row says so and the others are reported
        damaged.append(f"config.yaml unreadable ({type(e).__name__})")
    results = rundir.read_results(run)
    if results is not None:
      row |= {"status": "finished", "results": results, "path": run}
    elif (run / "results.json").exists():
      damaged.append("results.json unreadable (rerun the job's command: it finishes from its last checkpoint)")
    elif (run / "failed.json").exists():
      failed = rundir.read_json(run / "failed.json")
      row |= {"status": "failed", "error": failed.get("error", "") if failed else "failed.json unreadable"}
    if "status" not in row:
      row["status"] = "damaged" if damaged else "incomplete"
    if damaged:
      row["error"] = "; ".join(damaged)
    rows.append(row)
  return rows


def varying_keys(rows: list[dict]) -> list[str]:
  """Config keys whose value differs between runs, plus the keys the sweep itself varies."""
  # A key a run's config.yaml lacks (written before the key existed) holds the schema default.
  configs = [flatten(schema.defaults_like(r["config"])) | flatten(r["config"]) for r in rows if "config" in r]
  keys = sorted({k for c in configs for k in c})
  varying = {k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1}
  return sorted(varying | swept_keys(rows))


def swept_keys(rows: list[dict]) -> set[str]:
  """Override keys (config keys or group choices such as `model`) that take several values."""
  keys = {k for r in rows for k in r["overrides"]}
  return {k for k in keys if len({json.dumps(r["overrides"].get(k)) for r in rows}) > 1}


def _value(row: dict, key: str):
  """A row's value of a key: from its config.yaml, else from the sweep's overrides (group choices such as
  `model=conv` and jobs that never started live only there)."""
  return row.get("flat", {}).get(key, row["overrides"].get(key, ""))


def task_of(rows: list[dict]) -> Task:
  """The sweep's task, from its runs' configs (the density task for runs written before configs named one)."""
  names = {r["config"].get("task", "density") for r in rows if "config" in r} or {"density"}
  if len(names) > 1:
    raise ValueError(f"{sorted(names)}: the sweep mixes tasks; report each task's runs apart.")
  return tasks.get(names.pop())


def sort_by_headline(rows: list[dict], task: Task) -> list[dict]:
  """Finished runs first, best headline first (the job order among equals), then the others in job order."""
  done = [r for r in rows if r.get(task.headline) is not None]
  done.sort(key=lambda r: -task.headline_sign * r[task.headline])
  return done + [r for r in rows if r.get(task.headline) is None]


def sample_quality_row(workdir: Path) -> dict:
  """A run's sample quality from its eval.json (any evaluator's output, whatever the task), and the
  reference values as `<name>_reference`; {} when it has none."""
  quality = (rundir.read_json(Path(workdir) / "eval.json") or {}).get("sample_quality")
  if not isinstance(quality, dict):
    return {}
  reference = quality.get("reference")
  reference = reference if isinstance(reference, dict) else {}
  number = lambda v: v if _is_number(v) else None  # noqa: E731  a damaged file's odd values become blanks
  return ({k: number(quality.get(k)) for k in QUALITY} | {f"{k}_reference": number(reference.get(k)) for k in QUALITY}
          | {"quality_samples": number(quality.get("samples"))})


def _span(values: list[float]) -> str:
  low, high = f"{min(values):.2f}", f"{max(values):.2f}"
  return low if low == high else f"{low}-{high}"


def quality_note(rows: list[dict]) -> str:
  """The header's sentence on the sample-quality columns: what they are and a perfect generator's values
  (the range over the runs, whose classifiers and sample counts may differ)."""
  done = [r for r in rows if r.get("fd") is not None]
  if not done:
    return ""
  reference = ", ".join(f"{k} {_span(values)}" for k in QUALITY
                        if (values := [r[f"{k}_reference"] for r in done if r.get(f"{k}_reference") is not None]))
  counts = sorted({r["quality_samples"] for r in done if r.get("quality_samples") is not None}) or ["?"]
  samples = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
  return (f"Sample quality (eval.json, docs/sample_quality.md): {samples} prior samples against the test images "
          f"in the classifier's features (fd lower is better; precision, recall, coverage in [0, 1]). "
          f"Reference, as many training images: {reference}.\n\n")


def write_tables(rows: list[dict], keys: list[str], task: Task, out: Path) -> tuple[Path, Path]:
  quality = [k for k in QUALITY if any(r.get(k) is not None for r in rows)]
  metrics = [*task.report_columns, *(k for k in quality if k not in task.report_columns)]
  columns = ["run", *keys, "status", *metrics]
  references = [f"{k}_reference" for k in quality]  # in the CSV; the markdown states them in its header
  csv_path, md_path = out / "report.csv", out / "report.md"
  with open(csv_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(columns + references + ["error"])
    for r in rows:
      writer.writerow([_value(r, k) if k in keys else r.get(k, "") for k in columns + references]
                      + [r.get("error", "")])

  def fmt(v):
    if v is None or v == "":
      return ""
    return f"{v:.2f}" if isinstance(v, float) else str(v)

  lines = ["| " + " | ".join(columns[1:]) + " |", "|" + " --- |" * (len(columns) - 1)]
  for r in rows:
    cells = [fmt(_value(r, k)) for k in keys] + [r["status"]] + [fmt(r.get(m)) for m in metrics]
    lines.append("| " + " | ".join(cells) + " |")
  note = "".join(f"\n- `{r['run']}` {r['status']}: {r['error']}" for r in rows if r.get("error"))
  md_path.write_text(f"# Sweep report: {out.name}\n\ntask={task.name}; numbers on the test split as its "
                     f"results.json holds them (nats per example), best {task.headline} first.\n\n"
                     + quality_note(rows)
                     + "\n".join(lines) + "\n" + note + "\n")
  return csv_path, md_path


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_against(rows: list[dict], key: str, keys: list[str], out: Path) -> Optional[Path]:
  """ELBO, rec and KL against one numeric hyperparameter, one line per setting of the other keys."""
  done = [r for r in rows if r["status"] == "finished"]
  if len(done) < 2 or not all(_is_number(r["flat"].get(key)) for r in done):
    return None
  others = [k for k in keys if k != key]
  groups: dict[str, list[dict]] = {}
  for r in done:
    groups.setdefault(", ".join(f"{k}={_value(r, k)}" for k in others), []).append(r)
  panels = ["elbo", "rec", "kl"] + (["rate-distortion"] if key == "objective.beta" else [])
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8))
  for label, group in groups.items():
    group.sort(key=lambda r: r["flat"][key])
    xs = [r["flat"][key] for r in group]
    for ax, metric in zip(axes, panels):
      if metric == "rate-distortion":
        ax.plot([r["kl"] for r in group], [r["rec"] for r in group], "o-", label=label or None)
        for r in group:
          ax.annotate(f"{r['flat'][key]:g}", (r["kl"], r["rec"]), fontsize=8)
        ax.set_xlabel("rate: KL (nats)")
        ax.set_ylabel("distortion: rec (nats)")
        ax.set_title("rate-distortion (labels: beta)")
      else:
        ax.plot(xs, [r[metric] for r in group], "o-", label=label or None)
        ax.set_xlabel(key)
        ax.set_title(f"test {metric} (nats)")
        if max(xs) / max(min(xs), 1e-12) >= 10:
          ax.set_xscale("log")
  if any(groups):
    axes[0].legend(fontsize=7)
  fig.tight_layout()
  path = out / f"report_{key.split('.')[-1]}.png"
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def plot_per_architecture(rows: list[dict], keys: list[str], out: Path) -> Optional[Path]:
  """Bars of ELBO, rec and KL per setting of the non-numeric model keys that vary (arch, kind, widths)."""
  done = [r for r in rows if r["status"] == "finished"]
  candidates = [k for k in keys if k in swept_keys(rows)] or keys  # what the sweep chose, if known
  arch_keys = [k for k in candidates if k.startswith("model") and not all(_is_number(_value(r, k)) for r in done)]
  if not arch_keys or len(done) < 2:
    return None
  labels = [", ".join(str(_value(r, k)) for k in arch_keys) for r in done]
  fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8))
  for ax, metric in zip(axes, ("elbo", "rec", "kl")):
    ax.barh(range(len(done)), [r[metric] for r in done])
    ax.set_yticks(range(len(done)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_title(f"test {metric} (nats)")
  fig.suptitle("per architecture: " + ", ".join(arch_keys), fontsize=9)
  fig.tight_layout()
  path = out / "report_architecture.png"
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def write_report(sweep_dir: Path, out: Optional[Path] = None) -> dict:
  sweep_dir = Path(sweep_dir)
  if not sweep_dir.is_dir():
    raise FileNotFoundError(f"{sweep_dir} is not a folder: pass a sweep directory such as multirun/beta_sweep")
  out = Path(out or sweep_dir)
  out.mkdir(parents=True, exist_ok=True)
  rows = collect(sweep_dir)
  if not rows:
    raise FileNotFoundError(f"{sweep_dir} holds no runs: pass the folder a --multirun or sweep experiment wrote")
  task = task_of(rows)
  for row in rows:  # the task's numbers as columns, the config flattened for lookups
    if "results" in row:
      path = row.pop("path")
      row |= task.report_row(path, row.pop("results")) | sample_quality_row(path)
    row["flat"] = flatten(row["config"]) if "config" in row else {}
  rows = sort_by_headline(rows, task)
  keys = varying_keys(rows)
  csv_path, md_path = write_tables(rows, keys, task, out)
  # Plot against the numeric keys the sweep varies (not those that change only with the architecture).
  plotted = swept_keys(rows) or set(keys)
  plots = []
  if set(PLOTTED) <= set(task.report_columns):  # a task without an ELBO has its table only
    plots = [p for p in (plot_against(rows, k, keys, out) for k in keys if k in plotted) if p]
    arch = plot_per_architecture(rows, keys, out)
    plots += [arch] if arch else []
  return {"rows": rows, "varying": keys, "csv": csv_path, "markdown": md_path, "plots": plots}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("sweep_dir", type=Path, help="a sweep directory, e.g. multirun/beta_sweep")
  parser.add_argument("--out", type=Path, help="where to write (default: the sweep directory)")
  args = parser.parse_args(argv)
  experiment.load_plugins()
  try:
    report = write_report(args.sweep_dir, args.out)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(report["markdown"].read_text())
  for path in [report["csv"], report["markdown"], *report["plots"]]:
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
