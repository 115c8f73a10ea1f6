"""Many pipeline runs at once on a deployment stack (tests/helpers/stack.py), and what they did: the
load test (tests/test_load_postgres.py) asserts on it, bench/bench_load.py prints it for PostgreSQL
and SQLite side by side.

:func:`start_load` starts what the load needs (PostgreSQL or SQLite for the server, moto's S3 server
for the shared result storage, the stack with several `cpu` workers and the `gpu` pool's limit);
:func:`run_load` creates every run at once, from one thread per run, through the API the UI's Run
button calls, waits until all are final and measures them from the server's state timestamps.
"""

from __future__ import annotations

import datetime as dt
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployments import setup_local
from flows.postgres_server import PostgresServer
from tests.helpers.s3_server import MotoS3
from tests.helpers.stack import Stack, final
from tests.helpers.tiny_config import tiny_pipeline_config

RUNS = 24
LEARNING_RATES = (1e-3, 2e-3, 3e-3, 4e-3)  # 4 distinct configs; the rest of the config is shared
CPU_WORKERS = 3
WORKER_LIMIT = 2  # pipeline runs per cpu worker at once: 6 on 2 cores, each a Keras/JAX process
GPU_CONCURRENCY = 2
WAIT_S = 900
# Server log lines that are errors: a logged ERROR or a traceback (5xx answers log one).
SERVER_ERROR = re.compile(r"\bERROR\b|Traceback \(most recent call last\)|database is locked")
CLIENT_RETRY = re.compile(r"Received response with retryable status code|database is locked|HTTP/1.1 50[0-9]")


def load_config(preset: Path, root: Path, learning_rate: float) -> dict[str, Any]:
    """The tiny pipeline, shrunk further for the load: 2 optimizer steps, 2 held-out prompts."""
    return tiny_pipeline_config(preset, root / "runs", train__learning_rate=learning_rate, train__max_steps=2,
                                train__checkpoint_every=2, evaluation__num_prompts=2,
                                evaluation__num_side_by_side=1, generation__max_new_tokens=4)


@dataclass
class LoadStack:
    """What one load runs on; :meth:`close` stops every process by its PID."""

    stack: Stack
    database: str
    postgres: PostgresServer | None = None
    s3: MotoS3 | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def result_storage(self) -> str:
        return self.s3.url("load") if self.s3 is not None else str(self.stack.root / "shared-results")

    def close(self) -> None:
        try:
            self.stack.close()
        finally:
            if self.s3 is not None:
                self.s3.stop()
            if self.postgres is not None:
                self.postgres.stop()


def start_load(root: Path, database: str, *, s3: bool = True) -> LoadStack:
    """PostgreSQL (``database="postgres"``) or SQLite, moto's S3 (``s3``), and the stack."""
    t = time.monotonic()
    postgres = PostgresServer.temporary(root / "postgres.log").start() if database == "postgres" else None
    timings = {"postgres ready": time.monotonic() - t} if postgres else {}
    store = MotoS3(root / "s3.log").start() if s3 else None
    stack = Stack(root, database_url=postgres.prefect_database_url if postgres else None, cpu_workers=CPU_WORKERS,
                  worker_limit=WORKER_LIMIT, gpu_concurrency=GPU_CONCURRENCY, extra_env=store.env if store else None)
    load = LoadStack(stack, database, postgres, store, timings)
    try:
        stack.start()
    except BaseException:
        load.close()
        raise
    if postgres is not None:
        stack.logs["postgres"] = postgres.log_path
    return load


@dataclass
class LoadResult:
    runs: list[dict]  # the pipeline runs, final
    trainings: list[dict]  # their training runs (children), final
    stage_states: dict[str, dict[str, str]]  # pipeline run id -> stage -> state name
    seconds: float  # first run created to last run final
    create_errors: list[str]
    server_errors: int
    client_retries: int
    server_error_lines: list[str] = field(default_factory=list)  # each error line and the 8 after it

    def completed(self) -> list[dict]:
        return [r for r in self.runs if r["state"]["type"] == "COMPLETED"]

    def figures(self) -> dict[str, float]:
        queue = [(_t(r["start_time"]) - _t(r["created"])).total_seconds() for r in self.runs if r["start_time"]]
        took = [(_t(r["end_time"]) - _t(r["start_time"])).total_seconds() for r in self.runs
                if r["start_time"] and r["end_time"]]
        return {"runs": len(self.runs), "completed": len(self.completed()),
                "runs_per_minute": len(self.completed()) / self.seconds * 60, "wall_s": self.seconds,
                "queue_p50_s": _pct(queue, 50), "queue_p95_s": _pct(queue, 95),
                "run_p50_s": _pct(took, 50), "run_p95_s": _pct(took, 95),
                "server_errors": self.server_errors, "client_retries": self.client_retries,
                "create_errors": len(self.create_errors)}


def _t(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp)


def _pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run_load(load: LoadStack, preset: Path, runs: int = RUNS) -> LoadResult:
    """``runs`` pipeline runs (learning rates in turn from LEARNING_RATES), created at once."""
    stack = load.stack
    pipeline = stack.deployment(setup_local.PIPELINE_DEPLOYMENT)
    parameters = [{"training_deployment": setup_local.TRAINING_DEPLOYMENT, "result_storage": load.result_storage,
                   "config": load_config(preset, stack.root, LEARNING_RATES[i % len(LEARNING_RATES)])}
                  for i in range(runs)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=runs) as pool:
        responses = list(pool.map(lambda p: stack.run_from_ui(pipeline["id"], p), parameters))
    created = [r.json() for r in responses if r.status_code == 201]
    create_errors = [f"{r.status_code}: {r.text[:300]}" for r in responses if r.status_code != 201]
    deadline = time.monotonic() + WAIT_S
    ids = [r["id"] for r in created]
    while True:
        found = stack.post("/flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}, "limit": 200})
        if len(found) == len(ids) and all(final(r) for r in found):
            break
        if time.monotonic() > deadline:
            states = sorted((r["name"], r["state"]["name"]) for r in found)
            raise AssertionError(f"runs not final within {WAIT_S} s: {states}\n{stack.describe()}")
        time.sleep(2)
    seconds = time.monotonic() - started
    trainings = stack.post("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": ids}}, "limit": 200})
    states = {r["id"]: stack.stage_states(r["id"]) for r in found}
    server_log = stack.server.log_text()
    log_lines = server_log.splitlines()
    error_lines = ["\n".join(log_lines[i:i + 9]) for i, line in enumerate(log_lines) if SERVER_ERROR.search(line)]
    worker_logs = "".join(path.read_text(errors="replace") for name, path in stack.logs.items()
                          if name.startswith("worker") and path.exists())
    return LoadResult(runs=found, trainings=trainings, stage_states=states, seconds=seconds,
                      create_errors=create_errors, server_errors=len(SERVER_ERROR.findall(server_log)),
                      client_retries=len(CLIENT_RETRY.findall(worker_logs)), server_error_lines=error_lines[:20])


def max_concurrent(intervals: list[tuple[dt.datetime, dt.datetime]]) -> int:
    """The most intervals open at one moment (an end and a start at the same instant do not overlap)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def running_intervals(stack: Stack, runs: list[dict]) -> list[tuple[dt.datetime, dt.datetime]]:
    """(first Running, final state) of each run, from its state history on the server."""
    intervals = []
    for run in runs:
        history = sorted(stack.get(f"/flow_run_states/?flow_run_id={run['id']}"), key=lambda s: s["timestamp"])
        running = [_t(s["timestamp"]) for s in history if s["type"] == "RUNNING"]
        ended = [_t(s["timestamp"]) for s in history if s["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}]
        if running and ended:
            intervals.append((running[0], ended[-1]))
    return intervals


def table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table of :meth:`LoadResult.figures` by database."""
    rows = ["runs", "completed", "wall_s", "runs_per_minute", "queue_p50_s", "queue_p95_s", "run_p50_s",
            "run_p95_s", "server_errors", "client_retries", "create_errors"]
    names = list(results)
    lines = ["| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in rows:
        cells = [f"{results[n][row]:.1f}" if isinstance(results[n][row], float) else str(results[n][row])
                 for n in names]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
