"""`python -m cvae_jax.detect RUN INPUTS [--score NAME] [--fpr 0.05] [--out FILE]`: flag anomalous inputs.

Scores each input of INPUTS (a .npy array, or a .npz holding one array or one named `x`; images as uint8
0..255 [N, H, W(, C)], signals as floats [N, T(, C)]) with the trained run's model, and flags those whose
score is above the threshold that flags a fraction `--fpr` of normal inputs. The threshold is calibrated
on the run's calibration split (data.calibration_size: training inputs held out from training and from
epoch selection), else on its validation split (data.validation_size), never on its test split. Writes one
line per input (index, score, flag) to --out (default: INPUTS with the suffix .detections.csv) and reports
the false- and true-positive rates reached on the run's test protocol (its held-out classes as the
anomalies). From Python: `Detector(cvae_jax.load(run), ...)`.

Scores (higher = more anomalous; evaluators/anomaly.py):
  bound             -L_k (a VAE), the CVAE's marginal -log p(x), or a plain autoencoder's reconstruction error
  input_complexity  the bound minus the input's compressed length in nats (Serrà et al. 2020)
  llr>M             a hierarchy's (model=hvae) L_k minus its bound with the lowest M groups at their prior's
                    mean (Havtorn et al. 2021's LLR>k), M from 1 to the number of groups - 1
"""
from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from cvae_jax import api, xla_cpu
from cvae_jax.data import DataError
from cvae_jax.evaluators import ood
from cvae_jax.tasks import RestoreError

SCORES = ("bound", "input_complexity", "llr>M")


def _llr_group(score: str) -> Optional[int]:
  """M of a score named llr>M; None for any other name."""
  head, _, m = score.partition(">")
  return int(m) if head == "llr" and m.isdigit() else None


def threshold_at(normal_scores: np.ndarray, fpr: float) -> float:
  """The score above which a fraction `fpr` of these normal scores lies (their 1 - fpr quantile, the
  higher of the two order statistics around it, so that at most that fraction is flagged)."""
  return float(np.quantile(np.asarray(normal_scores, np.float64), 1.0 - fpr, method="higher"))


class Detector:
  """A run's anomaly detector at a false-positive rate: `scores(x)`, `flags(x)`, and `threshold`."""

  def __init__(self, model: api.Model, score: str = "bound", fpr: float = 0.05, k: int = 100):
    self.llr_group = _llr_group(score)
    if score not in SCORES[:2] and self.llr_group is None:
      raise ValueError(f"--score {score!r} is not one of {', '.join(SCORES)} (M a number, e.g. llr>1)")
    if not 0 < fpr < 1:
      raise ValueError(f"--fpr {fpr} must be in (0, 1): the fraction of normal inputs flagged")
    ds = model.dataset
    self.calibration_split = "calibration" if ds.calibration is not None and len(ds.calibration) else "validation"
    calibration = getattr(ds, self.calibration_split)
    if calibration is None or len(calibration) == 0:
      raise ValueError(f"{model.workdir} has no calibration or validation split to set the threshold on (the test "
                       "split is for measuring it). Train the run with data.calibration_size=N (e.g. 1000).")
    self.model, self.score, self.fpr, self.k = model, score, fpr, k
    self.calibration_scores = self.scores(calibration.images)
    self.threshold = threshold_at(self.calibration_scores, fpr)

  def scores(self, x) -> np.ndarray:
    stored = self.model._inputs(x)  # checked: shape, dtype and range; in the data's stored form
    bound = self.model.anomaly_score(stored, k=self.k, llr_group=self.llr_group)
    if self.score == "input_complexity":
      return bound - ood.complexity_nats(stored, self.model.config.evaluation.compressor)
    return bound

  def flags(self, x) -> np.ndarray:
    return self.scores(x) > self.threshold

  def test_protocol(self) -> Optional[dict]:
    """The rates reached on the run's test split, its held-out classes (data.exclude_classes) as the
    anomalies; None when the run holds out no class."""
    test, held_out = self.model.dataset.test, list(self.model.config.data.exclude_classes)
    if not held_out:
      return None
    anomalous = np.isin(test.labels, held_out)
    flagged = self.flags(test.images)
    return {"false_positive_rate": float(flagged[~anomalous].mean()), "true_positive_rate": float(flagged[anomalous].mean()),
            "num_normal": int((~anomalous).sum()), "num_anomalous": int(anomalous.sum())}


def read_inputs(path: Path) -> np.ndarray:
  """The array in a .npy file, or the one array (or the array `x`) of a .npz file."""
  if not path.is_file():
    raise ValueError(f"{path} does not exist")
  try:
    loaded = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not a .npy or .npz array file ({type(e).__name__}: {e})") from None
  if isinstance(loaded, np.lib.npyio.NpzFile):
    with loaded:
      names = list(loaded.files)
      name = "x" if "x" in names else names[0] if len(names) == 1 else None
      if name is None:
        raise ValueError(f"{path} holds arrays {names}: name the inputs `x`, or keep one array in it")
      return loaded[name]
  return loaded


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m cvae_jax.detect", description=__doc__.split("\n\n")[0])
  parser.add_argument("run", help="a trained run directory (with data.calibration_size or data.validation_size > 0)")
  parser.add_argument("inputs", help=".npy or .npz file of inputs")
  parser.add_argument("--score", default="bound", help=f"one of {', '.join(SCORES)} (default: bound)")
  parser.add_argument("--fpr", type=float, default=0.05, help="fraction of normal inputs flagged (default 0.05)")
  parser.add_argument("--k", type=int, default=100, help="importance samples of the bound (default 100)")
  parser.add_argument("--out", help="per-input scores and flags, CSV (default: INPUTS.detections.csv)")
  args = parser.parse_args(argv)
  xla_cpu.use_fast_scheduler()
  inputs = Path(args.inputs)
  try:
    x = read_inputs(inputs)
    detector = Detector(api.load(args.run), args.score, args.fpr, args.k)
    scores = detector.scores(x)
    if not np.all(np.isfinite(scores)):
      raise ValueError(f"{inputs}: {int((~np.isfinite(scores)).sum())} scores are not finite")
    protocol = detector.test_protocol()
  except (ValueError, RestoreError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  flags = scores > detector.threshold
  out = Path(args.out) if args.out else inputs.with_name(inputs.name + ".detections.csv")
  lines = ["index,score,anomalous"] + [f"{i},{s:.6f},{int(f)}" for i, (s, f) in enumerate(zip(scores, flags))]
  out.write_text("\n".join(lines) + "\n")
  summary = {"inputs": len(scores), "flagged": int(flags.sum()), "score": args.score, "fpr": args.fpr,
             "threshold": detector.threshold, "calibration_split": detector.calibration_split,
             "calibration": len(detector.calibration_scores),
             "calibration_fpr": float(np.mean(detector.calibration_scores > detector.threshold)),
             "test": protocol, "out": str(out)}
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
