"""A trained run as a Python object: `model = cvae_jax.load(run_dir)`.

    model = cvae_jax.load("outputs/smoke/2026-11-30/12-00-00")
    images = model.sample(16, condition=[7] * 16)     # uint8 [16, 28, 28, 1]: sixteen 7s (a CVAE)
    z = model.encode(x, labels)                       # posterior means [N, Z]
    model.decode(z, labels)                           # the likelihood's mean, in the data's units
    model.reconstruct(x, labels)
    model.translate(x, labels)                        # [N, K, ...]: each input redrawn as every class
    model.style_transfer(style_x, style_labels, content_labels)   # [S, C, ...]
    model.interpolate(x_a, x_b, steps=8, label_a=3, label_b=8)    # [steps, ...]
    model.log_likelihood(x, k=100, labels=labels)     # L_k per input, nats (log p(x | c) for a CVAE)
    model.anomaly_score(x)                            # higher = more anomalous (see the method)

Arrays go in and come out as NumPy in the dataset's own units. Images go in as the run's data holds them
(uint8 intensities 0..255, or 0/1 pixels for a run trained on statically binarized data; any integer or
bool array in that range is accepted) and come out as uint8 intensities 0..255: the decoder's mean (for
a binarized run, its pixel probabilities times 255; binarize them again before feeding them back). Signals
are float32, molecules SMILES strings (their condition: property values in their own units, or a dict
naming some). Every input is checked (shape, type, range, finite, the condition against the model) and a
bad one raises ValueError naming the argument. The computations are the ones the command lines run
(generate, evaluate and molecules load runs through this object; the estimators are those of evaluate);
encoding, decoding, sampling and the bounds compile once per input shape; the run's fixed keys are used
unless `seed` is given.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cvae_jax import estimators, experiment, generation, likelihoods
from cvae_jax.data import Condition, Encoding, Modality, model_input
from cvae_jax.data.smiles import TokenizeError, Vocabulary, tokenize_selfies, tokenize_smiles
from cvae_jax.estimators import Draw
from cvae_jax.evaluators import anomaly
from cvae_jax.keys import Stream, fold, stream_key
from cvae_jax.models.gru import sample_tokens


class Model:
  """A restored run: its config (`config`), data (`dataset`, `spec`), network (`network`) and parameters."""

  def __init__(self, workdir: str | Path):
    self.workdir = Path(workdir)
    self.restored = experiment.restore_run(self.workdir)
    self.config, self.dataset, self.task = self.restored.cfg, self.restored.dataset, self.restored.task
    self.spec, self.network, self.params = self.dataset.spec, self.restored.model, self.restored.params
    self.likelihood = likelihoods.of(self.config.objective)

  @property
  def normalized_likelihood(self) -> bool:
    """Whether log_likelihood bounds a normalized log-density (so nats and bits per dimension mean something)."""
    return self.likelihood.normalized(self.spec.encoding)

  def __repr__(self) -> str:
    kind = self.config.model.kind.value
    return (f"Model({str(self.workdir)!r}: a {kind} ({self.config.model.arch}) of {self.spec.name} "
            f"{self.spec.shape}, latent size {self.network.latent_size})")

  # ---- checks and conversions at the boundary -------------------------------------------------------
  def _inputs(self, x, name: str = "x") -> np.ndarray:
    """Inputs in the data's units -> the stored representation (uint8 images, float32 signals, token ids)."""
    if self.spec.modality == Modality.tokens:
      return self._token_ids(x, name)
    x = np.asarray(x)
    if x.ndim and len(x) == 0:
      raise ValueError(f"{name} holds no inputs (its first axis is empty)")
    shape = self.spec.shape
    if x.ndim == len(shape) and shape[-1] == 1 and x.shape[1:] == shape[:-1]:
      x = x[..., None]  # grayscale images given as [N, H, W]
    if x.ndim != len(shape) + 1 or x.shape[1:] != shape:
      raise ValueError(f"{name} has shape {x.shape}; this model takes [N, {', '.join(map(str, shape))}] "
                       f"({self.spec.modality.value}s of {self.spec.name})")
    if self.spec.encoding == Encoding.real:
      if not np.issubdtype(x.dtype, np.floating) or not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must hold finite floats (signals); got {x.dtype} with NaN, inf or non-float values")
      return x.astype(np.float32)
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
      raise ValueError(f"{name} has dtype {x.dtype}; images go in as uint8 intensities 0..255 (convert floats in "
                       "[0, 1] with (x * 255).round().astype(np.uint8))")
    top = 1 if self.spec.encoding in (Encoding.static_binary, Encoding.packed_binary) else 255
    if x.size and (x.min() < 0 or x.max() > top):
      if top == 1:
        raise ValueError(f"{name} holds values up to {x.max()}: this run was trained on statically binarized "
                         "pixels (0 or 1); binarize the images first (cvae_jax.data.spec.static_binarize)")
      raise ValueError(f"{name} holds values in [{x.min()}, {x.max()}]; images are intensities 0..255")
    return x.astype(np.uint8)

  def _model_inputs(self, x, name: str = "x") -> jax.Array:
    """Checked inputs as the network reads them in the uses (intensities for dynamically binarized runs)."""
    return model_input(jnp.asarray(self._inputs(x, name)), self._encoding())

  def _token_ids(self, strings, name: str) -> np.ndarray:
    if isinstance(strings, str) or not all(isinstance(s, str) for s in strings) or not len(strings):
      raise ValueError(f"{name} must be a non-empty list of SMILES strings")
    vocab = self._vocabulary()
    syntax = vocab.syntax
    try:
      if syntax == "selfies":
        from cvae_jax.data.smiles import to_selfies
        return vocab.encode([tokenize_selfies(to_selfies(s)) for s in strings])
      return vocab.encode([tokenize_smiles(s) for s in strings])
    except (TokenizeError, ValueError) as e:
      raise ValueError(f"{name}: {e}") from None

  def _labels(self, labels, n: int, name: str = "labels") -> np.ndarray:
    """The condition of n inputs as the dataset stores it (class ids, or z-scored property vectors)."""
    if not self.network.condition_size:
      if labels is not None:
        raise ValueError(f"{name}: this model is a {self.config.model.kind.value}, which takes no condition; "
                         "leave it out")
      return np.zeros(n, np.int32)  # ignored by an unconditional model
    if labels is None:
      raise ValueError(f"{name} is required: this model is conditional ({self._condition_says()})")
    if self.spec.condition == Condition.classes:
      labels = np.broadcast_to(np.asarray(labels), (n,)) if np.ndim(labels) == 0 else np.asarray(labels)
      if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be {n} integer class ids (or one for all); got {labels.dtype} {labels.shape}")
      bad = labels[(labels < 0) | (labels >= self.spec.num_classes)]
      if bad.size:
        raise ValueError(f"{name} holds class {bad[0]}, which is not a class of {self.spec.name} "
                         f"(0..{self.spec.num_classes - 1})")
      return labels.astype(np.int32)
    return self._property_condition(labels, n, name)

  def _property_condition(self, values, n: int, name: str) -> np.ndarray:
    """Property values in their own units ([n, P], [P], or a dict naming some) -> z-scored conditions."""
    names = list(self.spec.condition_names)
    mean, std = np.asarray(self.spec.condition_mean), np.asarray(self.spec.condition_std)
    if isinstance(values, dict):
      from cvae_jax.tasks.molecules import targets_for  # the rest drawn from training molecules near them
      try:
        return targets_for(self.dataset, {k: float(v) for k, v in values.items()}, n, self.config.seed)
      except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    values = np.broadcast_to(np.asarray(values, np.float64), (n, len(names))) if np.ndim(values) == 1 else \
        np.asarray(values, np.float64)
    if values.shape != (n, len(names)) or not np.all(np.isfinite(values)):
      raise ValueError(f"{name} must be finite values of {names} per input ([{n}, {len(names)}]) or a dict")
    return ((values - mean) / std).astype(np.float32)

  def _condition_says(self) -> str:
    if self.spec.condition == Condition.classes:
      return f"pass class ids 0..{self.spec.num_classes - 1}"
    return f"pass values of {list(self.spec.condition_names)}"

  def _outputs(self, mean: jax.Array) -> np.ndarray:
    """The likelihood's mean -> the data's units: uint8 intensities for images, floats for signals."""
    mean = np.asarray(mean)
    if self.spec.modality == Modality.image:
      return np.clip(np.round(mean * 255.0), 0, 255).astype(np.uint8)
    return mean.astype(np.float32)

  def _key(self, seed: Optional[int], stream: Stream = Stream.FIGURES) -> jax.Array:
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**32):
      raise ValueError(f"seed must be an integer in [0, 2**32); got {seed!r}")
    return stream_key(self.config.seed if seed is None else int(seed), stream)

  def _needs_classes(self, what: str) -> None:
    if not (self.network.condition_size and self.spec.num_classes):
      raise ValueError(f"{what} needs a CVAE of classes; this run is a {self.config.model.kind.value} of "
                       f"{self.spec.name}")

  def _needs_means(self, what: str) -> None:
    if self.likelihood.mean is None:
      raise ValueError(f"{what} decodes means, which a {self.likelihood.name} likelihood (token data) does not "
                       "have: use sample(), or decode() for sampled sequences")

  # ---- what a user calls ----------------------------------------------------------------------------
  def encode(self, x, labels=None) -> np.ndarray:
    """E_q[z | x, c]: the posterior means [N, Z] (the codes figures use)."""
    x = self._inputs(x)
    c = self._labels(labels, len(x))
    return np.asarray(self._jitted("encode")(self.params, jnp.asarray(x), c))

  def decode(self, z, labels=None, seed: Optional[int] = None):
    """Codes [N, Z] -> the likelihood's mean in the data's units (molecules: sampled SMILES)."""
    z = np.asarray(z, np.float32)
    if z.ndim != 2 or z.shape[1] != self.network.latent_size or not np.all(np.isfinite(z)):
        raise ValueError(f"z must be finite floats [N, {self.network.latent_size}]; got {z.shape}")
    c = self._labels(labels, len(z))
    if self.spec.modality == Modality.tokens:
      return self._sample_tokens(z, c, seed)
    return self._outputs(self._jitted("decode")(self.params, jnp.asarray(z), c))

  def sample(self, n: int, condition=None, temperature: float = 1.0, seed: Optional[int] = None):
    """n draws z ~ N(0, temperature^2 I) decoded (under `condition`: class ids, or property values)."""
    if not _is_int(n) or n < 1:
      raise ValueError(f"n must be a positive integer; got {n!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)) or \
        not np.isfinite(temperature) or temperature < 0:
      raise ValueError(f"temperature must be a number >= 0; got {temperature!r}")
    if not self.network.stochastic:
      raise ValueError("a plain autoencoder (model.kind=ae) has no prior to sample from")
    c = self._labels(condition, n, "condition")
    z = temperature * np.asarray(jax.random.normal(self._key(seed), (n, self.network.latent_size)))
    if self.spec.modality == Modality.tokens:
      return self._sample_tokens(z, c, seed)
    return self._outputs(self._jitted("decode")(self.params, jnp.asarray(z), c))

  def reconstruct(self, x, labels=None):
    """decode(encode(x)): each input through its posterior mean."""
    return self.decode(self.encode(x, labels), labels)

  def translate(self, x, labels) -> np.ndarray:
    """[N, K, ...]: each input's code (encoded under its own label) decoded under every class."""
    self._needs_classes("translate")
    self._needs_means("translate")
    x = self._model_inputs(x)
    c = self._labels(labels, len(x))
    return self._outputs(generation.translate(self.network, self.params, self.spec, x, c, self.likelihood))

  def style_transfer(self, style_x, style_labels, content_labels) -> np.ndarray:
    """[S, C, ...]: the style (code) of each style input rendered as each content label's class."""
    self._needs_classes("style_transfer")
    self._needs_means("style_transfer")
    x = self._model_inputs(style_x, "style_x")
    s = self._labels(style_labels, len(x), "style_labels")
    if not np.size(content_labels):
      raise ValueError("content_labels holds no class")
    content = self._labels(content_labels, len(np.atleast_1d(content_labels)), "content_labels")
    return self._outputs(generation.style_transfer(self.network, self.params, self.spec, x, s, content,
                                                   self.likelihood))

  def interpolate(self, x_a, x_b, steps: int = 8, label_a=None, label_b=None) -> np.ndarray:
    """[steps, ...]: decodes (1 - t) z_a + t z_b (and the labels' conditions alike) for t in [0, 1]."""
    self._needs_means("interpolate")
    if not isinstance(steps, (int, np.integer)) or steps < 2:
      raise ValueError(f"steps must be an integer >= 2; got {steps!r}")
    a, b = self._model_inputs(np.stack([np.asarray(x_a), np.asarray(x_b)]), "x_a and x_b")
    label_a = self._labels(None if label_a is None else [label_a], 1, "label_a")[0]
    label_b = self._labels(None if label_b is None else [label_b], 1, "label_b")[0]
    return self._outputs(generation.interpolate(self.network, self.params, self.spec, a, label_a, b, label_b, steps,
                                                self.likelihood))

  def log_likelihood(self, x, k: int = 100, labels=None, seed: Optional[int] = None) -> np.ndarray:
    """L_k (Burda et al. 2016) per input, in nats, chunked as the run's evaluation.batch_size and sample_chunk;
    with the run's own evaluation key by default, so the mean over the test split equals eval.json's iwae
    bound at the same k. A lower bound on log p(x) (log p(x | c) for a CVAE) only where the likelihood is
    a normalized density on these inputs (`normalized_likelihood`): not Bernoulli on grayscale pixels."""
    if not self.network.stochastic:
      raise ValueError("a plain autoencoder (model.kind=ae) has no likelihood bound; use anomaly_score")
    _check_k(k)
    x = self._inputs(x)
    c = self._labels(labels, len(x))
    bound = self._jitted("iwae", int(k))
    return np.asarray(bound(self.params, jnp.asarray(x), jnp.asarray(c), self._eval_key(seed)), np.float64)

  def anomaly_score(self, x, k: int = 100, seed: Optional[int] = None, llr_group: Optional[int] = None) -> np.ndarray:
    """Higher is more anomalous; the labels are not used (a detector does not know them). With the anomaly
    evaluator's key, so these are the scores of anomaly_scores.npz at the same k:
    a VAE's -L_k; a CVAE's -log sum_c p(c) exp(L_k(x | c)) with p(c) the training classes' frequencies;
    a plain autoencoder's reconstruction error (-log p(x | z = encoder mean)); with `llr_group` m, a
    hierarchy's llr>m (L_k minus the bound with its lowest m groups at their prior's mean)."""
    _check_k(k)
    x = self._inputs(x)
    if self.network.condition_size:
      self._needs_classes("anomaly_score")
    groups = ()
    if llr_group is not None:
      num_groups = len(self.network.group_sizes or ())
      if not 1 <= llr_group < num_groups:
        raise ValueError(f"llr>{llr_group} needs a hierarchy (model=hvae) with more than {llr_group} latent groups; "
                         f"this run's model has {num_groups or 'no'} groups")
      groups = (int(llr_group),)
    out = self._jitted("scores", int(k), groups)(self.params, jnp.asarray(x), jnp.zeros(len(x), jnp.int32),
                                                 self._key(seed, Stream.EVAL))  # the anomaly evaluator's key
    name = (f"llr>{llr_group}" if groups else "reconstruction" if not self.network.stochastic else
            "marginal_nll" if self.network.condition_size else "nll")
    return np.asarray(out[name], np.float64)

  # ---- internals ------------------------------------------------------------------------------------
  def _encoding(self) -> Encoding:
    # Dynamic binarization draws pixels at random; the figures and these uses read intensities as they are.
    # Packed binary data (dSprites) is stored 8 pixels to a byte; callers give its pixels as 0/1 images.
    if self.spec.encoding == Encoding.packed_binary:
      return Encoding.static_binary
    return Encoding.grayscale if self.spec.encoding == Encoding.dynamic_binary else self.spec.encoding

  def _eval_key(self, seed: Optional[int]) -> jax.Array:
    return fold(self._key(seed, Stream.EVAL), Draw.IWAE)

  def _jitted(self, what: str, k: int = 0, llr_groups: tuple = ()):
    """One compiled function per use (and k, and llr groups), built on first call and kept on this object:
    repeated calls do not retrace."""
    cache = self.__dict__.setdefault("_compiled", {})
    if (what, k, llr_groups) not in cache:
      cache[what, k, llr_groups] = self._build(what, k, llr_groups)
    return cache[what, k, llr_groups]

  def _build(self, what: str, k: int, llr_groups: tuple = ()):
    network, spec, likelihood, encoding = self.network, self.spec, self.likelihood, self._encoding()
    if what == "encode":
      return jax.jit(lambda params, x, labels: generation.encode_mean(network, params, spec,
                                                                     model_input(x, encoding), labels))
    if what == "decode":
      return jax.jit(lambda params, z, labels: generation.decode_mean(network, params, spec, z, labels, likelihood))
    if what == "tokens":
      return jax.jit(lambda params, z, c, key: sample_tokens(network, params, z, c, key, spec.shape[0]))
    ev = self.config.evaluation
    if what == "scores":
      prior = (anomaly.class_log_prior(self.dataset.train.labels, spec.num_classes) if network.condition_size
               else None)
      return anomaly.make_scores(network, spec, likelihood, k, ev.batch_size, ev.sample_chunk, prior, llr_groups)
    return estimators.make_iwae(network, spec, likelihood, k, ev.batch_size, ev.sample_chunk)

  def _vocabulary(self) -> Vocabulary:
    syntax = self.config.data.syntax
    return Vocabulary(self.spec.vocab, self.spec.shape[0], getattr(syntax, "value", syntax))

  def _sample_tokens(self, z, c, seed: Optional[int]) -> list[str]:
    vocab = self._vocabulary()
    cond = jnp.asarray(c) if self.network.condition_size else None
    ids = self._jitted("tokens")(self.params, jnp.asarray(z), cond, self._key(seed, Stream.EVAL))
    return vocab.to_smiles(vocab.decode(np.asarray(ids)))


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_k(k) -> None:
  if not _is_int(k) or k < 1:
    raise ValueError(f"k must be an integer >= 1; got {k!r}")


def load(workdir: str | Path) -> Model:
  """The run in `workdir` (a directory `python -m cvae_jax.train` wrote), at its latest checkpoint."""
  return Model(workdir)


__all__ = ["Model", "load"]
