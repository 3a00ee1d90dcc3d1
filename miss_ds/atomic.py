"""Atomic multi-rank checkpoint directories, independent of what is saved, plus RNG state capture.

Layout under ``root``::

    step_00000100/            complete: manifest.json lists every file with size and sha256
    .tmp-step_00000200/       a save in progress (or an interrupted one, removed at start)

A save becomes visible only through one ``os.rename`` of the temp dir to ``step_<N>``, done by global
rank 0 after every rank reported success and after the manifest and all files were fsynced, so a crash
at any point leaves the previous complete checkpoints or the new one, never a half-written ``step_*``.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_SAVE_ID = ".save-id"
_RANK_STATUS = ".rank-{rank:05d}.status"
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: Below this much free space an I/O error without errno (torch.save raises RuntimeError) counts as disk full.
_DISK_FULL_FREE_BYTES = 64 * 2**20
_HASH_CHUNK = 8 * 2**20

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, found or verified."""


class DiskFullError(CheckpointError):
    """A save failed because the filesystem ran out of space (or quota); earlier checkpoints are intact."""


def step_dir_name(step: int) -> str:
    """Directory name of the complete checkpoint for ``step``."""
    return f"step_{step:08d}"


def read_manifest(path: PathLike) -> dict[str, Any]:
    """The parsed manifest of checkpoint ``path``; CheckpointError if it is missing or unreadable."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST}: it is not a complete checkpoint "
                              "(an interrupted save, or not written by miss_ds.atomic)")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or not {"step", "files"} <= manifest.keys():
        raise CheckpointError(f"{file} is malformed: it needs 'step' and 'files'")
    return manifest


def verify(path: PathLike, full: bool = True, only: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Check that every file in the manifest of ``path`` exists with its recorded size and, if ``full``,
    its sha256; return the manifest. Raises CheckpointError naming the first bad file.

    ``only`` (relative paths: files, or directories meaning every file under them) limits the check to the files
    a reader uses; each that is on disk must match a file of the manifest, so nothing a reader reads goes
    unchecked (one on neither is not read: an adapter-only checkpoint has no trainer state)."""
    path = Path(path)
    manifest = read_manifest(path)
    entries = manifest["files"]
    if only is not None:
        unlisted = [name for name in only if (path / name).exists()
                    and not any(_under(entry["path"], name) for entry in entries)]
        if unlisted:
            raise CheckpointError(f"checkpoint {path} is incomplete: its {MANIFEST} lists no file "
                                  f"{unlisted[0]!r}")
        entries = [entry for entry in entries if any(_under(entry["path"], name) for name in only)]
    for entry in entries:
        file = path / entry["path"]
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: file {entry['path']!r} "
                                  f"({entry['size']} bytes in the manifest) is missing")
        size = file.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: file {entry['path']!r} has {size} bytes, "
                                  f"the manifest records {entry['size']} (truncated or overwritten)")
        if full and _sha256(file)[0] != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: file {entry['path']!r} does not match "
                                  "its sha256 in the manifest")
    return manifest


def _under(file: str, name: str) -> bool:
    """Whether the manifest path ``file`` is ``name`` or lies in the directory ``name``."""
    return file == name or file.startswith(name.rstrip("/") + "/")


def _step_dirs(directory: PathLike) -> list[Path]:
    """All ``step_*`` directories in ``directory``, complete or not, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoints_within(path: Path) -> Optional[Path]:
    """The directory of checkpoints that ``path`` is or holds (a run's output_dir holds its ``checkpoints/``), where
    a checkpoint was named by mistake; None when ``path`` is a checkpoint itself or holds none."""
    if (path / MANIFEST).exists():
        return None
    return next((d for d in (path, *sorted(c for c in path.iterdir() if c.is_dir())) if _step_dirs(d)), None)


class CheckpointManager:
    """Creates, finds, validates and prunes the checkpoints under ``root``; see the module docstring.

    Every rank constructs one with the same ``root`` and calls :meth:`save` together. ``barrier`` must
    synchronise all ``world_size`` ranks (e.g. ``torch.distributed.barrier``). For multi-node runs ``root``
    must be on a filesystem shared by all ranks. ``keep_last=None`` keeps every checkpoint.
    """

    def __init__(self, root: PathLike, keep_last: Optional[int] = None, rank: int = 0, world_size: int = 1,
                 barrier: Optional[Callable[[], None]] = None, tp_size: int = 1) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last}")
        if world_size > 1 and barrier is None:
            raise ValueError("a barrier is required when world_size > 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.tp_size = tp_size
        self._barrier = barrier or (lambda: None)
        # Rank 0's first save removes what interrupted saves left: a manager that only reads changes nothing (the
        # temp dirs it finds may be the saves of a run in progress).
        self._stale_removed = False

    def step_path(self, step: int) -> Path:
        """Where the complete checkpoint of ``step`` lives (whether or not it exists)."""
        return self.root / step_dir_name(step)

    def checkpoints(self) -> list[Path]:
        """All ``step_*`` directories, complete or not, oldest step first."""
        return _step_dirs(self.root)

    def latest(self, full: bool = False) -> Optional[Path]:
        """The newest checkpoint that verifies (sizes only unless ``full``), skipping bad ones with a warning."""
        for path in reversed(self.checkpoints()):
            try:
                verify(path, full)
                return path
            except CheckpointError as exc:
                logger.warning("skipping checkpoint %s: %s", path, exc)
        return None

    def resolve(self, resume: Optional[str], full: bool = False) -> Optional[Path]:
        """Turn a ``resume`` setting into a checkpoint path: None -> None, ``"auto"`` -> :meth:`latest`
        (None if there is none), otherwise a path (absolute, or relative to cwd or to ``root``) that must
        verify (sha256 too if ``full``); raises CheckpointError saying what is wrong and listing the complete
        checkpoints of the directory the path names (verified the same way)."""
        if resume is None:
            return None
        if resume == "auto":
            return self.latest(full)
        path = Path(resume).expanduser()
        if not path.exists() and not path.is_absolute() and (self.root / path).exists():
            path = self.root / path
        # A bare name may mean one under root; a path with a directory names where its siblings are.
        siblings = path.parent if path.parent != Path(".") or path.exists() else self.root
        if not path.is_dir():
            raise CheckpointError(f"resume checkpoint {resume!r} not found (no directory {path.absolute()}). "
                                  f"{self._resume_hint(siblings, full)}")
        held = checkpoints_within(path)
        if held is not None:
            raise CheckpointError(f"resume checkpoint {resume!r} is not a checkpoint but holds checkpoints: name one. "
                                  f"{self._resume_hint(held, full)}")
        try:
            verify(path, full)
        except CheckpointError as exc:
            raise CheckpointError(f"cannot resume from {path}: {exc}. {self._resume_hint(siblings, full)}") from None
        return path

    def save(self, step: int, write_fn: Callable[[Path], None],
             metadata: Optional[dict[str, Any]] = None) -> Path:
        """Write checkpoint ``step`` atomically and return its ``step_<N>`` path. Every rank must call this;
        ``write_fn(temp_dir)`` writes this rank's files. ``metadata`` (JSON-serialisable, read on rank 0)
        goes into the manifest. On any failure every rank raises and no ``step_<N>`` is created; a full disk
        raises DiskFullError. Protocol: rank 0 makes the temp dir | barrier | all write | barrier | rank 0
        checks, writes manifest, fsyncs, renames, prunes | barrier | other ranks confirm the commit."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        temp = self.root / f"{_TMP_PREFIX}{step_dir_name(step)}"
        final = self.step_path(step)
        save_id = secrets.token_hex(8) if self.rank == 0 else ""  # non-zero ranks read rank 0's
        failure: Optional[Exception] = None
        if self.rank == 0:
            try:
                if not self._stale_removed:
                    self._remove_stale_temp_dirs()
                    self._stale_removed = True
                self._prepare(temp, save_id, metadata)
            except Exception as exc:  # noqa: BLE001 - re-raised after the barriers below
                failure = self._classify(exc, step, temp)
        self._barrier()  # the temp dir exists
        if failure is None:
            try:
                save_id = self._write(temp, write_fn)
            except Exception as exc:  # noqa: BLE001
                failure = self._classify(exc, step, temp)
                self._write_status(temp, failure)
        self._barrier()  # every rank has finished writing
        if self.rank == 0:
            if failure is None:
                try:
                    self._commit(step, temp, final, save_id, metadata or {})
                except Exception as exc:  # noqa: BLE001
                    failure = self._classify(exc, step, temp)
            if failure is None:
                self._after_commit(final)
            else:
                shutil.rmtree(temp, ignore_errors=True)
        self._barrier()  # committed or aborted
        if failure is not None:
            raise failure
        if self.rank != 0 and _manifest_or_empty(final).get("save_id") != save_id:
            raise CheckpointError(f"checkpoint {final} was not committed: rank 0 aborted the save "
                                  "(its log has the reason)")
        return final

    # -- save phases -------------------------------------------------------------------------------

    def _prepare(self, temp: Path, save_id: str, metadata: Optional[dict[str, Any]]) -> None:
        """Rank 0: validate metadata, replace any stale temp dir of this step, publish the save id."""
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"checkpoint metadata must be JSON-serialisable: {exc}") from None
        if temp.exists():
            logger.warning("removing stale temp dir %s", temp)
            shutil.rmtree(temp)
        self.root.mkdir(parents=True, exist_ok=True)
        temp.mkdir()
        (temp / _SAVE_ID).write_text(save_id)

    def _write(self, temp: Path, write_fn: Callable[[Path], None]) -> str:
        """Run ``write_fn`` and report success to rank 0; return the save id rank 0 published."""
        try:
            save_id = (temp / _SAVE_ID).read_text()
        except OSError:
            raise CheckpointError(f"rank 0 did not create {temp}; its log has the reason") from None
        write_fn(temp)
        if self.rank != 0:
            _write_json(temp / _RANK_STATUS.format(rank=self.rank), {"ok": True})
        return save_id

    def _write_status(self, temp: Path, failure: Exception) -> None:
        """Best effort: tell rank 0 why this rank failed (it may fail itself when the disk is full)."""
        if self.rank == 0:
            return
        status = {"ok": False, "disk_full": isinstance(failure, DiskFullError),
                  "error": f"{type(failure).__name__}: {failure}"}
        try:
            _write_json(temp / _RANK_STATUS.format(rank=self.rank), status)
        except OSError:
            pass

    def _commit(self, step: int, temp: Path, final: Path, save_id: str, metadata: dict[str, Any]) -> None:
        """Rank 0: check all ranks succeeded, write and fsync the manifest, rename into place."""
        self._check_ranks(temp)
        (temp / _SAVE_ID).unlink()
        files = _describe_and_fsync(temp)
        _write_json(temp / MANIFEST, {
            "version": MANIFEST_VERSION, "step": step, "save_id": save_id,
            "time": time.time(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "world_size": self.world_size, "tp_size": self.tp_size, "metadata": metadata,
            "total_bytes": sum(f["size"] for f in files), "files": files})
        for directory, _, _ in os.walk(temp):
            _fsync_path(Path(directory))
        if final.exists():  # the same step saved again: the new one replaces it
            self._discard(final)
        os.rename(temp, final)

    def _check_ranks(self, temp: Path) -> None:
        """Rank 0: raise unless every other rank left an ok status file; remove the status files."""
        problems, disk_full = [], False
        for rank in range(1, self.world_size):
            file = temp / _RANK_STATUS.format(rank=rank)
            try:
                status = json.loads(file.read_text())
            except (OSError, ValueError):
                status = {"ok": False, "error": "no status file (it crashed, could not write it, "
                                                "or cannot see the temp dir)"}
            if not status["ok"]:
                problems.append(f"rank {rank}: {status['error']}")
                disk_full |= status.get("disk_full", False)
            file.unlink(missing_ok=True)
        if problems:
            error = DiskFullError if disk_full else CheckpointError
            raise error(f"not committing {temp}, other ranks failed: " + "; ".join(problems))

    def _after_commit(self, final: Path) -> None:
        """Rank 0: make the rename durable and prune; failures here only warn, the checkpoint is complete."""
        try:
            _fsync_path(self.root)
            self._prune(keep=final)
        except OSError as exc:
            logger.warning("checkpoint %s is complete, but fsync/pruning of %s failed: %s", final, self.root, exc)

    def _prune(self, keep: Path) -> None:
        """Delete step dirs except ``keep`` and the newest ``keep_last`` complete ones."""
        if self.keep_last is None:
            return
        complete = [p for p in reversed(self.checkpoints()) if _is_complete(p)]
        kept = set(complete[:self.keep_last]) | {keep}
        for path in self.checkpoints():
            if path not in kept:
                logger.info("pruning checkpoint %s (keep_last=%d)", path, self.keep_last)
                self._discard(path)

    def _discard(self, path: Path) -> None:
        """Delete a directory by first renaming it to a temp name, so a crash never leaves a partial step dir."""
        trash = self.root / f"{_TMP_PREFIX}discard-{path.name}-{secrets.token_hex(4)}"
        os.rename(path, trash)
        shutil.rmtree(trash)

    def _remove_stale_temp_dirs(self) -> None:
        for path in self.root.glob(f"{_TMP_PREFIX}*"):
            logger.warning("removing %s left by an interrupted save or prune", path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    # -- errors ------------------------------------------------------------------------------------

    def _classify(self, exc: Exception, step: int, temp: Path) -> Exception:
        """Turn an out-of-space failure into a DiskFullError that says where, how much and what to do."""
        if not _is_disk_full(exc, self.root):
            return exc
        previous = self.latest()
        previous_size = ""
        if previous is not None:
            size = sum(f["size"] for f in read_manifest(previous)["files"])
            previous_size = f", the previous checkpoint {previous.name} has {_format_bytes(size)}"
        error = DiskFullError(
            f"disk full while saving checkpoint step {step} to {temp} ({exc}): "
            f"{_format_bytes(_tree_size(temp))} had been written{previous_size}, and "
            f"{_format_bytes(_free_bytes(self.root))} is free on the filesystem of {self.root}. "
            "The partial checkpoint is deleted and earlier checkpoints are intact; free space, "
            "lower keep_last, or move the output dir to a larger disk.")
        error.__cause__ = exc
        return error

    def _resume_hint(self, directory: Path, full: bool) -> str:
        """What to resume instead: ``auto``, or one of the checkpoints of ``directory`` that verify."""
        if directory.is_dir():
            complete = [p.name for p in _step_dirs(directory) if _is_complete(p, full)]
            found = f"complete checkpoints in {directory}: {', '.join(complete) if complete else 'none'}"
        else:
            found = f"there is no directory {directory.absolute()}"
        return (f"Pass resume='auto' to use the newest complete checkpoint of {self.root}, or the path of another "
                f"one ({found}).")


# -- RNG state -------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and (if available) CUDA RNG states as a dict of plain types and tensors,
    so it pickles and loads with ``torch.load(..., weights_only=True)``. Save one per rank."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only for devices that exist here)."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


# -- file helpers ----------------------------------------------------------------------------------

def _manifest_or_empty(path: Path) -> dict[str, Any]:
    try:
        return read_manifest(path)
    except CheckpointError:
        return {}


def _is_complete(path: Path, full: bool = False) -> bool:
    """Whether ``path`` verifies (sizes only unless ``full``)."""
    try:
        verify(path, full)
        return True
    except CheckpointError:
        return False


def _sha256(file: Path) -> tuple[str, int]:
    """Hex sha256 and byte count of ``file``; also fsyncs it, since the data is at hand."""
    digest, size = hashlib.sha256(), 0
    with open(file, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        _fsync_fd(f.fileno())
    return digest.hexdigest(), size


def _describe_and_fsync(directory: Path) -> list[dict[str, Any]]:
    """Manifest entries (relative path, size, sha256) of the regular files under ``directory``."""
    entries = []
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink()):
        sha256, size = _sha256(file)
        entries.append({"path": file.relative_to(directory).as_posix(), "size": size, "sha256": sha256})
    return entries


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        _fsync_fd(f.fileno())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _fsync_fd(fd)
    finally:
        os.close(fd)


def _fsync_fd(fd: int) -> None:
    """fsync, tolerating filesystems that do not support it on this kind of object."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.ENOSYS):
            raise


def _is_disk_full(exc: BaseException, root: Path) -> bool:
    """True if the error chain has ENOSPC/EDQUOT, or it is an I/O error without errno (torch.save's
    RuntimeError) while the filesystem of ``root`` is (nearly) full."""
    cause: Optional[BaseException] = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL_ERRNOS:
            return True
        if "No space left on device" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return isinstance(exc, (OSError, RuntimeError)) and 0 <= _free_bytes(root) < _DISK_FULL_FREE_BYTES


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def _tree_size(directory: Path) -> int:
    if not directory.is_dir():
        return 0
    return sum(p.lstat().st_size for p in directory.rglob("*") if p.is_file() and not p.is_symlink())


def _format_bytes(n: float) -> str:
    if n < 0:
        return "an unknown amount"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
