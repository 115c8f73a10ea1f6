"""Export the tuned model of a pipeline run: the adapter, a merged Keras preset, Hugging Face safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.stages import start_flow
from tasks.caching import input_fingerprint
from tasks.common import CACHED
from tasks.model import load_stage_model, release
from tasks.results import FileRef, ModelResult, StageResult, TrainOutput
from tasks.runtime import logger, peak_rss_mb, timed
from tasks.stages import EXPORT_MODEL


class ExportResult(StageResult):
    out_dir: str
    exports: dict[str, str]


@task(name=EXPORT_MODEL, **CACHED)
def export_model(model: ModelResult, adapter: TrainOutput, out_root: str, backend: str = "jax") -> ExportResult:
    from gemma_core.export import export_all

    fingerprint = input_fingerprint("export", {"model": model, "adapter": adapter, "backend": backend})
    out_dir = Path(out_root) / "export" / f"export-{fingerprint[:16]}"
    with timed() as t:
        loaded = load_stage_model(model, adapter)
        paths = export_all(loaded, out_dir)
        del loaded
        release()
    files = {str(p.relative_to(out_dir)): FileRef.of(p) for p in sorted(out_dir.rglob("*")) if p.is_file()}
    logger().info("exported the tuned model to %s", out_dir)
    return ExportResult(
        stage=EXPORT_MODEL, fingerprint=fingerprint, files=files, seconds=t.seconds, peak_rss_mb=peak_rss_mb(),
        out_dir=str(out_dir.resolve()), exports={k: str(Path(v).resolve()) for k, v in paths.items()},
    )


@flow(name="gemma-lora-export")
def export_flow(
    config: dict[str, Any], model: ModelResult, adapter: TrainOutput, result_storage: str | None = None
) -> ExportResult:
    run = start_flow(config, result_storage)
    return run.stages.run(export_model, model, adapter, run.out_root, backend=run.cfg.backend)
