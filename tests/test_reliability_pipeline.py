"""The whole pipeline under faults, as a user runs it: ``gemma-lora run`` in real child processes against a
real ``prefect server start`` (127.0.0.1, a free port, its own PREFECT_HOME), on the tiny random Gemma.

- killed (SIGKILL) inside the data stage, inside generation, inside the report; each rerun finishes,
  and no partial file is ever read as complete;
- the Prefect server stopped in the middle of a run: the error names the server's URL; once it is
  started again (same port, same database) a rerun finishes, reusing what was done;
- two runs started at once on the same output and result directories: both finish, and no file is
  corrupted or mixed between them;
- a persisted task result (the cache record in the result storage) truncated, or pointing at a changed
  file: detected, logged with the file and the reason, and the stage recomputed.

Each test costs several pipeline runs of 20-60 s on a 2-core CPU: all are ``slow``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from helpers import procs
from flows.prefect_server import PrefectServer
from helpers.prefect_server import server  # noqa: F401  (the module's server fixture)

pytestmark = pytest.mark.slow

STAGES = procs.STAGES
RUN_TIMEOUT = 900


def cli_env(server: PrefectServer, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "GEMMA_LORA_RESULT", "GEMMA_LORA_FAIL", "RELIABILITY_"))}
    env.update(PYTHONPATH=str(procs.REPO), PREFECT_HOME=str(home), PREFECT_API_URL=server.api_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", **extra)
    return env


def run_cli(work: Path, name: str, server, preset, root: Path, **env) -> procs.PipelineRun:
    args = ["run", *procs.tiny_overrides(preset, root), "--result-storage", str(root / "prefect-results")]
    return procs.PipelineRun(work, name, args, cli_env(server, work / "client-home", **env))


def complete(run: procs.PipelineRun) -> dict[str, str]:
    rc = run.finish(RUN_TIMEOUT)
    assert rc == 0, run.tail()
    states = run.states()
    assert set(states) == set(STAGES), run.tail()
    return states


def verify_latest(root: Path) -> dict:
    """Every file the last run's summary points to exists and matches its recorded sha256."""
    latest = json.loads((root / "reports" / "latest.json").read_text())
    for stage, result in latest["results"].items():
        for name, ref in result["files"].items():
            data = Path(ref["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == ref["sha256"], (stage, name)
    report = Path(latest["report_dir"])
    assert {"report.md", "report.html", "metrics.json", "training_curve.png"} <= {p.name for p in report.iterdir()}
    json.loads((report / "metrics.json").read_text())
    return latest


def train_log_steps(root: Path) -> list[list[int]]:
    return [[json.loads(line)["step"] for line in log.read_text().splitlines()]
            for log in sorted((root / "train").glob("train-*/train_log.jsonl"))]


def hidden_leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if ".lock" not in p.name)


def test_killed_in_data_generation_and_report_then_rerun(server, tiny_preset, tmp_path):
    root = tmp_path / "runs"

    # 1. Killed inside the data stage: train.parquet written into the temp dir, the rest not.
    run = run_cli(tmp_path, "kill-data", server, tiny_preset, root, RELIABILITY_PAUSE="data")
    try:
        paused = run.wait_event("pause")
        assert Path(paused["path"]).parent.name.startswith(".data-")  # inside the temporary directory
        run.sigkill()
    finally:
        run.close()
    assert not [p for p in (root / "data").iterdir() if not p.name.startswith(".")], "a partial data dir"

    # 2. Rerun, killed inside generation: the base model's first batch answered, eval.json not written.
    run = run_cli(tmp_path, "kill-generation", server, tiny_preset, root, RELIABILITY_PAUSE="generation")
    try:
        run.wait_event("pause")
        run.sigkill()
    finally:
        run.close()
    assert not list((root / "eval").glob("*/eval.json")) if (root / "eval").exists() else True

    # 3. Rerun, killed inside the report: report.md and the curve written, report.html not.
    run = run_cli(tmp_path, "kill-report", server, tiny_preset, root, RELIABILITY_PAUSE="report")
    try:
        paused = run.wait_event("pause", timeout=600)
        report_dir = Path(paused["dir"])
        run.sigkill()
    finally:
        run.close()
    assert {p.name for p in report_dir.iterdir() if not p.name.startswith(".")} == {"report.md",
                                                                                   "training_curve.png"}
    assert not (root / "reports" / "latest.json").exists()

    # 4. Rerun to the end: what finished before is reused, the report is made whole.
    final = run_cli(tmp_path, "final", server, tiny_preset, root)
    states = complete(final)
    assert states == {**dict.fromkeys(STAGES, "Cached"), "render-report": "Completed"}, final.tail()
    latest = verify_latest(root)
    assert Path(latest["report_dir"]) == report_dir
    assert train_log_steps(root) == [[1, 2, 3, 4]]
    print("hidden temporary leftovers of the killed runs:", hidden_leftovers(root))


def test_prefect_server_stops_mid_run_then_comes_back(server, tiny_preset, tmp_path):
    root = tmp_path / "runs"
    go = tmp_path / "go"
    # Fewer client retries than Prefect's default, so the lost server is reported in about a minute.
    run = run_cli(tmp_path, "server-stops", server, tiny_preset, root, RELIABILITY_PAUSE="training:2",
                  RELIABILITY_GO=str(go), PREFECT_CLIENT_MAX_RETRIES="1")
    try:
        run.wait_event("pause", timeout=600)
        server.stop()
        go.touch()  # training goes on, with the server gone
        rc = run.finish(RUN_TIMEOUT)
    finally:
        run.close()
    output = run.output()
    assert rc == 1, output[-4000:]
    assert f"lost the Prefect server at {server.api_url}" in output, output[-4000:]
    assert "run the same command" in output

    # While it is down, a new run fails at once, naming the URL.
    early = run_cli(tmp_path, "server-down", server, tiny_preset, root)
    assert early.finish(RUN_TIMEOUT) == 1
    assert f"the Prefect server at {server.api_url} (PREFECT_API_URL) does not answer" in early.output()

    server.start()  # same port, same database
    again = run_cli(tmp_path, "server-back", server, tiny_preset, root)
    states = complete(again)
    for stage in ("prepare-data", "resolve-model", "evaluate-base"):
        assert states[stage] == "Cached", (stage, states)
    verify_latest(root)
    assert train_log_steps(root) == [[1, 2, 3, 4]]
    print("after the server came back:", states)


def test_two_runs_at_once_on_the_same_directories(server, tiny_preset, tmp_path):
    """Two runs of one config on one output root, overlapping inside training: the first is held after
    its step 2, and the second is started then. Each stage is computed once, under its lock
    (flows/stage_locks.py): the second waits for the first's training and finds it Cached."""
    root = tmp_path / "runs"
    go_first = tmp_path / "go-1"
    first = run_cli(tmp_path, "twin-1", server, tiny_preset, root, RELIABILITY_PAUSE="training:2",
                    RELIABILITY_GO=str(go_first))
    second = None
    try:
        first.wait_event("pause", timeout=600)
        second = run_cli(tmp_path, "twin-2", server, tiny_preset, root)
        waiting = "another run is computing this stage"
        deadline = time.monotonic() + 600
        while waiting not in second.output() and second.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert waiting in second.output(), second.tail()
        go_first.touch()
        states = [complete(run) for run in (first, second)]
    finally:
        first.close()
        if second is not None:
            second.close()
    assert states[0]["train-lora"] == "Completed" and states[1]["train-lora"] == "Cached", states
    print("states of the two runs:", states)
    # One training directory, one clean log: no step logged twice, nothing of the other run mixed in.
    assert train_log_steps(root) == [[1, 2, 3, 4]]
    verify_latest(root)
    # Every report either run wrote is whole and parses; every cache record is readable JSON.
    reports = sorted((root / "reports").glob("report-*"))
    assert reports
    for report in reports:
        assert {"report.md", "report.html", "metrics.json", "training_curve.png", "artifact.md"} <= {
            p.name for p in report.iterdir()}
        json.loads((report / "metrics.json").read_text())
    for record in (root / "prefect-results").iterdir():
        json.loads(record.read_text())
    for eval_file in root.glob("eval/*/eval.json"):
        json.loads(eval_file.read_text())
    assert not [p for p in hidden_leftovers(root) if p.endswith(".tmp")], hidden_leftovers(root)


def test_damaged_persisted_task_results_are_recomputed(server, tiny_preset, tmp_path):
    root = tmp_path / "runs"
    states = complete(run_cli(tmp_path, "first", server, tiny_preset, root))
    assert set(states.values()) == {"Completed"}
    records = {}
    for path in (root / "prefect-results").iterdir():
        stage = json.loads(json.loads(path.read_text())["result"])["data"]["stage"]
        records[stage] = path
    # The base evaluation's record cut in half (a crash mid-write, a full disk) ...
    base = records["evaluate-base"]
    os.truncate(base, base.stat().st_size // 2)
    # ... and the training record tampered with: it vouches for an adapter with another sha256.
    train = records["train-lora"]
    record = json.loads(train.read_text())
    result = json.loads(record["result"])
    adapter = result["data"]["files"]["adapter"]
    adapter["sha256"] = "0" * 64
    record["result"] = json.dumps(result)
    train.write_text(json.dumps(record))

    rerun = run_cli(tmp_path, "rerun", server, tiny_preset, root)
    states = complete(rerun)
    output = rerun.output()
    assert states["evaluate-base"] == "Completed" and states["train-lora"] == "Completed", states
    assert states["prepare-data"] == states["resolve-model"] == "Cached"
    assert f"cached result record {base}" in output and "unreadable" in output, output[-4000:]
    assert f"{adapter['path']}: sha256 differs" in output, output[-4000:]
    # Training was not redone: it resumed from its final checkpoint.
    latest = verify_latest(root)
    assert latest["results"]["train"]["resumed_from_step"] == 4
    assert train_log_steps(root) == [[1, 2, 3, 4]]
