"""Environment defaults for running Prefect embedded. Import and call :func:`apply_defaults` before
anything imports Prefect: Prefect reads its settings when it is first imported.

Every default is ``setdefault``: a value the user exported wins.
"""

from __future__ import annotations

import os
from pathlib import Path

from flows.quiet import QUIET_ENV, verbose

from gemma_core.config import RecoveryConfig

RESULT_STORAGE_ENV = "GEMMA_LORA_RESULT_STORAGE"

DEFAULTS = {
    # The server logs a telemetry error when it cannot reach the internet; do not try.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # The embedded server's 20 s default start-up limit was missed on a busy 2-core machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # gemma_core logs (conversion, training resume, dropped rows) show in the flow run's logs too.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "gemma_core",
    # Every flow run sends a heartbeat this often (recovery.heartbeat_s), so that the automation
    # 'crashed-when-silent' (deployments/automations.py) can tell a dead run from a long one.
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(RecoveryConfig.model_fields["heartbeat_s"].default),
}


def default_prefect_home() -> Path:
    """``.prefect/`` next to the run outputs (the current directory), like ``runs/``."""
    return Path.cwd() / ".prefect"


def apply_defaults(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set the defaults (and ``PREFECT_HOME``) where unset; returns what was set.

    Prefect runs embedded (its ephemeral server on SQLite under ``PREFECT_HOME``) unless
    ``PREFECT_API_URL`` points to a server. Unless ``GEMMA_LORA_VERBOSE`` is set, the native
    libraries' log levels are lowered too (flows/quiet.py).
    """
    env = os.environ if environ is None else environ
    applied = {}
    defaults = dict(DEFAULTS)
    defaults["PREFECT_HOME"] = str(default_prefect_home())
    if not env.get("PREFECT_API_URL"):
        defaults["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "true"
    if not verbose(env):
        defaults.update(QUIET_ENV)
    for key, value in defaults.items():
        if key not in env:
            env[key] = value
            applied[key] = value
    return applied
