"""Molecules (issue: conditional molecule generation): the tokenizer and vocabulary, the categorical
likelihood against closed forms, the GRU decoder's sampler against its own likelihood, RDKit properties
and MOSES metrics with known answers, the MOSES loader on a small file, and a whole run from the CLI."""
import csv
import gzip
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvae_jax.config import ConfigError
from cvae_jax.data import Condition, DataError, Dataset, DatasetSpec, Encoding, Modality, Split, moses, smiles
from cvae_jax.experiment import validate
from cvae_jax.likelihoods import categorical_log_prob
from cvae_jax.models import create_model, init_params
from cvae_jax.models.gru import sample_tokens
from cvae_jax.tasks import molecules
from conftest import REPO, small_config

# Real MOSES molecules (the first rows of its train.csv.gz) and a few more for variety.
SMILES = ["CCCS(=O)c1ccc2[nH]c(=NC(=O)OC)[nH]c2c1", "CC(C)(C)C(=O)C(Oc1ccc(Cl)cc1)n1ccnc1",
          "CC1C2CCC(C2)C1CN(CCO)C(=O)c1ccc(Cl)cc1", "Cc1c(Cl)cccc1Nc1ncccc1C(=O)OCC(O)CO",
          "Cn1cnc2c1c(=O)n(CC(O)CO)c(=O)n2C", "CC1Oc2ccc(Cl)cc2N(CC(O)CO)C1=O", "Cc1ccc(C(=O)Nc2ccccc2Br)cc1",
          "COc1ccc(-c2nc3ccccc3s2)cc1", "O=C(NCc1ccco1)c1cccc(F)c1", "CC(=O)Nc1ccc(S(=O)(=O)N2CCCC2)cc1",
          "N#Cc1ccc(NC(=O)C2CC2)cc1", "CCOC(=O)c1ccc(N)cc1"] * 3


def test_smiles_tokens_round_trip_and_bad_strings_are_named():
  assert smiles.tokenize_smiles("Clc1cc[nH]c1Br") == ["Cl", "c", "1", "c", "c", "[nH]", "c", "1", "Br"]
  assert smiles.tokenize_smiles("C%12CC%12") == ["C", "%12", "C", "C", "%12"]
  tokens = [smiles.tokenize_smiles(s) for s in SMILES]
  vocab = smiles.Vocabulary.build(tokens, "smiles")
  assert vocab.tokens[:3] == smiles.SPECIALS and vocab.length == max(map(len, tokens)) + 1
  ids = vocab.encode(tokens)
  assert ids.dtype == np.uint8 and ids.shape == (len(SMILES), vocab.length)
  assert vocab.decode(ids) == SMILES
  with pytest.raises(smiles.TokenizeError, match="outside the SMILES alphabet"):
    smiles.tokenize_smiles("CCÅ")
  with pytest.raises(smiles.TokenizeError, match="not in the vocabulary"):
    vocab.encode([["[Se]"]])
  with pytest.raises(smiles.TokenizeError, match="does not fit"):
    vocab.encode([["C"] * vocab.length])


def test_selfies_tokens_decode_to_the_same_molecule(tmp_path):
  strings = [smiles.to_selfies(s) for s in SMILES[:12]]
  vocab = smiles.Vocabulary.build([smiles.tokenize_selfies(s) for s in strings], "selfies")
  decoded = vocab.to_smiles(vocab.decode(vocab.encode([smiles.tokenize_selfies(s) for s in strings])))
  assert molecules.canonical(decoded) == molecules.canonical(SMILES[:12])
  vocab.save(tmp_path / "vocab.json")
  assert smiles.Vocabulary.load(tmp_path / "vocab.json") == vocab


def test_categorical_log_prob_matches_closed_forms():
  x = jnp.asarray([[5, 3, 2, 0, 0], [4, 2, 0, 0, 0]])  # tokens, end (2), padding (0, not scored)
  uniform = jnp.zeros((2, 5, 7))
  np.testing.assert_allclose(categorical_log_prob(x, uniform), [-3 * math.log(7), -2 * math.log(7)], rtol=1e-6)
  logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
  log_softmax = jax.nn.log_softmax(logits)
  expected = [log_softmax[0, 0, 5] + log_softmax[0, 1, 3] + log_softmax[0, 2, 2], log_softmax[1, 0, 4] + log_softmax[1, 1, 2]]
  np.testing.assert_allclose(categorical_log_prob(x, logits), expected, rtol=1e-6)


def _tiny_sequence_model(vocab_size=5, length=3, decoder_layers=1):
  spec = DatasetSpec("moses", (length,), 2, Encoding.tokens, Modality.tokens, Condition.vector,
                     vocab=tuple(str(i) for i in range(vocab_size)))
  cfg = small_config(**{"task": "molecules", "data.name": "moses", "model.arch": "gru", "model.kind": "cvae",
                        "objective.likelihood": "categorical", "model.rnn_size": 8, "model.embedding_size": 4,
                        "model.latent_size": 2, "model.decoder_layers": decoder_layers})
  model = create_model(cfg.model, spec)
  params = init_params(model, jax.random.key(0), jnp.zeros((1, length)), jnp.zeros((1, 2)), jax.random.key(1))
  params = jax.tree.map(lambda p: p * 3.0, params)  # sharper distributions: the frequencies differ clearly
  return model, params


def test_sampling_temperature_sharpens_the_first_token_and_zero_is_greedy():
  model, params = _tiny_sequence_model()
  n = 40_000
  z, c = jnp.full((n, 2), 0.3), jnp.full((n, 2), -0.5)
  first = model.apply({"params": params}, z[:1], c[:1], jnp.zeros((1, 3), jnp.int32), method=type(model).decode)[0, 0]
  for t in (0.5, 2.0):  # the first token's frequencies follow softmax(logits / t)
    tokens = np.asarray(sample_tokens(model, params, z, c, jax.random.key(3), 1, temperature=t))
    expected = np.asarray(jax.nn.softmax(first / t))
    observed = np.bincount(tokens[:, 0], minlength=5) / n
    assert np.max(np.abs(observed - expected) / np.sqrt(expected * (1 - expected) / n + 1e-12)) < 5
  greedy = np.asarray(sample_tokens(model, params, z[:4], c[:4], jax.random.key(4), 3, temperature=0.0))
  assert (greedy[:, 0] == int(jnp.argmax(first))).all() and (greedy == greedy[0]).all()
  with pytest.raises(ValueError, match="temperature"):
    sample_tokens(model, params, z[:1], c[:1], jax.random.key(0), 2, temperature=-1.0)


def test_word_dropout_acts_only_in_training_and_at_rate_one_hides_the_tokens():
  from cvae_jax.models.gru import GRUDecoder
  z, c = jnp.full((2, 2), 0.3), jnp.zeros((2, 0))
  x = jnp.asarray([[3, 4, 3, 2, 0], [4, 3, 4, 2, 0]])  # two strings of the same length
  plain, dropping = GRUDecoder(5, 4, 8), GRUDecoder(5, 4, 8, word_dropout=0.9999999)
  params = plain.init(jax.random.key(0), z, None, x)
  # No 'dropout' rng (evaluation, scoring): the decoder is the plain one.
  np.testing.assert_array_equal(dropping.apply(params, z, None, x), plain.apply(params, z, None, x))
  seen = plain.apply(params, z, None, x)
  hidden = dropping.apply(params, z, None, x, rngs={"dropout": jax.random.key(1)})
  # Every token after the start is dropped: both strings give the same logits; the start position is untouched.
  np.testing.assert_allclose(hidden[0], hidden[1], atol=1e-6)
  assert not np.allclose(seen[0], seen[1], atol=1e-3)
  np.testing.assert_allclose(hidden[:, 0], seen[:, 0], atol=1e-6)
  with pytest.raises(ConfigError, match="word_dropout"):
    validate(small_config(**{"task": "molecules", "data.name": "moses", "model.arch": "gru", "model.kind": "cvae",
                             "objective.likelihood": "categorical", "model.word_dropout": 1.0}))


def test_token_gru_computes_what_flax_gru_cells_compute_on_the_concatenated_inputs():
  import flax.linen as nn
  from cvae_jax.models.gru import TokenGRU
  b, t, v, e, s, h = 4, 7, 6, 3, 5, 8
  k = jax.random.split(jax.random.key(0), 5)
  tokens = jax.random.randint(k[0], (b, t), 0, v)
  embedding, context = jax.random.normal(k[1], (v, e)), jax.random.normal(k[2], (b, s))
  keep = jax.random.bernoulli(k[3], 0.7, (b, t))
  lengths, h0 = jnp.asarray([7, 3, 1, 5]), jax.random.normal(k[4], (b, h))
  ours = TokenGRU(h)
  params = ours.init(jax.random.key(1), h0, tokens, embedding, context)
  flax_rnn = lambda **kw: nn.RNN(nn.GRUCell(h), return_carry=True, **kw)
  inputs = jnp.concatenate([embedding[tokens] * keep[..., None], jnp.broadcast_to(context[:, None], (b, t, s))], -1)
  # The same parameter names and shapes as the cell (so runs saved with nn.GRUCell load) ...
  cell_params = nn.GRUCell(h).init(jax.random.key(2), h0, inputs[:, 0])["params"]
  assert jax.tree.map(jnp.shape, params["params"]) == jax.tree.map(jnp.shape, cell_params)
  reference = {"params": {"cell": params["params"]}}
  # ... and the same function: whole sequences, with word dropout's zeroed embeddings,
  carry, outputs = ours.apply(params, h0, tokens, embedding, context, keep=keep)
  want_carry, want_outputs = flax_rnn().apply(reference, inputs, initial_carry=h0)
  np.testing.assert_allclose(outputs, want_outputs, atol=1e-5)
  np.testing.assert_allclose(carry, want_carry, atol=1e-5)
  # the carry after each sequence's last token, forward and backward (nn.Bidirectional's halves),
  carry, _ = ours.apply(params, h0, tokens, embedding, context, lengths=lengths, keep=keep)
  np.testing.assert_allclose(carry, flax_rnn().apply(reference, inputs, initial_carry=h0, seq_lengths=lengths)[0], atol=1e-5)
  carry, _ = ours.apply(params, h0, tokens, embedding, context, lengths=lengths, reverse=True, keep=keep)
  backward = flax_rnn(reverse=True, keep_order=True).apply(reference, inputs, initial_carry=h0, seq_lengths=lengths)[0]
  np.testing.assert_allclose(carry, backward, atol=1e-5)
  # and one step, as the sampler runs it.
  step, same = ours.apply(params, h0, tokens[:, 0], embedding, context)
  first_inputs = jnp.concatenate([embedding[tokens[:, 0]], context], -1)
  np.testing.assert_allclose(step, nn.GRUCell(h).apply(params, h0, first_inputs)[0], atol=1e-5)
  np.testing.assert_array_equal(step, same)


def test_stacked_decoder_layers_compute_flax_gru_cells_on_the_layer_below():
  """DenseGRU (a stacked decoder's upper layers) is nn.RNN(nn.GRUCell) under the same parameters, over a
  sequence and for one step; a decoder of 2 layers is layer 1 (TokenGRU) then DenseGRU, from one start; and
  a stacked decoder's one-step path (sampling) agrees with its teacher-forced path (training, scoring)."""
  import flax.linen as nn
  from cvae_jax.models.gru import DenseGRU, GRUDecoder, TokenGRU
  b, t, d, h = 4, 6, 5, 8
  k = jax.random.split(jax.random.key(0), 3)
  inputs, h0 = jax.random.normal(k[0], (b, t, d)), jax.random.normal(k[1], (b, h))
  params = DenseGRU(h).init(k[2], h0, inputs)
  assert jax.tree.map(jnp.shape, params["params"]) == jax.tree.map(
      jnp.shape, nn.GRUCell(h).init(k[2], h0, inputs[:, 0])["params"])
  carry, outputs = DenseGRU(h).apply(params, h0, inputs)
  want_carry, want = nn.RNN(nn.GRUCell(h), return_carry=True).apply({"params": {"cell": params["params"]}}, inputs,
                                                                    initial_carry=h0)
  np.testing.assert_allclose(outputs, want, atol=1e-5)
  np.testing.assert_allclose(carry, want_carry, atol=1e-5)
  step, same = DenseGRU(h).apply(params, h0, inputs[:, 0])
  np.testing.assert_allclose(step, nn.GRUCell(h).apply(params, h0, inputs[:, 0])[0], atol=1e-5)
  np.testing.assert_array_equal(step, same)

  decoder = GRUDecoder(vocab_size=5, embedding_size=4, rnn_size=h, layers=2)
  z, c, x = jax.random.normal(k[0], (3, 2)), jax.random.normal(k[1], (3, 2)), jnp.asarray([[1, 2, 3], [4, 0, 1], [2, 2, 2]])
  p = decoder.init(k[2], z, c, x)["params"]
  zc = jnp.concatenate([z, c], -1)
  start = jnp.tanh(zc @ p["initial"]["kernel"] + p["initial"]["bias"])
  previous = jnp.concatenate([jnp.full((3, 1), smiles.BOS), x[:, :-1]], 1)
  _, lower = TokenGRU(h).apply({"params": p["cell"]}, start, previous, p["embed"]["embedding"], zc)
  _, upper = DenseGRU(h).apply({"params": p["upper_0"]}, start, lower)
  np.testing.assert_allclose(decoder.apply({"params": p}, z, c, x), upper @ p["logits"]["kernel"] + p["logits"]["bias"],
                             atol=1e-5)
  # Stepping a 3-layer decoder through x (the sampler's path) gives the teacher-forced logits at every position.
  model, params = _tiny_sequence_model(decoder_layers=3)
  tokens = jax.random.randint(k[2], (3, 3), 0, 5)
  teacher_forced = model.apply({"params": params}, z, c, tokens, method=type(model).decode)
  carry = model.apply({"params": params}, z, c, method=type(model).decoder_start)
  previous = jnp.full((3,), smiles.BOS)
  for t in range(3):
    carry, logits = model.apply({"params": params}, carry, previous, z, c, method=type(model).decoder_step)
    np.testing.assert_allclose(logits, teacher_forced[:, t], atol=1e-5)
    previous = tokens[:, t]
  with pytest.raises(ConfigError, match="decoder_layers"):
    validate(small_config(**{"task": "molecules", "data.name": "moses", "model.arch": "gru", "model.kind": "cvae",
                             "objective.likelihood": "categorical", "model.decoder_layers": 0}))


def _decoder_of_c():
  """A tiny CVAE over the tokens (specials, C, O), 5 slots, whose decoder ignores z and says 'C' in every slot."""
  vocab = (*smiles.SPECIALS, "C", "O")
  spec = DatasetSpec("moses", (5,), 2, Encoding.tokens, Modality.tokens, Condition.vector, vocab=vocab)
  cfg = small_config(**{"task": "molecules", "data.name": "moses", "model.arch": "gru", "model.kind": "cvae",
                        "objective.likelihood": "categorical", "model.rnn_size": 8, "model.embedding_size": 4,
                        "model.latent_size": 2})
  model = create_model(cfg.model, spec)
  params = init_params(model, jax.random.key(0), jnp.zeros((1, 5)), jnp.zeros((1, 2)), jax.random.key(1))
  params = jax.tree.map(jnp.zeros_like, params)
  params["decoder"]["logits"]["bias"] = jnp.zeros(5).at[3].set(10.0)  # 'C' in every slot
  return cfg, spec, model, params


def test_interpolation_of_a_decoder_that_ignores_z_stays_on_one_molecule():
  """A decoder that always says 'C' (z ignored: a collapsed posterior) decodes every point of every path to
  CCCCC (all 5 slots): validity 1 everywhere, one distinct molecule per path; only the path from CCCCC to
  CCCCC ends where it started and finished (1 of 2)."""
  from cvae_jax.tasks.molecule_space import interpolate
  cfg, spec, model, params = _decoder_of_c()
  cccc, cco = [3, 3, 3, 3, 3], [3, 3, 4, smiles.EOS, 0]
  split = Split(np.asarray([cccc, cccc, cccc, cco], np.uint8), np.zeros((4, 2), np.float32))
  got = interpolate(cfg, Dataset(spec, split, split), model, params, pairs=2, steps=5)
  assert got["validity_along_path"] == [1.0] * 5 and got["distinct_per_path"] == got["distinct_per_path_z_only"] == 1.0
  assert got["ends_reconstructed"] == 0.5 and got["example"] == ["CCCCC"] * 5
  assert math.isnan(got["neighbour_similarity"])
  with pytest.raises(ValueError, match="at least 1 pair and 2 steps"):
    interpolate(cfg, Dataset(spec, split, split), model, params, pairs=2, steps=1)


def test_latent_property_predictor_fits_a_known_function_and_optimization_has_a_random_baseline():
  from cvae_jax.tasks.molecule_space import fit_predictor, optimize
  z = np.random.default_rng(0).normal(size=(2000, 4)).astype(np.float32)
  y = 2 * z[:, 0] - z[:, 1] + 3
  predict, params, r2 = fit_predictor(z, y, steps=1500)
  assert r2 > 0.98
  np.testing.assert_allclose(np.asarray(predict(params, jnp.asarray(z[:5]))), y[:5], atol=0.3)
  # A decoder that ignores z decodes every start, moved or not, to CCCCC: valid, never better than CCCCC itself.
  cfg, spec, model, params = _decoder_of_c()
  params["encoder"]["mean"]["bias"] = jnp.asarray([0.5, -0.5])
  rows = np.asarray([[3, 3, 3, 3, 3], [3, 3, 4, smiles.EOS, 0], [3, 4, smiles.EOS, 0, 0], [3, 3, 3, 3, 3]], np.uint8)
  split = Split(rows, np.zeros((4, 2), np.float32))
  got = optimize(cfg, Dataset(spec, split, Split(rows[[0, 3]], np.zeros((2, 2), np.float32))), model, params,
                 prop="logp", fit=4, starts=2, steps=3)
  assert got["starts"] == 2 and got["fit"] == 4
  for way in ("gradient", "random"):
    assert got[way]["validity"] == 1.0 and got[way]["success"] == 0.0
  assert got["random"]["mean"] == pytest.approx(got["start_mean"])
  with pytest.raises(ValueError, match="choose one of"):
    optimize(cfg, Dataset(spec, split, split), model, params, prop="sa")


def test_reconstruction_accuracy_counts_exact_greedy_decodes():
  """A decoder that always says 'end' decodes every code to the empty string: the accuracy is the share of
  empty test strings, 3 of 7 here (batches of 4: the last one padded)."""
  model, params = _tiny_sequence_model()
  params = jax.tree.map(jnp.zeros_like, params)
  params["decoder"]["logits"]["bias"] = jnp.zeros(5).at[smiles.EOS].set(10.0)
  spec = DatasetSpec("moses", (3,), 2, Encoding.tokens, Modality.tokens, Condition.vector,
                     vocab=tuple(str(i) for i in range(5)))
  empty, three = [smiles.EOS, 0, 0], [3, smiles.EOS, 0]
  images = np.asarray([empty, three, three, empty, three, empty, three], np.uint8)
  split = Split(images, np.zeros((7, 2), np.float32))
  cfg = small_config(**{"task": "molecules", "data.name": "moses"})
  got = molecules.reconstruction_accuracy(cfg, Dataset(spec, split, split), model, params, n=7, batch_size=4)
  assert got == {"reconstruction_accuracy": 3 / 7, "reconstructed_of": 7}


@pytest.mark.parametrize("decoder_layers", [1, 3])
def test_sampler_draws_sequences_with_the_probabilities_the_decoder_scores(decoder_layers):
  """Sample 40k two-token prefixes from p(x | z, c) by ancestral sampling; their frequencies must match
  exp(log p) from the teacher-forced decoder (the likelihood used in training), for one GRU layer and for a
  stack (whose sampler steps every layer's state)."""
  model, params = _tiny_sequence_model(decoder_layers=decoder_layers)
  assert sum(name.startswith("upper_") for name in params["decoder"]) == decoder_layers - 1
  n = 40_000
  z, c = jnp.full((n, 2), 0.3), jnp.full((n, 2), -0.5)
  tokens = np.asarray(sample_tokens(model, params, z, c, jax.random.key(2), 2))
  grid = jnp.asarray([[a, b] for a in range(5) for b in range(5)])  # every two-token sequence
  logits = model.apply({"params": params}, z[:25], c[:25], grid, method=type(model).decode)
  log_p = jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), grid[..., None], -1)[..., 0], axis=1)
  expected = np.exp(np.asarray(log_p))
  np.testing.assert_allclose(expected.sum(), 1.0, rtol=1e-5)
  observed = np.bincount(tokens[:, 0] * 5 + tokens[:, 1], minlength=25) / n
  assert np.max(np.abs(observed - expected) / np.sqrt(expected * (1 - expected) / n + 1e-12)) < 5


def test_rdkit_properties_and_moses_metrics_have_known_values():
  mw, logp, tpsa, hbd, hba, qed = moses.molecule_properties("CCO")  # ethanol
  assert mw == pytest.approx(46.069, abs=1e-3) and tpsa == pytest.approx(20.23, abs=1e-2)
  assert (hbd, hba) == (1.0, 1.0) and 0 < qed < 1 and logp == pytest.approx(-0.0014, abs=1e-3)
  assert np.isnan(moses.molecule_properties("")).all() and np.isnan(moses.molecule_properties("C1CC")).all()
  samples = ["OCC", "CCO", "c1ccccc1", "C1CC", "", "CC(=O)O", "CC(=O)O"]  # 5 valid, 3 distinct, 2 in training
  m = molecules.generation_metrics(samples, training={"CCO", "c1ccccc1"})
  assert m["validity"] == pytest.approx(5 / 7) and m["unique@1k"] == pytest.approx(3 / 5)
  assert m["unique@1k_of"] == 5 and m["novelty"] == pytest.approx(1 / 3)
  # unique@k counts the first k valid samples only: 600 distinct chains, then the same 600 again.
  chains = ["C" * n for n in range(1, 601)]
  m = molecules.generation_metrics(chains + chains, training=set())
  assert (m["unique@1k"], m["unique@1k_of"], m["unique@10k"], m["unique@10k_of"]) == (0.6, 1000, 0.5, 1200)
  # Novelty compares canonical samples with the training strings as given (MOSES's are canonical SMILES).
  m = molecules.generation_metrics(["OCC", "CCCO", "CCCCO"], training={"CCO"}, all_training={"CCO", "CCCO"})
  assert (m["novelty"], m["novelty_all_moses_train"]) == (2 / 3, 1 / 3)
  assert molecules.generation_metrics(["CCO"], training=set())["validity"] == 1.0  # one sample
  none = molecules.generation_metrics(["", "C1CC"], training=set(), all_training=set())  # no valid sample
  assert (none["validity"], none["unique@1k"], none["unique@10k"], none["novelty"], none["novelty_all_moses_train"]) \
      == (0.0, 0.0, 0.0, 0.0, 0.0)
  assert molecules.generation_metrics(["C"] * 10001, training=set())["unique@10k_of"] == 10000
  errors = molecules.property_errors(["CCO", "", "C"], np.array([[40.0, 0.0], [0, 0], [20.0, 1.0]]), ["mw", "hbd"])
  assert errors["scored"] == 2
  assert errors["mae"]["mw"] == pytest.approx((6.069 + 3.957) / 2, abs=1e-3)
  assert errors["mae"]["hbd"] == pytest.approx(1.0)
  assert errors["hit_rate"] == {"mw": 0.0, "hbd": 0.0} and errors["hit_rate_all"] == 0.0
  # Hits: ethanol (MW 46.07, 1 donor) is within 10 % of MW 44 and has the 1 donor asked; methane (16.04, 0)
  # is within 10 % of MW 17 but not the 1 donor asked.
  hits = molecules.property_errors(["CCO", "C"], np.array([[44.0, 1.0], [17.0, 1.0]]), ["mw", "hbd"])
  assert hits["hit_rate"] == {"mw": 1.0, "hbd": 0.5} and hits["hit_rate_all"] == 0.5


def test_invalid_reasons_name_what_rdkit_rejects():
  cases = {"CCO": None, "C%10CC%10": None, "c1ccccc1": None, "": "empty", "C1CC": "unclosed_ring",
           "C1CCC2": "unclosed_ring", "C(C": "unbalanced_branch", "CC)C": "unbalanced_branch",
           "C1CC(C1": "unbalanced_branch", "CC=": "syntax", "C()C": "syntax", "C(C)(C)(C)(C)C": "valence",
           "FC(F)(F)(F)F": "valence", "c1cccc1": "kekulize", "cccc": "kekulize"}
  assert {s: molecules.invalid_reason(s) for s in cases} == cases
  samples = list(cases)  # 3 valid of 15; the shares are of all samples and sum to the invalid share
  m = molecules.generation_metrics(samples, training=set())
  assert set(m["invalid"]) == set(molecules.INVALID_REASONS)
  assert (m["invalid"]["unclosed_ring"], m["invalid"]["valence"], m["invalid"]["other"]) == (2 / 15, 2 / 15, 0.0)
  assert sum(m["invalid"].values()) == pytest.approx(1 - m["validity"]) and m["validity"] == pytest.approx(3 / 15)


@pytest.fixture
def moses_dir(tmp_path, monkeypatch):
  """A small MOSES-format folder (manual dir) and a private property cache."""
  folder = tmp_path / "manual" / "moses"
  folder.mkdir(parents=True)
  for name, rows in (("train.csv.gz", SMILES), ("test.csv.gz", SMILES[:10] + ["C[Se]C"])):
    with gzip.open(folder / name, "wt") as f:
      f.write("SMILES\n" + "".join(f"{s}\n" for s in rows))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "cache"))
  return folder.parent


def test_moses_loader_tokenizes_normalizes_and_caches(moses_dir, monkeypatch):
  cfg = small_config(**{"data.name": "moses", "data.manual_dir": str(moses_dir),
                        "data.properties": ["logp", "qed"]})
  train, test, spec = moses.read(cfg.data)
  assert train.images.shape == (len(SMILES), spec.shape[0]) and train.labels.shape == (len(SMILES), 2)
  assert len(test) == 10  # the [Se] molecule has a token training never saw: left out
  np.testing.assert_allclose(train.labels.mean(axis=0), 0, atol=1e-5)
  np.testing.assert_allclose(train.labels.std(axis=0), 1, rtol=1e-4)
  vocab = moses.vocabulary(spec, "smiles")
  assert sorted(vocab.decode(train.images)) == sorted(SMILES)
  qed = [moses.molecule_properties(s)[5] for s in vocab.decode(test.images)]
  np.testing.assert_allclose(test.labels[:, 1] * spec.condition_std[1] + spec.condition_mean[1], qed, rtol=1e-5)
  monkeypatch.setattr(moses, "compute_properties", lambda *a: pytest.fail("the cache was not used"))
  again = moses.read(cfg.data)
  np.testing.assert_array_equal(again[0].labels, train.labels)


def test_missing_moses_files_and_bad_settings_say_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setattr(moses.importlib.util, "find_spec", lambda name: None)
  monkeypatch.delenv("CVAE_JAX_MANUAL_DIR", raising=False)
  with pytest.raises(DataError, match="pip install --no-deps molsets"):
    moses.find_files(str(tmp_path))
  with pytest.raises(ConfigError, match="objective.likelihood"):
    validate(small_config(**{"data.name": "moses"}))
  with pytest.raises(ConfigError, match="model.arch"):
    validate(small_config(**{"data.name": "moses", "objective.likelihood": "categorical"}))
  with pytest.raises(ConfigError, match="task=molecules"):
    validate(small_config(**{"data.name": "moses", "objective.likelihood": "categorical", "model.arch": "gru"}))
  cfg = small_config(**{"data.name": "moses", "data.properties": ["color"]})
  with pytest.raises(DataError, match="data.properties"):
    moses.read(cfg.data)


@pytest.mark.integration
def test_a_molecule_run_trains_samples_scores_and_resamples_from_the_cli(moses_dir, tmp_path, env_for_cli,
                                                                              monkeypatch):
  env = dict(env_for_cli, CVAE_JAX_MANUAL_DIR=str(moses_dir), TFDS_DATA_DIR=str(tmp_path / "cache"))
  run = tmp_path / "run"
  command = [sys.executable, "-m", "cvae_jax.train", "+experiment=molecules_cvae", "data.train_limit=null",
             "data.test_limit=null", "training.epochs=2", "training.batch_size=8", "model.rnn_size=16",
             "model.embedding_size=8", "model.latent_size=4", "evaluation.molecules=20", "training.progress=false",
             f"hydra.run.dir={run}"]
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((run / "results.json").read_text())
  generated = json.loads((run / "molecules.json").read_text())
  assert generated["conditional"]["samples"] == 10  # one per test target (10 test molecules)
  assert generated["unconditional"]["samples"] == 20
  rows = list(csv.DictReader(open(run / "samples.csv")))
  for kind in ("conditional", "unconditional"):
    drawn = [r["smiles"] for r in rows if r["kind"] == kind]  # the samples themselves, scored again here
    valid = [s for s in molecules.canonical(drawn) if s is not None]
    assert generated[kind]["validity"] == len(valid) / len(drawn)
    assert generated[kind]["unique@1k"] == (len(set(valid)) / len(valid) if valid else 0.0)
    assert set(generated[kind]) >= {"unique@1k", "unique@10k", "novelty", "novelty_all_moses_train"}
  assert results["molecules"]["conditional"] == generated["conditional"]
  for p, ratio in generated["mae_ratio"].items():
    assert ratio == generated["conditional"]["mae"][p] / generated["unconditional"]["mae"][p]
  assert smiles.Vocabulary.load(run / "vocab.json").tokens[:3] == smiles.SPECIALS
  assert {"property_control.png", "molecules.png"} <= {p.name for p in (run / "figures").iterdir()}
  lines = (run / "samples.csv").read_text().splitlines()
  assert lines[0].startswith("kind,smiles,target_mw") and len(lines) == 1 + 10 + 20
  again = subprocess.run([sys.executable, "-m", "cvae_jax.molecules", str(run), "--samples", "4"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "conditional: validity=" in again.stdout
  assert json.loads((run / "molecules.json").read_text())["num_samples"] == 4
  assert "MOSES metrics (unconditional samples): " in again.stdout and "reconstruction accuracy" in again.stdout
  scored = json.loads((run / "molecules.json").read_text())
  assert {"samples", "valid", "unique@1k"} <= set(scored["moses"]) and 0 <= scored["reconstruction_accuracy"] <= 1
  assert (scored["moses"]["valid"] > 0) == ({"IntDiv", "IntDiv2", "Filters"} <= set(scored["moses"]))
  assert len(scored["interpolation"]["validity_along_path"]) == 11
  searched = subprocess.run([sys.executable, "-m", "cvae_jax.molecules", str(run), "--optimize", "qed"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
  assert searched.returncode == 0, searched.stderr[-3000:]
  found = json.loads((run / "optimization.json").read_text())
  assert found["property"] == "qed" and found["starts"] == 10 and set(found) >= {"gradient", "random"}
  chosen = subprocess.run([sys.executable, "-m", "cvae_jax.molecules", str(run), "--samples", "5", "--target",
                           "logp=2.5", "--target", "qed=0.8"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
  assert chosen.returncode == 0, chosen.stderr[-3000:]
  assert "logp: " in chosen.stdout and "target 2.5" in chosen.stdout
  assert len((run / "targets.csv").read_text().splitlines()) == 1 + 5
  vocab_file = run / "vocab.json"  # a vocabulary other than the checkpoint's is refused, and the file is kept
  original = vocab_file.read_text()
  vocab_file.write_text(original.replace('"length": ', '"length": 1'))
  refused = subprocess.run([sys.executable, "-m", "cvae_jax.molecules", str(run), "--samples", "2"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=600)
  assert refused.returncode == 1 and "vocabulary" in refused.stderr
  vocab_file.write_text(original)
  wrong = subprocess.run([sys.executable, "-m", "cvae_jax.molecules", str(run), "--target", "color=1"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
  assert wrong.returncode == 1 and "conditioned on" in wrong.stderr

  # The same run through the Python API: SMILES in, SMILES out, conditions in the properties' own units.
  import cvae_jax
  monkeypatch.setenv("CVAE_JAX_MANUAL_DIR", str(moses_dir))
  model = cvae_jax.load(run)
  drawn = model.sample(4, condition={"logp": 2.0}, seed=1)
  assert len(drawn) == 4 and all(isinstance(s, str) for s in drawn)
  assert drawn == model.sample(4, condition={"logp": 2.0}, seed=1)  # fixed keys
  assert model.encode(SMILES[:3], np.zeros((3, len(model.spec.condition_names)))).shape == (3, 4)
  with pytest.raises(ValueError, match="x: SMILES 'C!C' has characters outside"):
    model.encode(["C!C"], np.zeros((1, len(model.spec.condition_names))))
  with pytest.raises(ValueError, match="condition: --target color"):
    model.sample(2, condition={"color": 1.0})


def test_targets_keep_the_named_values_and_borrow_the_rest_from_near_training_molecules():
  from cvae_jax.data import Dataset, Split
  labels = np.array([[0.0, 10.0], [1.0, 20.0], [2.0, 30.0], [3.0, 40.0]], np.float32)  # z-scored already
  spec = DatasetSpec("moses", (5,), 2, Encoding.tokens, Modality.tokens, Condition.vector,
                     condition_names=("logp", "qed"), condition_mean=(1.0, 0.0), condition_std=(2.0, 1.0))
  ds = Dataset(spec, Split(np.zeros((4, 5), np.uint8), labels), Split(np.zeros((1, 5), np.uint8), labels[:1]))
  c = molecules.targets_for(ds, {"logp": 6.0}, n=50, seed=0, neighbours=2)  # logp 6 -> z = 2.5: rows 2 and 3
  np.testing.assert_array_equal(c[:, 0], 2.5)
  assert set(c[:, 1]) == {30.0, 40.0}
  with pytest.raises(ValueError, match="conditioned on"):
    molecules.targets_for(ds, {"mw": 300.0}, n=1, seed=0)
