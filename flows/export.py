"""Export the tuned model of a pipeline run: the adapter, a merged Keras preset, Hugging Face safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.stages import StageRunner, select_backend
from flows.storage import make_result_storage, result_storage_location
from gemma_core.config import validate_config
from tasks.caching import input_fingerprint
from tasks.common import CACHED
from tasks.model import load_model, release
from tasks.results import FileRef, ModelResult, StageResult, TrainOutput
from tasks.runtime import logger, peak_rss_mb, timed


class ExportResult(StageResult):
    out_dir: str
    exports: dict[str, str]


@task(name="export-model", **CACHED)
def export_model(model: ModelResult, adapter: TrainOutput, out_root: str, backend: str = "jax") -> ExportResult:
    from gemma_core.export import export_all

    fingerprint = input_fingerprint("export", {"model": model, "adapter": adapter, "backend": backend})
    out_dir = Path(out_root) / "export" / f"export-{fingerprint[:16]}"
    with timed() as t:
        loaded = load_model(model, adapter)
        paths = export_all(loaded, out_dir)
        del loaded
        release()
    files = {str(p.relative_to(out_dir)): FileRef.of(p) for p in sorted(out_dir.rglob("*")) if p.is_file()}
    logger().info("exported the tuned model to %s", out_dir)
    return ExportResult(
        stage="export-model", fingerprint=fingerprint, files=files, seconds=t.seconds, peak_rss_mb=peak_rss_mb(),
        out_dir=str(out_dir.resolve()), exports={k: str(Path(v).resolve()) for k, v in paths.items()},
    )


@flow(name="gemma-lora-export")
def export_flow(
    config: dict[str, Any], model: ModelResult, adapter: TrainOutput, result_storage: str | None = None
) -> ExportResult:
    cfg = validate_config(config)
    select_backend(cfg.backend)
    out_root = str(Path(cfg.output.root).resolve())
    stages = StageRunner(make_result_storage(result_storage_location(result_storage, out_root)))
    return stages.run(export_model, model, adapter, out_root, backend=cfg.backend)
