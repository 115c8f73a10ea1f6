"""Export stage: the tuned model as the adapter alone, a merged Keras preset and Hugging Face
safetensors (:mod:`gemma_core.export`), in a directory named by the model and adapter content."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.caching import input_fingerprint
from tasks.common import CACHED
from tasks.model import load_stage_model, release
from tasks.results import AdapterRef, FileRef, ModelResult, StageResult
from tasks.runtime import logger, peak_rss_mb, timed
from tasks.stages import EXPORT_MODEL


class ExportResult(StageResult):
    """Where each export went (``adapter``, ``keras_preset``, ``transformers``)."""

    out_dir: str
    exports: dict[str, str]


@task(name=EXPORT_MODEL, **CACHED)
def export_model(model: ModelResult, adapter: AdapterRef, out_root: str, backend: str = "jax") -> ExportResult:
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
