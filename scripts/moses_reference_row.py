"""MOSES's reference row, recomputed: molecules of MOSES's own training set scored as if they were samples.

  python scripts/moses_reference_row.py [--molecules 30000] [--seed 0]

Draws the molecules at random from MOSES's training file and runs cvae_jax's MOSES metrics on them (the same
code that scores a model's samples), printing JSON. The MOSES README's "Train" row is the number to compare
with: the metrics that average over molecules (SNN, IntDiv, Frag, Filters) must agree; FCD and Scaf, which
compare whole sets, depend on how many molecules are drawn. Needs `pip install --no-deps molsets==0.3.1
fcd_torch==1.0.7` (the data, and ChemNet's weights for FCD).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--molecules", type=int, default=30000, help="how many training molecules to score (MOSES: 30,000)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  from cvae_jax.data import moses
  from cvae_jax.tasks import chemnet, moses_metrics
  t0 = time.perf_counter()
  folder = moses.find_files(None)
  train = moses.read_smiles(folder / moses.FILES["train"])
  references = {name: moses_metrics.load_reference(folder, name) for name in moses_metrics.REFERENCES}
  pick = np.random.default_rng(args.seed).choice(len(train), args.molecules, replace=False)
  result = moses_metrics.metrics([train[i] for i in pick], set(train), references, chemnet.activations)
  result["wall_time"] = time.perf_counter() - t0
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
