"""Small helpers every task uses: a logger that works with or without a Prefect run, peak memory,
progress reporting (log lines in the terminal, a progress artifact in the UI), and fault injection
for resume tests and drills."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from typing import Any

from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

log = logging.getLogger("tasks")

# GEMMA_LORA_FAIL_AT=<stage>[:<step>] makes that stage raise InjectedFailure (for training, in the
# progress callback of optimizer step <step>, before that step's checkpoint is written, as a crash
# would). Tests and failure drills use it to show that a rerun resumes at the failed stage; it is
# never set in normal use.
FAIL_ENV = "GEMMA_LORA_FAIL_AT"


class InjectedFailure(RuntimeError):
    """Raised where GEMMA_LORA_FAIL_AT asks for a failure."""


def logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return log


def in_run() -> bool:
    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def maybe_fail(stage: str, step: int | None = None) -> None:
    wanted = os.environ.get(FAIL_ENV, "").strip()
    if not wanted:
        return
    name, _, at_step = wanted.partition(":")
    if name != stage:
        return
    if at_step and (step is None or step != int(at_step)):
        return
    where = f"{stage} after step {step}" if step is not None else stage
    raise InjectedFailure(f"injected failure at {where} ({FAIL_ENV}={wanted})")


class Progress:
    """Progress of one long piece of work: log lines in the terminal, a progress artifact in the UI.

    Logs at most every ``log_every_s`` seconds (and always the last update), so long runs do not
    flood the terminal; the artifact is updated on every call.
    """

    def __init__(self, key: str, description: str, log_every_s: float = 5.0):
        self.key, self.description, self.log_every_s = key, description, log_every_s
        self.artifact_id = None
        self.started = time.perf_counter()
        self._last_log = 0.0
        if in_run():
            try:
                from prefect.artifacts import create_progress_artifact

                self.artifact_id = create_progress_artifact(0.0, key=key, description=description)
            except Exception as err:  # progress display must never fail the work it reports on
                logger().debug("progress artifact %s not created: %s", key, err)

    def update(self, done: int, total: int, detail: str = "") -> None:
        percent = 100.0 * done / total if total else 100.0
        now = time.perf_counter()
        if done >= total or now - self._last_log >= self.log_every_s or done == 1:
            self._last_log = now
            elapsed = now - self.started
            eta = elapsed / done * (total - done) if done else float("nan")
            logger().info(
                "%s: %d/%d (%.0f%%)%s, %s elapsed, about %s left",
                self.description, done, total, percent, f", {detail}" if detail else "",
                _duration(elapsed), _duration(eta),
            )
        if self.artifact_id is not None:
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self.artifact_id, percent)
            except Exception as err:
                logger().debug("progress artifact %s not updated: %s", self.key, err)


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    seconds = int(round(seconds))
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def timed() -> Any:
    """``with timed() as t: ...`` then ``t.seconds``."""
    return _Timer()


class _Timer:
    seconds: float = 0.0

    def __enter__(self) -> "_Timer":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = round(time.perf_counter() - self._start, 3)
