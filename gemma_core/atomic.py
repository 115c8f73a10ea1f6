"""Writes that are all-or-nothing: a crash midway leaves the old file (or none), never half a file.

Everything is written to a temporary sibling, flushed to disk, then renamed over the target;
``os.replace`` is atomic on POSIX within one file system.

A temporary sibling is hidden and names its writer: ``.{target}.{host}-{pid}.{random}.tmp``. A writer
killed mid-write (SIGKILL, OOM) leaves it behind; :func:`remove_leftovers`, called by the next run of
that stage, removes those whose writer is gone and never one that a live process is writing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import psutil

log = logging.getLogger(__name__)


# The device or the user's quota is full: the write cannot succeed until space is freed.
_FULL = (errno.ENOSPC, errno.EDQUOT)
# fsync errors that mean the data did not reach the disk (others, such as EINVAL on a directory of a
# file system that cannot sync directories, are harmless).
_LOST = (*_FULL, errno.EIO)


class DiskFullError(OSError):
    """No space left while writing a file or directory; the message names it, and whatever was at that
    path before is untouched (the write went to a temporary sibling that is removed again)."""


def _name_full_disk(err: Exception, target: Path) -> Exception:
    """``err`` itself, or, for a full disk, a :class:`DiskFullError` that names ``target`` and the space left
    (a bare ENOSPC from ``write`` names no file). HDF5 (Keras weights through h5py) reports a full disk
    as a RuntimeError whose text carries the errno, so that text counts too."""
    if isinstance(err, DiskFullError):
        return err
    if isinstance(err, OSError):
        code = err.errno if err.errno in _FULL else None
    else:
        text = str(err)
        code = next((c for c in _FULL if f"errno = {c}," in text or os.strerror(c) in text), None)
    if code is None:
        return err
    try:
        room = f"{shutil.disk_usage(target.parent).free / 2**20:.1f} MiB free there"
    except OSError:
        room = "free space unknown"
    cause = " ".join(str(err).split())[:300]
    return DiskFullError(
        code,
        f"{os.strerror(code)} while writing {target} ({room}); anything already at that path is "
        f"untouched: free some space and rerun (cause: {type(err).__name__}: {cause})",
        str(target),
    )


@contextlib.contextmanager
def _naming_full_disk(target: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, RuntimeError) as err:
        named = _name_full_disk(err, target)
        if named is err:
            raise
        raise named from err


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` only if the block succeeds.

    >>> with atomic_path("out.parquet") as tmp:   # doctest: +SKIP
    ...     table.to_parquet(tmp)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _naming_full_disk(target):
        fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _naming_full_disk(target):
            yield tmp
            _fsync_path(tmp)
            os.replace(tmp, target)
            _fsync_path(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` as a whole when the block succeeds.

    If another process published ``target`` first, its copy is kept and ours is discarded: two
    writers of the same content-addressed directory never leave a mix of both.
    An empty directory at ``target`` is replaced. With ``replace=True`` an existing ``target`` is
    swapped out for ours (exports, where the newest wins).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _naming_full_disk(target):
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=TEMP_SUFFIX, dir=target.parent))
    try:
        with _naming_full_disk(target):
            yield tmp
            for path in tmp.rglob("*"):
                if path.is_file():
                    _fsync_path(path)
            if replace and target.exists():
                old = target.with_name(f"{_temp_prefix(target)}{secrets.token_hex(4)}{TEMP_SUFFIX}")
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                try:
                    os.rename(tmp, target)  # fails if target exists and is non-empty
                except OSError:
                    if not target.exists():
                        raise
                    # Another writer published the same content-addressed directory first: keep
                    # theirs. Directories only appear here by rename, so an existing one is complete;
                    # callers that find one corrupted delete it before rebuilding.
            _fsync_path(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno in _LOST:  # the bytes did not reach the disk: never publish the file as complete
            raise
    finally:
        os.close(fd)


# --- temporary names, and the leftovers of killed writers ------------------------------------------------

TEMP_SUFFIX = ".tmp"
# Host names can hold '-' and '.': kept to [A-Za-z0-9_] so that '-' only separates host and pid.
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
# .{target}.{host}-{pid}.{random}.tmp (random: tempfile's or token_hex's characters, no '.')
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
# A live writer touches its temp entry after it started; allow for clock granularity (seconds).
_CLOCK_SLACK_S = 2.0


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{_HOST}-{os.getpid()}."


def _writer_alive(host: str, pid: int, modified: float) -> bool:
    """Whether the process that named itself ``host-pid`` may still be writing an entry last modified at
    ``modified``. A process of another host cannot be checked from here: it counts as alive. A pid
    that exists again but started after the entry was last modified is a new process (pid reuse): the
    writer is gone."""
    if host != _HOST:
        return True
    if pid == os.getpid():
        return True  # this process: another thread may be writing it right now
    try:
        started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # e.g. access denied: it exists, and we cannot tell more
        return True
    return started <= modified + _CLOCK_SLACK_S


def remove_leftovers(directory: str | os.PathLike, *, any_writer: bool = False) -> list[Path]:
    """Remove the temporary files and directories that killed writers left below ``directory`` (its
    subdirectories too, not inside a temporary directory); returns what was removed, each logged.

    Only entries named like this module's temporaries count, and only those whose writer (the host
    and pid in the name) no longer runs on this host. A directory with a hidden lock file that a
    live process holds (the training lock ``.train.lock``, the registry's ``.lock``) is left alone,
    with what is below it: its holder sweeps it.

    ``any_writer=True`` is for that holder: it removes every temporary, whoever wrote it (another
    host's, the older unnamed ``.{target}.{random}.tmp``), and ignores the locks; only for a caller
    that holds the lock every writer of ``directory`` holds, so that no live writer can be in there.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); (d / ".x.json.otherhost-1.abc.tmp").touch()
    >>> remove_leftovers(d), [p.name for p in remove_leftovers(d, any_writer=True)]
    ([], ['.x.json.otherhost-1.abc.tmp'])
    """
    root = Path(directory)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for current, dirnames, filenames in os.walk(root):
        here = Path(current)
        if not any_writer and any(_lock_held(here / name) for name in filenames
                                  if name.startswith(".") and name.endswith("lock")):
            log.debug("not sweeping %s: its lock is held by a live process", here)
            dirnames[:] = []
            continue
        for name in [*dirnames, *filenames]:
            if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
                continue
            path = here / name
            if not any_writer:
                named = _TEMP_NAME.match(name)
                try:
                    modified = path.lstat().st_mtime
                except FileNotFoundError:
                    continue  # renamed into place or removed meanwhile by its writer
                if named is None or _writer_alive(named["host"], int(named["pid"]), modified):
                    continue
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                continue
            except OSError as err:  # a sweep never fails the stage that asked for it
                log.warning("could not remove %s, left by a killed writer: %s", path, err)
                continue
            log.info("removed %s, left by a killed writer", path)
            removed.append(path)
        # never walk into a temporary directory (removed above, or a live writer's)
        dirnames[:] = [d for d in dirnames if not (d.startswith(".") and d.endswith(TEMP_SUFFIX))]
    return removed


def _lock_held(path: Path) -> bool:
    """Whether a process holds a ``flock`` on ``path`` (filelock's FileLock is one on POSIX; the kernel
    drops it when its process dies, SIGKILL included). Probing takes the lock for an instant: a
    writer that asks for it meanwhile waits that instant."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False
