"""The automations that keep unattended retraining going on a self-hosted Prefect server.

Prefect Cloud marks a silent run `Crashed` by itself; a self-hosted server does only what its
automations say, so `deployments/setup_local.py` installs these three (and
`deployments/automations.yaml`, rendered from the same definitions with the default settings, is the
file for `prefect automation create --from-file` on other installations):

1. **crashed-when-silent**: every flow run of the project sends a heartbeat event every
   ``recovery.heartbeat_s`` seconds (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``). A run that sends none for
   ``recovery.crashed_after_s`` (its process was SIGKILLed together with its worker, the node was lost)
   is marked `Crashed`: its work pool's concurrency slot is free again.
2. **resume-crashed**: a `Crashed` run of the deployments (tag ``gemma-lora``) is scheduled again,
   the same flow run with the same parameters (`AwaitingRetry`, as the UI's Retry button does), while
   its run count is at most ``recovery.max_resumes``. Training continues from its newest checkpoint and
   finished stages are `Cached`; a pipeline waiting for its training run sees the same run complete.
3. **stop-resuming**: a run that crashed once more than that is set `Failed` (named
   `NotResumed`), with a message on its page saying why and what to do.

The run count is Prefect's own ``run_count`` (how often the run entered `Running`), which the server
puts on every state event as the ``prefect.run-count`` label, so the limit holds across workers and
server restarts with nothing kept elsewhere.

Both act only once a crash has settled: when nothing else has happened to the run for
``recovery.settle_s`` seconds after its `Crashed` (a Proactive trigger). Prefect's process worker
(3.9) reports one death twice, a few seconds apart: its run executor proposes `Crashed`, then the
worker proposes it again on the same exit code. While the run is still `Crashed` the server refuses
the second report (a terminal run cannot crash again); had the run been rescheduled at once, the
second report would crash its next attempt, before or while it runs, and the bound on attempts
would not hold. A person pressing Retry within the window counts as something happening: the
automation then leaves the run alone.

>>> from gemma_core.config import RecoveryConfig
>>> [a["name"] for a in project_automations(RecoveryConfig())]
['gemma-lora: crashed-when-silent', 'gemma-lora: resume-crashed', 'gemma-lora: stop-resuming']
>>> run_counts_up_to(2), run_counts_above(2)[:3]
(['1', '2'], ['3', '4', '5'])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gemma_core.config import RecoveryConfig

AUTOMATIONS_FILE = Path(__file__).resolve().parent / "automations.yaml"
DEPLOYMENT_TAG = "gemma-lora"  # the tag of both deployments (prefect.yaml), so of every run they start
PROJECT_FLOWS = ("gemma-lora-pipeline", "lora-training", "gemma-lora-watch-data", "gemma-lora-export")
NAME_PREFIX = "gemma-lora: "
TERMINAL_EVENTS = [f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")]
# A paused or suspended run is waiting for a person, not dead.
WAITING_EVENTS = ["prefect.flow-run.Paused", "prefect.flow-run.Suspended"]
_RUN_COUNT_MAX = 99  # run counts are listed one by one up to here, then matched by a glob


def run_counts_up_to(n: int) -> list[str]:
    """``prefect.run-count`` values 1..n (label values are strings, matched one by one)."""
    return [str(k) for k in range(1, n + 1)]


def run_counts_above(n: int) -> list[str]:
    """``prefect.run-count`` values greater than n: listed up to 99, then any number of 3+ digits."""
    return [str(k) for k in range(n + 1, _RUN_COUNT_MAX + 1)] + ["[1-9][0-9][0-9]*"]


def _ours(*, deployed: bool) -> list[dict[str, Any]]:
    """Related-resource filters: a flow of this project, and (``deployed``) a run of its deployments."""
    related = [{"prefect.resource.role": "flow", "prefect.resource.name": list(PROJECT_FLOWS)}]
    if deployed:
        related.append({"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{DEPLOYMENT_TAG}"})
    return related


def _settled_crash_of_a_deployed_run(run_counts: list[str], settle_s: int) -> dict[str, Any]:
    """A trigger on a run of the deployments whose run count is one of ``run_counts``: it fires when the run
    has been `Crashed` for ``settle_s`` seconds with no other event of it (no state change, no heartbeat)."""
    return {
        "type": "event", "posture": "Proactive",
        "match": {"prefect.resource.id": "prefect.flow-run.*", "prefect.run-count": run_counts},
        "match_related": _ours(deployed=True),
        "after": ["prefect.flow-run.Crashed"],
        "expect": ["prefect.flow-run.*"],
        "for_each": ["prefect.resource.id"], "threshold": 1, "within": settle_s,
    }


def crashed_when_silent(recovery: RecoveryConfig) -> dict[str, Any]:
    window = recovery.crashed_after_s
    return {
        "name": f"{NAME_PREFIX}crashed-when-silent",
        "description": f"A gemma-lora flow run with no heartbeat for {window} s is marked Crashed, which frees its "
                       "work pool's concurrency slot (its process died with its worker, or its node was lost).",
        "enabled": True,
        "trigger": {
            "type": "event", "posture": "Proactive",
            "match": {"prefect.resource.id": "prefect.flow-run.*"}, "match_related": _ours(deployed=False),
            "after": ["prefect.flow-run.heartbeat"],
            "expect": ["prefect.flow-run.heartbeat", *TERMINAL_EVENTS, *WAITING_EVENTS],
            "for_each": ["prefect.resource.id"], "threshold": 1, "within": window,
        },
        "actions": [{
            "type": "change-flow-run-state", "state": "CRASHED",
            "message": f"No heartbeat for {window} s: the process running this flow run is gone (a killed worker, "
                       "the OOM killer, a lost node). Marked Crashed by the gemma-lora automation "
                       "'crashed-when-silent'.",
        }],
    }


def resume_crashed(recovery: RecoveryConfig) -> dict[str, Any]:
    n = recovery.max_resumes
    return {
        "name": f"{NAME_PREFIX}resume-crashed",
        "description": f"A crashed run of the gemma-lora deployments is scheduled again (same run, same parameters), "
                       f"at most {n} times: training resumes from its newest checkpoint, finished stages are Cached.",
        "enabled": n > 0,
        "trigger": _settled_crash_of_a_deployed_run(run_counts_up_to(max(n, 1)), recovery.settle_s),
        "actions": [{
            "type": "change-flow-run-state", "state": "SCHEDULED", "name": "AwaitingRetry",
            "message": f"Crashed; resumed by the gemma-lora automation 'resume-crashed' (at most {n} times per run): "
                       "training continues from its newest checkpoint, finished stages are Cached.",
        }],
    }


def stop_resuming(recovery: RecoveryConfig) -> dict[str, Any]:
    n = recovery.max_resumes
    return {
        "name": f"{NAME_PREFIX}stop-resuming",
        "description": f"A run of the gemma-lora deployments that crashed {n + 1} times is set Failed, saying why.",
        "enabled": True,
        "trigger": _settled_crash_of_a_deployed_run(run_counts_above(n), recovery.settle_s),
        "actions": [{
            "type": "change-flow-run-state", "state": "FAILED", "name": "NotResumed",
            "message": f"Crashed {n + 1} times; the gemma-lora automation resumes a run at most {n} times "
                       "(recovery.max_resumes), so it is not started again. Look at the logs of its last attempts "
                       "(the worker's log says how its process ended: exit code -9 is SIGKILL, often the OOM killer), "
                       "fix the cause, then press Retry: it resumes from its newest checkpoint.",
        }],
    }


def project_automations(recovery: RecoveryConfig) -> list[dict[str, Any]]:
    return [crashed_when_silent(recovery), resume_crashed(recovery), stop_resuming(recovery)]


def render_file(recovery: RecoveryConfig | None = None) -> str:
    """automations.yaml's text: the automations with ``recovery``'s settings (default: the config's)."""
    recovery = recovery or RecoveryConfig()
    header = (
        "# Generated by deployments/automations.py from the default recovery.* settings (gemma_core/config.py);\n"
        "# regenerate with: .venv/bin/python deployments/automations.py --write\n"
        "# Install on a self-hosted server (setup_local.py does this for you, with your settings):\n"
        "#   PREFECT_API_URL=http://host:4200/api .venv/bin/prefect automation create --from-file "
        "deployments/automations.yaml\n"
        "# Flow runs must send heartbeats at least every recovery.heartbeat_s seconds:\n"
        f"#   PREFECT_FLOWS_HEARTBEAT_FREQUENCY={recovery.heartbeat_s} in the workers' environment.\n"
    )
    return header + yaml.safe_dump({"automations": project_automations(recovery)}, sort_keys=False, width=110)


def install(api_url: str, recovery: RecoveryConfig) -> list[str]:
    """Create the automations on the server at ``api_url``, replacing earlier versions of them (by name);
    returns their ids."""
    import httpx

    wanted = project_automations(recovery)
    names = {a["name"] for a in wanted}
    with httpx.Client(base_url=api_url, timeout=30) as client:
        existing = client.post("/automations/filter", json={}).raise_for_status().json()
        for automation in existing:
            if automation["name"] in names:
                client.delete(f"/automations/{automation['id']}").raise_for_status()
        return [client.post("/automations/", json=a).raise_for_status().json()["id"] for a in wanted]


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write"]:
        AUTOMATIONS_FILE.write_text(render_file())
        print(f"wrote {AUTOMATIONS_FILE}")
    else:
        sys.stdout.write(render_file())
