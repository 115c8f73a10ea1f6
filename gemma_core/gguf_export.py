"""Write a (LoRA-tuned) Keras Gemma 3 as a llama.cpp GGUF, with an Ollama Modelfile and a README beside it.

The reverse of :mod:`gemma_core.gguf_convert`, through the same name table
(:func:`~gemma_core.gguf_convert.hf_to_gguf_tensor_names`):

1. the adapter is merged into a copy of the backbone (keras-hub's LoRA layers keep the base kernel and
   ``A``, ``B`` apart; Keras' own ``save_own_variables`` folds ``kernel + A @ B * alpha / rank``);
2. keras-hub's Keras-to-Hugging Face weight map gives every weight its Hugging Face name and layout,
   the shared table its llama.cpp name; RMSNorm scales get llama.cpp's ``+1``;
3. metadata as llama.cpp's ``gemma3`` loader reads it, the SentencePiece vocabulary with llama.cpp's
   token types, ``<end_of_turn>`` as end-of-turn token, and Gemma's chat template;
4. ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the 2-D weights (norms stay f32, as llama.cpp keeps them),
   written to a temp file in the target directory and renamed. ``q8_0`` includes ``token_embd``, the
   embedding tied to the output head, as llama.cpp's own ``llama-quantize`` does for q8_0 (it keeps
   only 1-D tensors out of q8_0 on Gemma 3). ``token_embedding_quant`` can keep that one tensor in
   f16 or f32, at 2 or 4 bytes per embedding value instead of about 1 (the embedding is most of a small
   Gemma's weights); measured in llama.cpp it did not bring q8_0's answers to the tuned model's
   (bench/RESULTS.md, "GGUF export in llama.cpp"), so it is not the default.

>>> paths = export_gguf_bundle(model, "runs/export/x", quant="q8_0")     # doctest: +SKIP
>>> sorted(paths)                                                          # doctest: +SKIP
['gguf', 'gguf_readme', 'modelfile']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gemma_core.atomic import atomic_path, atomic_write_text
from gemma_core.gguf_convert import (
    LOCAL_ROPE_BASE,
    RMS_NORM_OFFSET,
    SLIDING_WINDOW_PATTERN,
    hf_to_gguf_tensor_names,
    is_rms_norm,
)
from gemma_core.prompts import END_OF_TURN, START_OF_TURN

GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's name for the token embedding, which Gemma ties to the output head (no output.weight).
TOKEN_EMBEDDING = "token_embd.weight"
# Gemma 3 270M and 1B were trained for 32k tokens (4B and larger: 128k); a Keras preset does not say.
DEFAULT_CONTEXT_LENGTH = 32_768
EOS, END_OF_TURN_STOP = "<eos>", END_OF_TURN

# Gemma's turn format as a Jinja chat template, the form llama.cpp recognises as Gemma (it looks for
# <start_of_turn>) and renders with --jinja: a system message goes in front of the first user turn (Gemma
# has no system role), "assistant" is Gemma's "model", and the generation prompt opens a model turn.
# Each turn renders exactly as gemma_core.prompts.chat_prompt does (tests/test_gguf_export.py checks).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system_prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '" + START_OF_TURN + "' + role + '\\n' + (system_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '" + END_OF_TURN + "\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + START_OF_TURN + "model\\n' }}{%- endif -%}"
)

# Ollama's TEMPLATE, rendered once per (prompt, response) pair of the conversation; while the model
# answers, everything after {{ .Response }} is left out. Same turns as chat_prompt.
OLLAMA_CHAT_TEMPLATE = f"{START_OF_TURN}user\n{{{{ .Prompt }}}}{END_OF_TURN}\n{START_OF_TURN}model\n{{{{ .Response }}}}{END_OF_TURN}\n"


class GGUFExportError(ValueError):
    """The model cannot be written as a llama.cpp Gemma 3 GGUF, or the target is not writable as asked."""


def check_quant(quant: str) -> str:
    if quant not in GGUF_QUANTS:
        raise GGUFExportError(f"GGUF quant {quant!r} is not supported; use one of {', '.join(GGUF_QUANTS)}")
    return quant


def merged_backbone(backbone):
    """``backbone`` itself when no layer has LoRA, else a copy with every adapter folded into its kernel
    (and trainable token rows into the embedding, :mod:`gemma_core.token_rows`).

    The copy is filled layer by layer through Keras' own (de)serialisation, the path ``save_to_preset``
    takes, so the merge is Keras' (``kernel + A @ B * alpha / rank``) and the tuned model is untouched.
    ``_flatten_layers`` is how Keras itself walks nested layers for saving; there is no public walk.
    """
    from gemma_core.token_rows import TokenRowsEmbedding

    layers = list(backbone._flatten_layers(include_self=False))
    if not any(getattr(layer, "lora_enabled", False) or isinstance(layer, TokenRowsEmbedding) for layer in layers):
        return backbone
    merged = type(backbone).from_config(backbone.get_config())
    merged_layers = list(merged._flatten_layers(include_self=False))
    # Same classes in the same order (weightless helpers such as rotary_embedding_2 get new auto names);
    # an embedding with token rows is a subclass of the plain one it saves as.
    if len(layers) != len(merged_layers) or not all(isinstance(s, type(t)) for s, t in zip(layers, merged_layers)):
        raise GGUFExportError("the backbone rebuilt from its config has other layers than the tuned one")
    for source, target in zip(layers, merged_layers):
        store: dict[str, Any] = {}
        source.save_own_variables(store)  # a LoRA layer saves kernel + A @ B * alpha / rank
        target.load_own_variables(store)
    return merged


def check_llama_cpp_can_run(backbone) -> None:
    """Refuse what llama.cpp's gemma3 graph would compute differently: GGUF cannot carry these settings."""
    problems = []
    if getattr(backbone, "vision_encoder", None) is not None:
        problems.append("it has a vision encoder (export the text model: a Gemma 3 text preset)")
    if not backbone.use_sliding_window_attention:
        problems.append("sliding-window attention is off (llama.cpp's Gemma 3 always uses it)")
    for name in ("attention_logit_soft_cap", "final_logit_soft_cap"):
        if getattr(backbone, name, None) is not None:
            problems.append(f"{name}={getattr(backbone, name)} (Gemma 3 in llama.cpp has no soft-capping)")
    for i in range(backbone.num_layers):
        block = backbone.get_layer(f"decoder_block_{i}")
        sliding = (i + 1) % SLIDING_WINDOW_PATTERN != 0
        if block.use_sliding_window_attention != sliding:
            problems.append(f"layer {i}'s attention is not llama.cpp's 5 sliding : 1 global pattern")
            break
        if sliding and block.rope_wavelength != LOCAL_ROPE_BASE:
            problems.append(f"local RoPE base {block.rope_wavelength} (llama.cpp fixes it at {LOCAL_ROPE_BASE})")
            break
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 62-layer 27B (1/sqrt(hidden/heads)).
    keras_scale = backbone.head_dim if backbone.query_head_dim_normalize else backbone.hidden_dim // backbone.num_query_heads
    llama_scale = backbone.hidden_dim // backbone.num_query_heads if backbone.num_layers == 62 else backbone.head_dim
    if keras_scale != llama_scale:
        problems.append(f"query scaling 1/sqrt({keras_scale}), llama.cpp would use 1/sqrt({llama_scale})")
    if getattr(backbone, "global_rope_scaling_factor", 1.0) != 1.0 or getattr(backbone, "local_rope_scaling_factor", 1.0) != 1.0:
        problems.append("RoPE scaling factors other than 1 (Gemma 3 4B and larger) are not exported yet")
    if problems:
        raise GGUFExportError("cannot export this model as a llama.cpp Gemma 3 GGUF: " + "; ".join(problems))


def _global_rope_base(backbone) -> float:
    return float(backbone.get_layer(f"decoder_block_{SLIDING_WINDOW_PATTERN - 1}").rope_wavelength
                 if backbone.num_layers >= SLIDING_WINDOW_PATTERN else 1_000_000.0)


def hf_layout_weights(backbone) -> dict[str, np.ndarray]:
    """float32 weights of ``backbone`` (adapters merged) under their Hugging Face names."""
    # keras-hub's own Keras-to-Transformers map (what export_to_transformers writes); it reads the raw
    # base kernels, hence the merged copy.
    from keras_hub.src.utils.transformers.export.gemma3 import get_gemma3_weights_map

    weights = get_gemma3_weights_map(merged_backbone(backbone), include_lm_head=True)
    weights.pop("lm_head.weight", None)  # tied to the token embedding: llama.cpp reads token_embd
    return {name: np.asarray(value, dtype=np.float32) for name, value in weights.items()}


def _encode(array: np.ndarray, quant: str, is_norm: bool):
    """``(data, raw_dtype)`` for GGUFWriter.add_tensor. 1-D tensors (norms) stay f32, as llama.cpp keeps them;
    a q8_0 row whose length is not a multiple of 32 falls back to f16, as llama.cpp's converter does."""
    import gguf

    qtype = gguf.GGMLQuantizationType
    if quant == "f32" or array.ndim < 2 or is_norm:
        return array, None
    if quant == "f16":
        return array.astype(np.float16), None
    if quant == "bf16":
        return gguf.quants.quantize(array, qtype.BF16), qtype.BF16
    try:
        return gguf.quants.quantize(array, qtype.Q8_0), qtype.Q8_0
    except gguf.quants.QuantError:
        return array.astype(np.float16), None


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def gguf_vocabulary(tokenizer) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores and llama.cpp token types of a keras-hub Gemma tokenizer's SentencePiece model.

    Types follow the SentencePiece piece types, as llama.cpp's converter maps them; the turn markers are
    CONTROL (llama.cpp's typing for Gemma: the chat template, not user text, produces them). A
    user-defined run of spaces is stored with real spaces, as llama.cpp matches user-defined tokens on
    the raw text (gguf_convert undoes both).
    """
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(tokenizer.proto)
    kind = sp_pb2.ModelProto.SentencePiece
    as_gguf = {kind.NORMAL: gguf.TokenType.NORMAL, kind.UNKNOWN: gguf.TokenType.UNKNOWN,
               kind.CONTROL: gguf.TokenType.CONTROL, kind.USER_DEFINED: gguf.TokenType.USER_DEFINED,
               kind.BYTE: gguf.TokenType.BYTE, kind.UNUSED: gguf.TokenType.UNUSED}
    tokens, scores, types = [], [], []
    for piece in proto.pieces:
        token, token_type = piece.piece, as_gguf[piece.type]
        if token_type == gguf.TokenType.USER_DEFINED and token and token.strip("\u2581") == "":
            token = " " * len(token)
        if token in (START_OF_TURN, END_OF_TURN):
            token_type = gguf.TokenType.CONTROL
        tokens.append(token)
        scores.append(piece.score)
        types.append(int(token_type))
    return tokens, scores, types


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise GGUFExportError(f"{path} exists; pass --overwrite (export.overwrite=true) to replace it")


def write_gguf(model, path: str | Path, quant: str = "f32", *, name: str = "Gemma 3 (LoRA merged)",
               context_length: int = DEFAULT_CONTEXT_LENGTH, overwrite: bool = False,
               token_embedding_quant: str | None = None) -> Path:
    """Write ``model`` (a keras-hub Gemma 3 ``CausalLM``, adapters merged) as a llama.cpp GGUF at ``path``.

    ``token_embedding_quant`` (one of GGUF_QUANTS) encodes ``token_embd.weight``, the tied embedding
    and output head, differently from the other 2-D weights; ``None``: as ``quant``.

    The file appears complete or not at all (:func:`gemma_core.atomic.atomic_path`: a temp file in the
    same directory, renamed when complete, removed on any failure).
    """
    import gguf

    check_quant(quant)
    embedding_quant = quant if token_embedding_quant is None else check_quant(token_embedding_quant)
    path = Path(path)
    _refuse_existing(path, overwrite)
    backbone, tokenizer = model.backbone, model.preprocessor.tokenizer
    check_llama_cpp_can_run(backbone)
    weights = hf_layout_weights(backbone)
    gguf_names = hf_to_gguf_tensor_names(backbone.num_layers)
    if set(weights) != set(gguf_names):
        raise GGUFExportError(f"weights without a GGUF name: {sorted(set(weights) ^ set(gguf_names))[:10]}")

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "gemma3")
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[quant]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(context_length)
        writer.add_embedding_length(backbone.hidden_dim)
        writer.add_block_count(backbone.num_layers)
        writer.add_feed_forward_length(backbone.intermediate_dim)
        writer.add_head_count(backbone.num_query_heads)
        writer.add_head_count_kv(backbone.num_key_value_heads)
        writer.add_key_length(backbone.head_dim)
        writer.add_value_length(backbone.head_dim)
        writer.add_layer_norm_rms_eps(backbone.layer_norm_epsilon)
        writer.add_rope_freq_base(_global_rope_base(backbone))
        writer.add_sliding_window(backbone.sliding_window_size)

        tokens, scores, types = gguf_vocabulary(tokenizer)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(tokenizer.token_to_id("<bos>"))
        writer.add_eos_token_id(tokenizer.token_to_id(EOS))
        writer.add_unk_token_id(tokenizer.token_to_id("<unk>"))
        writer.add_pad_token_id(tokenizer.token_to_id("<pad>"))
        writer.add_eot_token_id(tokenizer.token_to_id(END_OF_TURN))
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(False)
        writer.add_chat_template(CHAT_TEMPLATE)

        for hf_name, gguf_name in gguf_names.items():
            array = weights.pop(hf_name)
            norm = is_rms_norm(hf_name)
            if norm:
                array = array + np.float32(RMS_NORM_OFFSET)
            data, raw_dtype = _encode(array, embedding_quant if gguf_name == TOKEN_EMBEDDING else quant, norm)
            writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def modelfile_text(gguf_name: str, generation, prompt_format: str = "gemma_chat") -> str:
    """An Ollama Modelfile: FROM the GGUF beside it, the turn template, stop tokens, the config's sampler.

    ``generation`` is the config's ``generation`` section. A model tuned on the instruction template is
    prompted with that template (the turns would be new to it); the stop tokens are the same.
    """
    from gemma_core.prompts import format_prompt

    if prompt_format == "gemma_chat":
        template = OLLAMA_CHAT_TEMPLATE
    else:
        template = format_prompt("{{ .Prompt }}", "", prompt_format) + "{{ .Response }}"
    # Ollama's samplers: greedy is temperature 0; top_k and top_p are only in force when chosen.
    params = [("stop", f'"{END_OF_TURN_STOP}"'), ("stop", f'"{EOS}"'), ("num_predict", generation.max_new_tokens),
              ("seed", generation.seed)]
    if generation.sampler == "greedy":
        params.append(("temperature", 0))
    else:
        params.append(("temperature", generation.temperature))
        params.append(("top_k", generation.top_k if generation.sampler == "top_k" else 0))
        params.append(("top_p", generation.top_p if generation.sampler == "top_p" else 1.0))
    lines = [f"# Ollama Modelfile written by gemma-lora export (the config's generation.sampler: {generation.sampler})",
             f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER {key} {value}" for key, value in params]
    return "\n".join(lines) + "\n"


def readme_text(gguf_name: str, quant: str, prompt_format: str) -> str:
    tag = "gemma-lora-" + quant.replace("_", "")
    return f"""# {gguf_name}

Gemma 3 with the LoRA adapter merged in, as a llama.cpp GGUF ({quant}; norms in f32), written by
`gemma-lora export --format gguf --quant {quant}`. Tuned on the `{prompt_format}` prompt format; the
GGUF's chat template and the Modelfile use Gemma's turns (`<start_of_turn>user ... <end_of_turn>`), and
`<end_of_turn>` ends an answer.

## llama.cpp

```bash
llama-cli -m {gguf_name} --jinja -cnv              # chat in the terminal, with the GGUF's chat template
llama-cli -m {gguf_name} -no-cnv -n 64 --temp 0 -p "Instruction:
Name a primary colour.

Response:
"                                                   # one raw completion (the instruction template)
llama-server -m {gguf_name} --jinja --port 8080     # OpenAI-compatible API at http://127.0.0.1:8080/v1
```

## Ollama

```bash
ollama create {tag} -f Modelfile    # run in this directory: the Modelfile's FROM is ./{gguf_name}
ollama run {tag} "Name a primary colour."
```
"""


def export_gguf_bundle(model, out_dir: str | Path, quant: str, generation, prompt_format: str = "gemma_chat", *,
                       context_length: int = DEFAULT_CONTEXT_LENGTH, overwrite: bool = False) -> dict[str, Path]:
    """``model-<quant>.gguf``, ``Modelfile`` and ``README.md`` in ``out_dir``."""
    out_dir = Path(out_dir)
    gguf_path = write_gguf(model, out_dir / f"model-{check_quant(quant)}.gguf", quant,
                           context_length=context_length, overwrite=overwrite)
    modelfile = out_dir / "Modelfile"
    atomic_write_text(modelfile, modelfile_text(gguf_path.name, generation, prompt_format))
    readme = out_dir / "README.md"
    atomic_write_text(readme, readme_text(gguf_path.name, quant, prompt_format))
    return {"gguf": gguf_path, "modelfile": modelfile, "gguf_readme": readme}
