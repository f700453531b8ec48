"""Typed configuration: the schema that Hydra merges YAML and overrides into.

Field names equal the command-line override names (`model.latent_size=5`). The dataclasses are not
frozen because Hydra merges into them; treat them as read-only once `validate` has passed.
Enums make OmegaConf reject unknown choices at composition time with the list of valid ones.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Optional

import flax.linen as nn


class Pixels(str, enum.Enum):
  grayscale = "grayscale"            # intensities in [0, 1]
  static_binary = "static_binary"    # one fixed Bernoulli(intensity) sample per image, drawn once
  dynamic_binary = "dynamic_binary"  # resampled every time a batch is drawn (Burda et al. 2016)
  real = "real"                      # real-valued signals used as they are (1-D sequences; Gaussian likelihood)
  tokens = "tokens"                  # token ids of strings (molecules: data.name=moses), categorical likelihood


class Kind(str, enum.Enum):
  vae = "vae"    # p(x|z) p(z)
  cvae = "cvae"  # p(x|z,c) p(z); c = one-hot class label fed to encoder and decoder
  ae = "ae"      # plain autoencoder of the same size: z = encoder mean, loss = reconstruction only (baseline)


class Arch(str, enum.Enum):
  mlp = "mlp"
  conv = "conv"
  gru = "gru"    # token sequences: GRU encoder, autoregressive GRU decoder (molecules)


class EpochLoop(str, enum.Enum):
  auto = "auto"    # steps for conv models on CPU (XLA:CPU runs convs in a loop body ~10x slower), else scan
  scan = "scan"    # the whole epoch as one compiled lax.scan
  steps = "steps"  # a host loop over the jitted step


class Likelihood(str, enum.Enum):
  bernoulli = "bernoulli"                        # exact on binary pixels; on grayscale = BCE (unnormalized)
  continuous_bernoulli = "continuous_bernoulli"  # normalized density on [0, 1] (Loaiza-Ganem & Cunningham 2019)
  gaussian = "gaussian"                          # N(mean, sigma^2) per dimension, both from the decoder (real data)
  categorical = "categorical"                    # softmax over a vocabulary per position (token sequences)


class KLSchedule(str, enum.Enum):
  constant = "constant"  # the KL weight is beta throughout
  linear = "linear"      # 0 -> beta over objective.kl_warmup_epochs, then beta (Bowman et al. 2016)
  cyclical = "cyclical"  # objective.kl_cycles ramps 0 -> beta, each rising over kl_cycle_ratio of its cycle (Fu et al. 2019)


class Task(str, enum.Enum):
  density = "density"      # model p(x) (VAE) or p(x | class) (CVAE): cvae_jax/training.py
  quadrants = "quadrants"  # predict the hidden quadrants of an image from the given ones (Sohn et al. 2015):
                           # cvae_jax/quadrants.py


class Estimator(str, enum.Enum):
  elbo = "elbo"  # the ELBO, its reconstruction term averaged over objective.samples draws of z ("VAE, k")
  iwae = "iwae"  # the k-sample importance-weighted bound L_k (Burda et al. 2016, "IWAE, k")


class Syntax(str, enum.Enum):
  smiles = "smiles"    # SMILES strings, one token per atom, bond, branch or ring digit
  selfies = "selfies"  # SELFIES (Krenn et al. 2020): every token string decodes to a valid molecule


class KLEstimator(str, enum.Enum):
  analytic = "analytic"  # the closed-form KL(q || p)
  sampled = "sampled"    # log q(z) - log p(z) at the drawn z: same expectation, noisier (Pyro's Trace_ELBO)


class OptimizerName(str, enum.Enum):
  adam = "adam"
  adagrad = "adagrad"  # Kingma & Welling 2014


class LRSchedule(str, enum.Enum):
  constant = "constant"
  burda = "burda"  # stage i = 0, 1, ... lasts 3^i epochs at learning_rate * 10^(-i/7) (Burda et al. 2016)


@dataclass
class DataConfig:
  name: str = "mnist"                # any TFDS dataset with `image` and `label` features
  pixels: Pixels = Pixels.grayscale  # how pixel intensities become model inputs
  validation_size: int = 0           # examples carved from the end of train for validation (0: none)
  train_limit: Optional[int] = None  # use only the first N training examples (tests, smoke runs)
  test_limit: Optional[int] = None   # use only the first N test examples
  binarization_seed: int = 0         # seed of the fixed sample for static binarization
  exclude_classes: list[int] = field(default_factory=list)  # labels left out of train and validation (anomaly
                                                           # detection: the test split keeps them)
  manual_dir: Optional[str] = None   # folder holding <name>/ with the official files (env CVAE_JAX_MANUAL_DIR)
  data_dir: Optional[str] = None     # TFDS data_dir for prepared datasets (env TFDS_DATA_DIR, ~/tensorflow_datasets)
  download: bool = False             # allow TFDS to download when no manual files are found
  # data.name=moses (molecules, cvae_jax/moses.py): the string syntax, and the RDKit properties that form the
  # CVAE's condition vector (z-scored with the training split's mean and std).
  syntax: Syntax = Syntax.smiles
  properties: list[str] = field(default_factory=lambda: ["mw", "logp", "tpsa", "hbd", "hba", "qed"])


@dataclass
class ModelConfig:
  kind: Kind = Kind.cvae
  arch: Arch = Arch.conv
  latent_size: int = 2                                          # dimension of z
  activation: str = "relu"                                      # any flax.linen activation name
  hidden: list[int] = field(default_factory=lambda: [500])      # mlp: hidden widths (decoder mirrors them)
  encoder_channels: list[int] = field(default_factory=lambda: [32])  # conv: channels of the encoder's conv layers
  decoder_channels: list[int] = field(default_factory=list)     # conv: upsampling (sub-pixel conv) layers (empty: dense to image)
  kernel_size: int = 3                                          # conv: square kernel size
  conv_stride: int = 1                                          # conv: stride of every conv, and upsampling factor of every decoder layer
  dense: int = 64                                               # conv: width of the dense layer on each side
  init_scale: Optional[float] = None  # mlp: weights drawn from N(0, init_scale^2) (Kingma & Welling: 0.01);
                                      # None: Flax's default (LeCun normal)
  embedding_size: int = 32            # gru: width of the token embedding
  rnn_size: int = 256                 # gru: GRU width (the encoder runs one each way, each half this wide)


@dataclass
class ObjectiveConfig:
  likelihood: Likelihood = Likelihood.bernoulli
  beta: float = 1.0  # weight of the KL in the optimized loss only; the reported ELBO is unweighted
  kl_schedule: KLSchedule = KLSchedule.constant  # how the KL weight reaches beta (posterior-collapse remedies)
  kl_warmup_epochs: float = 0.0  # linear: epochs over which the weight rises from 0 to beta
  kl_cycles: int = 4             # cyclical: number of cycles over the whole run
  kl_cycle_ratio: float = 0.5    # cyclical: fraction of each cycle spent rising (the rest at beta)
  free_bits: float = 0.0         # nats per latent dimension below which the KL is not penalized (Kingma
                                 # et al. 2016): loss KL = sum_j max(free_bits, batch mean KL_j); 0: off
  samples: int = 1               # k: draws of z per example in each training step
  estimator: Estimator = Estimator.elbo  # what the k draws estimate: the ELBO, or the IWAE bound L_k


@dataclass
class OptimizerConfig:
  name: OptimizerName = OptimizerName.adam
  learning_rate: float = 1e-3
  schedule: LRSchedule = LRSchedule.constant
  weight_decay: float = 0.0  # L2 penalty weight_decay/2 * |theta|^2 added to the per-example loss's gradient
                             # (a N(0, 1/(weight_decay N)) prior on the parameters; K&W use 1/N: N(0, I))
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip_norm: Optional[float] = None  # clip the global gradient norm to this value (None: no clipping)
  flatten: bool = False  # update all parameters as one flat vector: fewer, larger kernels (experiments/speed)


@dataclass
class TrainingConfig:
  batch_size: int = 32
  epochs: int = 10
  eval_batch_size: int = 1000         # evaluation runs in chunks of this size
  checkpoint_every_epochs: int = 1    # save a checkpoint every N epochs (and always at the end)
  max_checkpoints: int = 3            # keep the newest N checkpoints
  skip_nonfinite: bool = False        # skip updates with a NaN/inf loss or gradient (counted in train/skipped)
                                      # instead of stopping the run at the first one
  epoch_loop: EpochLoop = EpochLoop.auto  # how an epoch runs: one lax.scan, or a host loop of jitted steps
  scan_unroll: int = 1                # steps per iteration of the epoch's lax.scan (fewer loop trips; longer compile)
  data_parallel: bool = False         # split each minibatch over all local devices (a 1-D mesh, axis "data");
                                      # batch_size must be a multiple of the device count
  progress: bool = True               # show a progress bar
  figures: bool = True                # write the figures at the end of training


@dataclass
class EvaluationConfig:
  iwae_samples: int = 100        # k of the importance-weighted bound at the end of training (0: skip);
                                 # `python -m cvae_jax.evaluate` defaults to the paper's 5000
  sample_accuracy: bool = False  # at the end of training, judge CVAE samples with a trained classifier
  batch_size: int = 100          # examples per chunk of the importance-weighted bound
  sample_chunk: int = 500        # importance samples per chunk (memory ~ batch_size * sample_chunk * D)
  diagnostics: bool = True       # every epoch: KL per dimension, active units and I(x; z) on the test split
  molecules: int = 10000         # token data: molecules sampled at the end of training for validity,
                                 # uniqueness, novelty and property control (python -m cvae_jax.molecules)
  mi_examples: int = 1000        # test examples for the I(x; z) estimate (its maximum is log of this)
  anomaly: bool = False          # at the end of training, score the test split for anomaly detection
  anomaly_samples: int = 100     # k of the importance-weighted anomaly score
  anomaly_dataset: Optional[str] = None  # also score this dataset's test split as anomalies (cross-dataset)


@dataclass
class QuadrantConfig:
  """task=quadrants: structured-output prediction of MNIST quadrants (Sohn et al. 2015, as Pyro replicates it).
  The networks use model.hidden, model.latent_size and model.activation; training.epochs is the most epochs."""
  given: int = 1             # quadrants given as input: 1 bottom-left, 2 the left half, 3 all but bottom-right
  patience: int = 3          # early stopping: stop after this many epochs without a better stopping loss
  elbo_samples: int = 10     # z draws of the reported negative ELBO (Pyro's table: 10)
  kl: KLEstimator = KLEstimator.analytic  # the KL term of the CVAE's training and stopping losses
  stopping_samples: int = 10  # z draws of the CVAE's early-stopping loss (Pyro: 1, with kl=sampled)
  # The conditional NLL -log p(y | x) uses evaluation.iwae_samples draws (chunked by evaluation.sample_chunk).


@dataclass
class Config:
  name: str = "default"  # run family; runs go to outputs/<name>/<overrides>, sweeps to multirun/<name>/
  seed: int = 0          # every random stream derives from it (params, reparameterization, data order, ...)
  task: Task = Task.density
  data: DataConfig = field(default_factory=DataConfig)
  model: ModelConfig = field(default_factory=ModelConfig)
  objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
  optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
  training: TrainingConfig = field(default_factory=TrainingConfig)
  evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
  quadrants: QuadrantConfig = field(default_factory=QuadrantConfig)


class ConfigError(ValueError):
  """A configuration value is out of range; the message names the key, the value and the fix."""


def _check(ok: bool, key: str, value: Any, requirement: str) -> None:
  if not ok:
    raise ConfigError(f"{key}={value!r} is invalid: {requirement}.")


def validate(cfg: Config) -> Config:
  """Checks value ranges that types alone cannot express; raises ConfigError on the first bad value."""
  m, d, o, t, opt = cfg.model, cfg.data, cfg.objective, cfg.training, cfg.optimizer
  _check(-2**31 <= cfg.seed < 2**31, "seed", cfg.seed, "must fit in 32 bits (-2^31 <= seed < 2^31)")
  _check(m.latent_size >= 1, "model.latent_size", m.latent_size, "the latent size must be at least 1")
  _check(all(w >= 1 for w in m.hidden), "model.hidden", m.hidden, "every hidden width must be at least 1")
  _check(all(ch >= 1 for ch in m.encoder_channels + m.decoder_channels), "model.encoder_channels",
         (m.encoder_channels, m.decoder_channels), "channel counts must be at least 1")
  _check(m.kernel_size >= 1, "model.kernel_size", m.kernel_size, "must be at least 1")
  _check(m.conv_stride >= 1, "model.conv_stride", m.conv_stride, "must be at least 1")
  _check(m.dense >= 1, "model.dense", m.dense, "must be at least 1")
  _check(o.beta >= 0, "objective.beta", o.beta, "beta weights the KL term and must be >= 0")
  _check(o.kl_schedule != KLSchedule.linear or o.kl_warmup_epochs > 0, "objective.kl_warmup_epochs",
         o.kl_warmup_epochs, "a linear KL schedule needs a warm-up of more than 0 epochs")
  _check(o.kl_cycles >= 1, "objective.kl_cycles", o.kl_cycles, "must be at least 1")
  _check(0 < o.kl_cycle_ratio <= 1, "objective.kl_cycle_ratio", o.kl_cycle_ratio, "must be in (0, 1]")
  _check(o.free_bits >= 0, "objective.free_bits", o.free_bits, "must be >= 0 nats per dimension (0: off)")
  _check(o.samples >= 1, "objective.samples", o.samples, "the number of z draws per example must be at least 1")
  if Estimator(o.estimator) == Estimator.iwae:
    _check(o.beta == 1 and KLSchedule(o.kl_schedule) == KLSchedule.constant and o.free_bits == 0,
           "objective.estimator", "iwae", "the IWAE bound has no separate KL term: use objective.beta=1, "
           "objective.kl_schedule=constant and objective.free_bits=0 (remedy=none)")
  _check(Kind(m.kind) != Kind.ae or (o.samples == 1 and Estimator(o.estimator) == Estimator.elbo),
         "objective.samples", o.samples, "a plain autoencoder (model.kind=ae) has no z to sample: use "
         "objective.samples=1 and objective.estimator=elbo")
  _check(m.init_scale is None or m.init_scale > 0, "model.init_scale", m.init_scale, "must be > 0, or null")
  _check(opt.weight_decay >= 0, "optimizer.weight_decay", opt.weight_decay, "must be >= 0")
  _check(opt.learning_rate > 0, "optimizer.learning_rate", opt.learning_rate, "must be > 0")
  _check(opt.grad_clip_norm is None or opt.grad_clip_norm > 0, "optimizer.grad_clip_norm",
         opt.grad_clip_norm, "must be > 0, or null for no clipping")
  _check(t.batch_size >= 1, "training.batch_size", t.batch_size, "must be at least 1")
  _check(t.epochs >= 1, "training.epochs", t.epochs, "must be at least 1")
  _check(t.eval_batch_size >= 1, "training.eval_batch_size", t.eval_batch_size, "must be at least 1")
  _check(t.scan_unroll >= 1, "training.scan_unroll", t.scan_unroll, "must be at least 1")
  _check(t.checkpoint_every_epochs >= 1, "training.checkpoint_every_epochs", t.checkpoint_every_epochs,
         "must be at least 1")
  _check(t.max_checkpoints >= 1, "training.max_checkpoints", t.max_checkpoints, "must be at least 1")
  ev = cfg.evaluation
  _check(ev.iwae_samples >= 0, "evaluation.iwae_samples", ev.iwae_samples, "must be >= 0 (0 skips the bound)")
  _check(ev.batch_size >= 1, "evaluation.batch_size", ev.batch_size, "must be at least 1")
  _check(ev.sample_chunk >= 1, "evaluation.sample_chunk", ev.sample_chunk, "must be at least 1")
  _check(ev.mi_examples >= 2, "evaluation.mi_examples", ev.mi_examples, "must be at least 2")
  _check(ev.anomaly_samples >= 1, "evaluation.anomaly_samples", ev.anomaly_samples, "must be at least 1")
  _check(ev.anomaly_dataset is None or ev.anomaly, "evaluation.anomaly_dataset", ev.anomaly_dataset,
         "scoring another dataset needs evaluation.anomaly=true")
  _check(not ev.anomaly or d.exclude_classes or ev.anomaly_dataset, "evaluation.anomaly", ev.anomaly,
         "anomaly detection needs anomalies: hold out classes (data.exclude_classes=[k]) or name another "
         "dataset (evaluation.anomaly_dataset=NAME)")
  _check(ev.anomaly_dataset != d.name, "evaluation.anomaly_dataset", ev.anomaly_dataset,
         "is the training dataset itself; name another one")
  _check(all(k >= 0 for k in d.exclude_classes), "data.exclude_classes", d.exclude_classes,
         "class labels are >= 0")
  _check(d.pixels != Pixels.real or o.likelihood == Likelihood.gaussian, "objective.likelihood",
         getattr(o.likelihood, "value", o.likelihood),
         "real-valued data (data.pixels=real) needs objective=gaussian; Bernoulli likelihoods need [0, 1] data")
  _check(d.validation_size >= 0, "data.validation_size", d.validation_size, "must be >= 0")
  for key in ("train_limit", "test_limit"):
    value = getattr(d, key)
    _check(value is None or value >= 1, f"data.{key}", value, "must be at least 1, or null for all")
  q = cfg.quadrants
  _check(q.given in (1, 2, 3), "quadrants.given", q.given, "give 1, 2 or 3 quadrants as input")
  _check(q.patience >= 1, "quadrants.patience", q.patience, "must be at least 1 epoch")
  _check(q.elbo_samples >= 1, "quadrants.elbo_samples", q.elbo_samples, "must be at least 1")
  _check(q.stopping_samples >= 1, "quadrants.stopping_samples", q.stopping_samples, "must be at least 1")
  tokens = Pixels(d.pixels) == Pixels.tokens
  _check(tokens == (d.name == "moses"), "data.pixels", getattr(d.pixels, "value", d.pixels),
         "data.name=moses (molecules) needs data.pixels=tokens, and token data comes only from it: use "
         "+experiment=molecules_cvae, or grayscale/static_binary/dynamic_binary/real for other data")
  _check(tokens == (Arch(m.arch) == Arch.gru), "model.arch", getattr(m.arch, "value", m.arch),
         "token sequences (data.pixels=tokens) need model.arch=gru, and model.arch=gru needs token data")
  _check(tokens == (Likelihood(o.likelihood) == Likelihood.categorical), "objective.likelihood",
         getattr(o.likelihood, "value", o.likelihood),
         "token sequences (data.pixels=tokens) need objective.likelihood=categorical, and the categorical "
         "likelihood needs token data")
  _check(m.embedding_size >= 1 and m.rnn_size >= 2, "model.rnn_size", m.rnn_size,
         "model.embedding_size must be >= 1 and model.rnn_size >= 2")
  _check(ev.molecules >= 1, "evaluation.molecules", ev.molecules, "must be at least 1")
  if Task(cfg.task) == Task.quadrants:
    _check(Pixels(d.pixels) == Pixels.grayscale, "data.pixels", getattr(d.pixels, "value", d.pixels),
           "the quadrant task (Pyro's protocol) uses grayscale pixels in [0, 1]: set data.pixels=grayscale")
    _check(Arch(m.arch) == Arch.mlp and len(m.hidden) >= 1, "model.arch", getattr(m.arch, "value", m.arch),
           "the quadrant networks are MLPs: use model=mlp with at least one hidden layer")
  _check(callable(getattr(nn, m.activation, None)), "model.activation", m.activation,
         "use a flax.linen activation name such as relu, tanh, gelu, elu")
  return cfg


def to_dict(cfg: Config) -> dict:
  """Plain JSON-ready dict (enums as their values)."""
  def convert(value):
    if isinstance(value, enum.Enum):
      return value.value
    if isinstance(value, dict):
      return {k: convert(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return [convert(v) for v in value]
    return value
  return convert(dataclasses.asdict(cfg))
