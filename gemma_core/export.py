"""Export a tuned model: the adapter alone, a merged Keras preset, Hugging Face safetensors (format
``keras``), or a merged llama.cpp GGUF with an Ollama Modelfile (format ``gguf``, :mod:`gemma_core.gguf_export`).

keras-hub's Transformers exporter reads each layer's raw base kernel and would silently drop the
adapter, so the safetensors export goes through the merged preset: Keras folds ``A @ B * alpha/r``
into the kernel when it saves a LoRA-enabled layer, and the preset reloads as a plain model.

>>> paths = export_all(model, "runs/export")        # doctest: +SKIP
>>> sorted(paths)                                    # doctest: +SKIP
['adapter', 'keras_preset', 'transformers']
>>> sorted(export_model_as(model, "runs/export", ExportConfig(format="gguf"), GenerationConfig(), "instruction"))  # doctest: +SKIP
['gguf', 'gguf_readme', 'modelfile']
"""

from __future__ import annotations

import os
from pathlib import Path

import keras_hub

from gemma_core.atomic import atomic_directory
from gemma_core.config import ExportConfig, GenerationConfig
from gemma_core.token_rows import save_adapter


def export_adapter(model, path: str | Path) -> Path:
    """The LoRA weights alone (``.lora.h5``, with any trainable token rows), loadable with
    :func:`gemma_core.token_rows.load_adapter`."""
    path = Path(path)
    if not path.name.endswith(".lora.h5"):
        raise ValueError(f"adapter path {path} must end in .lora.h5 (keras-hub's adapter format)")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(".partial-" + path.name)
    save_adapter(model.backbone, partial)
    os.replace(partial, path)
    return path


def export_merged_preset(model, path: str | Path) -> Path:
    """A self-contained Keras preset with the adapter folded into the base weights."""
    with atomic_directory(path, replace=True) as tmp:
        model.save_to_preset(str(tmp))
    return Path(path)


def export_transformers(merged_preset: str | Path, path: str | Path) -> Path:
    """Hugging Face config, safetensors and tokenizer, from a merged preset."""
    merged = keras_hub.models.CausalLM.from_preset(str(merged_preset))
    with atomic_directory(path, replace=True) as tmp:
        merged.export_to_transformers(str(tmp))
    return Path(path)


def export_all(model, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    preset = export_merged_preset(model, out_dir / "keras_preset")
    return {
        "adapter": export_adapter(model, out_dir / "adapter.lora.h5"),
        "keras_preset": preset,
        "transformers": export_transformers(preset, out_dir / "transformers"),
    }


def export_model_as(model, out_dir: str | Path, export: ExportConfig, generation: GenerationConfig,
                    prompt_format: str) -> dict[str, Path]:
    """What the config's ``export`` section asks for, in ``out_dir``: name -> path."""
    if export.format == "gguf":
        from gemma_core.gguf_export import export_gguf_bundle

        return export_gguf_bundle(model, out_dir, export.quant, generation, prompt_format,
                                  context_length=export.context_length, overwrite=export.overwrite)
    return export_all(model, out_dir)
