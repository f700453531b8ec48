"""Compare the final checkpoints of two run directories leaf by leaf.

  python scripts/compare_runs.py outputs/a outputs/b
Prints the step of each, the number of parameter and optimizer arrays, the largest absolute difference,
and `identical: yes` only when every array is bit-for-bit equal (and whether the trees' structures differ,
as they do in empty nodes between checkpoints of different layouts). Exit code 0 when identical, 1 otherwise.
"""
import argparse
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


def latest(workdir: Path):
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  if not steps:
    sys.exit(f"error: no checkpoint in {workdir}/checkpoints")
  step = max(steps)
  return step, ocp.StandardCheckpointer().restore((workdir / "checkpoints" / str(step) / "default").absolute())


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_a", type=Path)
  parser.add_argument("run_b", type=Path)
  args = parser.parse_args()
  (step_a, a), (step_b, b) = latest(args.run_a), latest(args.run_b)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  same_structure = jax.tree.structure(a) == jax.tree.structure(b)
  diffs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) if np.shape(x) == np.shape(y)
           else float("inf") for x, y in zip(leaves_a, leaves_b)]
  identical = (step_a == step_b and len(leaves_a) == len(leaves_b)
               and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b)))
  # Trees written by different versions may differ in empty nodes (an optimizer's stateless parts) alone.
  print(f"steps: {step_a} vs {step_b}; arrays: {len(leaves_a)} vs {len(leaves_b)}; "
        f"max |difference|: {max(diffs) if diffs else 0.0:.3g}; identical: {'yes' if identical else 'no'}"
        f"{'' if same_structure else ' (tree structures differ; arrays compared in order)'}")
  sys.exit(0 if identical else 1)


if __name__ == "__main__":
  main()
