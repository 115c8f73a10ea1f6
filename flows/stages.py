"""Running a stage inside a flow: the configured result storage, and a record of each stage's state."""

from __future__ import annotations

from typing import Any

from prefect import Task


class StageRunner:
    """Runs tasks with the flow's result storage and remembers each one's final state name
    (``Completed``, ``Cached``, ...), so a run can say which stages did work."""

    def __init__(self, storage: Any):
        self.storage = storage
        self.states: dict[str, str] = {}

    def run(self, task: Task, *args: Any, name: str | None = None, **kwargs: Any) -> Any:
        options: dict[str, Any] = {"result_storage": self.storage}
        if name:
            options["name"] = name
        configured = task.with_options(**options)
        state = configured(*args, return_state=True, **kwargs)
        self.states[configured.name] = state.name
        return state.result()  # raises the task's exception when it failed: the flow fails there


def select_backend(backend: str) -> None:
    """Use the config's Keras backend; Keras reads it once, at its first import."""
    import os
    import sys

    if "keras" in sys.modules:
        current = sys.modules["keras"].backend.backend()
        if current != backend:
            raise RuntimeError(
                f"backend={backend!r} was asked for, but Keras was already imported with {current!r} in this "
                "process: run in a fresh process (or set KERAS_BACKEND before starting it)"
            )
        return
    os.environ["KERAS_BACKEND"] = backend
