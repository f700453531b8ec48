"""Typed configuration: the schema that Hydra merges YAML and overrides into.

Field names equal the command-line override names (`model.latent_size=5`). The sections shared by every
run live here; a model family and a dataset each extend their base node with their own fields, in their
own module (`MLPConfig` in models/mlp.py, `MoleculeDataConfig` in data/moses.py, ...), so a key of
another family is an error at start-up. The dataclasses are not frozen because Hydra merges into them;
treat them as read-only once validated. Enums make OmegaConf reject unknown choices with the valid ones.
Names that plug-ins can extend (model.arch, data.name, objective.likelihood, task) are strings checked
against their registries (cvae_jax/experiment.py).
"""
from __future__ import annotations

import dataclasses
import enum
import signal
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


class Pixels(str, enum.Enum):
  grayscale = "grayscale"            # intensities in [0, 1]
  static_binary = "static_binary"    # one fixed Bernoulli(intensity) sample per image, drawn once
  dynamic_binary = "dynamic_binary"  # resampled every time a batch is drawn (Burda et al. 2016)


class Kind(str, enum.Enum):
  vae = "vae"    # p(x|z) p(z)
  cvae = "cvae"  # p(x|z,c) p(z); c = the dataset's condition (a one-hot class, a property vector)
  ae = "ae"      # plain autoencoder of the same size: z = encoder mean, loss = reconstruction only (baseline)


class EpochLoop(str, enum.Enum):
  auto = "auto"    # a host loop for families that ask for it on CPU (conv: XLA:CPU runs convs in a loop body ~10x slower), else scan
  scan = "scan"    # the whole epoch as one compiled lax.scan
  steps = "steps"  # a host loop over the jitted step


class Distributed(str, enum.Enum):
  none = "none"          # one process (its local devices with training.data_parallel)
  auto = "auto"          # join the other processes of the job as JAX detects them (Slurm, Open MPI, ...)
  explicit = "explicit"  # join through training.coordinator_address, num_processes and process_id


class Compressor(str, enum.Enum):
  zlib = "zlib"  # zlib level 9 of the stored bytes: any input
  png = "png"    # PNG, Pillow level 9: uint8 images


class KLSchedule(str, enum.Enum):
  constant = "constant"  # the KL weight is beta throughout
  linear = "linear"      # 0 -> beta over objective.kl_warmup_epochs, then beta (Bowman et al. 2016)
  cyclical = "cyclical"  # objective.kl_cycles ramps 0 -> beta, each rising over kl_cycle_ratio of its cycle (Fu et al. 2019)


class Regularizer(str, enum.Enum):
  kl = "kl"              # beta * KL(q(z|x) || p(z)): the ELBO (beta = 1) and the beta-VAE (Higgins et al. 2017)
  tcvae = "tcvae"        # KL + (beta - 1) * TC(z): beta-TCVAE (Chen et al. 2018), the total correlation of the
                         # aggregate posterior weighted by beta
  capacity = "capacity"  # beta * |KL - C|, C rising linearly from 0 to objective.capacity nats over
                         # objective.capacity_steps steps (Burgess et al. 2018; beta is their gamma)


class ScoreProtocol(str, enum.Enum):
  fast = "fast"  # the disentanglement scores at reduced sample counts: about a minute per model on 2 CPU cores
  dlib = "dlib"  # disentanglement_lib's sample counts: about 16 minutes (evaluators/disentanglement.py, Protocol)


class Estimator(str, enum.Enum):
  elbo = "elbo"  # the ELBO, its reconstruction term averaged over objective.samples draws of z ("VAE, k")
  iwae = "iwae"  # the k-sample importance-weighted bound L_k (Burda et al. 2016, "IWAE, k")


class KLEstimator(str, enum.Enum):
  analytic = "analytic"  # the closed-form KL(q || p)
  sampled = "sampled"    # log q(z) - log p(z) at the drawn z: same expectation, noisier (Pyro's Trace_ELBO)


class OptimizerName(str, enum.Enum):
  adam = "adam"
  adagrad = "adagrad"  # Kingma & Welling 2014


class LRSchedule(str, enum.Enum):
  constant = "constant"
  burda = "burda"  # stage i = 0, 1, ... lasts 3^i epochs at learning_rate * 10^(-i/7) (Burda et al. 2016)
  cosine = "cosine"  # learning_rate * (1 + cos(pi * step / all steps)) / 2: from the rate to 0 over the run


@dataclass
class DataConfig:
  """Keys every dataset has; each dataset's node (its module in cvae_jax/data/) adds its own."""
  name: str = MISSING                # the dataset's registry name (data/__init__.py); any other name is a TFDS image dataset
  validation_size: int = 0           # examples carved from the end of train for validation (0: none)
  calibration_size: int = 0          # examples carved from train before the validation ones, for anomaly thresholds
                                     # only (cvae_jax.detect): never trained on, never used to select an epoch
  train_limit: Optional[int] = None  # use only the first N training examples (tests, smoke runs)
  test_limit: Optional[int] = None   # use only the first N test examples
  exclude_classes: list[int] = field(default_factory=list)  # labels left out of train, validation and
                                                           # calibration (anomaly detection: test keeps them)
  manual_dir: Optional[str] = None   # folder holding <name>/ with the official files (env CVAE_JAX_MANUAL_DIR)
  data_dir: Optional[str] = None     # prepared data and caches (env TFDS_DATA_DIR, ~/tensorflow_datasets)
  in_memory: Optional[bool] = None   # true: the training split lives on the device (fast); false: batches are
                                     # read from host arrays or memory-mapped files as training goes (data
                                     # larger than device memory); null: true when it takes under a quarter
                                     # of the device's memory


@dataclass
class ModelConfig:
  """Keys every model family has; each family's node (its module in cvae_jax/models/) adds its own."""
  arch: str = MISSING      # the family's registry name; choose a family with model=NAME
  kind: Kind = Kind.cvae
  latent_size: int = 2     # dimension of z
  activation: str = "relu"  # any flax.linen activation name


@dataclass
class ObjectiveConfig:
  likelihood: str = "bernoulli"  # the decoder's likelihood, by registry name (cvae_jax/likelihoods.py)
  beta: float = 1.0  # weight of the KL in the optimized loss only; the reported ELBO is unweighted
  regularizer: Regularizer = Regularizer.kl  # what beta weighs: the KL, the total correlation, |KL - capacity|
  capacity: float = 25.0         # regularizer=capacity: the KL's target C at the end of its rise, nats
  capacity_steps: int = 100000   # regularizer=capacity: steps over which C rises from 0 (disentanglement_lib's defaults)
  kl_schedule: KLSchedule = KLSchedule.constant  # how the KL weight reaches beta (posterior-collapse remedies)
  kl_warmup_epochs: float = 0.0  # linear: epochs over which the weight rises from 0 to beta
  kl_cycles: int = 4             # cyclical: number of cycles over the whole run
  kl_cycle_ratio: float = 0.5    # cyclical: fraction of each cycle spent rising (the rest at beta)
  free_bits: float = 0.0         # nats per latent dimension (per group for model=hvae) below which the KL is not
                                 # penalized (Kingma et al. 2016): loss KL = sum_j max(free_bits, batch mean KL_j); 0: off
  samples: int = 1               # k: draws of z per example in each training step
  estimator: Estimator = Estimator.elbo  # what the k draws estimate: the ELBO, or the IWAE bound L_k
  min_scale: float = 1e-3        # gaussian: the decoder's scale is softplus(output) + this floor (in the data's
                                 # units); a larger floor stops the scale fitting training inputs too closely
  shared_scale: bool = False     # gaussian: one learned scale per position and channel, shared by every input, in
                                 # place of the decoder's per-input scale (which can shrink onto training inputs)
  mixtures: int = 10             # discretized_logistic_mixture: logistic components per pixel channel


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
  select_on_validation: bool = False  # keep the parameters of the epoch with the best validation ELBO (they travel in
                                      # the checkpoint) and evaluate, save and restore those rather than the last
                                      # epoch's: against overfitting (needs data.validation_size)
  skip_nonfinite: bool = False        # skip updates with a NaN/inf loss or gradient (counted in train/skipped)
                                      # instead of stopping the run at the first one
  skip_grad_norm: Optional[float] = None  # skip updates whose gradient's global norm exceeds this (counted in
                                      # train/skipped; VDVAE's outlier skipping, Child 2021); null: never
  # Aggressive inference-network training (He et al. 2019, "Lagging Inference Networks"), with a fixed inner
  # loop: in the first aggressive_epochs epochs, each decoder-only update follows this many encoder-only
  # updates, each on its own minibatch (the paper runs the inner loop to convergence, at most 100 steps);
  # after them every step updates both. 0: off.
  aggressive_encoder_steps: int = 0
  aggressive_epochs: int = 1
  epoch_loop: EpochLoop = EpochLoop.auto  # how an epoch runs: one lax.scan, or a host loop of jitted steps
  scan_unroll: int = 1                # steps per iteration of the epoch's lax.scan (fewer loop trips; longer compile)
  data_parallel: bool = False         # split each minibatch over all devices (a 1-D mesh, axis "data");
                                      # batch_size must be a multiple of the device count
  checkpoint_every_steps: int = 0     # also save every N steps, mid-epoch: the epoch runs in pieces of N steps
                                      # (one compiled program), and a preemption signal saves at the next
                                      # piece's end; 0: pieces are whole epochs (streamed data: 64 steps)
  preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # save and stop on these
  requeue: bool = True                # a preempted run inside a Slurm job requeues it (scontrol requeue)
  distributed: Distributed = Distributed.none  # several processes, one run (engine/distributed.py); with
                                      # auto or explicit every device of every process splits the batch
  coordinator_address: Optional[str] = None  # explicit: host:port of process 0's coordinator
  num_processes: Optional[int] = None        # explicit: how many processes the run has
  process_id: Optional[int] = None           # explicit: this process's id, 0..num_processes-1
  progress: bool = True               # show a progress bar
  figures: bool = True                # write the figures at the end of training


@dataclass
class EvaluationConfig:
  iwae_samples: int = 100        # k of the importance-weighted bound at the end of training (0: skip);
                                 # `python -m cvae_jax.evaluate` defaults to the paper's 5000
  sample_accuracy: bool = False  # at the end of training, judge CVAE samples with a trained classifier
  samples_per_class: int = 1000  # class-conditional samples the classifier judges per class
  quality_samples: int = 0       # image runs with classes: prior samples whose Fréchet distance, precision/recall
                                 # and density/coverage against the test set are computed in the classifier's
                                 # features (evaluators/quality.py; trains the classifier: ~1 min on CPU); 0: skip
  batch_size: int = 100          # examples per chunk of the importance-weighted bound
  sample_chunk: int = 500        # importance samples per chunk (memory ~ batch_size * sample_chunk * D)
  diagnostics: bool = True       # every epoch: KL per dimension, active units and I(x; z) on the test split
  molecules: int = 10000         # task=molecules: molecules sampled at the end of training for validity,
                                 # uniqueness, novelty and property control (python -m cvae_jax.molecules)
  mi_examples: int = 1000        # test examples for the I(x; z) estimate (its maximum is log of this)
  anomaly: bool = False          # at the end of training, score the test split for anomaly detection
  anomaly_samples: int = 100     # k of the importance-weighted anomaly score
  anomaly_dataset: Optional[str] = None  # also score this dataset's test split as anomalies (cross-dataset)
  compressor: Compressor = Compressor.zlib  # the input_complexity score's generic compressor
  llr_groups: list[int] = field(default_factory=lambda: [1])  # hierarchies (model=hvae, kind vae): one score
                                 # llr>k per k, the lowest k groups taken at their prior's mean (Havtorn et al.
                                 # 2021's LLR>k); []: none
  disentanglement: bool = False  # data with ground-truth factors (data=dsprites): the beta-VAE, FactorVAE, MIG, DCI
                                 # and SAP scores of the encoder's mean, and latent traversals
                                 # (evaluators/disentanglement.py)
  disentanglement_protocol: ScoreProtocol = ScoreProtocol.fast  # their sample counts: fast or dlib's
  background_rate: float = 0.0   # > 0: also train a background model on training images whose pixels are replaced
                                 # at this rate by random values (Ren et al. 2019 use 0.1-0.2), in <run>/background/,
                                 # for the likelihood_ratio score; 0: none


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
  task: str = "density"  # what a run trains and reports, by registry name (cvae_jax/tasks/)
  data: DataConfig = MISSING    # a dataset's node (conf/data/)
  model: ModelConfig = MISSING  # a model family's node (conf/model/)
  objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
  optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
  training: TrainingConfig = field(default_factory=TrainingConfig)
  evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
  quadrants: QuadrantConfig = field(default_factory=QuadrantConfig)


# Settings of how a run executes, not of what it computes: a run resumes under other values of these (more
# processes, step checkpoints, streamed data), and they do not name its directory (conf/config.yaml).
EXECUTION_KEYS = ("training.checkpoint_every_steps", "training.preemption_signals", "training.requeue",
                  "training.distributed", "training.coordinator_address", "training.num_processes",
                  "training.process_id", "data.in_memory")


class ConfigError(ValueError):
  """A configuration value is out of range; the message names the key, the value and the fix."""


def check(ok: bool, key: str, value: Any, requirement: str) -> None:
  """Raises ConfigError naming the key, the value received and what it must be."""
  if not ok:
    raise ConfigError(f"{key}={getattr(value, 'value', value)!r} is invalid: {requirement}.")


def validate_common(cfg: Config) -> Config:
  """The value ranges of the shared sections that types alone cannot express. The registries' entries
  (dataset, model family, likelihood, task) check what they need themselves (experiment.validate)."""
  m, d, o, t, opt, ev = cfg.model, cfg.data, cfg.objective, cfg.training, cfg.optimizer, cfg.evaluation
  check(-2**31 <= cfg.seed < 2**31, "seed", cfg.seed, "must fit in 32 bits (-2^31 <= seed < 2^31)")
  check(m.latent_size >= 1, "model.latent_size", m.latent_size, "the latent size must be at least 1")
  check(t.skip_grad_norm is None or t.skip_grad_norm > 0, "training.skip_grad_norm", t.skip_grad_norm,
        "must be > 0 (the largest gradient norm applied), or null to apply every update")
  check(o.mixtures >= 1, "objective.mixtures", o.mixtures, "the logistic mixture needs at least one component")
  check(o.beta >= 0, "objective.beta", o.beta, "beta weights the KL term and must be >= 0")
  check(o.kl_schedule != KLSchedule.linear or o.kl_warmup_epochs > 0, "objective.kl_warmup_epochs",
        o.kl_warmup_epochs, "a linear KL schedule needs a warm-up of more than 0 epochs")
  check(o.kl_cycles >= 1, "objective.kl_cycles", o.kl_cycles, "must be at least 1")
  check(0 < o.kl_cycle_ratio <= 1, "objective.kl_cycle_ratio", o.kl_cycle_ratio, "must be in (0, 1]")
  if o.regularizer != Regularizer.kl:
    check(o.kl_schedule == KLSchedule.constant and o.free_bits == 0 and o.estimator == Estimator.elbo
          and o.samples == 1 and m.kind == Kind.vae, "objective.regularizer", o.regularizer,
          "beta-TCVAE and the capacity objective are one-sample objectives of a VAE: use objective.kl_schedule=constant, "
          "objective.free_bits=0 (remedy=none), objective.estimator=elbo, objective.samples=1 and model.kind=vae")
  check(o.capacity >= 0, "objective.capacity", o.capacity, "the KL's target must be >= 0 nats")
  check(o.capacity_steps >= 1, "objective.capacity_steps", o.capacity_steps, "must be at least 1")
  check(o.free_bits >= 0, "objective.free_bits", o.free_bits, "must be >= 0 nats per dimension (0: off)")
  check(o.min_scale > 0, "objective.min_scale", o.min_scale, "the Gaussian scale's floor must be > 0")
  check(not o.shared_scale or o.likelihood == "gaussian", "objective.shared_scale", o.shared_scale,
        f"shares the Gaussian's scale; objective.likelihood={o.likelihood!r} has none: use objective=gaussian")
  check(o.samples >= 1, "objective.samples", o.samples, "the number of z draws per example must be at least 1")
  if o.estimator == Estimator.iwae:
    check(o.beta == 1 and o.kl_schedule == KLSchedule.constant and o.free_bits == 0,
          "objective.estimator", "iwae", "the IWAE bound has no separate KL term: use objective.beta=1, "
          "objective.kl_schedule=constant and objective.free_bits=0 (remedy=none)")
  check(m.kind != Kind.ae or (o.samples == 1 and o.estimator == Estimator.elbo),
        "objective.samples", o.samples, "a plain autoencoder (model.kind=ae) has no z to sample: use "
        "objective.samples=1 and objective.estimator=elbo")
  check(opt.weight_decay >= 0, "optimizer.weight_decay", opt.weight_decay, "must be >= 0")
  check(opt.learning_rate > 0, "optimizer.learning_rate", opt.learning_rate, "must be > 0")
  check(opt.grad_clip_norm is None or opt.grad_clip_norm > 0, "optimizer.grad_clip_norm",
        opt.grad_clip_norm, "must be > 0, or null for no clipping")
  check(t.batch_size >= 1, "training.batch_size", t.batch_size, "must be at least 1")
  check(t.epochs >= 1, "training.epochs", t.epochs, "must be at least 1")
  check(t.eval_batch_size >= 1, "training.eval_batch_size", t.eval_batch_size, "must be at least 1")
  check(t.scan_unroll >= 1, "training.scan_unroll", t.scan_unroll, "must be at least 1")
  check(t.aggressive_encoder_steps >= 0, "training.aggressive_encoder_steps", t.aggressive_encoder_steps,
        "must be >= 0 encoder-only updates per decoder update (0: off)")
  check(t.aggressive_epochs >= 1, "training.aggressive_epochs", t.aggressive_epochs,
        "must be at least 1 (set training.aggressive_encoder_steps=0 to turn aggressive training off)")
  check(t.checkpoint_every_epochs >= 1, "training.checkpoint_every_epochs", t.checkpoint_every_epochs,
        "must be at least 1")
  check(t.checkpoint_every_steps >= 0, "training.checkpoint_every_steps", t.checkpoint_every_steps,
        "must be >= 0 (0: checkpoints at epoch ends only)")
  for name in t.preemption_signals:
    check(isinstance(getattr(signal, "SIG" + str(name).upper().removeprefix("SIG"), None), int),
          "training.preemption_signals", list(t.preemption_signals), f"{name!r} is not a signal name (SIGTERM, SIGUSR1, ...)")
  check(t.num_processes is None or t.num_processes >= 1, "training.num_processes", t.num_processes,
        "must be at least 1")
  check(t.max_checkpoints >= 1, "training.max_checkpoints", t.max_checkpoints, "must be at least 1")
  check(not t.select_on_validation or d.validation_size > 0, "training.select_on_validation", t.select_on_validation,
        "selects on a validation split: set data.validation_size to the number of training examples to hold out")
  check(ev.iwae_samples >= 0, "evaluation.iwae_samples", ev.iwae_samples, "must be >= 0 (0 skips the bound)")
  check(ev.batch_size >= 1, "evaluation.batch_size", ev.batch_size, "must be at least 1")
  check(ev.sample_chunk >= 1, "evaluation.sample_chunk", ev.sample_chunk, "must be at least 1")
  check(ev.mi_examples >= 2, "evaluation.mi_examples", ev.mi_examples, "must be at least 2")
  check(ev.anomaly_samples >= 1, "evaluation.anomaly_samples", ev.anomaly_samples, "must be at least 1")
  check(all(k >= 1 for k in ev.llr_groups), "evaluation.llr_groups", list(ev.llr_groups),
        "each k must be at least 1 (the lowest k groups at their prior's mean; [] for no llr score)")
  check(ev.molecules >= 1, "evaluation.molecules", ev.molecules, "must be at least 1")
  check(ev.samples_per_class >= 1, "evaluation.samples_per_class", ev.samples_per_class, "must be at least 1")
  check(ev.quality_samples == 0 or ev.quality_samples >= 10, "evaluation.quality_samples", ev.quality_samples,
        "must be 0 (skip) or at least 10: the k-NN radii of precision, recall, density and coverage need more "
        "samples than k = 5")
  check(0 <= ev.background_rate < 1, "evaluation.background_rate", ev.background_rate,
        "the fraction of pixels replaced must be in [0, 1) (0: no background model)")
  check(ev.background_rate == 0 or ev.anomaly, "evaluation.background_rate", ev.background_rate,
        "the background model serves the anomaly scores: set evaluation.anomaly=true")
  check(ev.background_rate == 0 or t.distributed == Distributed.none, "evaluation.background_rate", ev.background_rate,
        "the background model trains in one process after the run: use training.distributed=none")
  check(ev.anomaly_dataset is None or ev.anomaly, "evaluation.anomaly_dataset", ev.anomaly_dataset,
        "scoring another dataset needs evaluation.anomaly=true")
  check(not ev.anomaly or d.exclude_classes or ev.anomaly_dataset, "evaluation.anomaly", ev.anomaly,
        "anomaly detection needs anomalies: hold out classes (data.exclude_classes=[k]) or name another "
        "dataset (evaluation.anomaly_dataset=NAME)")
  check(ev.anomaly_dataset != d.name, "evaluation.anomaly_dataset", ev.anomaly_dataset,
        "is the training dataset itself; name another one")
  check(all(k >= 0 for k in d.exclude_classes), "data.exclude_classes", d.exclude_classes,
        "class labels are >= 0")
  check(d.validation_size >= 0, "data.validation_size", d.validation_size, "must be >= 0")
  check(d.calibration_size >= 0, "data.calibration_size", d.calibration_size, "must be >= 0")
  for key in ("train_limit", "test_limit"):
    value = getattr(d, key)
    check(value is None or value >= 1, f"data.{key}", value, "must be at least 1, or null for all")
  return cfg


def to_dict(cfg) -> dict:
  """Plain JSON-ready dict of a config or any of its nodes (enums as their values)."""
  def convert(value):
    if isinstance(value, enum.Enum):
      return value.value
    if isinstance(value, dict):
      return {k: convert(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return [convert(v) for v in value]
    return value
  return convert(dataclasses.asdict(cfg))


def flatten(tree: dict, prefix: str = "") -> dict:
  """A nested dict (to_dict's) as one level of dotted names: {"objective": {"beta": 4}} -> {"objective.beta": 4}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out |= flatten(v, f"{prefix}{k}.")
    else:
      out[f"{prefix}{k}"] = v
  return out
