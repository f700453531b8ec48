"""Conditional molecule generation (`task=molecules`, Lim et al. 2018): the density task on MOSES token
sequences, whose end of training samples molecules for target property values and scores them.

The run's vocabulary is kept beside its checkpoints (vocab.json) and checked on every resume and restore.
`python -m cvae_jax.molecules RUN_DIR` samples and scores again; --target samples for chosen values.

Metrics (as MOSES, Polykovskiy et al. 2020, computes them):
  validity        fraction of samples RDKit parses (an empty string is invalid)
  unique@1k/@10k  distinct canonical SMILES among the first 1,000 / 10,000 valid samples
  novelty         fraction of the distinct valid samples not in the training set (the subset trained on,
                  and all of MOSES train)
  invalid         (not MOSES's) the share of all samples RDKit rejects, by reason (INVALID_REASONS: open rings,
                  unbalanced branches, other syntax, valence, aromatic rings that do not kekulize)
MOSES's whole set (cvae_jax/tasks/moses_metrics.py: IntDiv, Filters, SNN, Frag, Scaf, FCD against its test
and scaffold-test sets) is computed on the unconditional samples, under "moses"; MOSES's protocol is 30,000
samples (`python -m cvae_jax.molecules RUN --samples 30000`).
Reconstruction accuracy: the fraction of test molecules decoded exactly, greedily, from the posterior mean.
Interpolation between test molecules in the latent space: tasks/molecule_space.py.
Property control: the targets are the property vectors of the first N test molecules (real, jointly
possible values; N = the samples asked for, at most the test split), one sample per target; the mean absolute error between target and RDKit's value over the
valid samples, per property in its own units. The unconditional baseline samples under conditions drawn
from the training molecules (x ~ p(x) = sum_c p(c) p(x | c), blind to the target) and is scored against
the same targets (its first N samples; validity, uniqueness and novelty use all of them): the ratio
says how much the condition controls the property. The hit rates count the valid samples within a tolerance of
their target (TOLERANCES), per property and for Lim et al.'s five at once.
"""
from __future__ import annotations

import csv
import enum
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cvae_jax.config import Config, check  # noqa: E402
from cvae_jax.data import Dataset, moses  # noqa: E402
from cvae_jax.data.smiles import TokenizeError, Vocabulary, tokenize_smiles  # noqa: E402
from cvae_jax.engine import rundir  # noqa: E402
from cvae_jax.keys import Stream, fold, stream_key  # noqa: E402
from cvae_jax.models import VAE  # noqa: E402
from cvae_jax.models.gru import sample_tokens  # noqa: E402
from cvae_jax.tasks import chemnet, molecule_space, moses_metrics  # noqa: E402
from cvae_jax.tasks.base import register  # noqa: E402
from cvae_jax.tasks.density import DensityTask  # noqa: E402

log = logging.getLogger(__name__)


class Sampling(enum.IntEnum):
  """The named parts below the FIGURES key of a molecule run (each batch of samples folds its index)."""
  CONDITIONAL = 0    # one sample per test target
  UNCONDITIONAL = 1  # the baseline, blind to the targets
  FIGURES = 2        # the samples of property_control.png and molecules.png
  TARGETS = 7        # python -m cvae_jax.molecules --target


class Draw(enum.IntEnum):
  """The named parts below one batch's sampling key."""
  Z = 0       # z ~ N(0, I)
  TOKENS = 1  # x_t ~ p(x_t | x_<t, z, c)


def canonical(smiles: Sequence[str]) -> list[Optional[str]]:
  """RDKit's canonical SMILES of each string, None where it is empty or does not parse."""
  from rdkit import Chem, RDLogger
  RDLogger.DisableLog("rdApp.*")
  out = []
  for s in smiles:
    mol = Chem.MolFromSmiles(s) if s else None
    out.append(Chem.MolToSmiles(mol) if mol is not None else None)
  return out


# Why RDKit rejects a SMILES string, in the order they are checked. The parser's: an empty string, a ring bond
# left open (a ring label used an odd number of times), branches that do not balance, any other syntax (a bond
# with no atom after it). Sanitization's: an atom beyond its allowed valence, aromatic rings that do not
# kekulize, anything else.
INVALID_REASONS = ("empty", "unclosed_ring", "unbalanced_branch", "syntax", "valence", "kekulize", "other")


def invalid_reason(smiles: str) -> Optional[str]:
  """Which of INVALID_REASONS makes RDKit reject a SMILES string; None when it is valid (as validity counts)."""
  from rdkit import Chem
  if not smiles:
    return "empty"
  if moses_metrics.molecule(smiles) is not None:
    return None
  mol = Chem.MolFromSmiles(smiles, sanitize=False)
  if mol is None:
    try:
      tokens = tokenize_smiles(smiles)
    except TokenizeError:
      return "syntax"
    rings = [t for t in tokens if t.isdigit() or t.startswith("%")]
    if any(rings.count(label) % 2 for label in set(rings)):
      return "unclosed_ring"
    depth = 0
    for t in tokens:
      depth += (t == "(") - (t == ")")
      if depth < 0:
        return "unbalanced_branch"
    return "unbalanced_branch" if depth else "syntax"
  problems = [p.GetType() for p in Chem.DetectChemistryProblems(mol)] or ["other"]
  if problems[0] == "AtomValenceException":
    return "valence"
  return "kekulize" if "Kekulize" in problems[0] else "other"


def generation_metrics(samples: Sequence[str], training: set[str], all_training: Optional[set[str]] = None) -> dict:
  """validity, unique@1k, unique@10k and novelty of sampled SMILES (see the module docstring), and under
  "invalid" the share of all samples rejected for each of INVALID_REASONS."""
  valid, result = moses_metrics.validity_and_uniqueness(samples)
  result["validity"], result["valid"] = result.pop("valid"), len(valid)  # this report names the fraction validity
  reasons = [invalid_reason(s) for s in samples]
  result["invalid"] = {r: reasons.count(r) / max(len(samples), 1) for r in INVALID_REASONS}
  distinct = set(valid)
  result["novelty"] = len(distinct - training) / len(distinct) if distinct else 0.0
  if all_training is not None:
    result["novelty_all_moses_train"] = len(distinct - all_training) / len(distinct) if distinct else 0.0
  return result


# A sample hits its target when RDKit's value is within: MW and TPSA +-10 % of the target, LogP +-0.5, H-bond
# donors and acceptors exactly, QED +-0.05. "all" asks it of Lim et al.'s five (MW, LogP, TPSA, HBD, HBA) at once,
# those of them the run is conditioned on.
TOLERANCES = {"mw": ("relative", 0.10), "logp": ("absolute", 0.5), "tpsa": ("relative", 0.10),
              "hbd": ("absolute", 0.0), "hba": ("absolute", 0.0), "qed": ("absolute", 0.05)}
LIM_PROPERTIES = ("mw", "logp", "tpsa", "hbd", "hba")


def property_errors(samples: Sequence[str], targets: np.ndarray, names: Sequence[str]) -> dict:
  """Mean absolute error between each valid sample's RDKit properties and its target row, per property, and the
  share of valid samples within each property's tolerance (TOLERANCES) and within all of Lim et al.'s five."""
  values = moses.properties_of(samples, names)
  ok = np.all(np.isfinite(values), axis=1)
  errors = np.abs(values[ok] - targets[ok])
  hits = np.stack([errors[:, j] <= (TOLERANCES[p][1] * np.abs(targets[ok, j]) if TOLERANCES[p][0] == "relative"
                                    else TOLERANCES[p][1]) + 1e-6  # the targets come back from z-scores: rounding
                   for j, p in enumerate(names)], axis=1) if ok.any() else np.zeros((0, len(names)), bool)
  five = [j for j, p in enumerate(names) if p in LIM_PROPERTIES]
  return {"mae": {p: float(e) for p, e in zip(names, errors.mean(axis=0))} if ok.any() else {},
          "hit_rate": {p: float(h) for p, h in zip(names, hits.mean(axis=0))} if ok.any() else {},
          "hit_rate_all": float(np.all(hits[:, five], axis=1).mean()) if ok.any() and five else float("nan"),
          "scored": int(ok.sum())}


def make_sampler(model: VAE, length: int, batch_size: int = 1000, temperature: float = 1.0):
  """sample(params, conditions [N, P] or None, n, key) -> token ids [N, length], jitted per batch; z ~ N(0, I)
  and the tokens at `temperature` (sample_tokens)."""
  @jax.jit
  def sample_batch(params, c, key):
    n = batch_size if c is None else c.shape[0]
    z = jax.random.normal(fold(key, Draw.Z), (n, model.latent_size))
    return sample_tokens(model, params, z, c, fold(key, Draw.TOKENS), length, temperature)

  def sample(params, conditions, n, key):
    out = []
    for i, start in enumerate(range(0, n, batch_size)):
      c = None if conditions is None else jnp.asarray(conditions[start:start + batch_size])
      if c is not None and c.shape[0] < batch_size:  # pad the last batch: one compiled shape
        c = jnp.concatenate([c, jnp.zeros((batch_size - c.shape[0], c.shape[1]), c.dtype)])
      out.append(np.asarray(sample_batch(params, c, jax.random.fold_in(key, i))))
    return np.concatenate(out)[:n]

  return sample


def reconstruction_accuracy(cfg: Config, ds: Dataset, model: VAE, params, n: int, batch_size: int = 1000) -> dict:
  """The fraction of the first n test molecules decoded exactly (every token up to the end token) by greedy
  decoding from the posterior mean (and the molecule's own condition, for a CVAE): how much of a molecule its
  code carries. A collapsed posterior gives the condition's most likely string for every code."""
  vocab = moses.vocabulary(ds.spec, cfg.data.syntax)
  n = min(n, len(ds.test))

  @jax.jit
  def decode(params, x, c):
    mean, _ = model.apply({"params": params}, x, c, method=VAE.encode)
    return sample_tokens(model, params, mean, c, jax.random.key(0), vocab.length, temperature=0.0)

  exact = 0
  for start in range(0, n, batch_size):
    x = ds.test.images[start:start + batch_size]
    c = ds.test.labels[start:start + batch_size] if model.condition_size else None
    size = len(x)
    if size < batch_size:  # one compiled shape: pad the last batch with its first row
      x = np.concatenate([x, np.repeat(x[:1], batch_size - size, 0)])
      c = None if c is None else np.concatenate([c, np.repeat(c[:1], batch_size - size, 0)])
    ids = np.asarray(decode(params, jnp.asarray(x), None if c is None else jnp.asarray(c)))[:size]
    exact += sum(a == b for a, b in zip(vocab.decode(ids), vocab.decode(x[:size])))
  return {"reconstruction_accuracy": exact / max(n, 1), "reconstructed_of": n}


def moses_references(manual_dir: Optional[str]) -> dict:
  """MOSES's test and scaffold-test statistics ({} with a warning where the MOSES data lacks them)."""
  folder = moses.find_files(manual_dir)
  try:
    return {name: moses_metrics.load_reference(folder, name) for name in moses_metrics.REFERENCES}
  except FileNotFoundError as e:
    log.warning("SNN, Frag, Scaf and FCD are left out: %s", e)
    return {}


def chemnet_activations():
  """chemnet.activations, or None with a warning where ChemNet's weights are not installed (FCD left out)."""
  try:
    chemnet.load()
  except chemnet.ChemNetError as e:
    log.warning("FCD is left out: %s", e)
    return None
  return chemnet.activations


def evaluate_generation(cfg: Config, ds: Dataset, model: VAE, params, workdir: Path, num_samples: int,
                        temperature: float = 1.0) -> dict:
  """Samples num_samples molecules under test-set targets (and, for a CVAE, unconditionally) at `temperature`,
  scores them, MOSES's whole metric set on the unconditional ones, writes molecules.json, samples.csv and the
  figures. Returns the summary."""
  t0 = time.perf_counter()
  spec = ds.spec
  vocab = moses.vocabulary(spec, cfg.data.syntax)
  names = list(spec.condition_names)
  sample = make_sampler(model, vocab.length, temperature=temperature)
  key = stream_key(cfg.seed, Stream.FIGURES)
  to_smiles = lambda ids: vocab.to_smiles(vocab.decode(ids))
  all_train_smiles = moses.read_smiles(moses.find_files(cfg.data.manual_dir) / moses.FILES["train"])
  training = set(moses.subset(all_train_smiles, cfg.data.train_limit))  # the molecules trained on
  all_training = set(all_train_smiles)
  n = min(num_samples, len(ds.test))  # one conditional sample per test target
  result = {"num_samples": num_samples, "temperature": temperature, "properties": names, "syntax": vocab.syntax}
  rows = []
  if model.condition_size:
    targets_z = ds.test.labels[:n]
    targets = moses.in_property_units(spec, targets_z)
    conditional = to_smiles(sample(params, targets_z, n, fold(key, Sampling.CONDITIONAL)))
    # The baseline: conditions of randomly chosen training molecules, blind to the targets.
    pick = np.random.default_rng(cfg.seed).integers(0, len(ds.train), num_samples)
    unconditional = to_smiles(sample(params, ds.train.labels[pick], num_samples, fold(key, Sampling.UNCONDITIONAL)))
    result["conditional"] = generation_metrics(conditional, training, all_training)
    result["conditional"] |= property_errors(conditional, targets, names)
    result["unconditional"] = generation_metrics(unconditional, training, all_training)
    result["unconditional"] |= property_errors(unconditional[:n], targets, names)
    result["mae_ratio"] = {p: result["conditional"]["mae"][p] / result["unconditional"]["mae"][p] for p in names
                           if result["unconditional"]["mae"].get(p)}
    rows = [{"kind": "conditional", "smiles": s, **{f"target_{p}": float(v) for p, v in zip(names, t)}}
            for s, t in zip(conditional, targets)]
    rows += [{"kind": "unconditional", "smiles": s} for s in unconditional]
  else:
    unconditional = to_smiles(sample(params, None, num_samples, fold(key, Sampling.UNCONDITIONAL)))
    result["unconditional"] = generation_metrics(unconditional, training, all_training)
    rows = [{"kind": "unconditional", "smiles": s} for s in unconditional]
  result["moses"] = moses_metrics.metrics(unconditional, all_training, moses_references(cfg.data.manual_dir),
                                          chemnet_activations())
  result |= reconstruction_accuracy(cfg, ds, model, params, n)
  result["interpolation"] = molecule_space.interpolate(cfg, ds, model, params)
  if cfg.training.figures and model.condition_size:
    result["figures"] = [p.name for p in write_figures(workdir / "figures", cfg, ds, model, params, sample, vocab,
                                                       unconditional, fold(key, Sampling.FIGURES))]
  result["wall_time"] = time.perf_counter() - t0
  write_samples(workdir / "samples.csv", rows, names)
  rundir.write_json_atomic(workdir / "molecules.json", result)
  return result


def targets_for(ds: Dataset, named: dict[str, float], n: int, seed: int, neighbours: int = 1000) -> np.ndarray:
  """[n, P] z-scored conditions: the named properties at their values, the others those of training molecules
  drawn from the `neighbours` nearest to the named values (z-scored Euclidean distance)."""
  names = list(ds.spec.condition_names)
  unknown = [p for p in named if p not in names]
  if unknown:
    raise ValueError(f"--target {unknown[0]}: the run is conditioned on {names}; name one of those")
  mean, std = np.asarray(ds.spec.condition_mean), np.asarray(ds.spec.condition_std)
  columns = [names.index(p) for p in named]
  values = (np.asarray(list(named.values())) - mean[columns]) / std[columns]
  distance = np.sum((ds.train.labels[:, columns] - values) ** 2, axis=1)
  nearest = np.argsort(distance)[:neighbours]
  conditions = ds.train.labels[np.random.default_rng(seed).choice(nearest, n)].copy()
  conditions[:, columns] = values
  return conditions.astype(np.float32)


def sample_for_targets(cfg: Config, ds: Dataset, model: VAE, params, named: dict[str, float], n: int) -> dict:
  """n molecules for the named property values; returns the SMILES and, over the valid ones, RDKit's mean and
  standard deviation of every conditioned property, with validity and uniqueness."""
  vocab = moses.vocabulary(ds.spec, cfg.data.syntax)
  conditions = targets_for(ds, named, n, cfg.seed)
  ids = make_sampler(model, vocab.length)(params, conditions, n, stream_key(cfg.seed, Stream.FIGURES, Sampling.TARGETS))
  samples = vocab.to_smiles(vocab.decode(ids))
  names = list(ds.spec.condition_names)
  values = moses.properties_of(samples, names)
  ok = np.all(np.isfinite(values), axis=1)
  achieved = {p: {"target": named.get(p), "mean": float(values[ok, j].mean()) if ok.any() else None,
                  "std": float(values[ok, j].std()) if ok.any() else None} for j, p in enumerate(names)}
  distinct = set(canonical([s for s, good in zip(samples, ok) if good]))
  return {"smiles": samples, "validity": float(ok.mean()), "unique": len(distinct) / max(int(ok.sum()), 1),
          "properties": achieved}


def write_samples(path: Path, rows: list[dict], names: Sequence[str]) -> None:
  tmp = path.with_suffix(".csv.tmp")
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, ["kind", "smiles", *[f"target_{p}" for p in names]])
    writer.writeheader()
    writer.writerows(rows)
  tmp.replace(path)


def figure_targets(ds: Dataset, column: int, count: int = 3) -> np.ndarray:
  """Indices of test molecules at the 10th, 50th and 90th percentile of one property: the targets of the figures."""
  values = ds.test.labels[:, column]
  order = np.argsort(values)
  return order[(np.linspace(0.1, 0.9, count) * (len(order) - 1)).astype(int)]


def write_figures(directory: Path, cfg: Config, ds: Dataset, model: VAE, params, sample, vocab: Vocabulary,
                  unconditional: Sequence[str], key, per_target: int = 500) -> list[Path]:
  """property_control.png: per property, the distribution of RDKit values of samples under three targets
  (low, middle, high LogP when it is conditioned on) against the unconditional samples; molecules.png: a
  grid of valid samples, one row per target."""
  from rdkit import Chem, RDLogger
  from rdkit.Chem import Draw
  RDLogger.DisableLog("rdApp.*")  # invalid samples are expected; do not log each one
  directory.mkdir(parents=True, exist_ok=True)
  names = list(ds.spec.condition_names)
  column = names.index("logp") if "logp" in names else 0
  picks = figure_targets(ds, column)
  per_target_smiles = []
  for i, idx in enumerate(picks):
    c = np.repeat(ds.test.labels[idx][None], per_target, axis=0)
    per_target_smiles.append(vocab.to_smiles(vocab.decode(sample(params, c, per_target, jax.random.fold_in(key, i)))))
  base = moses.properties_of(list(unconditional)[:2000], names)
  per_target_values = [moses.properties_of(smiles, names) for smiles in per_target_smiles]
  targets = moses.in_property_units(ds.spec, ds.test.labels[picks])  # [3, P]
  train_values = moses.in_property_units(ds.spec, ds.train.labels)
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0))
  axes = np.atleast_1d(axes)
  colors = ["tab:blue", "tab:orange", "tab:green"]
  for j, (ax, name) in enumerate(zip(axes, names)):
    finite = base[:, j][np.isfinite(base[:, j])]
    low, high = np.quantile(train_values[:, j], [0.005, 0.995])  # the data's range
    bins = np.linspace(min(low, targets[:, j].min()), max(high, targets[:, j].max()), 31)
    ax.hist(finite, bins=bins, density=True, color="0.8", label="unconditional")
    for i, all_values in enumerate(per_target_values):
      values = all_values[:, j]
      ax.hist(values[np.isfinite(values)], bins=bins, density=True, histtype="step", color=colors[i], lw=1.5,
              label=f"target {i + 1}")
      ax.axvline(targets[i, j], color=colors[i], ls="--", lw=1)
    ax.set_title(moses.PROPERTY_LABELS[name])
    ax.set_yticks([])
  axes[0].legend(fontsize=7)
  fig.suptitle("RDKit properties of samples under three targets (dashed: target values)")
  fig.tight_layout()
  paths = [directory / "property_control.png", directory / "molecules.png"]
  fig.savefig(paths[0], dpi=80)
  plt.close(fig)
  mols, legends = [], []
  for i, smiles in enumerate(per_target_smiles):
    valid = [m for m in (Chem.MolFromSmiles(s) for s in smiles if s) if m is not None][:6]
    target = targets[i, column]
    mols += valid + [Chem.MolFromSmiles("")] * (6 - len(valid))
    legends += [f"target {i + 1}: {names[column]} {target:.2f}"] * 6
  Draw.MolsToGridImage(mols, molsPerRow=6, subImgSize=(220, 180), legends=legends).save(paths[1])
  return paths




class MoleculeTask(DensityTask):
  """The density task on molecules: no image figures; the vocabulary beside the checkpoints; molecules sampled
  and scored at the end of training (molecules.json, samples.csv, figures), summarized in results.json."""
  name = "molecules"

  def check(self, cfg: Config) -> None:
    check(cfg.data.name == "moses", "data.name", cfg.data.name, "task=molecules reads MOSES molecules: use data=moses "
          "(+experiment=molecules_cvae)")

  def on_start(self, workdir: Path, cfg: Config, ds: Dataset) -> None:
    moses.save_or_check_vocabulary(workdir, ds.spec, cfg.data.syntax)

  def figures(self, cfg: Config, ds: Dataset, model: VAE, params, workdir: Path) -> list[Path]:
    return []  # drawn with the samples (write_figures)

  def extend_results(self, cfg: Config, ds: Dataset, model: VAE, params, workdir: Path, results: dict) -> None:
    if model.stochastic:  # sample molecules: validity, uniqueness, novelty, property control
      generated = evaluate_generation(cfg, ds, model, params, workdir, cfg.evaluation.molecules)
      keep = ("conditional", "unconditional", "mae_ratio", "moses", "reconstruction_accuracy", "interpolation")
      results["molecules"] = {k: generated[k] for k in keep if k in generated}


register(MoleculeTask())
