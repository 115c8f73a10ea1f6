"""The fine-tuning flow, on its own so that it can run elsewhere (a GPU work pool, through
``run_deployment``) while the pipeline keeps the rest. :func:`run_training` runs the training stage
in the pipeline's own process, or, as the pipeline's ``training_deployment`` parameter says, as a
run of that deployment, and reads its ``train-lora`` task run back."""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow

from flows.stages import StageRunner, start_flow
from flows.storage import storage_for_child_runs
from gemma_core.config import validate_config
from tasks.results import DataResult, ModelResult, TrainOutput
from tasks.stages import TRAIN_LORA
from tasks.train import train_adapter


@flow(name="lora-training")
def lora_training_flow(
    config: dict[str, Any],
    data: DataResult,
    model: ModelResult,
    result_storage: str | None = None,
) -> TrainOutput:
    """Fine-tune ``model`` on ``data`` with the ``train`` and ``lora`` sections of ``config``.

    A rerun with the same inputs is Cached; after a failure it continues from the newest checkpoint.
    """
    run = start_flow(config, result_storage)
    return run.stages.run(train_adapter, run.cfg.train, run.cfg.lora, data, model, run.out_root,
                          backend=run.cfg.backend)


class TrainingRunFailed(RuntimeError):
    """The training flow run on a work pool did not complete; the message links to that run."""


def train_points(
    configs: dict[str, dict[str, Any]], data: DataResult, model: ModelResult, result_storage: str, *,
    stages: StageRunner, deployment: str | None = None,
) -> dict[str, TrainOutput]:
    """Train every point of a sweep (stage name -> config): in this process one after another, or as
    runs of ``deployment`` submitted all at once, so that the pool's concurrency limit spreads them
    over its GPUs (each thread waits for its own run)."""
    if not deployment or len(configs) == 1:
        return {stage: run_training(config, data, model, result_storage, stages=stages, deployment=deployment,
                                    stage=stage) for stage, config in configs.items()}
    with ThreadPoolExecutor(max_workers=len(configs)) as pool:
        futures = {stage: pool.submit(contextvars.copy_context().run, run_training, config, data, model,
                                      result_storage, stages=stages, deployment=deployment, stage=stage)
                   for stage, config in configs.items()}
        return {stage: future.result() for stage, future in futures.items()}


def run_training(
    config: dict[str, Any], data: DataResult, model: ModelResult, result_storage: str, *,
    stages: StageRunner, deployment: str | None = None, stage: str = TRAIN_LORA, poll_interval: float = 2,
) -> TrainOutput:
    """Fine-tune in this process (the ``train-lora`` stage of the calling flow), or, with ``deployment``
    ("lora-training/gpu"), as a run of that deployment on its work pool, waiting for it however long
    it queues for the pool's slot. Either way the stage's final state goes into ``stages``.

    A deployed run's stage result is read back through the result storage it persisted to (so pools
    on different machines need a shared ``result_storage``, such as an fsspec URL). When it does not
    complete, this raises with its link; a rerun starts a new run, whose training is Cached or
    continues from its newest checkpoint.
    """
    if not deployment:
        cfg = validate_config(config)
        return stages.run(train_adapter, cfg.train, cfg.lora, data, model, str(Path(cfg.output.root).resolve()),
                          backend=cfg.backend, stage=stage)
    from prefect.deployments import run_deployment
    from prefect.utilities.urls import url_for

    parameters = {"config": config, "data": data.model_dump(mode="json"), "model": model.model_dump(mode="json"),
                  "result_storage": storage_for_child_runs(result_storage)}
    child = run_deployment(deployment, parameters=parameters, timeout=0)
    label = f"training run {child.name!r} of deployment {deployment!r} ({url_for(child) or f'flow run {child.id}'})"
    resume_wait_s = validate_config(config).recovery.resume_wait_s
    child = wait_through_crashes(child.id, label, poll_interval, resume_wait_s)
    if child.state is None or not child.state.is_completed():
        ended = f"{child.state.name}: {child.state.message}" if child.state is not None else "without a state"
        raise TrainingRunFailed(f"{label} ended {ended}; run the pipeline again to resume from the newest checkpoint")
    output, state_name = _train_stage_of(child.id, label)
    stages.states[stage] = state_name
    return output


def wait_through_crashes(flow_run_id: UUID, label: str, poll_interval: float, resume_wait_s: float):
    """The flow run once it ends, however long it queues for its pool's slot. A `Crashed` run is not
    the end while it may be resumed: the automation 'resume-crashed' (deployments/automations.py)
    schedules the same run again within seconds, so wait up to ``resume_wait_s`` for that; a run it
    will not resume again is set `Failed` by 'stop-resuming', which ends the wait at once."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.logging import get_run_logger

    crashed_since: float | None = None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            state = run.state
            if state is not None and state.is_crashed():
                if crashed_since is None:
                    crashed_since = time.monotonic()
                    get_run_logger().warning("%s crashed (%s); waiting up to %g s for it to be resumed",
                                             label, state.message, resume_wait_s)
                if time.monotonic() - crashed_since >= resume_wait_s:
                    state.message = (f"{state.message} Not resumed within recovery.resume_wait_s={resume_wait_s:g} s: "
                                     "is the 'resume-crashed' automation installed (deployments/setup_local.py)?")
                    return run
            elif state is not None and state.is_final():
                return run
            elif crashed_since is not None:
                get_run_logger().info("%s was resumed (%s)", label, state.name if state else "no state")
                crashed_since = None
            time.sleep(poll_interval)


def _train_stage_of(flow_run_id: UUID, label: str, settle_s: float = 60, poll_interval: float = 1
                    ) -> tuple[TrainOutput, str]:
    """The ``train-lora`` task run of a finished training flow run: its result and final state name.

    The server records task-run states from events, after the fact: under load the flow run can be
    Completed before its task run's final state is written, so a missing one is awaited ``settle_s``.
    """
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    deadline = time.monotonic() + settle_s
    with get_client(sync_client=True) as client:
        while True:
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[TRAIN_LORA])),
            )
            train = next((run for run in task_runs if run.state is not None and run.state.is_completed()), None)
            if train is not None or time.monotonic() >= deadline:
                break
            time.sleep(poll_interval)
    if train is None:
        seen = ", ".join(f"{run.state.name if run.state else 'no state'}" for run in task_runs) or "none"
        raise TrainingRunFailed(f"{label} completed without a completed {TRAIN_LORA!r} task "
                                f"(its {TRAIN_LORA!r} task runs after {settle_s:g} s: {seen})")
    output = train.state.result()
    if isinstance(output, dict):
        output = TrainOutput.model_validate(output)
    return output, train.state.name
