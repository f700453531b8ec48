"""The run directory describes itself: config, environment, metrics, results.

  config.yaml     the resolved config (a rerun with a different config is refused)
  env.jsonl       library versions and devices, one line per start (first run and each resume)
  metrics.jsonl   one line per epoch: step, train and evaluation metrics, cumulative wall time
  tb/             the same metrics for TensorBoard
  checkpoints/    Orbax
  figures/        PNGs written at the end
  results.json    written last, atomically: its presence means the run finished
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Optional

import jax
import yaml

from cvae_jax import schema
from cvae_jax.config import EXECUTION_KEYS

log = logging.getLogger(__name__)

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "hydra-core", "tensorflow-datasets",
            "tensorflow-cpu", "numpy")


class RunDirError(RuntimeError):
  """The run directory cannot be used as asked; the message says how to proceed."""


# A file name holds at most 255 bytes on Linux and macOS file systems; a sweep with many overrides passes that.
NAME_BYTES = 200


def directory_name(overrides: str) -> str:
  """A run directory's name from Hydra's override_dirname ("key=value,key=value"): the name itself, or,
  where it is longer than NAME_BYTES, its start and a hash of the whole, so that the same command line still
  names the same directory (and resumes its run) while different ones stay apart."""
  raw = overrides.encode()
  if len(raw) <= NAME_BYTES:
    return overrides
  digest = hashlib.sha256(raw).hexdigest()[:16]
  return raw[:NAME_BYTES - len(digest) - 1].decode(errors="ignore") + "_" + digest


def write_bytes_atomic(path: Path, data: bytes) -> None:
  """Writes beside and renames: a reader sees the old file or the whole new one, never half of it."""
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
  write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


ABSENT = "<absent>"


def _diff(old: dict, new: dict, defaults: dict, prefix: str = "") -> list[str]:
  """Differences old -> new. A key absent from old whose new value is the schema default is no
  difference: the run predates that option and ran as its default does."""
  keys = sorted(set(old) | set(new))
  out = []
  for k in keys:
    a, b, d = old.get(k, ABSENT), new.get(k, ABSENT), defaults.get(k, ABSENT)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, d if isinstance(d, dict) else {}, f"{prefix}{k}.")
    elif a != b and not (a == ABSENT and b == d):
      out.append(f"{prefix}{k}: {a!r} -> {b!r}")
  return out


def check_config(workdir: Path, config: dict) -> None:
  """Refuses a run directory that holds a run of a different config. Reads only. The config written there
  is read in the current layout (schema.migrate), a key it lacks as the schema's default."""
  path = workdir / "config.yaml"
  if not path.exists():
    return
  try:
    old = yaml.safe_load(path.read_text())
  except (yaml.YAMLError, UnicodeDecodeError) as e:
    raise RunDirError(f"{path} is unreadable ({str(e).splitlines()[0]}). Nothing was changed. Restore or move "
                      "that file, or choose a new run directory with hydra.run.dir=....") from e
  if not isinstance(old, dict):
    raise RunDirError(f"{path} does not hold a config. Nothing was changed. Move it away, or choose a new run "
                      "directory with hydra.run.dir=....")
  try:
    old = schema.migrate(old)
  except Exception as e:  # noqa: BLE001  any content a migration cannot read: the same advice
    raise RunDirError(f"{path} does not hold a config this version can read ({e}). Nothing was changed. Move it "
                      "away, or choose a new run directory with hydra.run.dir=....") from e
  changes = [c for c in _diff(old, config, schema.defaults_like(config)) if c.split(":")[0] not in EXECUTION_KEYS]
  if changes:
    raise RunDirError(
        f"Run directory {workdir} holds a run with a different config ({'; '.join(changes)}). "
        "Nothing was changed. Rerun with the same config to resume it, or choose a new directory "
        "with hydra.run.dir=... (or name=...).")


def init(workdir: Path, config: dict) -> None:
  """Creates the run directory (or checks the one there) and records config and environment."""
  check_config(workdir, config)
  workdir.mkdir(parents=True, exist_ok=True)
  if not os.access(workdir, os.W_OK):
    raise RunDirError(f"Run directory {workdir} is not writable. Choose another with hydra.run.dir=...")
  path = workdir / "config.yaml"
  if not path.exists():
    write_bytes_atomic(path, yaml.safe_dump(config, sort_keys=False).encode())
  with open(workdir / "env.jsonl", "a") as f:
    f.write(json.dumps(environment()) + "\n")


def environment() -> dict:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return {
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "python": platform.python_version(),
      "platform": platform.platform(),
      "backend": jax.default_backend(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "devices": [d.device_kind for d in jax.devices()],
      "versions": versions,
  }


class MetricsLog:
  """metrics.jsonl plus TensorBoard. On resume, lines past the restored step are dropped: they came
  from work after the last checkpoint, which the resumed run redoes."""

  def __init__(self, workdir: Path, resume_step: int):
    self.path = workdir / "metrics.jsonl"
    self.rows = []
    if self.path.exists():
      text = self.path.read_text(errors="replace")  # bytes that are not text are damage, not a crash
      lines = text.splitlines()
      parsed, unreadable = [], []
      for number, line in enumerate(lines, 1):
        row = _json_or_none(line)
        if isinstance(row, dict) and isinstance(row.get("step"), int):
          parsed.append(row)
        else:  # a line cut short by a kill (its epoch is redone from the checkpoint), or damage
          unreadable.append(number)
          log.warning("Dropping unreadable line %d of %s: %r", number, self.path, line[:80])
      if any(number < len(lines) for number in unreadable) or "\ufffd" in text:  # more than a line cut short
        shutil.copy(self.path, self.path.with_name(self.path.name + ".damaged"))
      self.rows = [r for r in parsed if r["step"] <= resume_step]
      if len(self.rows) != len(lines):  # rewrite atomically: the dropped lines were work the resume redoes
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, self.path)
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(str(workdir / "tb"), purge_step=resume_step + 1 if resume_step else None)

  @property
  def wall_time(self) -> float:
    """Cumulative training wall time of the rows kept (earlier segments of a resumed run)."""
    return self.rows[-1]["wall_time"] if self.rows else 0.0

  def write(self, row: dict) -> None:
    self.rows.append(row)
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for key, value in row.items():
      if "/" in key and isinstance(value, (int, float)):  # lists (KL per dimension) stay in metrics.jsonl
        self._tb.add_scalar(key, value, row["step"])
    self._tb.flush()

  def write_images(self, step: int, images: dict) -> None:
    """Image grids [H, W, C] in [0, 1] under images/<name> at this step (TensorBoard's Images tab)."""
    for name, image in images.items():
      self._tb.add_image(f"images/{name}", image, step, dataformats="HWC")
    self._tb.flush()

  def close(self) -> None:
    self._tb.close()


def write_hparams(workdir: Path, hparams: dict, metrics: dict) -> None:
  """The run's hyperparameters and final metrics for TensorBoard's HParams view, in <run>/tb/hparams: a
  sweep's runs become rows to sort and filter there (tensorboard --logdir multirun/<name>)."""
  from tensorboardX import SummaryWriter
  from tensorboardX.summary import hparams as hparams_summary
  metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
  experiment, start, end = hparams_summary(hparams, metrics)
  with SummaryWriter(str(Path(workdir) / "tb" / "hparams")) as writer:
    for summary in (experiment, start, end):
      writer.file_writer.add_summary(summary)
    for name, value in metrics.items():
      writer.add_scalar(name, value)


def _json_or_none(text: str):
  try:
    return json.loads(text)
  except ValueError:
    return None


def read_json(path: Path) -> Optional[dict]:
  """A JSON object written by a run, or None when the file is absent, cut short or not an object."""
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError, UnicodeDecodeError):
    return None
  return value if isinstance(value, dict) else None


def read_results(workdir: Path) -> Optional[dict]:
  return read_json(Path(workdir) / "results.json")


def set_aside(path: Path, why: str) -> Path:
  """Renames a damaged file `<name>.damaged` (`.damaged1`, ... when taken) so nothing is lost, with a warning."""
  target, n = path.with_name(path.name + ".damaged"), 1
  while target.exists():
    target, n = path.with_name(f"{path.name}.damaged{n}"), n + 1
  path.rename(target)
  log.warning("%s is %s; kept as %s, and the run finishes again from its last checkpoint.", path, why, target.name)
  return target


def finished_results(workdir: Path, config: dict) -> Optional[dict]:
  """Checks that workdir is new or holds a run of this config (RunDirError otherwise) and returns its
  results.json when that run has finished: a finished run is not retrained. A results.json that cannot be
  read is set aside (the run is then not finished)."""
  check_config(workdir, config)
  path = Path(workdir) / "results.json"
  finished = read_results(workdir)
  if finished is None and path.exists():
    set_aside(path, "unreadable")
  if finished is not None:
    log.info("Run in %s already finished; results.json: %s", workdir, finished)
  return finished


class RunLock:
  """One owner per run directory: an exclusive lock on `<run>/.lock` (fcntl.flock) for as long as a process
  trains there, with its host and pid in the file for the message a second process gets. The kernel drops
  the lock of a process that dies (kill -9 included), so a rerun takes it over, with a warning naming the
  previous owner. The lock file is removed on release. Re-entrant within one process. On a cluster file
  system flock holds across hosts only where the file system supports it (Lustre mounted with `flock`,
  NFSv4, GPFS); elsewhere it guards one host only."""

  _held: dict = {}  # path -> [fd, count]: the locks this process holds

  def __init__(self, workdir: Path):
    self.path = (Path(workdir) / ".lock").absolute()
    self.created = False  # whether taking the lock created the run directory (removed again if left empty)

  def __enter__(self) -> "RunLock":
    if self.path in RunLock._held:
      RunLock._held[self.path][1] += 1
      return self
    self.created = not self.path.parent.exists()
    self.path.parent.mkdir(parents=True, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip()
        os.close(fd)
        raise RunDirError(f"Run directory {self.path.parent} is in use by another process ({holder or 'unknown'}). "
                          "Nothing was changed. Wait for it to finish or stop it; two processes on one run "
                          "directory would write over each other.") from None
      try:  # the file may have been removed and recreated by its previous owner meanwhile: lock the current one
        if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
          break
      except FileNotFoundError:
        pass
      os.close(fd)
    previous = os.read(fd, 4096).decode(errors="replace").strip()
    if previous:
      log.warning("Run directory %s was last held by %s, which is gone; taking it over.", self.path.parent, previous)
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, f"host {platform.node()}, pid {os.getpid()}, since "
                 f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n".encode())
    RunLock._held[self.path] = [fd, 1]
    return self

  def __exit__(self, *exc) -> None:
    entry = RunLock._held[self.path]
    entry[1] -= 1
    if entry[1] == 0:
      del RunLock._held[self.path]
      self.path.unlink(missing_ok=True)  # before unlocking: a waiting process then finds the path gone and retries
      fcntl.flock(entry[0], fcntl.LOCK_UN)
      os.close(entry[0])
      if self.created and not any(self.path.parent.iterdir()):  # a run that never started leaves nothing
        self.path.parent.rmdir()


def locked(workdirs) -> contextlib.ExitStack:
  """A context holding the RunLock of every run directory given."""
  stack = contextlib.ExitStack()
  try:
    for workdir in workdirs:
      stack.enter_context(RunLock(workdir))
  except BaseException:
    stack.close()
    raise
  return stack
