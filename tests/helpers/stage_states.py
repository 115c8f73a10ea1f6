"""The one reader of a pipeline run's stage states from Prefect's task runs. A stage's task run is named
exactly its stage name (tasks/stages.py), so runs are matched by name, never parsed."""

from __future__ import annotations

from typing import Any, Iterable

from tasks.stages import PIPELINE_STAGES


def stage_states(task_runs: Iterable[Any]) -> dict[str, str]:
    """{stage: state name} (in pipeline order) of the task runs that are pipeline stages. ``task_runs``
    are Prefect client ``TaskRun`` objects or task run records of the REST API (dicts); others, like
    the training flow's helper tasks, are left out."""
    found = {}
    for run in task_runs:
        if isinstance(run, dict):
            name, state = run["name"], run["state"]["name"]
        else:
            name, state = run.name, run.state.name
        if name in PIPELINE_STAGES:
            found[name] = state
    return {stage: found[stage] for stage in PIPELINE_STAGES if stage in found}
