"""MOSES's metrics and the JAX ChemNet against hand cases and closed forms: Tanimoto aggregates, internal
diversity, cosine similarity of counts, scaffolds, BRICS fragments, the filters, novelty; ChemNet's encoding,
padding, weight reader and layers against a plain NumPy implementation. With the MOSES data and fcd_torch's
weights installed, fingerprints and ChemNet are checked against the statistics MOSES ships."""
import collections
import math
import pickle
import struct
import sys
import types
from collections import Counter

import numpy as np
import pytest

from cvae_jax.tasks import chemnet, moses_metrics as M
from cvae_jax.evaluators.quality import gaussian_frechet_distance


def test_tanimoto_aggregates_and_internal_diversity_match_hand_values():
  a, b = np.array([1, 1, 0, 0], np.uint8), np.array([1, 0, 1, 0], np.uint8)  # Tanimoto(a, b) = 1 / 3
  ref = np.stack([a, b])
  assert M.mean_aggregated_tanimoto(ref, a[None], "max") == pytest.approx(1.0)
  assert M.mean_aggregated_tanimoto(ref, a[None], "mean") == pytest.approx(2 / 3)
  assert M.mean_aggregated_tanimoto(ref, a[None], "mean", p=2) == pytest.approx(math.sqrt((1 + 1 / 9) / 2))
  assert M.mean_aggregated_tanimoto(ref, ref, "max", chunk=1) == pytest.approx(1.0)  # chunks change nothing
  # IntDiv: 1 - the mean over the 4 ordered pairs (self-pairs included) of T = (1 + 1/3 + 1/3 + 1) / 4.
  assert M.internal_diversity(ref) == pytest.approx(1 / 3)
  assert M.internal_diversity(ref, p=2) == pytest.approx(1 - math.sqrt((2 + 2 / 9) / 4))
  empty = np.zeros((2, 4), np.uint8)  # two empty fingerprints are identical (MOSES sets 0/0 to 1)
  assert M.internal_diversity(empty) == pytest.approx(0.0)
  with pytest.raises(ValueError, match="agg"):
    M.mean_aggregated_tanimoto(ref, ref, "median")


def test_fingerprints_scaffolds_fragments_and_cosine_similarity():
  methane, ethanol = M.molecule("C"), M.molecule("CCO")
  fps = M.fingerprints([methane, ethanol])
  assert fps.shape == (2, 1024) and fps.dtype == np.uint8
  assert fps[0].sum() == 1  # one atom, no neighbours: one environment at radius 0
  assert fps[1].sum() > fps[0].sum()
  assert M.molecule("") is None and M.molecule("C1CC") is None and M.molecule("not a molecule") is None
  # Bemis-Murcko: the ring systems and the linker between them; fewer than 2 rings is no scaffold (MOSES).
  assert M.scaffold(M.molecule("Oc1ccccc1CCc1ccccc1")) == "c1ccc(CCc2ccccc2)cc1"
  assert M.scaffold(M.molecule("Cc1ccccc1")) is None and M.scaffold(M.molecule("CCO")) is None
  assert M.scaffolds([M.molecule("Oc1ccccc1CCc1ccccc1")] * 2 + [M.molecule("CCO")]) == Counter({"c1ccc(CCc2ccccc2)cc1": 2})
  # BRICS: benzene has no breakable bond, so it is its own fragment; an ester breaks into two labelled parts.
  assert M.fragments([M.molecule("c1ccccc1")] * 3) == Counter({"c1ccccc1": 3})
  parts = M.fragments([M.molecule("CCOC(=O)c1ccccc1")])
  assert sum(parts.values()) >= 2 and all("*" in p for p in parts)
  assert M.cosine_similarity(Counter(a=1, b=1), Counter(a=1)) == pytest.approx(1 / math.sqrt(2))
  assert M.cosine_similarity(Counter(a=2, b=4), Counter(a=1, b=2)) == pytest.approx(1.0)
  assert M.cosine_similarity(Counter(a=1), Counter(b=1)) == 0.0
  assert math.isnan(M.cosine_similarity(Counter(), Counter(a=1)))


@pytest.mark.parametrize("smiles, passes", [
    ("CCO", True), ("c1ccccc1", True), ("C1CCCCCC1", True),  # a 7-ring is allowed
    ("C1CCCCCCC1", False),    # a ring of 8
    ("CC[N+](C)(C)C", False),  # a charge
    ("CCP", False),           # phosphorus is not among the allowed atoms
    ("C=CC#N", False),        # MCF1: an acrylonitrile
    ("", False),              # not a molecule
])
def test_filters_follow_moses(smiles, passes):
  assert M.passes_filters(M.molecule(smiles)) is passes


def test_all_metrics_on_a_hand_set_and_against_its_own_reference():
  samples = ["CCO", "OCC", "", "C1CC", "c1ccccc1", "Oc1ccccc1CCc1ccccc1"]
  mols = [M.molecule(s) for s in ["CCO", "c1ccccc1", "Oc1ccccc1CCc1ccccc1"]]
  features = np.random.default_rng(0).normal(size=(5, 3))
  reference = {"SNN": {"fps": M.fingerprints(mols)}, "Frag": {"frag": M.fragments(mols)},
               "Scaf": {"scaf": M.scaffolds(mols)}, "FCD": {"mu": features.mean(0), "sigma": np.cov(features.T)}}
  got = M.metrics(samples, training={"CCO"}, references={"Test": reference}, chemnet_activations=lambda s: features)
  assert got["samples"] == 6 and got["valid"] == pytest.approx(4 / 6)
  assert got["unique@1k"] == pytest.approx(3 / 4) and got["unique@1k_of"] == 4
  assert got["novelty"] == pytest.approx(2 / 3)  # CCO is in training; benzene and the bibenzyl are not
  # Every valid sample is in the reference: nearest-neighbour similarity 1. The repeat of ethanol changes the
  # fragment counts' proportions (MOSES counts repeats), so Frag is below 1; Scaf has one scaffold in each.
  assert got["SNN/Test"] == pytest.approx(1.0) and got["Scaf/Test"] == pytest.approx(1.0)
  assert 0.5 < got["Frag/Test"] < 1.0
  assert got["FCD/Test"] == pytest.approx(0.0, abs=1e-9)
  assert got["Filters"] == 1.0
  fps = M.fingerprints([M.molecule(s) for s in ["CCO", "CCO", "c1ccccc1", "Oc1ccccc1CCc1ccccc1"]])
  assert got["IntDiv"] == pytest.approx(M.internal_diversity(fps))
  shifted = features + 1.0  # FCD of a shifted copy: the squared shift, 3 dimensions of 1
  got = M.metrics(samples, {"CCO"}, {"Test": reference}, chemnet_activations=lambda s: shifted)
  assert got["FCD/Test"] == pytest.approx(3.0)
  assert "FCD/Test" not in M.metrics(samples, set(), {"Test": reference})  # no ChemNet: no FCD
  nothing = M.metrics(["", "C1CC"], set(), {"Test": reference})
  assert (nothing["valid"], nothing["unique@10k"]) == (0.0, 0.0) and "SNN/Test" not in nothing


def test_missing_reference_statistics_say_how_to_install_them(tmp_path):
  with pytest.raises(FileNotFoundError, match="molsets"):
    M.load_reference(tmp_path, "Test")
  (tmp_path / "test_stats.npz").write_bytes(b"not an npz")
  with pytest.raises(FileNotFoundError, match="cannot be read"):
    M.load_reference(tmp_path, "Test")


def test_chemnet_encoding_and_padding_follow_fcd_torch():
  x = chemnet.one_hot("CCl[nH]Z") * 35  # Cl is one symbol; Z is unknown: X; then the end symbol '.'
  assert x.shape == (350, 35) and x.sum() == 8
  assert [chemnet.VOCAB[i] for i in x[:8].argmax(1)] == ["C", "Cl", "[", "n", "H", "]", "X", "."]
  long = chemnet.one_hot("C" * 400) * 35  # longer than 349 symbols: cut, the end symbol at the last position
  assert long.sum() == 350 and long[349].argmax() == chemnet.INDEX["."]
  assert chemnet._same_padding(350, 4, 2) == (1, 1) and chemnet._same_padding(175, 4, 2) == (1, 2)


def _write_legacy_torch(path, obj_with_arrays, monkeypatch):
  """A file in PyTorch's legacy save format holding `obj_with_arrays`, written without PyTorch: fake torch
  modules give the pickle the global names torch.save writes."""
  torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

  class FloatStorage:
    pass

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called while writing")

  FloatStorage.__module__, _rebuild_tensor_v2.__module__ = "torch", "torch._utils"
  FloatStorage.__qualname__, _rebuild_tensor_v2.__qualname__ = "FloatStorage", "_rebuild_tensor_v2"
  torch.FloatStorage, utils._rebuild_tensor_v2, torch._utils = FloatStorage, _rebuild_tensor_v2, utils
  monkeypatch.setitem(sys.modules, "torch", torch)
  monkeypatch.setitem(sys.modules, "torch._utils", utils)
  storages = {}

  class Tensor:
    def __init__(self, array):
      self.array = np.ascontiguousarray(array, np.float32)
      self.key = str(len(storages))
      storages[self.key] = self.array

    def __reduce__(self):
      strides = tuple(s // 4 for s in self.array.strides)
      return _rebuild_tensor_v2, (("storage", self), 0, self.array.shape, strides, False, collections.OrderedDict())

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "storage":
        return ("storage", FloatStorage, obj[1].key, "cpu", obj[1].array.size, None)
      return None

  def wrap(o):
    if isinstance(o, np.ndarray):
      return Tensor(o)
    if isinstance(o, dict):
      return type(o)((k, wrap(v)) for k, v in o.items())
    if isinstance(o, (list, tuple)):
      return type(o)(wrap(v) for v in o)
    return o

  with open(path, "wb") as f:
    pickle.dump(0x1950a86a20f9469cfc6c, f)
    pickle.dump(1001, f)
    pickle.dump({"little_endian": True}, f)
    Pickler(f).dump(wrap(obj_with_arrays))
    keys = sorted(storages)
    pickle.dump(keys, f)
    for key in keys:
      f.write(struct.pack("<q", storages[key].size) + storages[key].tobytes())


def _numpy_chemnet(layers, x):
  """ChemNet written out with loops: the reference for the JAX layers."""
  selu = lambda v: 1.0507009873554805 * np.where(v > 0, v, 1.6732632423543772 * (np.exp(v) - 1))
  sigmoid = lambda v: 1 / (1 + np.exp(-v))
  h = x.T  # [C, T]
  for kind, p, _, _ in layers[:2]:
    w = p["weight"]
    left, right = chemnet._same_padding(h.shape[1], 4, 2)
    padded = np.pad(h, ((0, 0), (left, right)))
    h = selu(np.stack([np.einsum("oik,ik->o", w, padded[:, t:t + 4]) for t in range(0, padded.shape[1] - 3, 2)], 1))
  seq = h.T  # [T, C]
  for _, p, _, _ in layers[2:]:
    seq = seq[::-1]
    hidden = p["weight_hh_l0"].shape[1]
    hh, cc, out = np.zeros(hidden), np.zeros(hidden), []
    for xt in seq:
      gates = p["weight_ih_l0"] @ xt + p["bias_ih_l0"] + p["weight_hh_l0"] @ hh + p["bias_hh_l0"]
      i, f, g, o = np.split(gates, 4)
      cc = sigmoid(f) * cc + sigmoid(i) * np.tanh(g)
      hh = sigmoid(o) * np.tanh(cc)
      out.append(hh)
    seq = np.stack(out)
  return seq[-1]


def test_chemnet_reads_legacy_weights_and_its_layers_equal_a_numpy_chemnet(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  small = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)
  conv = lambda o, i: ({"weight": small(o, i, 4)}, {"in_channels": i, "out_channels": o, "kernel_size": 4, "stride": 2},
                       {"activation": "selu", "padding": "same"})
  lstm = lambda d, h, last: ({"weight_ih_l0": small(4 * h, d), "weight_hh_l0": small(4 * h, h),
                              "bias_ih_l0": small(4 * h), "bias_hh_l0": small(4 * h)},
                             {"input_size": d, "hidden_size": h, "batch_first": True}, {"reverse": True, "last": last})
  config = [("Conv1d", conv(5, 35)), ("Conv1d", conv(4, 5)), ("LSTM", lstm(4, 3, False)), ("LSTM", lstm(3, 6, True))]
  path = tmp_path / "weights.pt"
  _write_legacy_torch(path, config, monkeypatch)
  monkeypatch.delitem(sys.modules, "torch")  # reading needs no torch
  layers = chemnet.read_legacy_torch(path)
  assert [kind for kind, *_ in layers] == ["Conv1d", "Conv1d", "LSTM", "LSTM"]
  np.testing.assert_array_equal(layers[3][1]["weight_hh_l0"], config[3][1][0]["weight_hh_l0"])
  assert layers[3][3] == {"reverse": True, "last": True}
  chemnet.load.cache_clear()
  smiles = ["CCO", "c1ccccc1Cl", "CC(=O)Nc1ccc(Br)cc1"]
  got = chemnet.activations(smiles, batch_size=2, path=str(path))
  want = np.stack([_numpy_chemnet(layers, chemnet.one_hot(s)) for s in smiles])
  np.testing.assert_allclose(got, want, atol=1e-5)
  chemnet.load.cache_clear()
  (tmp_path / "bad.pt").write_bytes(b"\x80\x04K\x01.")  # a pickle, but not PyTorch's
  with pytest.raises(chemnet.ChemNetError, match="fcd_torch"):
    chemnet.read_legacy_torch(tmp_path / "bad.pt")
  with pytest.raises(chemnet.ChemNetError, match="pip install --no-deps fcd_torch"):
    chemnet.find_weights(str(tmp_path / "missing.pt"))



def _installed(name):
  import importlib.util
  return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(not (_installed("moses") and _installed("fcd_torch")),
                    reason="needs `pip install --no-deps molsets==0.3.1 fcd_torch==1.0.7`")
def test_fingerprints_and_chemnet_reproduce_the_statistics_moses_ships():
  from cvae_jax.data import moses
  folder = moses.find_files(None)
  reference = M.load_reference(folder, "Test")
  test = moses.read_smiles(folder / "test.csv.gz")
  pick = np.random.default_rng(0).choice(len(test), 1000, replace=False)  # the file is ordered: draw at random
  mols = [M.molecule(test[i]) for i in pick]
  np.testing.assert_array_equal(M.fingerprints(mols), reference["SNN"]["fps"][pick])
  chemnet.load.cache_clear()
  act = chemnet.activations(M.canonical_valid([test[i] for i in pick]))
  mu, sd = reference["FCD"]["mu"], np.sqrt(np.diag(reference["FCD"]["sigma"]))
  # The mean of 1,000 draws is within sampling error of MOSES's mean: |z| averages 0.8 / sqrt(1000) = 0.025.
  assert np.abs((act.mean(0) - mu) / sd).mean() < 0.035
  assert gaussian_frechet_distance(act.mean(0), np.cov(act.T), mu, reference["FCD"]["sigma"]) < 2.0
