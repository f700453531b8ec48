"""The MOSES molecules (Polykovskiy et al. 2020; ZINC Clean Leads: 1,584,664 training and 176,074 test
SMILES) as token sequences, with RDKit properties as the CVAE's condition (`data.name=moses`).

The SMILES files ship inside the `molsets` package on PyPI (moses/dataset/data/{train,test}.csv.gz). Take
only its data: `pip install --no-deps molsets==0.3.1` (its dependencies would pull PyTorch). Or put the two
files in `<data.manual_dir or $CVAE_JAX_MANUAL_DIR>/moses/`.

Subsets: `data.train_limit` / `data.test_limit` take the first N molecules of a fixed permutation (seed 0)
of each file. The properties (RDKit, the slow part: about 3 ms per molecule) are computed once per split
and subset and cached in `<data.data_dir or $TFDS_DATA_DIR or ~/tensorflow_datasets>/cvae_jax_moses/`.
"""
from __future__ import annotations

import enum
import gzip
import hashlib
import importlib.util
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cvae_jax.config import Config, DataConfig, check
from cvae_jax.data import smiles as smiles_lib
from cvae_jax.data.files import data_root, find_manual_dir
from cvae_jax.data.registry import DatasetEntry, register
from cvae_jax.data.spec import Condition, DataError, DatasetSpec, Encoding, Modality, Split

log = logging.getLogger(__name__)


class Syntax(str, enum.Enum):
  smiles = "smiles"    # SMILES strings, one token per atom, bond, branch or ring digit
  selfies = "selfies"  # SELFIES (Krenn et al. 2020): every token string decodes to a valid molecule


@dataclass
class MoleculeDataConfig(DataConfig):
  name: str = "moses"
  syntax: Syntax = Syntax.smiles  # the string syntax the model reads and writes
  # The RDKit properties that form the CVAE's condition vector (z-scored with the training split's mean and std).
  properties: list[str] = field(default_factory=lambda: ["mw", "logp", "tpsa", "hbd", "hba", "qed"])

FILES = {"train": "train.csv.gz", "test": "test.csv.gz"}
INSTALL = "pip install --no-deps molsets==0.3.1"
# RDKit descriptors by config name (Lim et al. 2018 condition on MW, LogP, HBD, HBA and TPSA; QED is Bickerton
# et al. 2012's drug-likeness).
PROPERTIES = ("mw", "logp", "tpsa", "hbd", "hba", "qed")
PROPERTY_LABELS = {"mw": "molecular weight", "logp": "LogP", "tpsa": "TPSA", "hbd": "H-bond donors",
                   "hba": "H-bond acceptors", "qed": "QED"}


def find_files(manual_dir: Optional[str]) -> Path:
  """The folder holding train.csv.gz and test.csv.gz: <manual dir>/moses/, else the molsets package's data."""
  folder, looked = find_manual_dir("moses", manual_dir)
  if folder is None:
    spec = importlib.util.find_spec("moses")  # finds the package without importing it (it imports torch)
    if spec is not None and spec.submodule_search_locations:
      folder = Path(spec.submodule_search_locations[0]) / "dataset" / "data"
      looked.append(folder)
  missing = [n for n in FILES.values() if folder is None or not (folder / n).is_file()]
  if missing:
    raise DataError(f"The MOSES files ({', '.join(missing)}) were not found in {' or '.join(map(str, looked))}. "
                    f"Install the data with `{INSTALL}`, or put train.csv.gz and test.csv.gz in a folder "
                    "'moses/' under data.manual_dir (or $CVAE_JAX_MANUAL_DIR).")
  return folder


def read_smiles(path: Path) -> list[str]:
  """The SMILES column of a MOSES csv.gz (first column, header 'SMILES')."""
  try:
    with gzip.open(path, "rt") as f:
      header = f.readline().strip().split(",")
      if header[0] != "SMILES":
        raise DataError(f"{path} does not start with a SMILES column (header {header}); it is not a MOSES file.")
      return [line.split(",", 1)[0].strip() for line in f if line.strip()]
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise DataError(f"{path} cannot be read ({type(e).__name__}: {e}); reinstall it with `{INSTALL}`.") from e


def molecule_properties(smiles: str) -> list[float]:
  """MW, LogP, TPSA, HBD, HBA, QED of one molecule (in PROPERTIES order); NaN for each if RDKit cannot parse it."""
  from rdkit import Chem, RDLogger
  from rdkit.Chem import QED, Crippen, Descriptors, Lipinski, rdMolDescriptors
  RDLogger.DisableLog("rdApp.*")
  mol = Chem.MolFromSmiles(smiles) if smiles else None  # RDKit parses "" as a molecule of no atoms
  if mol is None:
    return [float("nan")] * len(PROPERTIES)
  return [Descriptors.MolWt(mol), Crippen.MolLogP(mol), rdMolDescriptors.CalcTPSA(mol),
          float(Lipinski.NumHDonors(mol)), float(Lipinski.NumHAcceptors(mol)), QED.qed(mol)]


def compute_properties(smiles: Sequence[str], workers: Optional[int] = None) -> np.ndarray:
  """[N, 6] float64 in PROPERTIES order, over worker processes (RDKit holds the GIL)."""
  workers = workers or os.cpu_count() or 1
  if workers == 1 or len(smiles) < 1000:
    return np.asarray([molecule_properties(s) for s in smiles], np.float64).reshape(-1, len(PROPERTIES))
  # Not fork: JAX's threads may hold locks in the parent, and a forked child would inherit them held.
  with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
    rows = list(pool.map(molecule_properties, smiles, chunksize=500))
  return np.asarray(rows, np.float64)


def properties_of(smiles: Sequence[str], names: Sequence[str]) -> np.ndarray:
  """[N, len(names)] RDKit values of the named properties (NaN rows for strings RDKit cannot parse)."""
  return compute_properties(smiles)[:, [PROPERTIES.index(p) for p in names]]


def in_property_units(spec: DatasetSpec, conditions: np.ndarray) -> np.ndarray:
  """z-scored condition vectors [..., P] -> the properties in their own units."""
  return conditions * np.asarray(spec.condition_std) + np.asarray(spec.condition_mean)


def cache_dir(data_dir: Optional[str]) -> Path:
  return data_root(data_dir) / "cvae_jax_moses"


def cached_properties(smiles: Sequence[str], split: str, data_dir: Optional[str]) -> np.ndarray:
  """compute_properties, cached on disk by the list's content; a corrupt or stale cache is recomputed."""
  digest = hashlib.sha256("\n".join(smiles).encode()).hexdigest()[:16]
  path = cache_dir(data_dir) / f"{split}_{len(smiles)}_{digest}.npy"
  if path.is_file():
    try:
      values = np.load(path)
      if values.shape == (len(smiles), len(PROPERTIES)):
        return values
    except (OSError, ValueError):
      pass
    log.warning("Property cache %s is unreadable or stale; recomputing it", path)
  log.info("Computing RDKit properties of %d %s molecules (cached in %s)", len(smiles), split, path.parent)
  values = compute_properties(smiles)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.npy")
  np.save(tmp, values)
  tmp.replace(path)  # atomic: a crash never leaves a half-written cache
  return values


def subset(smiles: list[str], limit: Optional[int]) -> list[str]:
  """The first `limit` molecules of a fixed permutation (seed 0) of the file (all of them for None)."""
  order = np.random.default_rng(0).permutation(len(smiles))
  return [smiles[i] for i in order[: limit or len(smiles)]]


def read(cfg: MoleculeDataConfig) -> tuple[Split, Split, DatasetSpec]:
  """MOSES as token ids [N, T] uint8 with z-scored property vectors [N, P] float32 as labels.

  The vocabulary comes from the training subset; test molecules it cannot encode (a new token, or longer
  than the longest training molecule) are left out and counted in the log."""
  unknown = [p for p in cfg.properties if p not in PROPERTIES]
  if unknown or not cfg.properties:
    raise DataError(f"data.properties={list(cfg.properties)}: choose one or more of {list(PROPERTIES)}.")
  folder = find_files(cfg.manual_dir)
  syntax = Syntax(cfg.syntax)
  tokenize = smiles_lib.TOKENIZERS[syntax.value]
  strings = {}
  for split, limit in (("train", cfg.train_limit), ("test", cfg.test_limit)):
    selected = subset(read_smiles(folder / FILES[split]), limit)
    strings[split] = (selected, [tokenize(smiles_lib.to_selfies(s) if syntax == Syntax.selfies else s)
                                 for s in selected])
  vocab = smiles_lib.Vocabulary.build(strings["train"][1], syntax.value)
  columns = [PROPERTIES.index(p) for p in cfg.properties]
  splits, mean, std = {}, None, None
  for split in ("train", "test"):
    selected, tokens = strings[split]
    known = set(vocab.tokens)
    keep = [i for i, t in enumerate(tokens) if len(t) < vocab.length and known.issuperset(t)]
    if len(keep) < len(tokens):
      log.info("MOSES %s: %d of %d molecules left out (tokens or length outside the training vocabulary)",
               split, len(tokens) - len(keep), len(tokens))
    values = cached_properties([selected[i] for i in keep], split, cfg.data_dir)[:, columns]
    parsed = np.all(np.isfinite(values), axis=1)  # RDKit parses every MOSES molecule; a damaged file may not
    if not parsed.all():
      log.warning("MOSES %s: %d molecules RDKit cannot parse are left out", split, int((~parsed).sum()))
      keep, values = [i for i, ok in zip(keep, parsed) if ok], values[parsed]
    if mean is None:
      mean, std = values.mean(axis=0), values.std(axis=0)
      std = np.where(std > 0, std, 1.0)
    splits[split] = Split(vocab.encode([tokens[i] for i in keep]), ((values - mean) / std).astype(np.float32))
  spec = DatasetSpec(name="moses", shape=(vocab.length,), condition_size=len(columns), encoding=Encoding.tokens,
                     modality=Modality.tokens, condition=Condition.vector, condition_names=tuple(cfg.properties),
                     vocab=vocab.tokens,
                     condition_mean=tuple(float(m) for m in mean), condition_std=tuple(float(s) for s in std))
  return splits["train"], splits["test"], spec


def vocabulary(spec: DatasetSpec, syntax: Syntax) -> smiles_lib.Vocabulary:
  return smiles_lib.Vocabulary(spec.vocab, spec.shape[0], Syntax(syntax).value)


VOCAB_FILE = "vocab.json"  # in the run directory, beside the checkpoints


def save_or_check_vocabulary(workdir: Path, spec: DatasetSpec, syntax: Syntax) -> None:
  """Writes the run's vocabulary on its first start; later (resume, sampling) the data must give the same one,
  or the checkpoint's token ids would mean other tokens."""
  vocab, path = vocabulary(spec, syntax), Path(workdir) / VOCAB_FILE
  try:
    saved = smiles_lib.Vocabulary.load(path) if path.exists() else None
  except (OSError, ValueError, KeyError, TypeError) as e:  # damaged: the data's own is written (the same data
    kept = path.with_name(path.name + ".damaged")            # gives the same one), the damaged file kept aside
    path.rename(kept)
    log.warning("%s is unreadable (%s); kept as %s and written again from the data.", path, type(e).__name__, kept.name)
    saved = None
  if saved is None:
    vocab.save(path)
    return
  if saved != vocab:
    raise DataError(f"The data now gives a vocabulary ({vocab.size} tokens, length {vocab.length}) other than the "
                    f"one {path} was trained with ({saved.size} tokens, length {saved.length}): the MOSES files "
                    "or the data settings changed. Restore the files it was trained on, or train a new run.")



def check_config(cfg: Config) -> None:
  """Molecules are the molecule task's data (its generation metrics and vocabulary), and their condition is
  a property vector, not classes."""
  check(cfg.task == "molecules", "task", cfg.task, "data.name=moses holds molecules: use task=molecules "
        "(+experiment=molecules_cvae)")
  check(not cfg.data.exclude_classes, "data.exclude_classes", cfg.data.exclude_classes,
        "molecules have no classes to leave out")


register(DatasetEntry("moses", MoleculeDataConfig, read, encoding=lambda cfg: Encoding.tokens, check=check_config))
