"""`python -m cvae_jax.generate RUN_DIR [--figures NAME ...]`: the generation uses as labelled PNGs.

  samples          class-conditional samples, one row per class (a VAE: prior samples)
  translation      each test image's code decoded under every class (CVAE)
  style_transfer   style images' codes rendered as the classes of content images (CVAE)
  interpolation    between the codes (and labels) of pairs of test images
  traversal        one latent dimension at a time around a test image's code
  manifold         the decoded 2-D latent grid (latent size 2 only)
Figures go to RUN_DIR/figures/ (or --out) with fixed keys, so reruns draw the same images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from cvae_jax import figures
from cvae_jax.data import DataError
from cvae_jax.keys import Stream, stream_key
from cvae_jax.restore import RestoreError, Restored, restore_run

CONDITIONAL_ONLY = {"translation", "style_transfer"}
ALL = ("samples", "translation", "style_transfer", "interpolation", "traversal", "manifold")


def applicable(restored: Restored) -> list[str]:
  """The image figures that make sense for this run: none for 1-D signals (training plots those), no
  prior samples for a plain autoencoder, CVAE-only uses for CVAEs, the manifold for 2-D latents."""
  model = restored.model
  if len(restored.dataset.spec.image_shape) != 3:
    return []
  names = [n for n in ALL if model.num_classes or n not in CONDITIONAL_ONLY]
  names = [n for n in names if model.stochastic or n not in ("samples", "manifold")]
  return [n for n in names if n != "manifold" or model.latent_size == 2]


def write_figures(restored: Restored, names, out: Path) -> list[Path]:
  cfg, ds, model, params = restored.cfg, restored.dataset, restored.model, restored.params
  likelihood = cfg.objective.likelihood
  out.mkdir(parents=True, exist_ok=True)
  key = stream_key(cfg.seed, Stream.FIGURES)
  paths = []
  for i, name in enumerate(names):
    path = out / f"{name}.png"
    k = jax.random.fold_in(key, 100 + i)
    if name == "samples":
      figures.sample_grid(path, model, params, ds.spec, likelihood, k)
    elif name == "manifold":
      figures.manifold(path, model, params, ds.spec, likelihood)
    else:
      figures.USE_FIGURES[name](path, model, params, ds.spec, likelihood, ds.test, k)
    paths.append(path)
  return paths


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdir", type=Path, help="a run directory written by python -m cvae_jax.train")
  parser.add_argument("--figures", nargs="+", choices=ALL, help="which figures (default: all that apply)")
  parser.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/figures)")
  args = parser.parse_args(argv)
  try:
    restored = restore_run(args.workdir)
  except (RestoreError, DataError) as e:
    sys.exit(f"error: {e}")
  names = args.figures or applicable(restored)
  wrong = [n for n in names if n not in applicable(restored)]
  if wrong:
    sys.exit(f"error: {', '.join(wrong)} do not apply to this run (a {restored.cfg.model.kind.value} with "
             f"latent size {restored.cfg.model.latent_size}); these do: {', '.join(applicable(restored))}.")
  for path in write_figures(restored, names, args.out or args.workdir / "figures"):
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
