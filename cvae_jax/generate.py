"""`python -m cvae_jax.generate RUN_DIR [--figures NAME ...] [--temperature T]`: the generation uses as labelled PNGs.

  samples          class-conditional samples, one row per class (a VAE: prior samples), at --temperature
  translation      each test image's code decoded under every class (CVAE)
  style_transfer   style images' codes rendered as the classes of content images (CVAE)
  interpolation    between the codes (and labels) of pairs of test images
  traversal        one latent dimension at a time around a test image's code (not for a hierarchy's thousands)
  manifold         the decoded 2-D latent grid (latent size 2 only)
For image data. Figures go to RUN_DIR/figures/ (or --out) with fixed keys, so reruns draw the same images.
"""
from __future__ import annotations

import argparse
import enum
import sys
from pathlib import Path

from cvae_jax import api, experiment, figures, likelihoods, xla_cpu
from cvae_jax.config import ConfigError
from cvae_jax.data import DataError, Modality
from cvae_jax.engine.memory import OutOfMemoryError
from cvae_jax.keys import Stream, stream_key
from cvae_jax.tasks import Restored, RestoreError


class Figure(enum.IntEnum):
  """Each figure's named part below the FIGURES key."""
  SAMPLES = 100
  TRANSLATION = 101
  STYLE_TRANSFER = 102
  INTERPOLATION = 103
  TRAVERSAL = 104
  MANIFOLD = 105


ALL = tuple(f.name.lower() for f in Figure)
CONDITIONAL_ONLY = {"translation", "style_transfer"}


def applicable(restored: Restored) -> list[str]:
  """The figures that make sense for this run: image data only (training draws signals' figures), no prior
  samples for a plain autoencoder, the class-conditional uses for CVAEs of classes, the manifold for 2-D latents."""
  model, spec = restored.model, restored.dataset.spec
  if spec.modality != Modality.image:
    return []
  names = [n for n in ALL if (model.condition_size and spec.num_classes) or n not in CONDITIONAL_ONLY]
  names = [n for n in names if model.stochastic or n not in ("samples", "manifold")]
  names = [n for n in names if model.group_sizes is None or n != "traversal"]
  return [n for n in names if n != "manifold" or model.latent_size == 2]


def write_figures(restored: Restored, names, out: Path, temperature: float = 1.0) -> list[Path]:
  cfg, ds, model, params = restored.cfg, restored.dataset, restored.model, restored.params
  likelihood = likelihoods.of(cfg.objective)
  out.mkdir(parents=True, exist_ok=True)
  paths = []
  for name in names:
    path = out / f"{name}.png"
    key = stream_key(cfg.seed, Stream.FIGURES, Figure[name.upper()])
    if name == "samples":
      figures.sample_grid(path, model, params, ds.spec, likelihood, key, temperature=temperature)
    elif name == "manifold":
      figures.manifold(path, model, params, ds.spec, likelihood)
    else:
      figures.USE_FIGURES[name](path, model, params, ds.spec, likelihood, ds.test, key)
    paths.append(path)
  return paths


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdir", type=Path, help="a run directory written by python -m cvae_jax.train")
  parser.add_argument("--figures", nargs="+", choices=ALL, help="which figures (default: all that apply)")
  parser.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/figures)")
  parser.add_argument("--temperature", type=float, default=1.0,
                      help="samples: the prior's scale times this (VDVAE shows t < 1; default 1)")
  args = parser.parse_args(argv)
  if args.temperature < 0:
    parser.error(f"--temperature must be >= 0 (0: every group at its prior mean); got {args.temperature}")
  xla_cpu.use_fast_scheduler()
  experiment.load_plugins()
  try:
    restored = api.load(args.workdir).restored
  except (RestoreError, DataError, ConfigError, OutOfMemoryError) as e:
    sys.exit(f"error: {e}")
  modality = restored.dataset.spec.modality
  if not applicable(restored):  # signals' figures are drawn by training; other tasks have their own command
    sys.exit(f"error: generate draws image figures, and {args.workdir} models {modality.value} data "
             f"(task={restored.cfg.task}). Training wrote its figures to {args.workdir / 'figures'}; the README lists "
             "the command of each task.")
  names = args.figures or applicable(restored)
  wrong = [n for n in names if n not in applicable(restored)]
  if wrong:
    sys.exit(f"error: {', '.join(wrong)} do not apply to this run (a {restored.cfg.model.kind.value} with "
             f"latent size {restored.cfg.model.latent_size}); these do: {', '.join(applicable(restored))}.")
  for path in write_figures(restored, names, args.out or args.workdir / "figures", args.temperature):
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
