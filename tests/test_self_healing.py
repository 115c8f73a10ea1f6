"""Retraining that heals itself, on a real `prefect server` with the project's pools, deployments,
automations (deployments/automations.py) and a process worker per pool, with real SIGKILLs:

- the data trigger: the watch-data flow emits ``gemma-lora.data.changed`` only on a change, and the
  pipeline deployment's debounced trigger turns one change into one run and a burst into one run;
- a training run's process SIGKILLed while its worker lives: `Crashed` at once, resumed by the
  automation from its newest checkpoint, and its adapter equals an uninterrupted training's;
- the `gpu` worker SIGKILLed together with its training run: the run stays `Running` with its pool's
  only slot until its heartbeats are missed, then `Crashed` (a queued training starts: the slot is
  free) and, once a new worker runs, resumed from its newest checkpoint;
- a run that crashes once more than ``recovery.max_resumes`` is not started again and says why.

Heartbeats every 30 s (Prefect's minimum) and a 95 s window, so one scenario waits about two minutes for
the zombie to be marked. One stack serves every test here (module-scoped), and the tests run in order.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from deployments import setup_local
from gemma_core.config import RecoveryConfig
from tests.helpers.stack import Stack, tiny_parameters

pytestmark = pytest.mark.slow

RECOVERY = RecoveryConfig(heartbeat_s=30, crashed_after_s=95, max_resumes=2, resume_wait_s=240,
                          watch_every_s=3600, debounce_s=45)
CHECKPOINT_EVERY = 4
LONG_TRAINING = {"train__max_steps": 48, "train__epochs": 50, "train__checkpoint_every": CHECKPOINT_EVERY}
REPO = Path(__file__).resolve().parents[1]
RECORD: dict[str, dict] = {}  # fault -> the figures of the closing note's table, printed at the end


@pytest.fixture(scope="module")
def healing(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("healing"), recovery=RECOVERY)
    try:
        yield stack.start()
    finally:
        stack.close()
        if RECORD:
            print("\nself-healing figures:\n" + json.dumps(RECORD, indent=1, default=str))


# --- helpers ------------------------------------------------------------------------------------------

def states(stack: Stack, run_id: str) -> list[dict]:
    return sorted(stack.get(f"/flow_run_states/?flow_run_id={run_id}"), key=lambda s: s["timestamp"])


def when(state: dict) -> dt.datetime:
    return dt.datetime.fromisoformat(state["timestamp"])


def wait_for(what: str, check, timeout: float, stack: Stack, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s\n{stack.describe()}")


class RunProcesses:
    """Every process a pool's worker started for one flow run (their environment names the run)."""

    def __init__(self, procs: list[psutil.Process]):
        self.procs = procs

    def send_signal(self, sig: int) -> None:
        for proc in self.procs:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def wait(self, timeout: float) -> None:
        psutil.wait_procs(self.procs, timeout=timeout)


def flow_run_process(stack: Stack, pool: str, run_id: str) -> RunProcesses | None:
    worker = stack.supervisor.workers[pool]
    try:
        children = psutil.Process(worker.pid).children(recursive=True)
    except psutil.Error:
        return None
    found = []
    for child in children:
        try:
            if child.environ().get("PREFECT__FLOW_RUN_ID") == run_id:
                found.append(child)
        except psutil.Error:
            continue
    return RunProcesses(found) if found else None


def train_dirs(child_run: dict) -> set[Path]:
    """The training directories under a training flow run's output root."""
    return set((Path(child_run["parameters"]["config"]["output"]["root"]) / "train").glob("train-*"))


def newest_checkpoint(train_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (train_dir / "checkpoints").glob("step-*")]
    return max(steps, default=0)


def logged_steps(train_dir: Path) -> int:
    log = train_dir / "train_log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return max((json.loads(line)["step"] for line in lines if line.strip()), default=0)


def train_output(stack: Stack, training_run_id: str) -> dict:
    """The train-lora task's result of a training run, read through its result storage."""
    from prefect.client.schemas.objects import State

    task_runs = stack.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [training_run_id]}},
                                                 "task_runs": {"name": {"any_": ["train-lora"]}}})
    done = [t for t in task_runs if t["state"]["type"] == "COMPLETED"]
    assert done, f"no completed train-lora task in {training_run_id}: {[t['state'] for t in task_runs]}"
    result = State.model_validate(done[-1]["state"]).result()
    return result.model_dump(mode="json") if hasattr(result, "model_dump") else result


def read_adapter(path: Path) -> dict[str, np.ndarray]:
    import h5py

    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, np.asarray(obj)) if hasattr(obj, "shape") else None)
    return arrays


def start_pipeline(stack: Stack, tiny_preset: Path, learning_rate: float) -> tuple[dict, dict, set[Path]]:
    """A pipeline run pressed in the UI with a long training; returns it, its training run and the training
    directories that were there before it (each test trains a new learning rate, so in a new one)."""
    pipeline = stack.deployment(setup_local.PIPELINE_DEPLOYMENT)
    params = tiny_parameters(tiny_preset, stack.root, learning_rate)
    for key, value in LONG_TRAINING.items():
        section, _, name = key.partition("__")
        params["config"][section][name] = value
    before = set((Path(params["config"]["output"]["root"]) / "train").glob("train-*"))
    response = stack.run_from_ui(pipeline["id"], params)
    assert response.status_code == 201, response.text
    run = response.json()
    return run, stack.wait_child(run["id"]), before


def kill_after_checkpoint(stack: Stack, child: dict, before: set[Path], with_worker: bool = False) -> dict:
    """SIGKILL the training run's process (``with_worker``: its worker first, so that nobody is left to
    report it) once a checkpoint is on disk; what was done at that moment."""
    pool = setup_local.GPU_POOL
    process = wait_for("the training run's process", lambda: flow_run_process(stack, pool, child["id"]), 120, stack)
    train_dir = wait_for("its training directory", lambda: next(iter(train_dirs(child) - before), None), 180, stack)
    wait_for("the first checkpoint", lambda: newest_checkpoint(train_dir) >= CHECKPOINT_EVERY, 180, stack, every=0.05)
    if with_worker:
        worker = stack.supervisor.workers[pool]
        worker.send_signal(signal.SIGKILL)
    process.send_signal(signal.SIGKILL)
    if with_worker:
        worker.wait(30)
    killed_at = dt.datetime.now(dt.timezone.utc)
    process.wait(30)
    return {"killed_at": killed_at, "train_dir": train_dir, "steps_done": logged_steps(train_dir),
            "checkpoint": newest_checkpoint(train_dir)}


def reference_adapter(stack: Stack, child: dict, out_root: Path) -> dict[str, np.ndarray]:
    """The same training, uninterrupted, in a process of its own."""
    params = child["parameters"]
    script = ("import json, sys\n"
              "from gemma_core.config import validate_config\n"
              "from tasks.results import DataResult, ModelResult\n"
              "from tasks.train import train_adapter\n"
              "p = json.load(sys.stdin)\n"
              "cfg = validate_config(p['config'])\n"
              "out = train_adapter.fn(cfg.train, cfg.lora, DataResult.model_validate(p['data']),\n"
              "                       ModelResult.model_validate(p['model']), sys.argv[1], backend=cfg.backend)\n"
              "print(out.files['adapter'].path)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(REPO), PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="true", PREFECT_HOME=str(out_root / "home"))
    done = subprocess.run([sys.executable, "-c", script, str(out_root)], input=json.dumps(params), text=True,
                          capture_output=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return read_adapter(Path(done.stdout.strip().splitlines()[-1]))


def assert_same_adapter(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    assert got.keys() == want.keys()
    worst = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
    assert worst <= 1e-5, f"the resumed adapter differs from an uninterrupted training's by {worst:g}"
    return worst


# --- the data trigger ---------------------------------------------------------------------------------

def test_data_change_trigger_starts_one_run_per_change_and_one_per_burst(healing, tmp_path):
    stack = healing
    data_file = tmp_path / "dolly.jsonl"
    row = {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"}
    data_file.write_text(json.dumps(row) + "\n")
    config = {"data": {"source": str(data_file)}}
    pipeline = stack.deployment(setup_local.PIPELINE_DEPLOYMENT)
    triggers = [t for t in pipeline_triggers(stack, pipeline["id"])]
    assert triggers and triggers[0]["trigger"]["within"] == RECOVERY.debounce_s, triggers

    def triggered_runs() -> list[dict]:
        runs = stack.post("/flow_runs/filter", {"deployments": {"id": {"any_": [pipeline["id"]]}}})
        return [r for r in runs if r["created_by"] and r["created_by"].get("type") == "AUTOMATION"]

    # the runs the trigger starts have the deployment's defaults (the real model): keep them queued
    stack.set_paused(setup_local.CPU_POOL, True)
    watcher = WatchDriver(stack)
    try:
        assert watcher.look(config)["changed"] is False  # first look: records the fingerprint
        assert watcher.look(config)["changed"] is False  # no change
        time.sleep(8)
        assert triggered_runs() == [], "no change must start no run"

        data_file.write_text(json.dumps({**row, "response": "Red."}) + "\n")
        first_change = time.monotonic()
        assert watcher.look(config)["changed"] is True
        wait_for("the triggered run", lambda: len(triggered_runs()) == 1, 60, stack)
        time.sleep(8)
        assert len(triggered_runs()) == 1, "one change must start exactly one run"

        # the window of the first change closes; then a burst of three changes within one window
        time.sleep(max(0.0, RECOVERY.debounce_s + 2 - (time.monotonic() - first_change)))
        burst_started = time.monotonic()
        for answer in ("Green.", "Violet.", "Amber."):
            data_file.write_text(json.dumps({**row, "response": answer}) + "\n")
            assert watcher.look(config)["changed"] is True
        assert time.monotonic() - burst_started < RECOVERY.debounce_s, "the burst took longer than the window"
        wait_for("the burst's run", lambda: len(triggered_runs()) == 2, 60, stack)
        time.sleep(8)
        assert len(triggered_runs()) == 2, "three changes within the window must start one run"
    finally:
        watcher.close()
        for run in triggered_runs():
            stack.request("DELETE", f"/flow_runs/{run['id']}")
        stack.set_paused(setup_local.CPU_POOL, False)


def pipeline_triggers(stack: Stack, deployment_id: str) -> list[dict]:
    automations = stack.post("/automations/filter", {})
    return [a for a in automations if deployment_id in json.dumps(a["actions"])]


class WatchDriver:
    """The watch-data flow run again and again in one process of its own (real flow runs on the
    server, without a worker's start-up for each)."""

    SCRIPT = ("import json, sys\n"
              "from flows.watch_data import watch_data\n"
              "for line in sys.stdin:\n"
              "    print(json.dumps(watch_data(None, json.loads(line))), flush=True)\n")

    def __init__(self, stack: Stack):
        env = setup_local.base_env(stack.api, RECOVERY, PYTHONPATH=str(REPO),
                                   PREFECT_HOME=str(stack.root / "watch-home"))
        env.pop("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", None)
        self.log = open(stack.root / "watch-driver.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=env, cwd=REPO, text=True)

    def look(self, config: dict) -> dict:
        self.proc.stdin.write(json.dumps(config) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the watch driver exited: {Path(self.log.name).read_text()[-3000:]}"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# --- crashes ------------------------------------------------------------------------------------------

def test_crash_of_a_killed_training_process_is_resumed_from_its_checkpoint(healing, tiny_preset, tmp_path):
    stack = healing
    run, child, before = start_pipeline(stack, tiny_preset, 3e-3)
    kill = kill_after_checkpoint(stack, child, before)
    crashed = wait_for("Crashed", lambda: next((s for s in states(stack, child["id"]) if s["type"] == "CRASHED"), None),
                       60, stack)
    resumed = wait_for("the resumed attempt", lambda: [s for s in states(stack, child["id"])
                                                        if s["type"] == "RUNNING" and when(s) > when(crashed)], 120, stack)
    parent, training = stack.wait_final(run["id"], child["id"])
    assert training["state"]["type"] == "COMPLETED", training["state"]
    assert parent["state"]["type"] == "COMPLETED", f"{parent['state']}\n{stack.describe()}"
    # the worker reports this death twice, seconds apart; the second report must find the run still
    # Crashed (and be refused), not crash the next attempt: one Crashed, one resume
    names = [s["name"] for s in states(stack, child["id"])]
    assert (names.count("Crashed"), names.count("AwaitingRetry")) == (1, 1), history(stack, child)
    output = train_output(stack, child["id"])
    assert output["resumed_from_step"] == kill["checkpoint"] > 0
    lost = kill["steps_done"] - output["resumed_from_step"]
    assert 0 <= lost <= CHECKPOINT_EVERY, f"{lost} steps lost, more than one checkpoint interval"
    worst = assert_same_adapter(read_adapter(Path(output["files"]["adapter"]["path"])),
                                reference_adapter(stack, child, tmp_path / "reference"))
    RECORD["training process SIGKILLed (worker alive)"] = {
        "to Crashed s": round((when(crashed) - kill["killed_at"]).total_seconds(), 1),
        "to resumed s": round((when(resumed[0]) - when(crashed)).total_seconds(), 1),
        "steps lost": lost, "resumed from step": output["resumed_from_step"], "adapter max diff": worst,
    }


def test_zombie_of_a_killed_worker_frees_the_gpu_slot_and_resumes(healing, tiny_preset, tmp_path):
    stack = healing
    run, child, before = start_pipeline(stack, tiny_preset, 4e-3)
    worker = stack.supervisor.workers[setup_local.GPU_POOL]
    kill = kill_after_checkpoint(stack, child, before, with_worker=True)
    time.sleep(5)
    assert stack.flow_run(child["id"])["state"]["type"] == "RUNNING"  # nobody is left to say it died

    # a second training queues for the pool's only slot, which the dead run still holds
    training = stack.deployment(setup_local.TRAINING_DEPLOYMENT)
    params = json.loads(json.dumps(child["parameters"]))
    params["config"]["train"]["learning_rate"] = 5e-3
    response = stack.request("POST", f"/deployments/{training['id']}/create_flow_run",
                             {"parameters": params, "state": {"type": "SCHEDULED"}})
    assert response.status_code == 201, response.text
    second = response.json()
    stack.supervisor.check()  # the dead worker is started again (setup_local's loop does this every second)
    wait_for("a new gpu worker", lambda: stack.supervisor.workers[setup_local.GPU_POOL].pid != worker.pid
             or stack.supervisor.check(), 30, stack, every=0.5)
    time.sleep(10)
    assert stack.flow_run(second["id"])["state"]["type"] == "SCHEDULED", \
        "the queued training started while the dead run held the gpu slot"

    crashed = wait_for("the zombie marked Crashed",
                       lambda: next((s for s in states(stack, child["id"]) if s["type"] == "CRASHED"), None),
                       RECOVERY.crashed_after_s + 90, stack, every=1)
    assert "No heartbeat" in (crashed["message"] or ""), crashed
    second_running = wait_for("the queued training starts", lambda: next(
        (s for s in states(stack, second["id"]) if s["type"] == "RUNNING"), None), 120, stack, every=0.5)
    assert when(second_running) > when(crashed)
    RECORD["gpu worker SIGKILLed with its run"] = {
        "to Crashed s": round((when(crashed) - kill["killed_at"]).total_seconds(), 1),
        "queued training started after Crashed s": round((when(second_running) - when(crashed)).total_seconds(), 1),
    }
    # the second training is the one that crashes too often (next test): kill it whenever it runs
    crash_too_often(stack, second)

    parent, resumed_run = stack.wait_final(run["id"], child["id"])
    assert resumed_run["state"]["type"] == "COMPLETED", resumed_run["state"]
    assert parent["state"]["type"] == "COMPLETED", f"{parent['state']}\n{stack.describe()}"
    resumed = [s for s in states(stack, child["id"]) if s["type"] == "RUNNING" and when(s) > when(crashed)]
    output = train_output(stack, child["id"])
    assert output["resumed_from_step"] == kill["checkpoint"] > 0
    lost = kill["steps_done"] - output["resumed_from_step"]
    assert 0 <= lost <= CHECKPOINT_EVERY
    worst = assert_same_adapter(read_adapter(Path(output["files"]["adapter"]["path"])),
                                reference_adapter(stack, child, tmp_path / "reference"))
    RECORD["gpu worker SIGKILLed with its run"].update({
        "to resumed s": round((when(resumed[0]) - when(crashed)).total_seconds(), 1),
        "steps lost": lost, "resumed from step": output["resumed_from_step"], "adapter max diff": worst,
        "worker restarts": len(stack.supervisor.restarts),
    })


def history(stack: Stack, run: dict) -> str:
    """The run's states and the automation actions taken on it, for a failure message."""
    lines = [f"{s['timestamp']} {s['type']:<10} {s['name']:<14} {(s['message'] or '')[:90]}" for s in states(stack, run["id"])]
    events = stack.post("/events/filter", {"filter": {"event": {"prefix": ["prefect.automation."]},
                                                      "occurred": {"since": "2000-01-01T00:00:00Z"}}, "limit": 50})
    for event in events.get("events", []):
        if run["id"] in json.dumps(event):
            lines.append(f"{event['occurred']} {event['event']} {event['resource'].get('prefect.resource.name')}")
    return "\n".join(sorted(lines))


def crash_too_often(stack: Stack, run: dict) -> None:
    """SIGKILL ``run``'s process each time it runs, until it is no longer resumed."""
    kills = []
    for attempt in range(RECOVERY.max_resumes + 1):
        process = wait_for(f"attempt {attempt + 1} of the run", lambda: (
            stack.flow_run(run["id"])["state"]["type"] == "RUNNING" and flow_run_process(stack, setup_local.GPU_POOL,
                                                                                        run["id"])), 180, stack)
        process.send_signal(signal.SIGKILL)
        kills.append(time.monotonic())
        process.wait(30)
        wait_for("Crashed", lambda: stack.flow_run(run["id"])["state"]["type"] in ("CRASHED", "SCHEDULED", "FAILED"),
                 60, stack)
    final = wait_for("the run given up", lambda: (lambda r: r if r["state"]["type"] == "FAILED" else None)(
        stack.flow_run(run["id"])), 60, stack)
    assert final["state"]["name"] == "NotResumed", final["state"]
    assert f"Crashed {RECOVERY.max_resumes + 1} times" in final["state"]["message"], final["state"]
    assert final["run_count"] == RECOVERY.max_resumes + 1, history(stack, run)
    RECORD["a run crashing on every attempt"] = {"processes per attempt": len(process.procs)}
    time.sleep(8)
    assert stack.flow_run(run["id"])["state"]["type"] == "FAILED", f"a run given up was started again:\n{history(stack, run)}"
    RECORD["a run crashing on every attempt"] |= {"attempts": len(kills), "final state": final["state"]["name"],
                                                 "message": final["state"]["message"][:80]}
