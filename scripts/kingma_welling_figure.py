"""Kingma & Welling 2014, Figure 2, from our runs: the train and test lower bounds against the number of
training samples seen, one colour per latent size, and a table of the final numbers.

  python scripts/kingma_welling_figure.py multirun/kingma_welling [--out kingma_welling.png]

Train bound = the mean training ELBO over each epoch's minibatches (as the optimizer saw them); test bound
= the ELBO on the test split after the epoch. Both are per image, in nats.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402


def load_runs(sweep: Path) -> list[dict]:
  runs = []
  for run in sweep.iterdir():
    if not (run / "metrics.jsonl").exists():
      continue
    config = yaml.safe_load((run / "config.yaml").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((run / "results.json").read_text()) if (run / "results.json").exists() else {}
    runs.append({"latent": config["model"]["latent_size"], "batch": config["training"]["batch_size"],
                 "rows": rows, "results": results})
  return sorted(runs, key=lambda r: r["latent"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("sweep", type=Path)
  parser.add_argument("--out", type=Path)
  args = parser.parse_args()
  runs = load_runs(args.sweep)
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  print("| latent size | samples seen | train bound | test bound | test - train | NLL (k) | active units |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for i, run in enumerate(runs):
    seen = [r["step"] * run["batch"] for r in run["rows"]]
    train, test = [r["train/elbo"] for r in run["rows"]], [r["test/elbo"] for r in run["rows"]]
    ax.plot(seen, train, "--", color=f"C{i}")
    ax.plot(seen, test, "-", color=f"C{i}", label=f"N_z = {run['latent']}")
    res = run["results"]
    nll = f"{res['nll']:.2f} ({res['iwae_samples']})" if "nll" in res else "-"
    print(f"| {run['latent']} | {seen[-1]:.2e} | {train[-1]:.2f} | {test[-1]:.2f} | {test[-1] - train[-1]:+.2f} | "
          f"{nll} | {res.get('active_units', '-')} |")
  ax.set_xscale("log")
  ax.set_xlabel("training samples seen")
  ax.set_ylabel("lower bound (nats per image)")
  ax.set_ylim(-160, -90)
  ax.set_title("AEVB on MNIST: train (dashed) and test (solid) bound")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  out = args.out or args.sweep / "kingma_welling.png"
  fig.savefig(out, dpi=90)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
