"""The deployments on a real `prefect server` with a `process` worker per pool (tests/helpers/stack.py),
driven through the REST calls the UI's Run button makes: two runs pressed with custom parameters
train on the `gpu` pool one at a time, an unchanged rerun is all Cached, the schedule and the typed
parameters are the server's, and an invalid parameter is refused when the run is created.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest
import yaml

from deployments import setup_local
from tasks.stages import PIPELINE_STAGES as STAGES
from tests.helpers.stack import tiny_parameters

pytest_plugins = ["tests.helpers.stack"]  # the session's one stack: the `stack` and `two_runs` fixtures


def prefect_yaml() -> dict:
    return yaml.safe_load(setup_local.PREFECT_FILE.read_text())


@pytest.mark.slow
def test_run_from_the_ui_completes_with_training_on_the_gpu_pool(stack, two_runs):
    for run in two_runs["runs"]:
        assert run["state"]["type"] == "COMPLETED", f"{run['name']}: {run['state']['message']}\n{stack.describe()}"
        assert run["work_pool_name"] == setup_local.CPU_POOL
        assert run["parameters"]["config"]["model"]["spec"]  # the custom parameters were used
    first, second = two_runs["runs"]
    assert stack.stage_states(first["id"]) == dict.fromkeys(STAGES, "Completed")
    # the second run differs in learning rate only: what precedes training is Cached
    assert stack.stage_states(second["id"]) == {**dict.fromkeys(STAGES[:3], "Cached"),
                                                **dict.fromkeys(STAGES[3:], "Completed")}
    cpu_log, gpu_log = stack.worker_log(setup_local.CPU_POOL), stack.worker_log(setup_local.GPU_POOL)
    for run, child in zip(two_runs["runs"], two_runs["children"]):
        assert child["state"]["type"] == "COMPLETED"
        assert child["work_pool_name"] == setup_local.GPU_POOL and child["deployment_id"]
        assert child["parameters"]["config"]["train"]["learning_rate"] == run["parameters"]["config"]["train"]["learning_rate"]
        # the gpu pool's worker ran it, the cpu pool's ran its pipeline
        assert f"'gpu-worker' submitting flow run '{child['id']}'" in gpu_log
        assert child["id"] not in cpu_log
        assert f"'cpu-worker' submitting flow run '{run['id']}'" in cpu_log
    # trigger to start: the worker polls every 2 s
    created = dt.datetime.fromisoformat(two_runs["triggered"][0]["created"])
    started = two_runs["first_start"]
    print(f"\ntrigger to Running: {(started - created).total_seconds():.1f} s")
    assert (started - created).total_seconds() < 60


@pytest.mark.slow
def test_a_second_training_waits_for_the_gpu_slot(stack, two_runs):
    pool = stack.get(f"/work_pools/{setup_local.GPU_POOL}")
    assert pool["concurrency_limit"] == 1
    first, second = sorted(two_runs["children"], key=lambda c: c["start_time"])
    t_first, t_second = stack.state_times(first["id"]), stack.state_times(second["id"])
    first_end = dt.datetime.fromisoformat(first["end_time"])
    # both trainings were waiting on the pool before either ran ...
    assert dt.datetime.fromisoformat(second["created"]) < dt.datetime.fromisoformat(first["start_time"])
    # ... and the second was handed to the worker only once the first had finished
    assert t_second["PENDING"] >= first_end, (t_first, t_second)
    assert dt.datetime.fromisoformat(second["start_time"]) >= first_end
    waited = (t_second["PENDING"] - dt.datetime.fromisoformat(second["created"])).total_seconds()
    print(f"\nsecond training waited {waited:.1f} s for the gpu slot")


@pytest.mark.slow
def test_unchanged_rerun_is_all_cached_within_a_minute(stack, two_runs, tiny_preset):
    """The run that finished last met the champion that is still in place (or the one it replaced, if
    it won): rerun unchanged, it meets the very same gate. (Rerunning the other run would gate it
    against the newer champion, which is new work, as it should be.)"""
    pipeline = two_runs["pipeline"]
    last = max(two_runs["runs"], key=lambda r: r["end_time"])
    response = stack.run_from_ui(pipeline["id"], last["parameters"])
    assert response.status_code == 201, response.text
    (run,) = stack.wait_final(response.json()["id"])
    assert run["state"]["type"] == "COMPLETED", stack.describe()
    assert stack.stage_states(run["id"]) == dict.fromkeys(STAGES, "Cached")
    seconds = (dt.datetime.fromisoformat(run["end_time"]) - dt.datetime.fromisoformat(run["start_time"])).total_seconds()
    print(f"\nunchanged rerun: {seconds:.1f} s from start to end, training run included")
    assert seconds < 60


@pytest.mark.slow
def test_schedule_and_typed_parameters_on_the_server(stack):
    from gemma_core.config import PipelineConfig

    pipeline = stack.deployment(setup_local.PIPELINE_DEPLOYMENT)
    training = stack.deployment(setup_local.TRAINING_DEPLOYMENT)
    (schedule,) = pipeline["schedules"]
    assert schedule["active"] and schedule["schedule"]["cron"] == stack.cron == "17 4 * * 0"
    assert schedule["schedule"]["timezone"] == "UTC"
    assert training["schedules"] == []
    upcoming = stack.post("/flow_runs/filter", {"deployments": {"id": {"any_": [pipeline["id"]]}},
                                                "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
    auto = [r for r in upcoming if r["auto_scheduled"]]
    assert auto, "the scheduler made no run for the cron"
    for run in auto:
        when = dt.datetime.fromisoformat(run["expected_start_time"]).astimezone(dt.timezone.utc)
        assert (when.minute, when.hour, when.isoweekday() % 7) == (17, 4, 0)
    schema = pipeline["parameter_openapi_schema"]
    assert schema["properties"]["config"]["default"] == PipelineConfig().model_dump(mode="json")
    # the pull step is resolved where each run starts (GEMMA_LORA_CHECKOUT there), not at deploy time
    assert pipeline["enforce_parameter_schema"] and pipeline["pull_steps"] == prefect_yaml()["pull"]
    assert training["pull_steps"] == prefect_yaml()["pull"]


@pytest.mark.slow
def test_an_invalid_parameter_is_refused_when_the_run_is_created(stack):
    pipeline = stack.deployment(setup_local.PIPELINE_DEPLOYMENT)

    def count():
        return len(stack.post("/flow_runs/filter", {"deployments": {"id": {"any_": [pipeline["id"]]}}}))

    before = count()
    for config, field in (({"train": {"learning_rate": -1}}, "config.train.learning_rate"),
                          ({"train": {"learnin_rate": 1e-4}}, "config.train")):
        response = stack.run_from_ui(pipeline["id"], {"config": config})
        assert response.status_code == 409, response.text
        assert f"'{field}'" in response.json()["detail"]
    assert count() == before


@pytest.mark.slow
def test_both_runs_promotions_land_in_one_history(stack, two_runs):
    """The two runs trained one after the other on the gpu pool and then gated: the first against the
    base model, the second against whatever was champion when it got there (compare-and-swap)."""
    from gemma_core.registry import Registry

    history = Registry(stack.root / "runs", "default").history()
    run_ids = [run["id"] for run in two_runs["runs"]]
    assert history and all(record.run_id in run_ids and record.promoted_by == "gate" for record in history)
    assert [record.sequence for record in history] == list(range(1, len(history) + 1))


@pytest.mark.slow
def test_a_sweep_trains_every_point_as_a_run_of_the_training_deployment(stack, two_runs, tiny_preset):
    pipeline = two_runs["pipeline"]
    parameters = tiny_parameters(tiny_preset, stack.root, 1e-3)
    parameters["config"]["sweep"] = {"train": {"learning_rate": [1e-3, 2e-3]}}  # both trained before: Cached
    response = stack.run_from_ui(pipeline["id"], parameters)
    assert response.status_code == 201, response.text
    (run,) = stack.wait_final(response.json()["id"])
    assert run["state"]["type"] == "COMPLETED", f"{run['state']['message']}\n{stack.describe()}"
    children = stack.children(run["id"])
    assert sorted(c["parameters"]["config"]["train"]["learning_rate"] for c in children) == [1e-3, 2e-3]
    assert all(c["work_pool_name"] == setup_local.GPU_POOL and c["state"]["type"] == "COMPLETED" for c in children)
    board = stack.post("/artifacts/filter", {"artifacts": {"key": {"any_": ["gemma-lora-leaderboard"]}},
                                             "flow_runs": {"id": {"any_": [run["id"]]}}})
    assert board and len(json.loads(board[0]["data"])) == 2
