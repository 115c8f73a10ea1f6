"""Export stage: the tuned model as the adapter alone, a merged Keras preset and Hugging Face
safetensors, or as a merged GGUF with an Ollama Modelfile (:mod:`gemma_core.export`), in a directory
named by the model and adapter content and the export settings."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from gemma_core.checkpoints import adapter_identity, write_adapter_manifest
from gemma_core.config import ExportConfig, GenerationConfig
from tasks.caching import input_fingerprint
from tasks.common import CACHED
from tasks.model import load_stage_model, release
from tasks.results import AdapterRef, FileRef, ModelResult, StageResult
from tasks.runtime import logger, peak_rss_mb, timed
from tasks.stages import EXPORT_MODEL


class ExportResult(StageResult):
    """Where each export went (``adapter``, ``keras_preset``, ``transformers``; or ``gguf``, ``modelfile``,
    ``gguf_readme``)."""

    out_dir: str
    exports: dict[str, str]


@task(name=EXPORT_MODEL, **CACHED)
def export_model(model: ModelResult, adapter: AdapterRef, out_root: str, export: ExportConfig,
                 generation: GenerationConfig, backend: str = "jax") -> ExportResult:
    from gemma_core.export import export_model_as

    # The Modelfile prompts in the format the adapter was trained in (None: from before formats existed,
    # when the instruction template was the only one).
    prompt_format = adapter.prompt_format or "instruction"
    # overwrite changes no byte written, so it is no part of the directory's name; the generation
    # section and the prompt format only reach the Modelfile of a GGUF export.
    settings = export.model_dump(mode="json", exclude={"overwrite"})
    if export.format == "gguf":
        settings |= {"generation": generation.model_dump(mode="json"), "prompt_format": prompt_format}
    fingerprint = input_fingerprint("export", {"model": model, "adapter": adapter, "backend": backend,
                                               "export": settings})
    out_dir = Path(out_root) / "export" / f"export-{fingerprint[:16]}"
    with timed() as t:
        loaded = load_stage_model(model, adapter)
        paths = export_model_as(loaded, out_dir, export, generation, prompt_format)
        del loaded
        release()
        if "adapter" in paths:  # what it was trained on travels with it (generate --model EXPORT_DIR reads it)
            identity = adapter_identity(adapter.path) or {"prompt_format": prompt_format}
            write_adapter_manifest(paths["adapter"], identity, exported_from=adapter.file.sha256)
    files = {str(p.relative_to(out_dir)): FileRef.of(p) for p in sorted(out_dir.rglob("*")) if p.is_file()}
    logger().info("exported the tuned model to %s", out_dir)
    return ExportResult(
        stage=EXPORT_MODEL, fingerprint=fingerprint, files=files, seconds=t.seconds, peak_rss_mb=peak_rss_mb(),
        out_dir=str(out_dir.resolve()), exports={k: str(Path(v).resolve()) for k, v in paths.items()},
    )
