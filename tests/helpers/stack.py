"""The deployment stack of the slow deployment tests: a real Prefect server (flows.prefect_server, with
its UI), deployments/setup_local.py's pools and deployments, and a `process` worker per pool, driven
through the REST calls the UI's Run button makes.

tests/test_deployment_stack.py and tests/test_deployment_ui.py load this module as a pytest plugin
(``pytest_plugins = ["tests.helpers.stack"]``): its fixtures are session-scoped, so both files share
one stack and its two pipeline runs, set up once. The server, the workers and their flow runs are
real processes, every one stopped by PID as soon as the last test that uses the stack is done (also
when a test fails), not at the end of the session.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from deployments import automations, setup_local
from flows.prefect_server import PrefectServer
from gemma_core.config import RecoveryConfig
from tests.helpers.prefect_server import isolated_server
from tests.helpers.stage_states import stage_states
from tests.helpers.tiny_config import tiny_pipeline_config

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 240
TEST_CRON = "17 4 * * 0"  # not the default: shows the schedule is configurable


def final(run: dict) -> bool:
    return run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class Stack:
    """A Prefect server, the pools and deployments, and a process worker per pool.

    For the load test (tests/test_load_postgres.py): ``database_url`` puts the server on PostgreSQL,
    ``cpu_workers`` process workers serve the `cpu` pool (each running at most ``worker_limit`` flow
    runs at once, each in a working directory and PREFECT_HOME of its own, as on separate machines),
    ``gpu_concurrency`` is the `gpu` pool's limit, and ``extra_env`` reaches every worker's flow runs
    (an object store's endpoint and credentials)."""

    def __init__(self, root: Path, recovery: RecoveryConfig | None = None, *, database_url: str | None = None,
                 cpu_workers: int = 0, worker_limit: int | None = None,
                 gpu_concurrency: int = setup_local.GPU_CONCURRENCY, extra_env: dict[str, str] | None = None):
        self.root = root
        self.recovery = recovery  # given: heartbeats at its period and the project's automations installed
        self.database_url, self.cpu_workers, self.worker_limit = database_url, cpu_workers, worker_limit
        self.gpu_concurrency, self.extra_env = gpu_concurrency, dict(extra_env or {})
        self.cpu_pool_workers: list[subprocess.Popen] = []  # the load test's own cpu workers (cpu_workers > 0)
        self.server: PrefectServer | None = None
        self.supervisor: setup_local.WorkerSupervisor | None = None  # the workers, restarted when they die
        self.logs: dict[str, Path] = {}
        self.api = ""
        self.timings: dict[str, float] = {}
        self.cron = TEST_CRON  # the pipeline deployment's schedule
        self.closed = False

    # --- set-up and tear-down ------------------------------------------------------------------------

    def start(self) -> "Stack":
        started = time.monotonic()
        self.server = isolated_server(self.root / "server-home", self.root / "server.log", ui=True,
                                      database_url=self.database_url)
        self.api, self.logs["server"] = self.server.api_url, self.server.log_path
        self.timings["server healthy"] = self.server.spawn().wait_healthy()
        t = time.monotonic()
        # Flow runs take their code from a checkout (the pull step): a snapshot of this one, so that
        # edits made to the working tree while the test runs cannot change cache keys mid-test.
        checkout = self.root / "checkout"
        for package in ("gemma_core", "tasks", "flows"):
            shutil.copytree(REPO / package, checkout / package, ignore=shutil.ignore_patterns("__pycache__"))
        setup_local.create_pools(self.api, checkout, gpu_concurrency=self.gpu_concurrency)
        env = setup_local.base_env(self.api, self.recovery, GEMMA_LORA_CHECKOUT=str(checkout), PYTHONPATH=str(checkout),
                                   PREFECT_HOME=str(self.root / "client-home"), PREFECT_WORKER_QUERY_SECONDS="2",
                                   **self.extra_env)
        for var in ("GEMMA_LORA_RESULT_STORAGE", "GEMMA_LORA_FAIL_AT", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"):
            env.pop(var, None)
        setup_local.apply_deployments(self.api, self.cron, env, recovery=self.recovery)
        if self.recovery is not None:
            automations.install(self.api, self.recovery)
        self.timings["pools and deployments"] = time.monotonic() - t
        pools = (setup_local.GPU_POOL,) if self.cpu_workers else (setup_local.CPU_POOL, setup_local.GPU_POOL)
        self.supervisor = setup_local.WorkerSupervisor(pools, env, self.root, names={p: f"{p}-worker" for p in pools},
                                                       max_backoff_s=2, say=print)
        self.supervisor.start()
        for pool in pools:
            self.logs[f"worker-{pool}"] = self.supervisor.log_path(pool)
        for i in range(self.cpu_workers):  # as on separate machines: own working directory and PREFECT_HOME
            name = f"{setup_local.CPU_POOL}-worker-{i}"
            workdir = self.root / "workers" / name
            (workdir / "home").mkdir(parents=True, exist_ok=True)
            self.logs[f"worker-{name}"] = self.root / f"worker-{name}.log"
            self.cpu_pool_workers.append(setup_local.start_worker(
                setup_local.CPU_POOL, {**env, "PREFECT_HOME": str(workdir / "home")}, self.logs[f"worker-{name}"],
                name=name, limit=self.worker_limit, cwd=workdir))
        self.timings["set-up"] = time.monotonic() - started
        return self

    def close(self) -> None:
        """Stop the workers (and their flow runs), then the server; every process must be gone."""
        if self.closed:
            return
        self.closed = True
        t = time.monotonic()
        procs = list(self.supervisor.workers.values()) if self.supervisor is not None else []
        procs += self.cpu_pool_workers
        setup_local.stop_all(reversed(self.cpu_pool_workers))
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.server is not None and self.server.process is not None:
            procs.append(self.server.process)
            try:
                self.server.stop()
            except Exception as err:  # the assertion below names it
                print(f"could not stop the Prefect server: {err}")
        stopped = [p.pid for p in procs if p.poll() is not None]
        print(f"\ndeployment stack timings (s): { {k: round(v, 1) for k, v in self.timings.items()} }; "
              f"stopped {len(stopped)}/{len(procs)} processes in {time.monotonic() - t:.1f} s")
        assert len(stopped) == len(procs), "a process of the stack is still running"

    # --- the API -------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: dict | None = None):
        """One API call; retried, as Prefect's own client does, while the server answers 503 (its
        SQLite database was busy: nothing was written)."""
        import httpx

        with httpx.Client(base_url=self.api, timeout=30) as client:
            for attempt in range(8):
                response = client.request(method, path, json=body)
                if response.status_code != 503:
                    return response
                time.sleep(0.25 * 2 ** attempt)
        return response

    def get(self, path: str):
        response = self.request("GET", path)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict):
        response = self.request("POST", path, body)
        response.raise_for_status()
        return response.json()

    def describe(self) -> str:
        parts = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {name} ({path}) ---\n{text[-3000:]}")
        return "\n".join(parts)

    def deployment(self, full_name: str) -> dict:
        return self.get(f"/deployments/name/{full_name}")

    def run_from_ui(self, deployment_id: str, parameters: dict):
        """What the UI's Run button sends (POST /deployments/{id}/create_flow_run)."""
        return self.request("POST", f"/deployments/{deployment_id}/create_flow_run", {
            "state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"},
            "parameters": parameters, "enforce_parameter_schema": True,
        })

    def flow_run(self, run_id: str) -> dict:
        return self.get(f"/flow_runs/{run_id}")

    def children(self, run_id: str) -> list[dict]:
        return self.post("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}})

    def wait_child(self, run_id: str) -> dict:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            kids = self.children(run_id)
            if kids:
                return kids[0]
            parent = self.flow_run(run_id)
            assert not final(parent), f"{parent['name']} ended {parent['state']['name']} before training\n{self.describe()}"
            time.sleep(1)
        raise AssertionError(f"no training run for {run_id} within {WAIT_S} s\n{self.describe()}")

    def wait_final(self, *run_ids: str) -> list[dict]:
        deadline = time.monotonic() + WAIT_S
        while True:
            runs = [self.flow_run(i) for i in run_ids]
            if all(final(r) for r in runs):
                return runs
            if time.monotonic() > deadline:
                raise AssertionError(f"runs not finished within {WAIT_S} s: "
                                     f"{[(r['name'], r['state']['name']) for r in runs]}\n{self.describe()}")
            time.sleep(1)

    def stage_states(self, run_id: str) -> dict[str, str]:
        """Final state of each stage of a pipeline run, its training run's included."""
        ids = [run_id, *(c["id"] for c in self.children(run_id))]
        return stage_states(self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": ids}}}))

    def state_times(self, run_id: str) -> dict[str, dt.datetime]:
        """When the run first entered each state type."""
        times = {}
        for state in sorted(self.get(f"/flow_run_states/?flow_run_id={run_id}"), key=lambda s: s["timestamp"]):
            times.setdefault(state["type"], dt.datetime.fromisoformat(state["timestamp"]))
        return times

    def set_paused(self, pool: str, paused: bool) -> None:
        self.request("PATCH", f"/work_pools/{pool}", {"is_paused": paused}).raise_for_status()

    def worker_log(self, pool: str) -> str:
        return self.logs[f"worker-{pool}"].read_text(errors="replace")


def tiny_parameters(preset: Path, root: Path, learning_rate: float) -> dict:
    """The pipeline deployment's parameters for a tiny run, training on the training deployment."""
    return {"training_deployment": setup_local.TRAINING_DEPLOYMENT,
            "config": tiny_pipeline_config(preset, root / "runs", train__learning_rate=learning_rate)}


# --- the fixtures (session-scoped: shared by the files that load this plugin) ------------------------

_STACKS: list[Stack] = []


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("deployments"))
    _STACKS.append(s)
    try:
        yield s.start()
    finally:
        s.close()


@pytest.fixture(scope="session")
def two_runs(stack, tiny_preset):
    """Two pipeline runs pressed in the UI with custom parameters, their trainings queued on the
    `gpu` pool together: the pool is paused until both wait there, then resumed."""
    pipeline = stack.deployment(setup_local.PIPELINE_DEPLOYMENT)
    stack.set_paused(setup_local.GPU_POOL, True)
    triggered = time.monotonic()
    runs, children = [], []
    try:
        for learning_rate in (1e-3, 2e-3):
            response = stack.run_from_ui(pipeline["id"], tiny_parameters(tiny_preset, stack.root, learning_rate))
            assert response.status_code == 201, response.text
            runs.append(response.json())
            children.append(stack.wait_child(runs[-1]["id"]))  # the pipeline asked for its training
    finally:
        stack.set_paused(setup_local.GPU_POOL, False)
    first_start = stack.state_times(runs[0]["id"]).get("RUNNING")
    finished = stack.wait_final(*(r["id"] for r in runs))
    stack.timings["two pipeline runs"] = time.monotonic() - triggered
    return {"pipeline": pipeline, "runs": finished, "children": [stack.flow_run(c["id"]) for c in children],
            "first_start": first_start, "triggered": runs}


def pytest_runtest_teardown(item, nextitem):
    """Stop the stack after the last test of the session that uses it, so that its processes do not
    run on (and share the CPUs) through the rest of the session."""
    if not _STACKS or "stack" not in getattr(item, "fixturenames", ()):
        return
    items = item.session.items
    later = items[items.index(item) + 1:] if item in items else []
    if not any("stack" in getattr(other, "fixturenames", ()) for other in later):
        for s in _STACKS:
            s.close()
