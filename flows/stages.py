"""What every flow does first, and how it runs a stage.

:func:`start_flow` is the one preamble of the pipeline, training and export flows: validate the
config, select the Keras backend, resolve the output root and the result storage, and make the
:class:`StageRunner` that runs each stage's task with that storage and remembers its final state.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from prefect import Task
from prefect.cache_policies import CachePolicy

from flows.stage_locks import FlockLockManager, stage_lock_manager
from flows.storage import check_storage_parameter, make_result_storage, result_storage_location
from gemma_core.atomic import remove_leftovers
from gemma_core.redact import install_log_redaction
from gemma_core.config import PipelineConfig, validate_config

class StageRunner:
    """Runs tasks with the flow's result storage; each task run is named exactly its stage name
    (:mod:`tasks.stages`), and its final state name (``Completed``, ``Cached``, ...) is kept in
    ``states``, so a run can say which stages did work."""

    def __init__(self, storage: Any, locks: FlockLockManager | None = None):
        self.storage = storage
        self.locks = locks
        self.states: dict[str, str] = {}

    def run(self, task: Task, *args: Any, stage: str | None = None, **kwargs: Any) -> Any:
        stage = stage or task.name
        options: dict[str, Any] = {}
        if self.locks is not None and isinstance(task.cache_policy, CachePolicy):
            # runs started together with the same inputs compute a stage once: the others wait for
            # its lock and find it Cached (flows/stage_locks.py)
            options["cache_policy"] = task.cache_policy.configure(isolation_level="SERIALIZABLE",
                                                                  lock_manager=self.locks)
        configured = task.with_options(name=stage, task_run_name=stage, result_storage=self.storage, **options)
        state = configured(*args, return_state=True, **kwargs)
        self.states[stage] = state.name
        return state.result()  # raises the task's exception when it failed: the flow fails there


@dataclass(frozen=True)
class FlowSetup:
    cfg: PipelineConfig
    out_root: str  # output.root, absolute
    result_storage: str  # the location (path or URL) that child flow runs get passed
    stages: StageRunner


def start_flow(config: PipelineConfig | Mapping[str, Any] | None, result_storage: str | None) -> FlowSetup:
    """The preamble of every flow; a wrong config value fails here, before any stage runs."""
    install_log_redaction()  # from here on no log record of this process carries a credential in a URL
    check_storage_parameter(result_storage)
    cfg = config if isinstance(config, PipelineConfig) else validate_config(config or {})
    select_backend(cfg.backend)
    out_root = str(Path(cfg.output.root).resolve())
    remove_leftovers(out_root)  # temporaries of earlier runs' killed writers (never a live writer's)
    location = result_storage_location(result_storage, out_root)
    return FlowSetup(cfg, out_root, location, StageRunner(make_result_storage(location), stage_lock_manager(out_root)))


def select_backend(backend: str) -> None:
    """Use the config's Keras backend; Keras reads it once, at its first import."""
    if "keras" in sys.modules:
        current = sys.modules["keras"].backend.backend()
        if current != backend:
            raise RuntimeError(
                f"backend={backend!r} was asked for, but Keras was already imported with {current!r} in this "
                "process: run in a fresh process (or set KERAS_BACKEND before starting it)"
            )
        return
    os.environ["KERAS_BACKEND"] = backend
