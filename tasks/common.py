"""Task options shared by every stage."""

from __future__ import annotations

from typing import Any

from tasks.caching import CONTENT_CACHE

# Results are JSON (readable in the result storage, and a renamed class degrades to a cache miss,
# never to a wrong object); they persist so that a later run, or a retried one, can reuse them.
CACHED: dict[str, Any] = {
    "cache_policy": CONTENT_CACHE,
    "persist_result": True,
    "result_serializer": "json",
}


def transient_error(task, task_run, state) -> bool:
    """Retry only what a retry can fix: network and other transient I/O errors, not bad input."""
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))
    name = type(exc).__name__
    return name in {"HTTPError", "ReadTimeout", "ConnectTimeout", "ConnectError", "RemoteDisconnected"}
