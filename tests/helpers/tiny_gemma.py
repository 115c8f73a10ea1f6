"""A tiny, randomly initialised Gemma 3 with a tiny real tokenizer, for fast tests of mechanics.

It is the real keras-hub stack (``Gemma3Backbone``, ``Gemma3Tokenizer``, ``Gemma3CausalLMPreprocessor``,
``Gemma3CausalLM``), only small: 2 layers, hidden size 32, a 640-piece SentencePiece BPE vocabulary
trained in-process on generated English. Generation, a training step, LoRA, saving and loading
take seconds, so tests all over the project exercise the code paths of the 270M model without
its minute of conversion and its 1 GB of weights. Its outputs are noise: it says nothing about quality.

The tokenizer is built like Gemma's: BPE with byte fallback, no normalisation, no dummy prefix,
pad/eos/bos/unk at ids 0/1/2/3, ``<mask>`` a control token, and the chat and image markers
(``<start_of_turn>``, ``<end_of_turn>``, ``<start_of_image>``, ``<img>``, ``<end_of_image>``) as
user-defined pieces that text can contain.

Weights come from a numpy generator seeded with ``seed``, not from Keras' global RNG, so the same
seed gives the same model on every backend and leaves the caller's random state alone.

``save_tiny_gemma3_gguf`` writes the same model as a llama.cpp-style GGUF (norms stored as ``w + 1``,
chat markers typed CONTROL), so the GGUF converter and its cache can be tested in seconds.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gemma_core.atomic import atomic_directory
from gemma_core.manifest import write_manifest
from gemma_core.preset_cache import PRESET_MANIFEST

if TYPE_CHECKING:
    import keras_hub

VOCABULARY_SIZE = 640
SEQUENCE_LENGTH = 128
USER_DEFINED = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<img>", "<end_of_image>", "\n", "\n\n")
BACKBONE_CONFIG = dict(
    num_layers=2,
    num_query_heads=2,
    num_key_value_heads=1,
    hidden_dim=32,
    intermediate_dim=64,
    head_dim=16,
    query_head_dim_normalize=True,
    use_query_key_norm=True,
    use_post_ffw_norm=True,
    use_post_attention_norm=True,
    attention_logit_soft_cap=None,
    final_logit_soft_cap=None,
    use_sliding_window_attention=True,
    sliding_window_size=64,
    layer_norm_epsilon=1e-6,
    image_size=None,
    vision_encoder=None,
)

_WORDS = (
    "the a an of to and in is it that for on with as was by at from this be are which or have "
    "one two three many some all first new most other time year people way day man woman child world "
    "life school state family student group country problem hand part place case week company system "
    "program question work government number night point home water room mother area money story fact "
    "month lot right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea kid body "
    "information back parent face others level office door health person art war history party result "
    "change morning reason research girl guy moment air teacher force education river music capital "
    "France Paris London music science answer question instruction response context summary list"
).split()
_TEMPLATES = (
    "Instruction:\n{q}\n\nResponse:\n{a}",
    "Instruction:\n{q}\n\nContext:\n{c}\n\nResponse:\n{a}",
    "<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n{a}<end_of_turn>",
    "{a} {c}",
)


def tiny_corpus(seed: int = 0, lines: int = 2000) -> list[str]:
    """Generated English-like text (words, numbers, punctuation, the prompt template) to train on."""
    rng = random.Random(seed)

    def sentence() -> str:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2025)))
        text = " ".join(words)
        return text[0].upper() + text[1:] + rng.choice(".?!,;:")

    return [rng.choice(_TEMPLATES).format(q=sentence(), a=sentence(), c=sentence()) for _ in range(lines)]


def train_tiny_tokenizer_proto(seed: int = 0, vocabulary_size: int = VOCABULARY_SIZE) -> bytes:
    """Serialized SentencePiece BPE model, laid out like Gemma's (see the module docstring)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus(seed)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocabulary_size,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        control_symbols=["<mask>"],
        user_defined_symbols=list(USER_DEFINED),
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def make_tiny_gemma3(seed: int = 0, sequence_length: int = SEQUENCE_LENGTH) -> "keras_hub.models.Gemma3CausalLM":
    """Build the tiny Gemma 3 ``CausalLM`` with its preprocessor; same ``seed``, same weights and vocabulary."""
    import keras_hub

    tokenizer = keras_hub.models.Gemma3Tokenizer(proto=train_tiny_tokenizer_proto(seed), has_vision_tokens=True)
    backbone = keras_hub.models.Gemma3Backbone(vocabulary_size=tokenizer.vocabulary_size(), **BACKBONE_CONFIG)
    _seed_weights(backbone, seed)
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(tokenizer=tokenizer, sequence_length=sequence_length)
    return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)


def save_tiny_gemma3_preset(path: str | Path, seed: int = 0) -> Path:
    """Save the tiny model as a local Keras preset directory (with a checksum manifest) and return it.

    The directory is published atomically; if ``path`` already holds a preset, that one is kept.
    """
    path = Path(path)
    with atomic_directory(path) as tmp:
        tmp.chmod(0o755)
        make_tiny_gemma3(seed).save_to_preset(str(tmp))
        write_manifest(tmp, {"description": "tiny randomly initialised Gemma 3 for tests", "seed": seed},
                       name=PRESET_MANIFEST)
    return path


def save_tiny_gemma3_gguf(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny model as a GGUF laid out as llama.cpp writes Gemma 3 (all tensors F32).

    The weights go through keras-hub's own Keras-to-Hugging Face export map, then get llama.cpp's
    tensor names and its ``w + 1`` RMSNorm storage; the vocabulary gets llama.cpp's token types, with
    ``<unk>`` and the chat markers typed CONTROL as in the real file. Published atomically.
    """
    import gguf

    from keras_hub.src.utils.transformers.export.gemma3 import get_gemma3_weights_map

    model = make_tiny_gemma3(seed)
    backbone = model.backbone
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, backbone.num_layers)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "gemma3")
    writer.add_name("tiny random Gemma 3")
    writer.add_context_length(2048)
    writer.add_embedding_length(backbone.hidden_dim)
    writer.add_block_count(backbone.num_layers)
    writer.add_feed_forward_length(backbone.intermediate_dim)
    writer.add_head_count(backbone.num_query_heads)
    writer.add_head_count_kv(backbone.num_key_value_heads)
    writer.add_key_length(backbone.head_dim)
    writer.add_value_length(backbone.head_dim)
    writer.add_layer_norm_rms_eps(backbone.layer_norm_epsilon)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(backbone.sliding_window_size)
    _add_llama_cpp_vocabulary(writer, gguf, model.preprocessor.tokenizer)
    for hf_name, value in get_gemma3_weights_map(backbone, include_lm_head=True).items():
        if hf_name == "lm_head.weight":
            continue  # tied to the token embedding, as in the real file
        array = np.asarray(value, dtype=np.float32)
        if hf_name.endswith("norm.weight"):
            array = array + np.float32(1.0)
        writer.add_tensor(name_map.get_name(hf_name.removesuffix(".weight")) + ".weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


def _add_llama_cpp_vocabulary(writer, gguf, tokenizer) -> None:
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    proto.ParseFromString(tokenizer.proto)
    kind = spm_pb2.ModelProto.SentencePiece
    as_gguf = {kind.NORMAL: gguf.TokenType.NORMAL, kind.UNKNOWN: gguf.TokenType.CONTROL,
               kind.CONTROL: gguf.TokenType.CONTROL, kind.USER_DEFINED: gguf.TokenType.USER_DEFINED,
               kind.BYTE: gguf.TokenType.BYTE, kind.UNUSED: gguf.TokenType.UNUSED}
    tokens, scores, types = [], [], []
    for piece in proto.pieces:
        tokens.append(piece.piece)
        scores.append(piece.score if piece.type == kind.NORMAL else -1000.0)
        token_type = as_gguf[piece.type]
        if piece.piece in ("<start_of_turn>", "<end_of_turn>"):
            token_type = gguf.TokenType.CONTROL  # llama.cpp's typing, which hides them from SentencePiece
        types.append(token_type)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_space_prefix(False)


def _seed_weights(backbone, seed: int) -> None:
    """Overwrite Keras' initial values with a seeded numpy draw: N(0, 0.02) for matrices and
    embeddings, N(0, 0.1) for RMSNorm scales (Gemma's norms multiply by 1 + scale)."""
    rng = np.random.default_rng(seed)
    for variable in sorted(backbone.weights, key=lambda v: v.path):
        shape = tuple(variable.shape)
        scale = 0.1 if len(shape) <= 1 else 0.02
        variable.assign(rng.normal(0.0, scale, size=shape).astype("float32"))
