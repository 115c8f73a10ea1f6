"""Where runs persist: cached task results (a local directory by default, any fsspec URL otherwise),
and the summary of the last pipeline run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from flows.env import RESULT_STORAGE_ENV

RESULTS_DIRNAME = "prefect-results"
LATEST = Path("reports") / "latest.json"  # under output.root: the last pipeline run, for `gemma-lora report`


def read_latest(output_root: str | Path) -> dict | None:
    """The last pipeline run's summary under ``output_root``; None when there is none or it is unreadable."""
    try:
        return json.loads((Path(output_root) / LATEST).read_text())
    except (OSError, ValueError):
        return None


def result_storage_location(url: str | None, out_root: str | Path) -> str:
    """The storage URL or path: ``url``, else ``$GEMMA_LORA_RESULT_STORAGE``, else ``<output.root>/prefect-results``."""
    return url or os.environ.get(RESULT_STORAGE_ENV) or str(Path(out_root) / RESULTS_DIRNAME)


def make_result_storage(location: str):
    """What a task's ``result_storage`` option takes for ``location``.

    A local path (or ``file://``) is passed as a ``Path``. Any other fsspec URL (``s3://bucket/prefix``,
    ``gs://...``, ``memory://...``; the matching fsspec package must be installed) becomes a
    ``RemoteFileSystem`` block, which Prefect only accepts on a task once it is saved on the server:
    it is saved under a name derived from the URL, so repeated runs reuse one block document.
    """
    if "://" in location and not location.startswith("file://"):
        from prefect.filesystems import RemoteFileSystem

        basepath = location.rstrip("/")
        name = "gemma-lora-results-" + hashlib.sha256(basepath.encode()).hexdigest()[:12]
        block = RemoteFileSystem(basepath=basepath)
        block.save(name, overwrite=True)
        return block
    path = Path(location.removeprefix("file://")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
