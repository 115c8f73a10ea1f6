"""The fine-tuning flow, on its own so that it can run elsewhere (a GPU work pool, through
``run_deployment``) while the pipeline keeps the rest. Called in-process it is a subflow;
:func:`run_training` does either, as the pipeline's ``training_deployment`` parameter says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from pydantic import BaseModel

from flows.stages import StageRunner, select_backend
from flows.storage import make_result_storage, result_storage_location
from gemma_core.config import validate_config
from tasks.results import DataResult, ModelResult, TrainOutput
from tasks.train import NOT_IN_KEY, train_adapter, train_identity


class TrainingRun(BaseModel):
    output: TrainOutput
    states: dict[str, str]


@flow(name="lora-training")
def lora_training_flow(
    config: dict[str, Any],
    data: DataResult,
    model: ModelResult,
    result_storage: str | None = None,
) -> TrainingRun:
    """Fine-tune ``model`` on ``data`` with the ``train`` and ``lora`` sections of ``config``.

    A rerun with the same inputs is Cached; after a failure it continues from the newest checkpoint.
    """
    cfg = validate_config(config)
    select_backend(cfg.backend)
    out_root = str(Path(cfg.output.root).resolve())
    storage = make_result_storage(result_storage_location(result_storage, out_root))
    stages = StageRunner(storage)
    output = stages.run(
        train_adapter, train_identity(cfg.train), cfg.lora, data, model, out_root,
        checkpointing=cfg.train.model_dump(include=NOT_IN_KEY), backend=cfg.backend,
    )
    return TrainingRun(output=output, states=stages.states)


class TrainingRunFailed(RuntimeError):
    """The training flow run on a work pool did not complete; the message links to that run."""


def run_training(
    config: dict[str, Any], data: DataResult, model: ModelResult, result_storage: str,
    deployment: str | None = None, poll_interval: float = 2,
) -> TrainingRun:
    """Fine-tune in this process (a subflow), or, with ``deployment`` ("lora-training/gpu"), as a run
    of that deployment on its work pool, waiting for it however long it queues for the pool's slot.

    The child run's stage result is read back through the result storage it persisted to (so pools
    on different machines need a shared ``result_storage``, such as an fsspec URL). When the child
    does not complete, this raises with the child's link; a rerun starts a new child run, whose
    training is Cached or continues from its newest checkpoint.
    """
    if not deployment:
        return lora_training_flow(config=config, data=data, model=model, result_storage=result_storage)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.utilities.urls import url_for

    child = run_deployment(
        deployment,
        parameters={"config": config, "data": data.model_dump(mode="json"), "model": model.model_dump(mode="json"),
                    "result_storage": result_storage},
        timeout=None, poll_interval=poll_interval,
    )
    link = url_for(child) or f"flow run {child.id}"
    state = child.state
    if state is None or not state.is_completed():
        ended = f"{state.name}: {state.message}" if state is not None else "without a state"
        raise TrainingRunFailed(f"training run {child.name!r} of deployment {deployment!r} ended {ended} ({link}); "
                                "run the pipeline again to resume from the newest checkpoint")
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[child.id])))
    stages = {run.name.rsplit("-", 1)[0]: run for run in task_runs}
    train = stages.get(train_adapter.name)
    if train is None or train.state is None or not train.state.is_completed():
        raise TrainingRunFailed(f"training run {child.name!r} completed without a completed "
                                f"{train_adapter.name!r} task ({link})")
    output = train.state.result()
    if isinstance(output, dict):
        output = TrainOutput.model_validate(output)
    return TrainingRun(output=output, states={train_adapter.name: train.state.name})
