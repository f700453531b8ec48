"""`python -m cvae_jax.molecules RUN_DIR [--samples N] [--target PROPERTY=VALUE ...]`: sample and score molecules.

On a run trained with `+experiment=molecules_cvae` (task=molecules; training calls the same code at its
end, with evaluation.molecules samples; MOSES's protocol is --samples 30000 at --temperature 1). Writes molecules.json, samples.csv and
figures/{property_control,molecules}.png in the run directory; the metrics are described in
cvae_jax/tasks/molecules.py.

`--optimize qed` searches the latent space for molecules of higher QED from test molecules (tasks/molecule_space.py)
and prints the success rate against random moves.

`--target logp=4.5 --target qed=0.8` samples N molecules for chosen property values instead (the
drug-design use) and prints how close RDKit finds them; it writes targets.csv. The properties left unnamed
take the values of training molecules close to the named ones (a draw from p(rest | named), so the
condition stays one that real molecules have).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cvae_jax import api, experiment, xla_cpu
from cvae_jax.config import ConfigError
from cvae_jax.data import DataError
from cvae_jax.engine import rundir
from cvae_jax.tasks import RestoreError, molecule_space
from cvae_jax.tasks.molecules import MoleculeTask, evaluate_generation, sample_for_targets, write_samples


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdir", type=Path, help="a run directory written by +experiment=molecules_cvae")
  parser.add_argument("--samples", type=int, default=10000, help="molecules to sample (conditional and unconditional)")
  parser.add_argument("--temperature", type=float, default=1.0,
                      help="sampling temperature: the logits are divided by it (1: the model; below 1: surer, less "
                           "diverse; 0: greedy). MOSES reports temperature 1")
  parser.add_argument("--optimize", metavar="PROPERTY", choices=["mw", "logp", "tpsa", "hbd", "hba", "qed"],
                      help="instead of sampling: optimize PROPERTY in the latent space from test molecules, against "
                           "random moves of the same length (writes optimization.json)")
  parser.add_argument("--target", action="append", default=[], metavar="PROPERTY=VALUE",
                      help="sample for this property value (repeatable), e.g. --target logp=4.5")
  args = parser.parse_args(argv)
  if args.samples < 1:
    parser.error("--samples must be at least 1")
  if not args.temperature >= 0:
    parser.error(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
  xla_cpu.use_fast_scheduler()
  experiment.load_plugins()
  try:
    named = {k: float(v) for k, v in (t.split("=", 1) for t in args.target)}
  except ValueError:
    parser.error(f"--target takes PROPERTY=VALUE with a number, e.g. logp=4.5 (got {args.target})")
  try:
    restored = api.load(args.workdir).restored
    if not isinstance(restored.task, MoleculeTask):
      raise RestoreError(f"{args.workdir} is not a molecule run (task={restored.cfg.task}).")
    if args.optimize:
      found = molecule_space.optimize(restored.cfg, restored.dataset, restored.model, restored.params, args.optimize)
      rundir.write_json_atomic(args.workdir / "optimization.json", found)
      print(f"{args.optimize}: predictor R^2 {found['predictor_r2']:.3f}; start molecules' mean {found['start_mean']:.3f}")
      for way in ("gradient", "random"):
        r = found[way]
        print(f"  {way}: success {r['success']:.3f} validity {r['validity']:.3f} mean {r['mean']:.3f} "
              f"(predicted {r['predicted']:.3f})")
      print(f"wrote {args.workdir / 'optimization.json'}")
      return
    if named:
      if not restored.model.condition_size:
        raise RestoreError(f"{args.workdir} is an unconditional model (model.kind=vae): it takes no --target.")
      found = sample_for_targets(restored.cfg, restored.dataset, restored.model, restored.params, named, args.samples)
      write_samples(args.workdir / "targets.csv", [{"kind": "targets", "smiles": s} for s in found["smiles"]], [])
      print(f"validity={found['validity']:.3f} unique={found['unique']:.3f} of {args.samples}")
      for p, a in found["properties"].items():
        target = "" if a["target"] is None else f" target {a['target']:.3g}"
        achieved = "no valid sample" if a["mean"] is None else f"RDKit mean {a['mean']:.3g} (std {a['std']:.3g})"
        print(f"  {p}: {achieved}{target}")
      print(f"wrote {args.workdir / 'targets.csv'}")
      return
    result = evaluate_generation(restored.cfg, restored.dataset, restored.model, restored.params, args.workdir,
                                 args.samples, args.temperature)
  except (RestoreError, DataError, ConfigError, ValueError) as e:
    sys.exit(f"error: {e}")
  for kind in ("conditional", "unconditional"):
    if kind in result:
      r = result[kind]
      print(f"{kind}: validity={r['validity']:.3f} unique@1k={r['unique@1k']:.3f} unique@10k={r['unique@10k']:.3f} "
            f"novelty={r['novelty']:.3f} mae=" + " ".join(f"{p}:{v:.3g}" for p, v in r.get("mae", {}).items())
            + " hit rate=" + " ".join(f"{p}:{v:.3f}" for p, v in r.get("hit_rate", {}).items())
            + (f" all five:{r['hit_rate_all']:.3f}" if "hit_rate_all" in r else ""))
      print("  invalid, by RDKit's reason: " + " ".join(f"{k}={v:.4f}" for k, v in r["invalid"].items()))
  m = result["moses"]
  print("MOSES metrics (unconditional samples): " + " ".join(
      f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float)))
  print(f"reconstruction accuracy (greedy, posterior mean): {result['reconstruction_accuracy']:.4f} "
        f"of {result['reconstructed_of']} test molecules")
  walk = result["interpolation"]
  print(f"interpolation ({walk['pairs']} pairs of test molecules, {walk['steps']} steps): validity "
        + " ".join(f"{v:.2f}" for v in walk["validity_along_path"])
        + f"; ends reconstructed {walk['ends_reconstructed']:.3f}; distinct per path {walk['distinct_per_path']:.2f} "
        f"(z alone: {walk['distinct_per_path_z_only']:.2f}); "
        f"neighbour Tanimoto {walk['neighbour_similarity']:.3f}")
  print(f"wrote {args.workdir / 'molecules.json'}")


if __name__ == "__main__":
  main()
