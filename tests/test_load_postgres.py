"""Scale-out under load, for real: a Prefect server on a real PostgreSQL (flows/postgres_server.py),
three `cpu` process workers (each with its own working directory and PREFECT_HOME, sharing only
``output.root`` and an ``s3://`` result storage on moto's S3 server), the `gpu` pool with a
concurrency limit of 2, and 24 pipeline runs of the tiny model created at once through the API the
UI's Run button calls, 6 each of 4 configs (tests/helpers/load.py).

The load's figures (runs/minute, queue and run times, server errors) are printed; bench/bench_load.py
gives them for PostgreSQL and SQLite side by side (bench/RESULTS.md).
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict

import pytest

from flows.postgres_server import PostgresNotInstalled, ensure_installed
from tasks.artifacts import REPORT_KEY
from tasks.stages import PREPARE_DATA, TRAIN_LORA
from tests.helpers.load import LEARNING_RATES, RUNS, load_config, max_concurrent, run_load, running_intervals, start_load

pytestmark = pytest.mark.slow


def require_postgres() -> None:
    """Debian's postgresql, installed here as root when missing; else a skip, or under CI a failure."""
    try:
        ensure_installed()
    except PostgresNotInstalled as err:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {err}")
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def load(tmp_path_factory, tiny_preset):
    require_postgres()
    stack = start_load(tmp_path_factory.mktemp("load-postgres"), "postgres")
    try:
        result = run_load(stack, tiny_preset)
        figures = result.figures()
        print(f"\nload on PostgreSQL: { {k: round(v, 1) for k, v in figures.items()} }; set-up "
              f"{ {k: round(v, 1) for k, v in {**stack.timings, **stack.stack.timings}.items()} }")
        yield stack, result
    finally:
        stack.close()


def test_postgres_load_every_run_completes_none_lost_or_stuck(load):
    stack, result = load
    assert not result.create_errors, result.create_errors
    assert len(result.runs) == RUNS
    failed = [(r["name"], r["state"]["name"], r["state"]["message"]) for r in result.runs
              if r["state"]["type"] != "COMPLETED"]
    assert not failed, f"{failed}\n{stack.stack.describe()}"
    # nothing left behind: no flow run of the server is still scheduled, pending or running
    active = stack.stack.post("/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": [
        "SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"]}}}, "limit": 200})
    active = [r for r in active if not r["auto_scheduled"]]  # the weekly schedule's future runs are not load
    assert active == [], [(r["name"], r["state"]["name"]) for r in active]
    # the server's database is PostgreSQL's, and every run is in it
    assert stack.stack.server.database.startswith("postgresql+asyncpg://")
    # (the pipeline runs and their training runs, all of a deployment; not the watch-data runs of its schedule)
    assert int(stack.postgres.psql(
        "SELECT count(*) FROM flow_run JOIN flow ON flow.id = flow_run.flow_id WHERE flow_run.deployment_id IS NOT NULL "
        "AND flow_run.state_type = 'COMPLETED' AND flow.name IN ('gemma-lora-pipeline', 'lora-training')")) == 2 * RUNS
    # the server's errors are recorded, not failed on: what counts is that no run was lost for them
    print(f"\nserver errors seen: {result.server_errors}" + "".join(f"\n--- {e}" for e in result.server_error_lines))


def test_postgres_load_at_most_two_trainings_at_once(load):
    stack, result = load
    assert len(result.trainings) == RUNS
    assert {t["work_pool_name"] for t in result.trainings} == {"gpu"}
    intervals = running_intervals(stack.stack, result.trainings)
    assert len(intervals) == RUNS
    most = max_concurrent(intervals)
    print(f"\nmost trainings running at one moment: {most}")
    assert 1 <= most <= 2


def test_postgres_load_same_config_trained_once_others_cached(load):
    stack, result = load
    by_rate = defaultdict(list)
    for run in result.runs:
        by_rate[run["parameters"]["config"]["train"]["learning_rate"]].append(result.stage_states[run["id"]])
    assert sorted(by_rate) == sorted(LEARNING_RATES)
    for rate, states in by_rate.items():
        trained = Counter(s[TRAIN_LORA] for s in states)
        assert trained == {"Completed": 1, "Cached": RUNS // len(LEARNING_RATES) - 1}, (rate, trained)
    # what all 24 share (data, model, baseline) was computed once
    data = Counter(s[PREPARE_DATA] for s in result.stage_states.values())
    assert data == {"Completed": 1, "Cached": RUNS - 1}, data


def test_postgres_load_every_report_artifact_exists(load):
    stack, result = load
    artifacts = stack.stack.post("/artifacts/filter", {"artifacts": {"key": {"any_": [REPORT_KEY]}}, "limit": 200})
    reported = {a["flow_run_id"] for a in artifacts}
    missing = [r["name"] for r in result.runs if r["id"] not in reported]
    assert not missing, missing


def test_postgres_load_shared_s3_result_storage_is_reused_across_workers(load):
    """The data stage ran once, on one worker; runs on the other workers found it Cached through the
    shared s3:// result storage (each worker has its own PREFECT_HOME and so its own local storage)."""
    stack, result = load
    assert result.runs[0]["parameters"]["result_storage"].startswith("s3://")
    records = stack.s3.keys("load/")
    assert len(records) >= 4 + 3  # at least the 4 trainings and the shared data, model and baseline
    worker_of = {}
    for name, path in stack.stack.logs.items():
        if name.startswith("worker-cpu-worker-"):
            for run_id in re.findall(r"submitting flow run '([0-9a-f-]{36})'", path.read_text(errors="replace")):
                worker_of[run_id] = name.removeprefix("worker-")
    assert set(worker_of) >= {r["id"] for r in result.runs}, "a run was not submitted by a cpu worker"
    computed = [rid for rid, s in result.stage_states.items() if s[PREPARE_DATA] == "Completed"]
    reused = {worker_of[rid] for rid, s in result.stage_states.items() if s[PREPARE_DATA] == "Cached"}
    assert len(computed) == 1
    others = reused - {worker_of[computed[0]]}
    assert others, f"every Cached run ran on {worker_of[computed[0]]}, the worker that computed the data"
    print(f"\ndata computed on {worker_of[computed[0]]}, reused (Cached) on {sorted(others)}; "
          f"{len(records)} result records in S3; runs per worker {Counter(worker_of[r['id']] for r in result.runs)}")


def test_postgres_load_config_is_the_tiny_one(tiny_preset, tmp_path):
    """The load's runs differ only in learning rate, so 4 configs share data, model and baseline."""
    configs = [load_config(tiny_preset, tmp_path, rate) for rate in LEARNING_RATES]
    assert len({str(c) for c in configs}) == 4
    assert all({**c, "train": {}} == {**configs[0], "train": {}} for c in configs)


def test_postgres_setup_local_sets_up_the_stack_on_it_and_stops_everything():
    """`deployments/setup_local.py --database postgres`, end to end: it starts PostgreSQL (data under its
    PREFECT_HOME) and a Prefect server on it, creates the pools, deployments and automations there, and
    with --no-workers stops both again. Started once more, the database holds what it created."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from deployments.automations import project_automations
    from flows.postgres_server import PostgresServer
    from flows.prefect_server import free_port
    from gemma_core.config import RecoveryConfig
    from tests.helpers.procs import REPO, child_env

    require_postgres()
    # under /tmp, open to PostgreSQL's own user (pytest's tmp_path is closed to others when run as root)
    home = Path(tempfile.mkdtemp(prefix="gemma-lora-setup-postgres-"))
    home.chmod(0o755)
    env = {k: v for k, v in child_env().items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(home)
    port = free_port()
    try:
        done = subprocess.run([sys.executable, str(REPO / "deployments" / "setup_local.py"), "--database", "postgres",
                               "--no-workers", "--port", str(port)], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-4000:]
        assert re.search(r"PostgreSQL on postgresql://\S+ \(data in " + re.escape(str(home / "postgres")), out), out
        assert f"starting the Prefect server on http://127.0.0.1:{port}/api (database postgresql+asyncpg://" in out, out
        assert "work pools: cpu" in out and "automations:" in out, out
        assert "stopping 1 processes" in out, out
        # everything stopped: the server's port is free again
        assert subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], capture_output=True).returncode != 0
        database = PostgresServer(home / "postgres", home / "check.log").start()
        try:
            pools = set(database.psql("SELECT name FROM work_pool").split())
            deployments = database.psql("SELECT count(*) FROM deployment")
            automations = set(database.psql("SELECT name FROM automation").splitlines())
        finally:
            database.stop()
        # the three of deployments/automations.py, and the pipeline deployment's data-change trigger
        assert {"cpu", "gpu"} <= pools and int(deployments) == 3 and len(automations) == 4, (pools, deployments, automations)
        assert {a["name"] for a in project_automations(RecoveryConfig())} <= automations, automations
    finally:
        shutil.rmtree(home, ignore_errors=True)
