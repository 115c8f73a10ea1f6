"""One run at a time per cache key: a Prefect lock manager on ``flock`` lock files, so that runs started
together with the same inputs (many users pressing Run, a schedule meeting a manual run, a load
test's 24 runs) compute each stage once, and the others wait and find it Cached.

The stages' cache policy is configured ``SERIALIZABLE`` with this lock manager (flows/stages.py):
Prefect takes the key's lock before it looks for a cached result and releases it once the result is
written (or the task failed). The lock files live under ``output.root`` (``.locks/``), which every
worker of a scale-out set-up shares.

Why not Prefect's own ``FileSystemLockManager``: its lock is a file that says who holds it, which
outlives a process that was killed (a SIGKILLed training, an OOM), and every later run of that
stage would wait on it forever. A ``flock`` is the kernel's: it goes with the process that held it.

    >>> locks = FlockLockManager(Path(tempfile.mkdtemp()))
    >>> locks.acquire_lock("key", holder="a")
    True
    >>> locks.is_locked("key"), locks.is_lock_holder("key", "a"), locks.is_lock_holder("key", "b")
    (True, True, False)
    >>> locks.release_lock("key", holder="a"); locks.is_locked("key")
    False
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import tempfile  # noqa: F401  (the docstring's example)
import threading
import time
from pathlib import Path

LOCKS_DIRNAME = ".locks"
POLL_S = 0.2


class FlockLockManager:
    """Prefect's LockManager protocol (prefect.locking.protocol) on ``<directory>/<key>.lock`` files."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._held: dict[str, tuple[int, str]] = {}  # key -> (file descriptor, holder), in this process
        self._guard = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.lock"

    def _open(self, key: str) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        return os.open(self._path(key), os.O_RDWR | os.O_CREAT, 0o644)

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        """Block until this holder has the lock (False after ``acquire_timeout`` seconds). The lock is
        held until released or until this process ends; ``hold_timeout`` is not needed for that."""
        with self._guard:
            if key in self._held:
                if self._held[key][1] == holder:
                    return True
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        fd = self._open(key)
        said = False
        while True:
            try:
                # A separate descriptor per attempt: flocks on two descriptors conflict even within
                # one process, so two threads of one run also take turns.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:  # a run that waits says so, once
                    self._say_waiting(key)
                    said = True
                if deadline is not None and time.monotonic() > deadline:
                    os.close(fd)
                    return False
                time.sleep(POLL_S)
        with self._guard:
            self._held[key] = (fd, holder)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        with self._guard:
            held = self._held.get(key)
            if held is None:
                return
            if held[1] != holder:
                raise ValueError(f"lock {key!r} is held by {held[1]!r}, not {holder!r}: only its holder releases it")
            del self._held[key]
        fcntl.flock(held[0], fcntl.LOCK_UN)
        os.close(held[0])

    def is_locked(self, key: str) -> bool:
        with self._guard:
            if key in self._held:
                return True
        if not self._path(key).exists():
            return False
        fd = self._open(key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        with self._guard:
            held = self._held.get(key)
        return held is not None and held[1] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until no one holds the lock; False if it is still held after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        said = False
        while self.is_locked(key):
            if not said:  # Prefect waits here before it reads a record another run is writing
                self._say_waiting(key)
                said = True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return True

    def _say_waiting(self, key: str) -> None:
        _logger().info("another run is computing this stage (lock %s): waiting for it", self._path(key))

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self.wait_for_lock, key, timeout)


def _logger():
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:  # the lock is taken before the task run's context exists
        from prefect.logging import get_logger

        return get_logger("gemma_lora.stage_locks")  # under `prefect`: shown where Prefect's logs are


def stage_lock_manager(out_root: str | Path) -> FlockLockManager:
    """The lock manager of the stages writing under ``out_root``."""
    return FlockLockManager(Path(out_root) / LOCKS_DIRNAME)
