"""The disentanglement sweep's table and figure (+experiment=disentanglement).

  python scripts/disentanglement_table.py multirun/disentanglement [more sweep directories] [--out DIR]

Rows: objective (beta-VAE, beta-TCVAE) x beta; columns: each score's mean +- standard deviation over the
seeds (the count in brackets), then the reconstruction term and the KL of the test split. The figure shows
each score against beta, one line per objective through the seeds' mean and every seed as a point
(Locatello et al. 2019's point: seeds move the scores about as much as beta does). Reads config.yaml,
eval.json and results.json of every finished run.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

SCORES = {"beta_vae": "beta-VAE score", "factor_vae": "FactorVAE score", "mig": "MIG",
          "dci_disentanglement": "DCI disentanglement", "dci_completeness": "DCI completeness",
          "dci_informativeness": "DCI informativeness", "sap": "SAP"}
TERMS = {"rec": "reconstruction (nats)", "kl": "KL (nats)"}
OBJECTIVES = {"kl": "beta-VAE", "tcvae": "beta-TCVAE", "capacity": "capacity"}


def score_value(value):
  """A score as eval.json holds it: a number, or a block whose "eval" (held-out) accuracy is the score."""
  return float(value["eval"] if isinstance(value, dict) else value)


def collect(sweeps: list[Path]):
  """{(objective, beta): {column: [values over seeds]}}, and the runs without eval.json."""
  table, missing = defaultdict(lambda: defaultdict(list)), []
  for run in sorted(p for sweep in sweeps for p in sweep.iterdir() if p.is_dir()):
    if not (run / "eval.json").exists() or "disentanglement" not in json.loads((run / "eval.json").read_text()):
      missing.append(run.name)
      continue
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    scores = json.loads((run / "eval.json").read_text())["disentanglement"]
    results = json.loads((run / "results.json").read_text())
    row = table[(cfg["objective"]["regularizer"], float(cfg["objective"]["beta"]))]
    for name in SCORES:
      row[name].append(score_value(scores[name]))
    for name in TERMS:
      row[name].append(float(results[name]))
  return table, missing


def markdown(table) -> str:
  columns = {**SCORES, **TERMS}
  head = ["objective", "beta"] + list(columns.values())
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for objective, beta in sorted(table, key=lambda k: (list(OBJECTIVES).index(k[0]), k[1])):
    row = table[(objective, beta)]
    cells = []
    for name in columns:
      values, digits = row[name], (1 if name in TERMS else 3)
      spread = f" ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else ""
      cells.append(f"{np.mean(values):.{digits}f}{spread} ({len(values)})")
    lines.append(f"| {OBJECTIVES[objective]} | {beta:g} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def figure(table, out: Path) -> Path:
  names = ["mig", "factor_vae", "dci_disentanglement", "beta_vae", "sap", "rec"]
  fig, axes = plt.subplots(2, 3, figsize=(12, 7))
  for ax, name in zip(axes.ravel(), names):
    for i, objective in enumerate(o for o in OBJECTIVES if any(k[0] == o for k in table)):
      betas = sorted(b for o, b in table if o == objective)
      means = [np.mean(table[(objective, b)][name]) for b in betas]
      ax.plot(betas, means, marker="o", color=f"C{i}", label=OBJECTIVES[objective])
      for b in betas:
        values = table[(objective, b)][name]
        ax.scatter([b * (1 + 0.04 * (i - 0.5))] * len(values), values, color=f"C{i}", s=12, alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("beta")
    ax.set_title({**SCORES, **TERMS}[name])
  axes[0, 0].legend()
  fig.tight_layout()
  path = out / "scores_vs_beta.png"
  fig.savefig(path, dpi=110)
  return path


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("sweeps", type=Path, nargs="+", help="sweep directories, e.g. multirun/disentanglement")
  parser.add_argument("--out", type=Path, default=None, help="where the figure goes (default: the first sweep's)")
  args = parser.parse_args(argv)
  table, missing = collect(args.sweeps)
  if not table:
    raise SystemExit(f"No finished run with disentanglement scores under {', '.join(map(str, args.sweeps))}.")
  print(markdown(table))
  if missing:
    print(f"\nNot finished (no scores): {', '.join(missing)}")
  out = args.out or args.sweeps[0]
  out.mkdir(parents=True, exist_ok=True)
  print(f"\nfigure: {figure(table, out)}")


if __name__ == "__main__":
  main()
