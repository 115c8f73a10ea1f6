"""Render the GPU base job templates through the real Docker and Kubernetes workers, as they would
for a flow run, and show what they would ask the Docker engine or the cluster for.

Needs the worker packages (not project dependencies):

    pip install prefect-docker prefect-kubernetes
    python deployments/gpu/render_templates.py [--set gpu_count=2 ...]

Exits non-zero when a rendered job would get no GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent


async def render(overrides: dict) -> int:
    from prefect.client.schemas.objects import FlowRun
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration
    from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

    flow_run = FlowRun(id=uuid.uuid4(), name="render-check", flow_id=uuid.uuid4())
    problems = []
    for kind, worker, configuration in (("docker", DockerWorker, DockerWorkerJobConfiguration),
                                        ("kubernetes", KubernetesWorker, KubernetesWorkerJobConfiguration)):
        template = json.loads((HERE / f"{kind}-gpu.base-job-template.json").read_text())
        default = worker.get_default_base_job_template()
        missing = set(default["variables"]["properties"]) - set(template["variables"]["properties"])
        if missing:
            problems.append(f"{kind}: variables of the installed worker's default template missing: {sorted(missing)}")
        declared = set(template["variables"]["properties"])
        config = await configuration.from_template_and_values(
            template, {k: v for k, v in overrides.items() if k in declared})
        config.prepare_for_flow_run(flow_run)
        if kind == "docker":
            requests = (config.container_create_kwargs or {}).get("device_requests") or []
            print(f"docker: image {config.image}, device_requests {requests}, volumes {config.volumes}")
            if not any("gpu" in sum(r.get("capabilities", []), []) for r in requests):
                problems.append("docker: no device request with the gpu capability")
        else:
            pod = config.job_manifest["spec"]["template"]["spec"]
            limits = pod["containers"][0]["resources"]["limits"]
            print(f"kubernetes: image {pod['containers'][0]['image']}, limits {limits}, "
                  f"nodeSelector {pod.get('nodeSelector')}, volumes {pod.get('volumes')}")
            if not limits.get("nvidia.com/gpu"):
                problems.append("kubernetes: no nvidia.com/gpu limit")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="VARIABLE=JSON",
                        help="a job variable, as a deployment would override it (repeatable)")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    return asyncio.run(render(overrides))


if __name__ == "__main__":
    sys.exit(main())
