"""The watch-data flow: a retraining run when the data changes, not only on the cron.

The `gemma-lora-watch-data/cpu` deployment runs it every ``recovery.watch_every_s`` seconds. It fingerprints the
pipeline deployment's data source the way the data stage keys it (a local file by its sha256, with
``data.eval_source`` too; an ``hf://`` dataset by its revision on the Hub) and emits the event
``gemma-lora.data.changed`` only when the fingerprint differs from the one it recorded last time (a
Prefect Variable per source; the first look only records it). The pipeline deployment has a trigger on
that event with ``within: recovery.debounce_s``: it starts a run at the first change and ignores
further changes for the rest of that window, so five files dropped in a minute start one run.

The data source is read from the pipeline deployment's own ``config`` parameter, so the two never
disagree: point the pipeline deployment at a new file and the watch follows it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

from prefect import flow, get_run_logger

from gemma_core.config import DataConfig, validate_config
from gemma_core.redact import install_log_redaction, redact_text
from tasks.data import source_fingerprint

DATA_CHANGED = "gemma-lora.data.changed"
PIPELINE_DEPLOYMENT = "gemma-lora-pipeline/cpu"  # deployments/prefect.yaml (setup_local.PIPELINE_DEPLOYMENT)
VARIABLE_PREFIX = "gemma-lora-data-"


def data_fingerprint(data: DataConfig) -> str:
    """The data stage's fingerprint of the source, with an ``hf://`` dataset's Hub revision."""
    parts = [source_fingerprint(data)]
    for source in (data.source, getattr(data, "eval_source", None)):
        if isinstance(source, str) and source.startswith("hf://"):
            parts.append(f"{source}@{hub_revision(source)}")
    return " ".join(parts)


def hub_revision(source: str) -> str:
    """The commit sha of an ``hf://org/name`` dataset's main branch (needs the network)."""
    from huggingface_hub import HfApi

    return HfApi().dataset_info(source.removeprefix("hf://").split("@")[0]).sha


def watched_key(data: DataConfig) -> str:
    """The Variable holding the last fingerprint seen of this source (names allow [a-z0-9_-] only)."""
    identity = f"{data.source}|{getattr(data, 'eval_source', None)}"
    return VARIABLE_PREFIX + hashlib.sha256(identity.encode()).hexdigest()[:16]


def _deployment_config(name: str) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return dict(client.read_deployment_by_name(name).parameters.get("config") or {})


@flow(name="gemma-lora-watch-data")
def watch_data(pipeline_deployment: str | None = PIPELINE_DEPLOYMENT,
               config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Emit ``gemma-lora.data.changed`` when the data of ``pipeline_deployment`` (or of ``config``,
    when given) changed since the last look; returns what it saw."""
    from prefect.events import emit_event
    from prefect.variables import Variable

    install_log_redaction()  # a source URL's credential never reaches the run's logs
    log = get_run_logger()
    cfg = validate_config(config if config is not None else _deployment_config(pipeline_deployment))
    key = watched_key(cfg.data)
    shown = redact_text(cfg.data.source)  # what the run writes of the source: its credential hidden
    fingerprint = data_fingerprint(cfg.data)
    previous = Variable.get(key, default=None)
    last = previous.get("fingerprint") if isinstance(previous, dict) else None
    changed = last is not None and last != fingerprint
    if fingerprint.startswith("missing:"):
        log.warning("the data source %s is missing; nothing to compare (fix data.source of %s)",
                    cfg.data.source, pipeline_deployment or "the config")
        return {"source": shown, "fingerprint": fingerprint, "changed": False}
    if changed:
        emit_event(event=DATA_CHANGED,
                   resource={"prefect.resource.id": f"gemma-lora.data.{key.removeprefix(VARIABLE_PREFIX)}",
                             "prefect.resource.name": shown},
                   payload={"source": shown, "fingerprint": fingerprint, "previous": last})
        log.info("data changed (%s -> %s): emitted %s", last, fingerprint, DATA_CHANGED)
    elif last is None:
        log.info("first look at %s: recorded %s (the next change starts a run)", cfg.data.source, fingerprint)
    else:
        log.info("data unchanged (%s)", fingerprint)
    if last != fingerprint:
        Variable.set(key, {"fingerprint": fingerprint, "source": shown,
                           "seen_at": dt.datetime.now(dt.timezone.utc).isoformat()}, overwrite=True)
    return {"source": shown, "fingerprint": fingerprint, "changed": changed}
