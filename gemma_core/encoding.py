"""Prompt/response pairs → fixed-shape token arrays with the loss mask on the response only.

keras-hub's Gemma 3 preprocessor does the work: given separate ``prompts`` and ``responses`` it
returns ``sample_weight`` that is 1 on response tokens (and the end-of-sequence token that closes
them) and 0 on the prompt and padding. Arrays are materialised once as numpy, so training can pick
any batch by index, which is what makes mid-epoch resume exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gemma_core.prompts import PROMPT_FORMATS, format_prompt, format_response

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedExamples:
    token_ids: np.ndarray  # (n, sequence_length) int32
    padding_mask: np.ndarray  # (n, sequence_length) bool
    labels: np.ndarray  # (n, sequence_length) int32: the next token
    sample_weight: np.ndarray  # (n, sequence_length) float32: 1 on response tokens
    kept_rows: np.ndarray  # indices of the input rows that survived (at least one response token)

    def __len__(self) -> int:
        return len(self.token_ids)

    def take(self, indices: np.ndarray) -> "EncodedExamples":
        return EncodedExamples(
            self.token_ids[indices], self.padding_mask[indices], self.labels[indices],
            self.sample_weight[indices], self.kept_rows[indices],
        )


class SequenceTooShortError(ValueError):
    pass


def check_sequence_length(preprocessor, sequence_length: int) -> None:
    """Fail early when even an empty instruction's template plus one answer token cannot fit (in the
    longer of the prompt formats, so one check holds for both)."""
    template_tokens = max(len(preprocessor.tokenizer(format_prompt("", "", f) + format_response("", f)))
                          for f in PROMPT_FORMATS)
    needed = template_tokens + 3  # start token, one response token, end token
    if sequence_length < needed:
        raise SequenceTooShortError(
            f"train.sequence_length={sequence_length} is shorter than the prompt template "
            f"({template_tokens} tokens) plus an answer; use at least {needed}, typically 128-512"
        )


def encode_examples(
    preprocessor, prompts: Sequence[str], responses: Sequence[str], sequence_length: int, batch_size: int = 256
) -> EncodedExamples:
    """Tokenize and pack pairs; drop (and log) pairs whose response is cut off entirely."""
    check_sequence_length(preprocessor, sequence_length)
    parts = []
    for start in range(0, len(prompts), batch_size):
        x, y, weight = preprocessor(
            {"prompts": list(prompts[start:start + batch_size]), "responses": list(responses[start:start + batch_size])},
            sequence_length=sequence_length,
        )
        parts.append((np.asarray(x["token_ids"]), np.asarray(x["padding_mask"]), np.asarray(y), np.asarray(weight)))
    token_ids, padding_mask, labels, weight = (np.concatenate(p) for p in zip(*parts))
    # keras-hub packs round-robin: an over-long pair loses tokens from both prompt and response.
    truncated = int(padding_mask.all(axis=1).sum())
    if truncated:
        log.warning(
            "%d of %d examples fill all %d tokens and were truncated (prompt and response alike); "
            "raise train.sequence_length to keep them whole", truncated, len(prompts), sequence_length,
        )
    keep = np.flatnonzero(weight.sum(axis=1) > 0)
    if len(keep) < len(prompts):
        log.warning(
            "%d of %d examples dropped: their prompt fills all %d tokens, leaving no response to learn "
            "from (raise train.sequence_length to keep them)", len(prompts) - len(keep), len(prompts), sequence_length,
        )
    return EncodedExamples(
        token_ids[keep].astype("int32"), padding_mask[keep].astype(bool), labels[keep].astype("int32"),
        weight[keep].astype("float32"), keep,
    )
