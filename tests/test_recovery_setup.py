"""The self-healing set-up without a server: the automations' definitions and their YAML file, the
recovery settings, the deployments' trigger and watch schedule, the worker supervisor's restarts, and
the watch-data flow's fingerprint. tests/test_self_healing.py runs all of it on a real server."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml
from pydantic import ValidationError

from deployments import automations, setup_local
from gemma_core.config import ConfigError, DataConfig, RecoveryConfig, load_config


def test_crash_automations_file_is_the_rendering_of_the_defaults():
    assert automations.AUTOMATIONS_FILE.read_text() == automations.render_file(), (
        "deployments/automations.yaml is stale: run .venv/bin/python deployments/automations.py --write")
    names = [a["name"] for a in yaml.safe_load(automations.AUTOMATIONS_FILE.read_text())["automations"]]
    assert names == [a["name"] for a in automations.project_automations(RecoveryConfig())]


def test_crash_automations_validate_as_prefect_automations():
    from prefect.events.schemas.automations import AutomationCore

    for definition in automations.project_automations(RecoveryConfig(max_resumes=3)):
        AutomationCore.model_validate(definition)


def test_heartbeat_window_and_resume_limit_are_the_configured_ones():
    recovery = RecoveryConfig(heartbeat_s=30, crashed_after_s=95, max_resumes=3, settle_s=15)
    silent, resume, stop = automations.project_automations(recovery)
    assert silent["trigger"]["within"] == 95 and silent["trigger"]["posture"] == "Proactive"
    assert silent["trigger"]["after"] == ["prefect.flow-run.heartbeat"]
    assert silent["actions"][0]["state"] == "CRASHED"
    assert resume["trigger"]["match"]["prefect.run-count"] == ["1", "2", "3"]
    assert resume["actions"][0] == {**resume["actions"][0], "state": "SCHEDULED", "name": "AwaitingRetry"}
    above = stop["trigger"]["match"]["prefect.run-count"]
    assert above[0] == "4" and "3" not in above and stop["actions"][0]["state"] == "FAILED"
    # both act once a crash has settled: nothing else happened to the run for settle_s after it
    from prefect.server.events.schemas.events import matches

    for trigger in (resume["trigger"], stop["trigger"]):
        assert (trigger["posture"], trigger["after"], trigger["within"]) == ("Proactive", ["prefect.flow-run.Crashed"], 15)
        for event in ("Crashed", "AwaitingRetry", "Scheduled", "Running", "Completed", "heartbeat"):
            assert any(matches(e, f"prefect.flow-run.{event}") for e in trigger["expect"]), event
    with pytest.raises(ValidationError):
        RecoveryConfig(settle_s=5)  # Prefect's shortest window for a Proactive trigger is 10 s
    # only runs of the deployments (their tag) are resumed; any run of the project's flows is watched
    assert {"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.gemma-lora"} in resume["trigger"]["match_related"]
    assert len(silent["trigger"]["match_related"]) == 1


def test_crash_run_counts_above_the_limit_match_every_larger_count():
    from prefect.server.events.schemas.events import matches

    above = automations.run_counts_above(2)
    assert not any(matches(p, str(k)) for p in above for k in (1, 2))
    assert all(any(matches(p, str(k)) for p in above) for k in (3, 9, 10, 99, 100, 1234))
    assert automations.run_counts_up_to(0) == []


def test_crash_no_resumes_disables_the_resume_automation():
    _, resume, stop = automations.project_automations(RecoveryConfig(max_resumes=0))
    assert resume["enabled"] is False
    assert stop["trigger"]["match"]["prefect.run-count"][0] == "1"


def test_heartbeat_window_must_cover_the_heartbeats():
    with pytest.raises(ConfigError, match="crashed_after_s=100 must cover"):
        load_config(overrides=["recovery.heartbeat_s=60", "recovery.crashed_after_s=100"])
    with pytest.raises(ConfigError, match="heartbeat_s"):
        load_config(overrides=["recovery.heartbeat_s=10"])  # Prefect's minimum is 30


def test_heartbeat_is_set_for_every_run_the_project_starts():
    from flows.env import apply_defaults

    env: dict[str, str] = {}
    apply_defaults(env)
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(RecoveryConfig().heartbeat_s)
    worker_env = setup_local.base_env("http://127.0.0.1:1/api", RecoveryConfig(heartbeat_s=45, crashed_after_s=160))
    assert worker_env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "45"


def test_trigger_and_watch_schedule_are_declared_in_prefect_yaml():
    spec = yaml.safe_load(setup_local.PREFECT_FILE.read_text())
    by_entrypoint = {d["entrypoint"]: d for d in spec["deployments"]}
    pipeline = by_entrypoint["flows/pipeline.py:gemma_lora_pipeline"]
    (trigger,) = pipeline["triggers"]
    assert trigger["expect"] == ["gemma-lora.data.changed"] and trigger["posture"] == "Reactive"
    assert trigger["within"] == "{{ $GEMMA_LORA_DEBOUNCE }}"
    watch = by_entrypoint["flows/watch_data.py:watch_data"]
    assert watch["schedules"][0]["interval"] == RecoveryConfig().watch_every_s  # setup_local sets other values
    assert "gemma-lora" in watch["tags"] and watch["work_pool"]["name"] == setup_local.CPU_POOL
    from flows.watch_data import DATA_CHANGED, PIPELINE_DEPLOYMENT

    assert DATA_CHANGED == trigger["expect"][0] and PIPELINE_DEPLOYMENT == setup_local.PIPELINE_DEPLOYMENT
    assert set(automations.PROJECT_FLOWS) >= {"gemma-lora-pipeline", "lora-training", "gemma-lora-watch-data"}


def test_setup_local_takes_recovery_settings_and_refuses_others():
    args = setup_local.parse_args(["--set", "recovery.max_resumes=4", "--set", "recovery.debounce_s=30"])
    assert args.recovery.max_resumes == 4 and args.recovery.debounce_s == 30
    with pytest.raises(SystemExit):
        setup_local.parse_args(["--set", "train.learning_rate=1e-3"])
    with pytest.raises(SystemExit):
        setup_local.parse_args(["--set", "recovery.max_resumes=-1"])


def _sleeper(lifetime: float):
    def spawn(pool, env, log_path, name=None):
        return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({lifetime})"])
    return spawn


def test_crash_of_a_worker_restarts_it_with_a_back_off(tmp_path):
    lines: list[str] = []
    supervisor = setup_local.WorkerSupervisor(["cpu", "gpu"], {}, tmp_path, say=lines.append, max_backoff_s=0.4,
                                              spawn=_sleeper(0.05))
    supervisor.start()
    try:
        deadline = time.monotonic() + 20
        while len([r for r in supervisor.restarts if r[0] == "gpu"]) < 4 and time.monotonic() < deadline:
            supervisor.check()
            time.sleep(0.02)
        gpu = [r for r in supervisor.restarts if r[0] == "gpu"]
        assert len(gpu) >= 4 and all(code == 0 for _, _, code in gpu)
        assert supervisor.failures["gpu"] >= 4  # a worker that keeps dying soon is not reset
        assert any("exited with 0; starting a new one in 0 s" in line or "in 1 s" in line for line in lines)
        assert any("starting a new one in 0 s" in line for line in lines[2:]), lines  # capped at max_backoff_s
    finally:
        supervisor.stop()
    assert all(p.poll() is not None for p in supervisor.workers.values())


def test_crash_back_off_resets_after_a_healthy_run(tmp_path):
    supervisor = setup_local.WorkerSupervisor(["cpu"], {}, tmp_path, say=lambda line: None, healthy_after_s=0.2,
                                              spawn=_sleeper(30))
    supervisor.start()
    try:
        supervisor.failures["cpu"] = 5
        time.sleep(0.3)
        supervisor.check()
        assert supervisor.failures["cpu"] == 0 and not supervisor.restarts
    finally:
        supervisor.stop()


def test_trigger_fingerprint_follows_the_data_and_its_eval_source(tmp_path):
    from flows.watch_data import data_fingerprint, watched_key

    source = tmp_path / "d.jsonl"
    source.write_text('{"instruction": "a", "context": "", "response": "b", "category": "open_qa"}\n')
    data = DataConfig(source=str(source))
    first = data_fingerprint(data)
    assert first == data_fingerprint(data) and first.startswith("sha256:")
    source.write_text('{"instruction": "a", "context": "", "response": "c", "category": "open_qa"}\n')
    assert data_fingerprint(data) != first
    assert watched_key(data) == watched_key(DataConfig(source=str(source)))
    assert watched_key(data) != watched_key(DataConfig(source=str(tmp_path / "other.jsonl")))
    assert watched_key(data).startswith("gemma-lora-data-") and watched_key(data).islower()
