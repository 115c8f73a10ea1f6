"""Trainable embedding rows for a few tokens, beside LoRA (what PEFT calls trainable tokens).

A base Gemma has never been trained to say ``<end_of_turn>``: it gives that token almost no
probability, and LoRA on attention does not move one output word's score far in a short run
(bench/RESULTS.md, prompt format ``gemma_chat``: 0 of 16 answers ended with it). Tuning that
token's row itself does, since the tied head scores a token by its row. :func:`enable_token_rows` gives the backbone's token embedding one trainable delta
per chosen token, zero at first, used on both sides of the tied embedding:

- input: the embedding of token ``t`` is ``E[t] + delta[t]``;
- output: the logit of ``t`` is ``h . (E[t] + delta[t])``.

So the tuned model is exactly the base model with those rows replaced, which is how it is
merged (:meth:`TokenRowsEmbedding.save_own_variables`) for presets, safetensors and GGUF. Only the
k deltas train, and training and decoding never rebuild the 262,144-row matrix: each side adds a
k-column correction.

The deltas travel in the adapter file, in a ``token_rows`` group beside keras-hub's ``lora`` one
(:func:`save_adapter`, :func:`load_adapter`; read without a model by
:func:`gemma_core.adapter_file.read_token_rows`), so an adapter stays one file.

>>> enable_token_rows(model.backbone, token_ids=(105, 106))        # doctest: +SKIP
>>> save_adapter(model.backbone, "adapter.lora.h5")                # doctest: +SKIP
>>> load_adapter(fresh.backbone, "adapter.lora.h5")                # LoRA and rows  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import keras
import numpy as np
from keras import ops

from gemma_core.adapter_file import TOKEN_ROWS_GROUP, read_token_rows
from gemma_core.prompts import END_OF_TURN, START_OF_TURN

# Gemma 3's turn markers: what gemma_chat trains a base model to produce.
TURN_TOKENS = (START_OF_TURN, END_OF_TURN)


class TokenRowsError(ValueError):
    """Trainable rows cannot be set up as asked; the message names the value and the fix."""


class TokenRowsEmbedding:
    """A tied ``ReversibleEmbedding`` whose rows ``row_ids`` have a trainable delta added.

    A mixin, not constructed directly: :func:`enable_token_rows` swaps a built embedding's class for
    a subclass of its own class with this mixed in (a built layer grows in place, as with Keras'
    own ``enable_lora``), so the backbone's graph calls it where it called the plain embedding.
    """

    def call(self, inputs, reverse=False):
        deltas = ops.cast(self.row_deltas, self.compute_dtype)
        if not reverse:
            hits = ops.equal(ops.expand_dims(ops.cast(inputs, "int32"), -1), ops.array(self.row_ids, "int32"))
            return super().call(inputs) + ops.matmul(ops.cast(hits, self.compute_dtype), deltas)
        logits = super().call(inputs, reverse=True)
        # Scores of the chosen rows' deltas, spread into their columns with a (k, vocabulary) one-hot.
        extra = ops.matmul(ops.cast(inputs, logits.dtype), ops.transpose(ops.cast(deltas, logits.dtype)))
        return logits + ops.matmul(extra, ops.one_hot(ops.array(self.row_ids, "int32"), self.input_dim,
                                                      dtype=logits.dtype))

    def merged_embeddings(self) -> np.ndarray:
        merged = np.array(ops.convert_to_numpy(self._embeddings), copy=True)
        merged[list(self.row_ids)] += ops.convert_to_numpy(self.row_deltas).astype(merged.dtype)
        return merged

    def save_own_variables(self, store):
        """The embedding as one matrix with the deltas folded in: what a plain tied, unquantized
        embedding saves (its one variable under "0"), so a plain one loads it."""
        store["0"] = self.merged_embeddings()


def enable_token_rows(backbone, token_ids: Sequence[int]) -> TokenRowsEmbedding:
    """Make ``token_ids``' rows of ``backbone.token_embedding`` trainable (deltas start at zero).

    Call after ``enable_lora`` (which freezes every layer). Calling again with the same ids is a no-op.
    """
    layer = backbone.token_embedding
    ids = tuple(int(t) for t in token_ids)
    if isinstance(layer, TokenRowsEmbedding):
        if layer.row_ids != ids:
            raise TokenRowsError(f"token rows {list(layer.row_ids)} are already trainable; this asks for {list(ids)}: "
                                 "load the model fresh for another set")
        return layer
    if not ids or len(set(ids)) != len(ids) or not all(0 <= t < layer.input_dim for t in ids):
        raise TokenRowsError(f"trainable token ids {list(ids)} must be distinct ids of the vocabulary "
                             f"(0 to {layer.input_dim - 1})")
    if not isinstance(layer, keras.layers.ReversibleEmbedding) or type(layer).call is not keras.layers.ReversibleEmbedding.call:
        raise TokenRowsError(f"trainable token rows need a plain tied embedding; this model has {type(layer).__name__}")
    if not layer.tie_weights or layer.logit_soft_cap is not None or layer.quantization_mode is not None:
        raise TokenRowsError("trainable token rows need a tied, unquantized embedding without a logit soft cap "
                             "(Gemma 3's); set lora.trainable_tokens=[] for this model")
    # The subclass keeps its base's name: Keras' weight files name a layer's entry after its class, and
    # a merged save must load into a plain model.
    layer.__class__ = type(type(layer).__name__, (TokenRowsEmbedding, type(layer)), {})
    layer.trainable = True
    layer._embeddings.trainable = False
    layer._tracker.unlock()  # a built layer's state is locked; Keras' enable_lora unlocks it the same way
    layer.row_ids = ids
    layer.row_deltas = layer.add_weight(name="row_deltas", shape=(len(ids), layer.output_dim),
                                        initializer="zeros", trainable=True)
    layer._tracker.lock()
    return layer


def token_ids_for(tokenizer, tokens: Sequence[str]) -> tuple[int, ...]:
    """The vocabulary ids of ``tokens``, each of which must be one token of ``tokenizer``."""
    ids = []
    for token in tokens:
        found = tokenizer.token_to_id(token)
        if found is None or tokenizer.id_to_token(found) != token:
            raise TokenRowsError(f"lora.trainable_tokens: {token!r} is not a single token of this model's "
                                 "vocabulary; list tokens of its vocabulary, or [] for none")
        ids.append(int(found))
    return tuple(ids)


def trainable_token_names(configured: Sequence[str] | None, prompt_format: str | None) -> tuple[str, ...]:
    """What ``lora.trainable_tokens`` means: the configured tokens, or (None) Gemma's turn markers when the
    run trains in ``gemma_chat`` and none otherwise.

    >>> trainable_token_names(None, "gemma_chat"), trainable_token_names(None, "instruction")
    (('<start_of_turn>', '<end_of_turn>'), ())
    """
    if configured is not None:
        return tuple(configured)
    return TURN_TOKENS if prompt_format == "gemma_chat" else ()


def save_adapter(backbone, path: str | Path) -> None:
    """keras-hub's ``save_lora_weights`` into ``path``, plus the token rows when there are some."""
    import h5py

    backbone.save_lora_weights(str(path))
    layer = backbone.token_embedding
    if isinstance(layer, TokenRowsEmbedding):
        with h5py.File(path, "a") as f:
            group = f.create_group(TOKEN_ROWS_GROUP)
            group["ids"] = np.asarray(layer.row_ids, "int32")
            group["deltas"] = ops.convert_to_numpy(layer.row_deltas)


def load_adapter(backbone, path: str | Path) -> None:
    """keras-hub's ``load_lora_weights``, plus the token rows the file holds (enabled here if needed)."""
    backbone.load_lora_weights(str(path))
    rows = read_token_rows(path)
    if rows is not None:
        ids, deltas = rows
        enable_token_rows(backbone, ids).row_deltas.assign(deltas)
