"""The fine-tuning flow, on its own so that it can run elsewhere (a GPU work pool, through
``run_deployment``) while the pipeline keeps the rest. Called in-process it is a subflow."""

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
