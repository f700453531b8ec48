"""Markdown tables of an anomaly sweep (+experiment=anomaly_mnist, anomaly_fashion_mnist, anomaly_ecg5000).

  python scripts/anomaly_table.py multirun/anomaly_mnist [--metric auroc|auprc|mean_normal|mean_anomalous]

Rows: the held-out class, or for a one-class sweep the class trained on (and the mean over classes), then
the cross-dataset protocol (from the run that holds no class out); columns: each model kind's scores. Runs that differ in seed are averaged (the count is shown). Reads anomaly.json of every
finished run; a run without one is listed as missing.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

KINDS = ("ae", "vae", "cvae")
SCORES = ("reconstruction", "neg_elbo", "nll", "marginal_nll", "best_label_nll", "marginal_neg_elbo",
          "best_label_neg_elbo", "input_complexity", "likelihood_ratio", "typicality")  # column order within a kind


def collect(sweep: Path, metric: str):
  """{(protocol, held-out classes, arch): {(kind, score): [values over seeds]}}, and runs without results."""
  table, missing = defaultdict(lambda: defaultdict(list)), []
  for run in sorted(p for p in sweep.iterdir() if p.is_dir()):
    if not (run / "anomaly.json").exists():
      missing.append(run.name)
      continue
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    result = json.loads((run / "anomaly.json").read_text())
    arch = cfg["model"]["arch"]
    excluded = cfg["data"]["exclude_classes"]
    held = ",".join(map(str, excluded))
    if len(excluded) == 9:  # one-class: trained on the one class left
      held = "only " + ",".join(str(k) for k in range(10) if k not in excluded)
    for protocol, block in result["protocols"].items():
      if protocol == "cross_dataset" and held:
        continue  # the cross-dataset number comes from the run trained on every class
      for score, values in block["scores"].items():
        table[(protocol, held, arch)][(cfg["model"]["kind"], score)].append(values.get(metric, np.nan))
  return table, missing


def markdown(table, metric: str) -> str:
  present = {c for row in table.values() for c in row}
  columns = sorted(present, key=lambda c: (KINDS.index(c[0]) if c[0] in KINDS else len(KINDS),
                                           SCORES.index(c[1]) if c[1] in SCORES else len(SCORES), c))
  head = ["protocol", "held out", "arch"] + [f"{k}: {s}" for k, s in columns]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  by_protocol = defaultdict(list)
  for key in sorted(table, key=lambda k: (k[0] != "held_out", k[2], len(k[1]), k[1])):
    by_protocol[(key[0], key[2])].append(key)
  for (protocol, arch), keys in by_protocol.items():
    for key in keys:
      cells = []
      for c in columns:
        values = table[key].get(c, [])
        cells.append(f"{np.mean(values):.3f}" + (f" ({len(values)})" if len(values) > 1 else "") if values else "")
      lines.append("| " + " | ".join([protocol, key[1] or "none", arch] + cells) + " |")
    if protocol == "held_out" and len(keys) > 1:
      means = [np.mean([np.mean(table[k][c]) for k in keys if c in table[k]]) if any(c in table[k] for k in keys)
               else None for c in columns]
      lines.append("| " + " | ".join([f"**mean {metric}**", "", arch] + [f"**{m:.3f}**" if m is not None else ""
                                                                          for m in means]) + " |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("sweep", type=Path)
  parser.add_argument("--metric", choices=["auroc", "auprc", "mean_normal", "mean_anomalous"], default="auroc",
                      help="mean_normal, mean_anomalous: a score's mean over the normal or the anomalous test inputs")
  args = parser.parse_args()
  table, missing = collect(args.sweep, args.metric)
  print(markdown(table, args.metric))
  if missing:
    print(f"\nno anomaly.json (not finished): {', '.join(missing)}")


if __name__ == "__main__":
  main()
