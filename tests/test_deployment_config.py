"""Deployments without a server: deployments/prefect.yaml, the run form's schema from the typed config,
the GPU pools' base job templates, the worker image, and the pipeline's side of a training
deployment (run_deployment stubbed). The same deployments on a real server and workers are
tests/test_deployment_stack.py's; in the UI, tests/test_deployment_ui.py's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from deployments import setup_local

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
GPU_DIR = REPO / "deployments" / "gpu"
DOCKERFILE = GPU_DIR / "Dockerfile"
# Docker's DeviceRequest (docker-py DeviceRequest(**kwargs), Engine API DeviceRequests)
DEVICE_REQUEST_KEYS = {"driver", "count", "device_ids", "capabilities", "options"}


def prefect_yaml() -> dict:
    return yaml.safe_load(PREFECT_FILE.read_text())


def deployment(doc: dict, entrypoint: str) -> dict:
    """The deployment of a flow (names repeat across flows: the pipeline and the data watch are both `cpu`)."""
    (found,) = [d for d in doc["deployments"] if d["entrypoint"] == entrypoint]
    return found


PIPELINE_ENTRYPOINT = "flows/pipeline.py:gemma_lora_pipeline"
TRAINING_ENTRYPOINT = "flows/training.py:lora_training_flow"


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
    pipeline, training = deployment(doc, PIPELINE_ENTRYPOINT), deployment(doc, TRAINING_ENTRYPOINT)
    assert pipeline["work_pool"]["name"] == setup_local.CPU_POOL == "cpu"
    assert training["work_pool"]["name"] == setup_local.GPU_POOL == "gpu"
    (schedule,) = pipeline["schedules"]
    assert schedule == {"cron": "{{ $GEMMA_LORA_RETRAIN_CRON }}", "timezone": "UTC", "active": True}
    assert "schedules" not in training  # training runs when the pipeline asks for it
    # the pipeline sends training to the training deployment, by the name the deploy gives it
    assert pipeline["parameters"] == {"training_deployment": setup_local.TRAINING_DEPLOYMENT}
    assert pipeline["name"] == "cpu" and training["name"] == "gpu"
    assert setup_local.TRAINING_DEPLOYMENT == "lora-training/gpu"
    assert pipeline["enforce_parameter_schema"] is True and training["enforce_parameter_schema"] is True


def test_entrypoints_are_the_projects_flows():
    from prefect import Flow

    from flows.pipeline import gemma_lora_pipeline
    from flows.training import lora_training_flow
    from flows.watch_data import watch_data

    doc = prefect_yaml()
    flows = {f"flows/{f.fn.__module__.split('.')[-1]}.py:{f.fn.__name__}": f
             for f in (gemma_lora_pipeline, lora_training_flow, watch_data)}
    assert {d["entrypoint"] for d in doc["deployments"]} == set(flows)
    full_names = set()
    for entrypoint, flow in flows.items():
        assert (REPO / entrypoint.split(":")[0]).is_file() and isinstance(flow, Flow)
        full_names.add(f"{flow.name}/{deployment(doc, entrypoint)['name']}")
    assert full_names == {setup_local.PIPELINE_DEPLOYMENT, setup_local.TRAINING_DEPLOYMENT,
                          setup_local.WATCH_DEPLOYMENT}


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

    import flows.training
    from flows.stages import StageRunner
    from flows.training import TrainingRunFailed, run_training

    child = FlowRun(id=uuid.uuid4(), name="brave-otter", flow_id=uuid.uuid4(),
                    state=Failed(message="Flow run encountered an exception: InjectedFailure"))
    calls = []

    def fake_run_deployment(name, parameters=None, timeout=-1, **kwargs):
        calls.append({"name": name, "parameters": parameters, "timeout": timeout})
        return child

    monkeypatch.setattr(prefect.deployments, "run_deployment", fake_run_deployment)
    # the wait itself (through crashes the automation resumes) is tested on a real server: test_self_healing.py
    monkeypatch.setattr(flows.training, "wait_through_crashes", lambda run_id, label, poll, wait: child)
    data, model = stage_results()
    config = {"train": {"learning_rate": 1e-3}}
    with temporary_settings(updates={PREFECT_UI_URL: "http://prefect.example:4200"}):
        with pytest.raises(TrainingRunFailed) as failure:
            run_training(config, data, model, "/results", stages=StageRunner(None), deployment="lora-training/gpu")
    message = str(failure.value)
    assert f"http://prefect.example:4200/runs/flow-run/{child.id}" in message
    assert "'brave-otter'" in message and "lora-training/gpu" in message and "InjectedFailure" in message
    (call,) = calls
    assert call["name"] == "lora-training/gpu" and call["timeout"] == 0  # created here, waited for by the pipeline
    assert call["parameters"]["config"] == config and call["parameters"]["result_storage"] == "/results"
    assert call["parameters"]["data"]["data_hash"] == "d" * 16  # JSON, as the deployment's schema takes it
    json.dumps(call["parameters"])
