"""MOSES's metrics of generated molecules (Polykovskiy et al. 2020; molecularsets/moses, moses/metrics), with
MOSES's definitions, on lists of SMILES.

  valid        fraction of the samples RDKit parses and sanitizes (an empty string is invalid)
  unique@k     distinct canonical SMILES among the first k valid samples, over k (or over the valid samples
               when there are fewer than k: `unique@k_of` says how many)
  novelty      fraction of the distinct valid samples not in the training set
  IntDiv_p     1 - (mean over all ordered pairs of valid samples, self-pairs included, of T^p)^(1/p), T the
               Tanimoto similarity of Morgan fingerprints (radius 2, 1024 bits); p = 1 and 2
  Filters      fraction of the valid samples that pass MOSES's filters: MCF and PAINS substructures (the SMARTS
               files MOSES ships, vendored here), atoms among C N S O F Cl Br H, no charge, no ring of 8 or more
  SNN/ref      mean over the valid samples of the Tanimoto similarity to the nearest molecule of the reference
  Frag/ref     cosine similarity of the counts of BRICS fragments in the valid samples and in the reference
  Scaf/ref     cosine similarity of the counts of Bemis-Murcko scaffolds (scaffolds of fewer than 2 rings are
               left out, as MOSES does)
  FCD/ref      Fréchet ChemNet Distance (Preuer et al. 2018) between the valid samples' ChemNet activations and
               the reference's (chemnet.py)
Like MOSES, every metric after validity is over the valid samples with their repeats (a molecule sampled twice
counts twice), except uniqueness and novelty. The references are MOSES's test set and scaffold test set, as the
statistics MOSES ships with its data (test_stats.npz, test_scaffolds_stats.npz: fingerprints, fragment and
scaffold counts, ChemNet mean and covariance), so the numbers compare with the MOSES table.
"""
from __future__ import annotations

import csv
import functools
import pickle
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from cvae_jax import resources
from cvae_jax.evaluators.quality import gaussian_frechet_distance

MORGAN_RADIUS, MORGAN_BITS = 2, 1024
ALLOWED_ATOMS = frozenset({"C", "N", "S", "O", "F", "Cl", "Br", "H"})
REFERENCES = {"Test": "test_stats.npz", "TestSF": "test_scaffolds_stats.npz"}


def _rdkit():
  from rdkit import Chem, RDLogger
  RDLogger.DisableLog("rdApp.*")  # invalid samples are expected; do not log each one
  return Chem


def molecule(smiles: str):
  """RDKit's molecule, sanitized, or None (MOSES's get_mol)."""
  Chem = _rdkit()
  if not smiles:
    return None
  mol = Chem.MolFromSmiles(smiles)
  if mol is None:
    return None
  try:
    Chem.SanitizeMol(mol)
  except ValueError:
    return None
  return mol


def canonical_valid(samples: Sequence[str]) -> list[str]:
  """The canonical SMILES of the valid samples, in order, repeats kept."""
  Chem = _rdkit()
  return [Chem.MolToSmiles(m) for m in map(molecule, samples) if m is not None]


def validity_and_uniqueness(samples: Sequence[str]) -> tuple[list[str], dict]:
  """(the canonical valid samples, {samples, valid, unique@1k, unique@10k and how many each is over}); unique@k
  is 0 when no sample is valid."""
  valid = canonical_valid(samples)
  result: dict = {"samples": len(samples), "valid": len(valid) / max(len(samples), 1)}
  for k in (1000, 10000):
    first = valid[:k]
    result[f"unique@{k // 1000}k"] = len(set(first)) / len(first) if first else 0.0
    result[f"unique@{k // 1000}k_of"] = len(first)
  return valid, result


def fingerprints(mols: Sequence) -> np.ndarray:
  """[N, 1024] uint8 Morgan fingerprint bits, radius 2 (MOSES's 'morgan')."""
  from rdkit.Chem import rdFingerprintGenerator
  generator = rdFingerprintGenerator.GetMorganGenerator(radius=MORGAN_RADIUS, fpSize=MORGAN_BITS)
  out = np.zeros((len(mols), MORGAN_BITS), np.uint8)
  for i, mol in enumerate(mols):
    out[i] = generator.GetFingerprintAsNumPy(mol)
  return out


def mean_aggregated_tanimoto(reference: np.ndarray, generated: np.ndarray, agg: str, p: int = 1,
                             chunk: int = 1000) -> float:
  """For each generated fingerprint, the max or the power-p mean (mean T^p)^(1/p) of its Tanimoto similarity
  to every reference fingerprint; the mean of that over the generated set (MOSES's average_agg_tanimoto; two
  empty fingerprints have similarity 1)."""
  if agg not in ("max", "mean"):
    raise ValueError(f"agg must be 'max' or 'mean', not {agg!r}")
  generated = generated.astype(np.float32)
  total = np.zeros(len(generated))
  g_bits = generated.sum(1)
  for start in range(0, len(reference), chunk):
    ref = reference[start:start + chunk].astype(np.float32)
    both = ref @ generated.T  # [R, G] bits in common
    union = ref.sum(1)[:, None] + g_bits[None, :] - both
    with np.errstate(invalid="ignore", divide="ignore"):
      t = np.where(union > 0, both / union, 1.0)
    if agg == "max":
      total = np.maximum(total, t.max(0))
    else:
      total += (t ** p).sum(0)
  if agg == "mean":
    total = (total / len(reference)) ** (1 / p)
  return float(total.mean())


def internal_diversity(fps: np.ndarray, p: int = 1) -> float:
  return 1 - mean_aggregated_tanimoto(fps, fps, "mean", p)


def fragments(mols: Iterable) -> Counter:
  """Counts of BRICS fragments (canonical SMILES with their attachment points) over the molecules."""
  Chem = _rdkit()
  from rdkit.Chem import AllChem
  counts: Counter = Counter()
  for mol in mols:
    counts.update(Chem.MolToSmiles(AllChem.FragmentOnBRICSBonds(mol)).split("."))
  return counts


def scaffold(mol, min_rings: int = 2) -> Optional[str]:
  """The Bemis-Murcko scaffold's canonical SMILES; None for no scaffold or one of fewer than `min_rings` rings
  (MOSES's compute_scaffold: min_rings=2)."""
  Chem = _rdkit()
  from rdkit.Chem.Scaffolds import MurckoScaffold
  try:
    core = MurckoScaffold.GetScaffoldForMol(mol)
  except (ValueError, RuntimeError):
    return None
  smiles = Chem.MolToSmiles(core)
  return None if smiles == "" or core.GetRingInfo().NumRings() < min_rings else smiles


def scaffolds(mols: Iterable) -> Counter:
  counts = Counter(scaffold(m) for m in mols)
  counts.pop(None, None)
  return counts


def cosine_similarity(reference: Counter, generated: Counter) -> float:
  """Cosine similarity of two count vectors given as {key: count} (absent keys count 0); NaN if either is empty."""
  if not reference or not generated:
    return float("nan")
  keys = sorted(set(reference) | set(generated))
  r = np.array([reference.get(k, 0) for k in keys], np.float64)
  g = np.array([generated.get(k, 0) for k in keys], np.float64)
  return float(r @ g / np.linalg.norm(r) / np.linalg.norm(g))


@functools.lru_cache(maxsize=1)
def _filters():
  """MOSES's MCF and PAINS SMARTS (mcf.csv, wehi_pains.csv), compiled."""
  Chem = _rdkit()
  folder = resources.vendored_data_dir() / "moses_filters"
  with open(folder / "mcf.csv", newline="") as f:
    smarts = [row["smarts"] for row in csv.DictReader(f)]
  with open(folder / "wehi_pains.csv", newline="") as f:
    smarts += [row[0].strip() for row in csv.reader(f)]  # the quoted SMARTS is padded with spaces
  patterns = [Chem.MolFromSmarts(s) for s in smarts]
  if any(p is None for p in patterns):
    raise RuntimeError(f"a SMARTS pattern in {folder} does not parse; reinstall the package")
  return patterns


def passes_filters(mol) -> bool:
  """MOSES's mol_passes_filters: no ring of 8 or more atoms, no charged atom, only allowed atoms, no MCF or PAINS
  substructure (matched with explicit hydrogens), and a canonical SMILES that parses again."""
  Chem = _rdkit()
  if mol is None:
    return False
  if any(len(ring) >= 8 for ring in mol.GetRingInfo().AtomRings()):
    return False
  if any(atom.GetFormalCharge() != 0 for atom in mol.GetAtoms()):
    return False
  if any(atom.GetSymbol() not in ALLOWED_ATOMS for atom in mol.GetAtoms()):
    return False
  with_h = Chem.AddHs(mol)
  if any(with_h.HasSubstructMatch(p) for p in _filters()):
    return False
  smiles = Chem.MolToSmiles(mol, isomericSmiles=False)
  return bool(smiles) and Chem.MolFromSmiles(smiles) is not None


def load_reference(folder: Path, name: str) -> dict:
  """MOSES's statistics of a reference set (test_stats.npz or test_scaffolds_stats.npz in the molsets data):
  {'FCD': {'mu', 'sigma'}, 'SNN': {'fps'}, 'Frag': {'frag'}, 'Scaf': {'scaf'}, ...}. The file is a pickled dict
  (it holds Counters), so only read it from the molsets package or a folder you trust."""
  path = Path(folder) / REFERENCES[name]
  try:
    return np.load(path, allow_pickle=True)["stats"].item()
  except (OSError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
    raise FileNotFoundError(f"MOSES's reference statistics {path} cannot be read ({type(e).__name__}: {e}); they "
                            "come with the MOSES data: pip install --no-deps molsets==0.3.1") from e


def metrics(samples: Sequence[str], training: set[str], references: dict[str, dict],
            chemnet_activations=None) -> dict:
  """All the metrics above for sampled SMILES. `training`: canonical SMILES of the training set; `references`:
  {name: load_reference(...)}; `chemnet_activations(canonical_smiles) -> [N, 512]` (chemnet.activations) or None
  to leave FCD out."""
  valid, result = validity_and_uniqueness(samples)
  if not valid:
    return result
  distinct = set(valid)
  result["novelty"] = len(distinct - training) / len(distinct)
  mols = [molecule(s) for s in valid]
  fps = fingerprints(mols)
  result["IntDiv"] = internal_diversity(fps, 1)
  result["IntDiv2"] = internal_diversity(fps, 2)
  result["Filters"] = float(np.mean([passes_filters(m) for m in mols]))
  frag, scaf = fragments(mols), scaffolds(mols)
  activations = chemnet_activations(valid) if chemnet_activations is not None and len(valid) > 1 else None
  for name, ref in references.items():
    result[f"SNN/{name}"] = mean_aggregated_tanimoto(ref["SNN"]["fps"], fps, "max")
    result[f"Frag/{name}"] = cosine_similarity(ref["Frag"]["frag"], frag)
    result[f"Scaf/{name}"] = cosine_similarity(ref["Scaf"]["scaf"], scaf)
    if activations is not None:
      result[f"FCD/{name}"] = gaussian_frechet_distance(activations.mean(0), np.cov(activations, rowvar=False),
                                                        ref["FCD"]["mu"], ref["FCD"]["sigma"])
  return result
