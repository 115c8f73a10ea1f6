"""Run the output head only where the loss looks: the response tokens.

Gemma's tied output head (hidden 640 → 262,144 words for the 270M model) is about 60% of the
FLOPs of a training step, yet the loss is read at response positions only, a third or less of
the tokens. :class:`ResponseOnlyLM` shares the task's backbone (so its LoRA weights, and
``save_lora_weights``, are the same objects), runs it on the whole sequence, gathers the hidden
states at a fixed number of chosen positions per batch (``slots`` per row, filled across the
batch), and computes logits only there.

The loss is the same number as the full model's, on the same batch: the gathered logits are the
full model's logits at those positions, and the padding slots carry zero weight.
:func:`sparse_cross_entropy` computes it without the one-hot (batch, slots, vocabulary) tensor
that Keras's ``SparseCategoricalCrossentropy`` builds.

>>> lm = ResponseOnlyLM(causal_lm.backbone)                                   # doctest: +SKIP
>>> logits = lm({"token_ids": ids, "padding_mask": mask, "positions": pos})  # (batch, slots, vocab)
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


class ResponseOnlyLM(keras.Model):
    def __init__(self, backbone, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    def call(self, inputs):
        hidden = self.backbone({"token_ids": inputs["token_ids"], "padding_mask": inputs["padding_mask"]})
        batch, length = ops.shape(hidden)[0], ops.shape(hidden)[1]
        # Positions index the flattened (batch * length) sequence: a batch's response tokens fill its
        # slots wherever they are, so one long answer does not widen every row.
        flat = ops.reshape(hidden, (batch * length, ops.shape(hidden)[2]))
        picked = ops.take(flat, inputs["positions"], axis=0)
        return self.backbone.token_embedding(picked, reverse=True)


class ResponseNLL(keras.Model):
    """Per-position cross-entropy at the response positions: the held-out loss of evaluation.

    The same numbers as the full model's logits would give there, without the (batch, length,
    262,144) logits: :class:`ResponseOnlyLM`'s logits go straight into :func:`sparse_cross_entropy`
    inside the compiled program, which returns (batch, slots).

    >>> nll = ResponseNLL(causal_lm.backbone).predict_on_batch(                            # doctest: +SKIP
    ...     {"token_ids": ids, "padding_mask": mask, "positions": pos, "labels": labels})
    """

    def __init__(self, backbone, **kwargs):
        super().__init__(**kwargs)
        self.lm = ResponseOnlyLM(backbone)
        self.jit_compile = True  # Keras leaves XLA off for TensorFlow on a CPU-only machine

    def call(self, inputs):
        return sparse_cross_entropy(inputs["labels"], self.lm(inputs))


def sparse_cross_entropy(labels, logits):
    """Per-position cross-entropy from logits: logsumexp minus the label's logit.

    The same number as ``keras.losses.sparse_categorical_crossentropy(..., from_logits=True)``.
    Keras's version multiplies the log-softmax by a one-hot (batch, slots, 262,144) tensor, forward
    and backward, which costs more than the head's own matmuls (bench/RESULTS.md).
    """
    labels = ops.expand_dims(ops.cast(labels, "int32"), axis=-1)
    picked = ops.squeeze(ops.take_along_axis(logits, labels, axis=-1), axis=-1)
    return ops.logsumexp(logits, axis=-1) - picked


class ResponseCrossEntropy(keras.losses.Loss):
    """:func:`sparse_cross_entropy`, averaged over the weighted (response) positions."""

    def __init__(self, name: str = "response_cross_entropy"):
        super().__init__(name=name, reduction="mean_with_sample_weight")

    def call(self, y_true, y_pred):
        return sparse_cross_entropy(y_true, y_pred)


def gather_response_positions(
    labels: np.ndarray, sample_weight: np.ndarray, slots: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The batch's weighted positions as flat indices into (batch * length), in ``batch * slots``
    places shaped ``(batch, slots)``; unused places point at position 0 with zero weight.

    Returns ``(positions, labels_at_positions, weight_at_positions)``, each ``(batch, slots)``.
    """
    batch = len(labels)
    where = np.flatnonzero(sample_weight)
    if len(where) > batch * slots:
        raise ValueError(f"batch has {len(where)} response tokens but only {batch} x {slots} head positions")
    positions = np.zeros(batch * slots, "int32")
    positions[: len(where)] = where
    picked_weight = np.zeros(batch * slots, "float32")
    picked_weight[: len(where)] = sample_weight.reshape(-1)[where]
    picked_labels = labels.reshape(-1)[positions]
    shape = (batch, slots)
    return positions.reshape(shape), picked_labels.astype("int32").reshape(shape), picked_weight.reshape(shape)
