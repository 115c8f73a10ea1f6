"""Cache keys from content and code, and cached results that are checked before they are trusted.

Prefect's default cache policy includes the flow run id, so it reuses nothing across runs. Every
task here uses :data:`CONTENT_CACHE` instead, whose key is a hash of

- the task's inputs, where an upstream stage result counts by its content hash only (not by its
  timings or paths) and a config section by its values;
- the task's own source (``TASK_SOURCE``), and
- the sources of the code the task runs: the whole ``gemma_core`` package (including its sample
  data) and this ``tasks`` package. ``TASK_SOURCE`` alone misses an edited ``gemma_core`` helper.

Before a cached result is returned, :class:`ContentCache` reads the record and asks the result
(a :class:`~tasks.results.StageResult`) whether the files it points to still exist and match their
sha256. If not, the record is overwritten with an expired tombstone, so Prefect sees no valid cache
entry and runs the task again.

The same input hash names each stage's output directory (:func:`input_fingerprint`), so a changed
input never finds a stale file under a fixed name.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from pydantic import BaseModel

log = logging.getLogger(__name__)

# Bump to invalidate every cached stage at once (e.g. after a change to how results are laid out).
CACHE_VERSION = "1"
_CODE_SUFFIXES = (".py", ".jsonl", ".json", ".txt", ".yaml", ".yml", ".toml")


def _package_files(package_dir: Path) -> Iterable[Path]:
    for path in sorted(package_dir.rglob("*")):
        if path.is_file() and path.suffix in _CODE_SUFFIXES and "__pycache__" not in path.parts:
            yield path


@functools.lru_cache(maxsize=None)
def code_hash() -> str:
    """sha256 over the sources of ``gemma_core`` and ``tasks`` (paths and bytes), computed once per process."""
    import gemma_core

    digest = hashlib.sha256()
    # From __file__, not the package objects: an install can expose a package as a namespace
    # package (no __file__).
    roots = {"gemma_core": Path(gemma_core.__file__).resolve().parent, "tasks": Path(__file__).resolve().parent}
    for name, root in roots.items():
        for path in _package_files(root):
            digest.update(f"{name}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def identity(value: Any) -> Any:
    """What of ``value`` goes into a cache key: a stage result's content hash, a config's values."""
    cache_identity = getattr(value, "cache_identity", None)
    if callable(cache_identity):
        return cache_identity()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {str(k): identity(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [identity(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def input_fingerprint(stage: str, inputs: Mapping[str, Any]) -> str:
    """Hash of a stage's name, inputs and code: the name of its output directory."""
    payload = {
        "stage": stage,
        "cache_version": CACHE_VERSION,
        "code": code_hash(),
        "inputs": {k: identity(v) for k, v in sorted(inputs.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class ContentCache(CachePolicy):
    """Key = inputs (by content, :func:`identity`) + task source + package sources; a cached result
    must verify. A config that leaves some fields out of its key says so itself (``TrainConfig``)."""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        source_key = TASK_SOURCE.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        stage = task_ctx.task.fn.__qualname__ if task_ctx else "unknown"
        key = hashlib.sha256(f"{input_fingerprint(stage, inputs)}:{source_key}".encode()).hexdigest()
        _drop_if_stale(key, task_ctx)
        return key


CONTENT_CACHE = ContentCache()


def _drop_if_stale(key: str, task_ctx: TaskRunContext | None) -> None:
    """If a cached record exists for ``key`` but its files are gone or changed, expire the record."""
    from prefect.results import get_result_store

    store = get_result_store()
    try:
        if not store.exists(key):
            _report_unreadable(store, key, task_ctx)
            return
        record = store.read(key)
    except Exception as err:  # unreadable record: Prefect will treat it as absent or fail; log why
        log.warning("cache record %s is unreadable (%s); the task will run again", key[:12], err)
        return
    result = record.result
    verify = getattr(result, "verify", None)
    problem = verify() if callable(verify) else None
    if problem is None:
        return
    name = task_ctx.task.name if task_ctx else "task"
    _logger().warning("cached result of %s is no longer valid (%s): running it again", name, problem)
    past = _dt.datetime(2000, 1, 1, tzinfo=_dt.timezone.utc)
    store.write(obj=None, key=key, expiration=past)


def _report_unreadable(store, key: str, task_ctx: TaskRunContext | None) -> None:
    """Prefect's ``exists`` is False both when no record is stored and when the stored one cannot be
    read (cut short by a crash or a full disk, edited): the task reruns either way; say so in the second case."""
    if store.result_storage is None:
        return
    try:
        store.read(key)
    except Exception as err:
        # Prefect's storages say a missing path with ValueError("... does not exist") (local) or
        # FileNotFoundError (fsspec): nothing is stored under this key, nothing to report.
        if isinstance(err, FileNotFoundError) or "does not exist" in str(err):
            return
        where = f"{str(getattr(store.result_storage, 'basepath', '')).rstrip('/')}/{key}"
        name = task_ctx.task.name if task_ctx else "task"
        _logger().warning("cached result record %s of %s is unreadable (%s: %s): running it again",
                          where, name, type(err).__name__, str(err)[:200])


def _logger():
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log
