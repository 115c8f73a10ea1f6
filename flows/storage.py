"""Where runs persist: cached task results (a local directory by default, any fsspec URL otherwise),
and the summary of the last pipeline run.

A storage URL that holds a credential (``s3://KEY:SECRET@bucket/prefix``) is never a flow-run
parameter: Prefect keeps parameters in its database and shows them in the UI. It reaches the flows
through ``GEMMA_LORA_RESULT_STORAGE`` (:func:`parameter_for_storage`), intact, and is written
redacted wherever the project writes it (:mod:`gemma_core.redact`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from flows.env import RESULT_STORAGE_ENV
from gemma_core.atomic import atomic_write_text
from gemma_core.redact import has_credentials, redact, redact_text

RESULTS_DIRNAME = "prefect-results"
LATEST = Path("reports") / "latest.json"  # under output.root: the last pipeline run, for `gemma-lora report`


def read_latest(output_root: str | Path) -> dict | None:
    """The last pipeline run's summary under ``output_root``; None when there is none or it is unreadable."""
    try:
        return json.loads((Path(output_root) / LATEST).read_text())
    except (OSError, ValueError):
        return None


def write_latest(output_root: str | Path, summary: dict) -> Path:
    """Write the last pipeline run's summary (``reports/latest.json``), credentials in URLs redacted."""
    return atomic_write_text(Path(output_root) / LATEST, json.dumps(redact(summary), indent=1, sort_keys=True) + "\n")


class CredentialInParameterError(ValueError):
    """A result storage URL with an inline credential was given as a flow-run parameter."""


def parameter_for_storage(url: str | None, environ: dict | None = None) -> str | None:
    """What to pass as a flow's ``result_storage`` parameter for ``url``: ``url`` itself, or, when it holds
    a credential, None after putting it in ``GEMMA_LORA_RESULT_STORAGE`` of this process (which the
    flows read, and in-process child runs inherit). For the CLI, before it starts a flow.

    >>> env = {}
    >>> parameter_for_storage("s3://bucket/prefix", env), env
    ('s3://bucket/prefix', {})
    >>> parameter_for_storage("s3://key:secret@bucket/prefix", env), env
    (None, {'GEMMA_LORA_RESULT_STORAGE': 's3://key:secret@bucket/prefix'})
    """
    if url is None or not has_credentials(url):
        return url
    (os.environ if environ is None else environ)[RESULT_STORAGE_ENV] = url
    return None


def check_storage_parameter(url: str | None) -> None:
    """Refuse a ``result_storage`` flow-run parameter that holds a credential, naming the fix (the value
    is already in Prefect's database by then: the user should know, and move it to the environment)."""
    if url and has_credentials(url):
        raise CredentialInParameterError(
            f"result_storage={redact_text(url)!r} holds a credential in its URL: Prefect stores flow-run "
            f"parameters in its database and shows them in the UI. Leave result_storage empty and set "
            f"{RESULT_STORAGE_ENV} to the URL in the environment of every worker (or give the credential "
            "to fsspec its own way, e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for s3://); then delete "
            "this flow run, whose parameters hold the credential"
        )


def storage_for_child_runs(location: str) -> str | None:
    """The ``result_storage`` parameter for a deployment run this flow starts: the location, or None when
    it holds a credential (the child's worker reads the same URL from its own environment)."""
    return None if has_credentials(location) else location


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

        from flows.credentialed_storage import CredentialedFileSystem

        basepath = location.rstrip("/")
        name = "gemma-lora-results-" + hashlib.sha256(basepath.encode()).hexdigest()[:12]
        # A URL with a credential: the block keeps it as a secret, shown redacted (flows/credentialed_storage.py).
        block = CredentialedFileSystem(url=basepath) if has_credentials(basepath) else RemoteFileSystem(basepath=basepath)
        _save_block(block, name)
        return block
    path = Path(location.removeprefix("file://")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _save_block(block, name: str, attempts: int = 3) -> None:
    """Save ``block`` as ``name``, replacing an older document. Runs that start at once race to create
    the same new document: the server checks for the name, then inserts, so the loser's insert fails
    on the unique name (a 500 on PostgreSQL, a 409 elsewhere). Saving again finds the document and
    updates it. Any other 4xx (a bad key, a refused value) fails the same way every time: raised at once."""
    import time

    from prefect.exceptions import PrefectHTTPStatusError

    for attempt in range(1, attempts + 1):
        try:
            block.save(name, overwrite=True)
            return
        except PrefectHTTPStatusError as err:
            status = err.response.status_code
            if attempt == attempts or (400 <= status < 500 and status != 409):
                raise
            time.sleep(0.5 * attempt)
