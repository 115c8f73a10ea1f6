"""The export flow: the tuned model of a pipeline run as the adapter, a merged Keras preset and
Hugging Face safetensors, or as a merged GGUF with an Ollama Modelfile, as the config's ``export``
section says (``gemma-lora export`` runs it)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.stages import start_flow
from tasks.export import ExportResult, export_model
from tasks.results import AdapterRef, ModelResult


@flow(name="gemma-lora-export")
def export_flow(
    config: dict[str, Any], model: ModelResult, adapter: AdapterRef, result_storage: str | None = None
) -> ExportResult:
    run = start_flow(config, result_storage)
    cfg = run.cfg
    return run.stages.run(export_model, model, adapter, run.out_root, cfg.export, cfg.generation,
                          backend=cfg.backend)
