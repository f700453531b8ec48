"""Orbax checkpoints: one CheckpointManager per run directory, keeping the newest few.

Orbax writes each step to a temporary folder and renames it when complete, so a kill during a save
leaves the previous checkpoint as the latest complete one (leftover temporary folders are removed when
the manager opens). A finalized checkpoint that cannot be read (a damaged disk, a truncated copy) is
renamed `<step>.corrupt`, named in a warning, and the previous one is used instead.

Each completed step gets a manifest (the size and SHA-256 of its files) checked before the step is read:
damage is found without starting Orbax's reads, whose in-flight threads would otherwise fail after the
first bad array (printing tracebacks a user cannot act on), and garbage that still parses is found too.
A step without a manifest (a kill between the save and the manifest) is read as it is.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import orbax.checkpoint as ocp

from cvae_jax.engine.memory import nbytes

log = logging.getLogger(__name__)


class CheckpointMismatchError(RuntimeError):
  """The checkpoint holds parameters of another model; the message says which and what to do."""


class DiskFullError(OSError):
  """A checkpoint could not be written for want of disk space; the previous one is kept."""

  def __str__(self) -> str:
    return self.strerror


@contextlib.contextmanager
def _quiet_background_failures():
  """A failed read leaves Orbax's reading coroutines and threads to fail after it (unraisable exceptions,
  "Event loop is closed"); their tracebacks say nothing the warning about the checkpoint does not, so they
  are muted while a checkpoint is read, and collected before the hooks come back."""
  unraisable, excepthook = sys.unraisablehook, threading.excepthook
  sys.unraisablehook, threading.excepthook = (lambda args: None), (lambda args: None)
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook, threading.excepthook = unraisable, excepthook


def _is_disk_full(error: BaseException) -> bool:
  """Orbax reports a full disk as its writer's RESOURCE_EXHAUSTED, or as an OSError(ENOSPC)."""
  while error is not None:
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) or \
        "RESOURCE_EXHAUSTED" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _shapes(tree) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


MANIFEST = "cvae_jax_manifest.json"


def _digest(path: Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(step_dir: Path) -> None:
  tmp = step_dir / (MANIFEST + ".tmp")
  tmp.unlink(missing_ok=True)  # left by a write that failed (a full disk): not a file of the checkpoint
  files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
  entries = {p.relative_to(step_dir).as_posix(): [p.stat().st_size, _digest(p)] for p in files}
  tmp.write_text(json.dumps(entries, indent=0))
  os.replace(tmp, step_dir / MANIFEST)


def check_manifest(step_dir: Path) -> None:
  """Raises ValueError naming the first file of the step that is missing or changed since it was saved."""
  try:
    entries = json.loads((step_dir / MANIFEST).read_text())
  except FileNotFoundError:
    return  # written before manifests, or killed before its manifest: Orbax's own read decides
  except (OSError, ValueError) as e:
    raise ValueError(f"its manifest {MANIFEST} is unreadable ({e})") from None
  if not isinstance(entries, dict):
    raise ValueError(f"its manifest {MANIFEST} is unreadable")
  for name, (size, digest) in entries.items():
    path = step_dir / name
    if not path.is_file():
      raise ValueError(f"{name} is missing")
    if path.stat().st_size != size or _digest(path) != digest:
      raise ValueError(f"{name} changed after it was saved")


class _GlobSafe:
  """A path for Orbax's merge of per-process OCDBT files whose glob treats the directory's own name literally.
  Orbax globs `str(directory) + "/ocdbt.process_*"`, so a run directory named with brackets (a Hydra sweep's
  `data.exclude_classes=[1,2]`) matches nothing and the checkpoint is left without its merged manifest."""

  def __init__(self, path: Path):
    self.path = Path(path)

  def glob(self, pattern: str):
    from etils import epath
    return [epath.Path(p) for p in sorted(self.path.glob(pattern))]  # pathlib globs below the directory only

  def as_posix(self) -> str:
    return self.path.as_posix()


def merge_process_files(step_dir: Path) -> bool:
  """Completes a checkpoint whose per-process OCDBT files were never merged (see _GlobSafe); True if it did."""
  import asyncio
  from orbax.checkpoint._src.serialization import ocdbt_utils, tensorstore_utils
  merged = False
  for item in (p for p in Path(step_dir).iterdir() if p.is_dir()):
    if (item / "manifest.ocdbt").exists() or not any(item.glob("ocdbt.process_*")):
      continue
    asyncio.run(ocdbt_utils.merge_ocdbt_per_process_files(
        _GlobSafe(item), ts_context=tensorstore_utils.get_ts_context(use_ocdbt=True), use_zarr3=False))
    merged = True
  return merged


class Checkpointer:
  def __init__(self, directory: Path, max_to_keep: int):
    self.directory = Path(directory).absolute()
    self._last_saved: tuple = (None, {})  # (step, state) of the newest save, for the disk-full message
    if self.directory.is_dir() and jax.process_index() == 0:
      # Removed here, not by Orbax's own clean-up: that runs in a background thread, which a process that
      # exits soon after (a command line stopping with an error) would leave scheduling work at shutdown.
      for leftover in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
        log.warning("Checkpoint %s is incomplete (a save was interrupted); it is ignored and removed.", leftover)
        shutil.rmtree(leftover)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Asynchronous; `wait` (or the next save) makes it durable. A disk without room for it is found before
    anything is written (and a disk that fills meanwhile when the save completes): DiskFullError."""
    self.wait()  # the previous save first, so that its failure names its own step (and its manifest)
    self._last_saved = (step, state)
    self.directory.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(self.directory).free < nbytes(state) + 2**20:  # the arrays and a little metadata
      self._raise_disk_full()
    with self._disk_full_says():
      self._manager.save(step, args=ocp.args.StandardSave(state))

  def _raise_disk_full(self):
    step, state = self._last_saved
    free, latest = shutil.disk_usage(self.directory).free, self.latest_step()
    kept = f"The checkpoint of step {latest} is kept" if latest is not None else "No earlier checkpoint exists"
    raise DiskFullError(errno.ENOSPC, f"The disk holding {self.directory} is full ({free / 2**20:.1f} MiB free): the "
                        f"checkpoint of step {step} ({nbytes(state) / 2**20:.1f} MiB) could not be written. {kept}. "
                        "Free some space, then rerun the same command: it resumes from the newest checkpoint.")

  @contextlib.contextmanager
  def _disk_full_says(self):
    """A full disk while a checkpoint is written becomes a DiskFullError saying where, how much, and what to do."""
    try:
      yield
    except Exception as e:  # noqa: BLE001  whatever type the writer raised
      if not _is_disk_full(e):
        raise
      self._raise_disk_full()

  def restore(self, like: Any, step: Optional[int] = None) -> Any:
    """Restores into the structure, shapes and dtypes of `like` (a state built by create_train_state)."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def _check_architecture(self, step: int, like: Any) -> None:
    """Raises CheckpointMismatchError when the saved parameter shapes differ from the model's."""
    # The item's handler reads the tree's shapes alone (StandardCheckpointer would also look for a
    # checkpoint-level metadata file in the item's folder and warn that it is not there).
    metadata = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "default")
    tree = getattr(metadata, "item_metadata", metadata)
    saved, expected = _shapes(getattr(tree, "tree", tree)["params"]), _shapes(like.params)
    if saved != expected:
      diff = sorted(set(saved.items()) ^ set(expected.items()))[:4]
      raise CheckpointMismatchError(
          f"The checkpoint {self.directory / str(step)} holds parameters of another model (differences: "
          f"{diff}). It was not changed. Use a run directory whose config matches that checkpoint, or a new "
          "one (hydra.run.dir=...).")

  def _restore_any(self, like: Any, step: int, legacy: Sequence[tuple[Any, Callable]]) -> Any:
    """The checkpoint in `like`'s structure or, failing that, in a legacy layout converted to it."""
    try:
      return self.restore(like, step)
    except Exception:  # noqa: BLE001  try the layouts earlier versions wrote before calling it unreadable
      for old_like, convert in legacy:
        try:
          return convert(self.restore(old_like, step))
        except Exception:  # noqa: BLE001
          continue
      raise

  def restore_latest_good(self, like: Any, legacy: Sequence[tuple[Any, Callable]] = ()) -> Optional[Any]:
    """The newest readable checkpoint restored into `like`'s structure, or None when there is none.
    `legacy`: (structure, convert) pairs of layouts an earlier version wrote, tried in turn.

    An unreadable checkpoint is renamed `<step>.corrupt` (kept for inspection, ignored from then on)
    with a warning naming it; one of another architecture stops the run instead.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        check_manifest(self.directory / str(step))
        if jax.process_index() == 0 and merge_process_files(self.directory / str(step)):
          log.warning("Checkpoint %s was saved without its merged OCDBT manifest (an Orbax save under a directory "
                      "named with brackets); merged it now.", self.directory / str(step))
        self._check_architecture(step, like)
        with _quiet_background_failures():
          return self._restore_any(like, step, legacy)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # noqa: BLE001  any read failure means this checkpoint is unusable
        path = self.directory / str(step)
        if jax.process_index() != 0:  # the first process sets it aside; each process reads the previous one
          continue
        quarantine = path.with_name(f"{step}.corrupt")
        n = 1
        while quarantine.exists():
          quarantine, n = path.with_name(f"{step}.corrupt{n}"), n + 1
        path.rename(quarantine)
        log.warning("Checkpoint %s is unreadable (%s: %s); renamed it %s and trying the previous one.",
                    path, type(e).__name__, str(e)[:200], quarantine.name)
        self._manager.reload()
    return None

  def wait(self) -> None:
    with self._disk_full_says():
      self._manager.wait_until_finished()
    step = self._last_saved[0]
    step_dir = self.directory / str(step)
    # Several processes save one checkpoint together; the first, whose wait returns once it is complete, writes
    # the manifest.
    if step is not None and jax.process_index() == 0 and step_dir.is_dir() and not (step_dir / MANIFEST).exists():
      with self._disk_full_says():
        merge_process_files(step_dir)
        write_manifest(step_dir)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()
