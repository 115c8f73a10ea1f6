"""Human approval of a promotion on a real ``prefect server`` (127.0.0.1, a free port, its own
PREFECT_HOME): with ``promotion.require_approval`` a run whose gate passes pauses, visible as Paused in
the API the UI reads; the UI's Resume form (``POST /flow_runs/<id>/resume`` with the typed input) either
approves, and the promotion is recorded with the approver's comment, or rejects, and the champion is
unchanged. The pipeline is ``gemma-lora run`` in a child process, on the tiny random Gemma.
"""

import json
import time
import urllib.request
from pathlib import Path

import pytest

from gemma_core.registry import Registry
from helpers import procs
from helpers.prefect_server import server  # noqa: F401  (the module's server fixture)

RUN_TIMEOUT = 600


def api(server, method: str, path: str, body: dict | None = None):
    request = urllib.request.Request(f"{server.api_url}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def start(tmp_path: Path, server, tiny_preset, registry: str) -> procs.PipelineRun:
    root = tmp_path / "runs"
    args = ["run", *procs.tiny_overrides(tiny_preset, root, **{"promotion.registry": registry,
                                                               "promotion.require_approval": True,
                                                               "promotion.approval_timeout_s": RUN_TIMEOUT}),
            "--result-storage", str(root / "prefect-results")]
    env = {k: v for k, v in procs.child_env().items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=server.api_url, PREFECT_HOME=str(tmp_path / "client-home"))
    return procs.PipelineRun(tmp_path, registry, args, env)


def wait_paused(server, run: procs.PipelineRun) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        paused = api(server, "POST", "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}})
        if paused:
            return paused[0]
        assert run.proc.poll() is None, f"the run ended without pausing:\n{run.tail()}"
        time.sleep(1)
    raise TimeoutError(f"no paused run within {RUN_TIMEOUT} s:\n{run.tail()}")


def resume(server, flow_run_id: str, run_input: dict) -> dict:
    """The Resume form's call. Prefect sets the run Paused first and saves its input form's schema just
    after, and the server rejects a resume before that ("Run input schema not found"); the UI shows the
    form only once the schema is there, so this waits for it the same way."""
    deadline = time.monotonic() + 60
    while True:
        result = api(server, "POST", f"/flow_runs/{flow_run_id}/resume", {"run_input": run_input})
        reason = (result.get("details") or {}).get("reason") or ""
        if result["status"] != "REJECT" or "schema not found" not in reason or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("approve", [True, False], ids=["approved", "rejected"])
def test_a_passing_gate_waits_for_a_person(tmp_path, server, tiny_preset, approve):
    registry = "approved" if approve else "rejected"
    run = start(tmp_path, server, tiny_preset, registry)
    try:
        paused = wait_paused(server, run)
        assert Registry(tmp_path / "runs", registry).champion() is None  # nothing promoted while it waits
        latest = json.loads((tmp_path / "runs" / "reports" / "latest.json").read_text())
        assert latest["gate"]["promote"] and latest["promotion"]["why"] == "waiting for approval"
        result = resume(server, paused["id"], {"approve": approve, "comment": "checked the report"})
        assert result["status"] == "ACCEPT", result
        assert run.finish(RUN_TIMEOUT) == 0, run.tail()
    finally:
        run.close()
    champion = Registry(tmp_path / "runs", registry).champion()
    latest = json.loads((tmp_path / "runs" / "reports" / "latest.json").read_text())
    final = api(server, "GET", f"/flow_runs/{paused['id']}")
    assert final["state"]["type"] == "COMPLETED"
    if approve:
        assert champion is not None and champion.promoted_by == "approval:checked the report"
        assert latest["promotion"]["promoted"] and latest["promotion"]["sequence"] == 1
    else:
        assert champion is None
        assert latest["promotion"] == {"promoted": False, "sequence": None,
                                       "why": "rejected by a person: checked the report"}
