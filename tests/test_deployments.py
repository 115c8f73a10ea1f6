"""Deployments: deployments/prefect.yaml, the GPU job templates and worker image, and (slow) the whole
thing on a real `prefect server` with a `process` worker per pool, driven through the REST calls the
UI's Run button makes.

The slow test's server, workers and flow runs are real processes; every one is stopped by PID when
the module ends, also when a test fails.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from deployments import setup_local
from tests.helpers.prefect_server import isolated_server

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
GPU_DIR = REPO / "deployments" / "gpu"
DOCKERFILE = GPU_DIR / "Dockerfile"
STAGES = ("prepare-data", "resolve-model", "evaluate-base", "train-lora", "evaluate-tuned", "render-report")
# Docker's DeviceRequest (docker-py DeviceRequest(**kwargs), Engine API DeviceRequests)
DEVICE_REQUEST_KEYS = {"driver", "count", "device_ids", "capabilities", "options"}


def prefect_yaml() -> dict:
    return yaml.safe_load(PREFECT_FILE.read_text())


def deployment(doc: dict, name: str) -> dict:
    (found,) = [d for d in doc["deployments"] if d["name"] == name]
    return found


def placeholders(obj) -> set[str]:
    """Every {{ name }} in the strings of ``obj``."""
    text = json.dumps(obj)
    return set(re.findall(r"\{\{\s*([^}\s]+)\s*\}\}", text))


def bundled_worker_template(kind: str) -> dict:
    """The default base job template Prefect's server ships for a worker type."""
    import prefect.server.api

    views = Path(prefect.server.api.__file__).parent / "collections_data" / "views"
    meta = json.loads((views / "aggregate-worker-metadata.json").read_text())
    for collection in meta.values():
        if kind in collection:
            return collection[kind]["default_base_job_configuration"]
    raise KeyError(kind)


# --- prefect.yaml ----------------------------------------------------------------------------------

def test_prefect_yaml_pulls_code_from_the_checkout_and_builds_nothing():
    doc = prefect_yaml()
    assert doc["build"] is None and doc["push"] is None
    (step,) = doc["pull"]
    assert step == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $GEMMA_LORA_CHECKOUT }}"}}
    # every environment value the file reads is one setup_local provides (at deploy or at run time)
    env_vars = {p.removeprefix("$") for p in placeholders(doc) if p.startswith("$")}
    assert env_vars == set(setup_local.DEPLOY_ENV) | set(setup_local.RUN_ENV)
    assert placeholders(doc) == {f"${v}" for v in env_vars}  # nothing else is templated


def test_pipeline_on_cpu_training_on_gpu_with_a_weekly_utc_schedule():
    doc = prefect_yaml()
    pipeline, training = deployment(doc, "cpu"), deployment(doc, "gpu")
    assert pipeline["work_pool"]["name"] == setup_local.CPU_POOL == "cpu"
    assert training["work_pool"]["name"] == setup_local.GPU_POOL == "gpu"
    (schedule,) = pipeline["schedules"]
    assert schedule == {"cron": "{{ $GEMMA_LORA_RETRAIN_CRON }}", "timezone": "UTC", "active": True}
    assert "schedules" not in training  # training runs when the pipeline asks for it
    # the pipeline sends training to the training deployment, by the name the deploy gives it
    assert pipeline["parameters"] == {"training_deployment": setup_local.TRAINING_DEPLOYMENT}
    assert setup_local.TRAINING_DEPLOYMENT == "lora-training/gpu"
    assert pipeline["enforce_parameter_schema"] is True and training["enforce_parameter_schema"] is True


def test_entrypoints_are_the_projects_flows():
    from prefect import Flow

    from flows.pipeline import gemma_lora_pipeline
    from flows.training import lora_training_flow

    doc = prefect_yaml()
    expected = {"cpu": gemma_lora_pipeline, "gpu": lora_training_flow}
    for name, flow in expected.items():
        path, func = deployment(doc, name)["entrypoint"].split(":")
        assert (REPO / path).is_file() and isinstance(flow, Flow) and flow.fn.__name__ == func
    full_names = {f"{expected[n].name}/{n}" for n in expected}
    assert full_names == {setup_local.PIPELINE_DEPLOYMENT, setup_local.TRAINING_DEPLOYMENT}


def test_default_cron_is_weekly_in_utc():
    from prefect.client.schemas.schedules import CronSchedule

    schedule = CronSchedule(cron=setup_local.DEFAULT_CRON, timezone="UTC")
    minute, hour, day, month, weekday = schedule.cron.split()
    assert day == month == "*" and weekday.isdigit() and minute.isdigit() and hour.isdigit()


def test_process_pools_get_the_checkout_in_their_job_template():
    template = setup_local.process_base_job_template(Path("/some/checkout"))
    assert template["variables"]["properties"]["env"]["default"] == {"GEMMA_LORA_CHECKOUT": "/some/checkout"}
    assert template["job_configuration"]["env"] == "{{ env }}"


# --- parameters from the typed config --------------------------------------------------------------

def pipeline_schema() -> dict:
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import gemma_lora_pipeline

    return parameter_schema(gemma_lora_pipeline).model_dump()


def test_run_form_shows_every_config_field_with_its_default():
    from gemma_core.config import PipelineConfig

    schema = pipeline_schema()
    config = schema["properties"]["config"]
    assert config["default"] == PipelineConfig().model_dump(mode="json")
    definitions = schema["definitions"]
    top = definitions["PipelineConfig"]["properties"]
    assert set(top) == set(PipelineConfig.model_fields)
    for section, info in PipelineConfig.model_fields.items():
        sub = getattr(info.annotation, "model_fields", None)
        if sub is None:
            assert top[section]["default"] == info.default
            continue
        fields = definitions[info.annotation.__name__]["properties"]
        assert set(fields) == set(sub), section
        defaults = info.annotation().model_dump(mode="json")
        for name, field in fields.items():
            assert field["default"] == defaults[name], f"{section}.{name}"
    assert set(schema["properties"]) == {"config", "result_storage", "training_deployment"}


@pytest.mark.parametrize("config, field", [
    ({"train": {"learning_rate": -1}}, "config.train.learning_rate"),
    ({"train": {"learnin_rate": 1e-4}}, "config.train"),  # a typo: unknown keys are refused
    ({"backend": "torch"}, "config.backend"),
    ({"lora": {"rank": 0}}, "config.lora.rank"),
    ({"generation": {"sampler": "beam"}}, "config.generation.sampler"),
])
def test_a_wrong_value_is_refused_by_the_schema_the_server_enforces(config, field):
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    with pytest.raises(ValidationError, match=re.escape(f"'{field}'")):
        validate({"config": config}, pipeline_schema(), raise_on_error=True)
    validate({"config": {"train": {"learning_rate": 1e-4}}}, pipeline_schema(), raise_on_error=True)


# --- GPU pools: base job templates -----------------------------------------------------------------

def gpu_template(kind: str) -> dict:
    return json.loads(setup_local.GPU_BASE_JOB_TEMPLATES[kind].read_text())


@pytest.mark.parametrize("kind", ["docker", "kubernetes"])
def test_gpu_templates_extend_the_workers_default_and_declare_what_they_use(kind):
    template, default = gpu_template(kind), bundled_worker_template(kind)
    variables = template["variables"]["properties"]
    assert set(default["variables"]["properties"]) <= set(variables)
    assert default["job_configuration"].keys() <= template["job_configuration"].keys()
    assert placeholders(template["job_configuration"]) <= set(variables)  # nothing undeclared
    assert variables["image"]["default"] == "gemma-lora-flow:gpu"
    assert variables["env"]["default"]["GEMMA_LORA_CACHE"].startswith("/srv/gemma-lora")
    # every default satisfies its own schema, as Prefect checks job variables against it
    from prefect.utilities.schema_tools.validation import validate

    defaults = {k: v["default"] for k, v in variables.items() if "default" in v}
    validate(defaults, template["variables"], raise_on_error=True, ignore_required=True)


def test_docker_template_requests_nvidia_gpus():
    template = gpu_template("docker")
    assert template["job_configuration"]["container_create_kwargs"] == "{{ container_create_kwargs }}"
    kwargs = template["variables"]["properties"]["container_create_kwargs"]["default"]
    (request,) = kwargs["device_requests"]
    assert set(request) <= DEVICE_REQUEST_KEYS
    assert request["driver"] == "nvidia" and request["capabilities"] == [["gpu"]] and request["count"] == 1
    # docker-py builds DeviceRequest(**request): keys must be its keyword names
    assert all(isinstance(c, list) and all(isinstance(x, str) for x in c) for c in request["capabilities"])


def test_kubernetes_template_limits_nvidia_gpus():
    template = gpu_template("kubernetes")
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    gpu_count = template["variables"]["properties"]["gpu_count"]
    assert gpu_count["type"] == "integer" and gpu_count["default"] == 1 and gpu_count["minimum"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert mount["name"] == volume["name"] and mount["mountPath"] == "/srv/gemma-lora"
    assert volume["persistentVolumeClaim"]["claimName"] == "{{ shared_volume_claim }}"


def test_a_job_variable_override_is_checked_against_the_template():
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    k8s = gpu_template("kubernetes")["variables"]
    validate({"gpu_count": 2, "node_selector": {"nvidia.com/gpu.product": "H100"}}, k8s, raise_on_error=True,
             ignore_required=True)
    with pytest.raises(ValidationError):
        validate({"gpu_count": 0}, k8s, raise_on_error=True, ignore_required=True)
    docker = gpu_template("docker")["variables"]
    validate({"container_create_kwargs": {"device_requests": [{"driver": "nvidia", "device_ids": ["1"],
                                                               "capabilities": [["gpu"]]}]}},
             docker, raise_on_error=True, ignore_required=True)


# --- the worker image ------------------------------------------------------------------------------

DOCKERFILE_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
                           "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuation lines joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, "a continuation line runs past the end of the file"
    return out


def pins(requirements) -> dict[str, str]:
    found = {}
    for req in requirements:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([A-Za-z0-9_.+-]+)", req.strip("\"'"))
        if m:
            found[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(3)
    return found


def test_dockerfile_parses_and_pins_what_pyproject_pins():
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    assert {k for k, _ in steps} <= DOCKERFILE_INSTRUCTIONS
    assert steps[0][0] == "FROM" and steps[0][1].startswith("nvidia/cuda:12.")  # a CUDA base
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    project_pins = pins(project["dependencies"])
    run_text = " ".join(args for k, args in steps if k == "RUN")
    image_pins = pins(run_text.split())
    assert image_pins, "the Dockerfile pins nothing"
    for name, version in image_pins.items():
        if name == "uv":  # the installer: the Makefile's pin
            assert f"uv=={version}" in (REPO / "Makefile").read_text()
        else:
            assert project_pins.get(name) == version, f"{name}=={version} differs from pyproject.toml"
    assert "jax" in image_pins  # the CUDA build of the project's JAX version
    assert re.search(r"uv pip install -e \. ", run_text), "the project is installed from pyproject.toml"
    # the image's Python is one pyproject allows
    assert "--python 3.11" in run_text and project["requires-python"] == ">=3.11,<3.13"


def test_dockerfile_copies_what_exists_and_its_entrypoint_runs_the_workers_command():
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    workdir = Path([a for k, a in steps if k == "WORKDIR"][-1])
    copied = {}
    for keyword, args in steps:
        if keyword == "COPY":
            *sources, dest = args.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: no such file in the build context"
                copied[(workdir / dest / (source if dest.endswith("/") else "")).resolve()] = REPO / source
    (entrypoint,) = [json.loads(a) for k, a in steps if k == "ENTRYPOINT"]
    image_path = Path(entrypoint[0])
    local = next(src / image_path.relative_to(dst) for dst, src in copied.items()
                 if image_path.is_relative_to(dst))
    assert local == GPU_DIR / "entrypoint.sh" and os.access(local, os.X_OK)
    env = dict(os.environ, PATH="/usr/bin:/bin")  # no nvidia-smi here
    ran = subprocess.run([str(local), "echo", "flow run"], env={**env, "GEMMA_LORA_REQUIRE_GPU": "0"},
                         capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0 and ran.stdout == "flow run\n"
    refused = subprocess.run([str(local), "echo", "flow run"], env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 70 and "no NVIDIA GPU" in refused.stderr and not refused.stdout
    env_lines = " ".join(a for k, a in steps if k == "ENV")
    assert f"GEMMA_LORA_CHECKOUT={workdir}" in env_lines  # the pull step's directory in the image
    # the build context's ignore file keeps every copied source
    ignore = (GPU_DIR / "Dockerfile.dockerignore").read_text()
    for source in {src.relative_to(REPO).parts[0] for src in copied.values()}:
        assert f"!{source}" in ignore


# --- slow: a real server, a process worker per pool, runs triggered like the UI's Run button --------

WAIT_S = 240
TEST_CRON = "17 4 * * 0"  # not the default: shows the schedule is configurable


def final(run: dict) -> bool:
    return run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class Stack:
    """A Prefect server, the pools and deployments, and a process worker per pool, for one module."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[str, Path] = {}
        self.api = ""
        self.timings: dict[str, float] = {}

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
        task_runs = self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": ids}}})
        states = {}
        for task_run in task_runs:
            stage = task_run["name"].rsplit("-", 1)[0]
            if stage in STAGES:
                states[stage] = task_run["state"]["name"]
        return states

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
    return {
        "training_deployment": setup_local.TRAINING_DEPLOYMENT,
        "config": {
            "model": {"spec": str(preset)},
            "output": {"root": str(root / "runs")},
            "data": {"train_limit": 8},
            "train": {"learning_rate": learning_rate, "max_steps": 4, "batch_size": 2, "sequence_length": 96,
                      "checkpoint_every": 2},
            "generation": {"max_new_tokens": 6, "batch_size": 4},
            "evaluation": {"num_prompts": 4, "num_side_by_side": 2},
        },
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployments")
    s = Stack(root)
    started = time.monotonic()
    try:
        server = isolated_server(root / "server-home", root / "server.log", ui=True)
        s.api, s.logs["server"] = server.api_url, server.log_path
        s.procs.append(server.spawn().process)
        s.timings["server healthy"] = server.wait_healthy()
        t = time.monotonic()
        # Flow runs take their code from a checkout (the pull step): a snapshot of this one, so that
        # edits made to the working tree while the test runs cannot change cache keys mid-test.
        checkout = root / "checkout"
        for package in ("gemma_core", "tasks", "flows"):
            shutil.copytree(REPO / package, checkout / package, ignore=shutil.ignore_patterns("__pycache__"))
        setup_local.create_pools(s.api, checkout)
        env = setup_local.base_env(s.api, GEMMA_LORA_CHECKOUT=str(checkout), PYTHONPATH=str(checkout),
                                   PREFECT_HOME=str(root / "client-home"), PREFECT_WORKER_QUERY_SECONDS="2")
        for var in ("GEMMA_LORA_RESULT_STORAGE", "GEMMA_LORA_FAIL_AT", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"):
            env.pop(var, None)
        setup_local.apply_deployments(s.api, TEST_CRON, env)
        s.timings["pools and deployments"] = time.monotonic() - t
        for pool in (setup_local.CPU_POOL, setup_local.GPU_POOL):
            s.logs[f"worker-{pool}"] = root / f"worker-{pool}.log"
            s.procs.append(setup_local.start_worker(pool, env, s.logs[f"worker-{pool}"], name=f"{pool}-worker"))
        s.timings["set-up"] = time.monotonic() - started
        yield s
    finally:
        t = time.monotonic()
        setup_local.stop_all(reversed(s.procs))  # workers (and their flow runs), then the server
        stopped = [p.pid for p in s.procs if p.poll() is not None]
        print(f"\ndeployment stack timings (s): { {k: round(v, 1) for k, v in s.timings.items()} }; "
              f"stopped {len(stopped)}/{len(s.procs)} processes in {time.monotonic() - t:.1f} s")
        assert len(stopped) == len(s.procs), "a process of the stack is still running"


@pytest.fixture(scope="module")
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
    pipeline = two_runs["pipeline"]
    response = stack.run_from_ui(pipeline["id"], two_runs["runs"][0]["parameters"])
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
    assert schedule["active"] and schedule["schedule"]["cron"] == TEST_CRON
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


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium(url: str, out: Path, tmp: Path, *, screenshot: bool) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    profile = tmp / f"profile-{out.stem}-{screenshot}"
    profile.mkdir()
    action = [f"--screenshot={out}"] if screenshot else ["--dump-dom"]
    done = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1800",
                           "--virtual-time-budget=20000", *action, url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="no chromium (Debian: apt-get install -y chromium)")
def test_the_ui_shows_the_finished_run_and_its_report(stack, two_runs, tmp_path):
    """What a user sees: the run's page, the report artifact and the deployment's run form (every
    config field), in headless Chromium. Screenshots go
    to $GEMMA_LORA_SCREENSHOT_DIR (else this test's temporary directory); their paths are printed."""
    shots = Path(os.environ.get("GEMMA_LORA_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    ui = stack.api.removesuffix("/api")
    run = two_runs["runs"][0]
    (report,) = [a for a in stack.post("/artifacts/filter", {"artifacts": {"key": {"any_": ["gemma-lora-report"]}}})
                 if a["flow_run_id"] == run["id"]]
    from gemma_core.config import PipelineConfig

    form_titles = [field.title or name.replace("_", " ").title()
                   for section in PipelineConfig.model_fields.values()
                   for name, field in getattr(section.annotation, "model_fields", {}).items()]
    pages = {"flow-run": (f"{ui}/runs/flow-run/{run['id']}", [run["name"], "Completed", "render-report"]),
             "report": (f"{ui}/artifacts/artifact/{report['id']}", ["LoRA fine-tuning report", "Overall metrics"]),
             "run-form": (f"{ui}/deployments/deployment/{two_runs['pipeline']['id']}/run", form_titles)}
    for name, (url, expected) in pages.items():
        dom = chromium(url, shots / f"{name}.png", tmp_path, screenshot=False)
        for text in expected:
            assert text in dom, f"{name} page ({url}) does not show {text!r}"
        chromium(url, shots / f"{name}.png", tmp_path, screenshot=True)
        assert (shots / f"{name}.png").stat().st_size > 20_000
        print(f"\nscreenshot of the {name} page: {shots / f'{name}.png'}")


# --- the pipeline's side of a training deployment (run_deployment stubbed) --------------------------

def stage_results():
    from tasks.results import DataResult, ModelResult

    common = {"fingerprint": "f" * 16, "files": {}, "seconds": 1.0, "peak_rss_mb": 1.0}
    data = DataResult(stage="prepare-data", data_hash="d" * 16, source="sample", is_sample=True, counts={},
                      dropped={}, **common)
    model = ModelResult(stage="resolve-model", spec="/m", preset_dir="/m", model_hash="m" * 16, **common)
    return data, model


def test_a_failed_training_run_fails_the_stage_with_the_runs_link(monkeypatch):
    """The pipeline waits for the training deployment's run; when that run fails, the training stage
    raises, naming the run and linking to it in the UI."""
    import uuid

    import prefect.deployments
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_UI_URL, temporary_settings
    from prefect.states import Failed

    from flows.training import TrainingRunFailed, run_training

    child = FlowRun(id=uuid.uuid4(), name="brave-otter", flow_id=uuid.uuid4(),
                    state=Failed(message="Flow run encountered an exception: InjectedFailure"))
    calls = []

    def fake_run_deployment(name, parameters=None, timeout=-1, **kwargs):
        calls.append({"name": name, "parameters": parameters, "timeout": timeout})
        return child

    monkeypatch.setattr(prefect.deployments, "run_deployment", fake_run_deployment)
    data, model = stage_results()
    config = {"train": {"learning_rate": 1e-3}}
    with temporary_settings(updates={PREFECT_UI_URL: "http://prefect.example:4200"}):
        with pytest.raises(TrainingRunFailed) as failure:
            run_training(config, data, model, "/results", deployment="lora-training/gpu")
    message = str(failure.value)
    assert f"http://prefect.example:4200/runs/flow-run/{child.id}" in message
    assert "'brave-otter'" in message and "lora-training/gpu" in message and "InjectedFailure" in message
    (call,) = calls
    assert call["name"] == "lora-training/gpu" and call["timeout"] is None  # waits however long it queues
    assert call["parameters"]["config"] == config and call["parameters"]["result_storage"] == "/results"
    assert call["parameters"]["data"]["data_hash"] == "d" * 16  # JSON, as the deployment's schema takes it
    json.dumps(call["parameters"])
