"""Per-epoch posterior-collapse diagnostics of a sweep: active units, I(x; z), KL and test ELBO by epoch.

  python scripts/collapse_figure.py multirun/collapse [--out collapse.png]

One line per run, labelled by the overrides that vary (for +experiment=collapse: beta and the remedy);
reads each run's metrics.jsonl (the diagnostics training logs every epoch).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [("test/active_units", "active units"), ("test/mutual_information", "I(x; z) estimate (nats)"),
          ("test/kl", "test KL (nats)"), ("test/elbo", "test ELBO (nats)")]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("sweep", type=Path)
  parser.add_argument("--out", type=Path)
  args = parser.parse_args()
  runs = sorted(p for p in args.sweep.iterdir() if (p / "metrics.jsonl").exists())
  fig, axes = plt.subplots(1, len(PANELS), figsize=(4.6 * len(PANELS), 3.8))
  for i, run in enumerate(runs):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    style = "-" if "beta=1," in run.name or run.name.endswith("beta=1") else "--"
    for ax, (key, title) in zip(axes, PANELS):
      ax.plot([r["epoch"] for r in rows], [r.get(key) for r in rows], style, color=f"C{i % 10}", marker=".",
              label=run.name.replace("objective.", ""))
      ax.set_title(title)
      ax.set_xlabel("epoch")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  out = args.out or args.sweep / "collapse.png"
  fig.savefig(out, dpi=90)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
