"""Read a llama.cpp Gemma 3 GGUF into a Hugging Face-layout folder that keras-hub's converter loads.

keras-hub cannot read GGUF, but it can read a Hugging Face folder, so :func:`write_hf_folder`

1. dequantizes every tensor to float32 with the ``gguf`` package and undoes llama.cpp's changes
   (RMSNorm weights stored as ``w + 1``);
2. writes ``config.json`` for ``Gemma3ForCausalLM``, ``model.safetensors`` and a SentencePiece
   ``tokenizer.model`` rebuilt from the GGUF vocabulary.

No Gemma layer is written here; the weights then go through the same keras-hub code path as any
Hugging Face Gemma 3. Caching the converted preset is :mod:`gemma_core.preset_cache`'s job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# gguf, safetensors and sentencepiece are imported where they are used: every command imports
# gemma_core (through the model cache), and only a conversion needs them.

# Not stored in a Gemma 3 GGUF; llama.cpp, transformers and keras-hub all hard-code these values.
LOCAL_ROPE_BASE = 10_000.0
SLIDING_WINDOW_PATTERN = 6  # every 6th layer attends globally, the other 5 use the sliding window
# SentencePiece never matches CONTROL pieces in text; llama.cpp marks ~6,249 Gemma tokens CONTROL,
# including <start_of_turn>, which the original tokenizer matches. Only these stay CONTROL.
CONTROL_TOKENS = ("<pad>", "<eos>", "<bos>", "<mask>")
UNKNOWN_TOKEN = "<unk>"
RMS_NORM_OFFSET = 1.0  # llama.cpp stores each Gemma RMSNorm scale w as w + 1

# GGUF token_type values (llama.cpp's llama_token_type).
_GGUF_NORMAL, _GGUF_UNKNOWN, _GGUF_CONTROL, _GGUF_USER_DEFINED, _GGUF_UNUSED, _GGUF_BYTE = 1, 2, 3, 4, 5, 6


class ConversionError(RuntimeError):
    """The GGUF does not hold what the converter expects (architecture, tensors, tokenizer)."""



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


def hf_to_gguf_tensor_names(num_layers: int) -> dict[str, str]:
    """Every Gemma 3 text weight: Hugging Face name (``model.layers.0.self_attn.q_proj.weight``) to its
    llama.cpp GGUF name (``blk.0.attn_q.weight``), from gguf's own tensor map.

    The one table both directions use: this converter (GGUF to Keras) and :mod:`gemma_core.gguf_export`.
    The output head is tied to ``token_embd`` and has no tensor of its own.

    >>> hf_to_gguf_tensor_names(1)["model.layers.0.pre_feedforward_layernorm.weight"]
    'blk.0.ffn_norm.weight'
    """
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, num_layers)
    return {f"{hf}.weight": f"{name_map.get_name(hf)}.weight" for hf in _hf_weight_names(num_layers)}


def is_rms_norm(hf_name: str) -> bool:
    """RMSNorm scales, which llama.cpp stores as ``w + RMS_NORM_OFFSET`` (Gemma multiplies by ``1 + w``)."""
    return hf_name.removesuffix(".weight").endswith("norm")


def dequantized_weights(reader: Any, num_layers: int) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, float32 array)`` for every GGUF tensor, in Hugging Face layout.

    GGUF stores each matrix with numpy shape ``[out, in]``, as Hugging Face does, and llama.cpp did not
    permute Gemma's Q/K rows, so only the RMSNorm weights change: llama.cpp stored ``w + 1``.
    Every GGUF tensor must be used exactly once; a leftover or a missing one is an error.
    """
    import gguf

    by_name = {t.name: t for t in reader.tensors}
    for hf_name, gguf_name in hf_to_gguf_tensor_names(num_layers).items():
        tensor = by_name.pop(gguf_name, None)
        if tensor is None:
            raise ConversionError(f"GGUF has no tensor {gguf_name!r} (for {hf_name})")
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        array = np.array(array, dtype=np.float32)  # own the memory: F32 tensors come back as views of the mmap
        if is_rms_norm(hf_name):
            array -= RMS_NORM_OFFSET
        yield hf_name, array
    if by_name:
        raise ConversionError(f"GGUF tensors the converter does not know: {sorted(by_name)[:10]}")


def sentencepiece_proto_from_gguf(reader: Any) -> bytes:
    """Rebuild Gemma's SentencePiece BPE model from ``tokenizer.ggml.{tokens,scores,token_type}``.

    Two llama.cpp quirks are undone: runs of spaces are stored with real spaces (SentencePiece spells
    them with ``▁``), and ~6,249 tokens are marked CONTROL, which SentencePiece never matches in text,
    so all but pad/eos/bos/mask become user-defined (as ``<start_of_turn>`` is in Gemma's own tokenizer).
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

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
    import gguf
    import safetensors.numpy

    reader = gguf.GGUFReader(str(gguf_path))
    config = hf_config_from_gguf(reader)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.model").write_bytes(sentencepiece_proto_from_gguf(reader))
    weights = dict(dequantized_weights(reader, config["num_hidden_layers"]))
    safetensors.numpy.save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return config
