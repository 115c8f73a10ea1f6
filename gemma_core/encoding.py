"""Prompt/response pairs → fixed-shape token arrays with the loss mask on the response only.

The layout is keras-hub's Gemma 3 preprocessor's, given separate ``prompts`` and ``responses``
(tests/test_lora_train.py compares the two): ``<bos>`` prompt response ``<eos>``, with
``sample_weight`` 1 on the response tokens and the ``<eos>`` that closes them, 0 on the prompt and
padding. Two things differ. A response in Gemma's turns (``gemma_chat``) ends with its
``<end_of_turn>`` and no ``<eos>``, as Gemma's chat template has it. And for pairs too long for the
sequence keras-hub cuts prompt and response alike, losing the response's end, which is what teaches
the model to stop; here the prompt gives way first (:func:`fit_pair`). Arrays are materialised once
as numpy, so training can pick any batch by index, which is what makes mid-epoch resume exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gemma_core.prompts import END_OF_TURN, PROMPT_FORMATS, format_prompt, format_response

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedExamples:
    token_ids: np.ndarray  # (n, sequence_length) int32
    padding_mask: np.ndarray  # (n, sequence_length) bool
    labels: np.ndarray  # (n, sequence_length) int32: the next token
    sample_weight: np.ndarray  # (n, sequence_length) float32: 1 on response tokens

    def __len__(self) -> int:
        return len(self.token_ids)

    def take(self, indices: np.ndarray) -> "EncodedExamples":
        return EncodedExamples(
            self.token_ids[indices], self.padding_mask[indices], self.labels[indices], self.sample_weight[indices]
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
    """Tokenize and pack pairs as keras-hub's Gemma 3 preprocessor does (``<bos>`` prompt response
    ``<eos>``, loss on the response and ``<eos>``), except for pairs that do not fit, which keep their
    response's end (:func:`fit_pair`), and responses closed by ``<end_of_turn>``, which get no ``<eos>``."""
    check_sequence_length(preprocessor, sequence_length)
    tokenizer = preprocessor.tokenizer
    keep_tail = prompt_tail_tokens(tokenizer)
    # sequence_length + 1 tokens are packed (then shifted into inputs and labels): <bos> and, after it,
    # the prompt and the response closed by <eos>, which a response cut short loses with its end. A
    # response in Gemma's turns is closed by its <end_of_turn> instead, as in Gemma's chat template:
    # an <eos> after it would teach the model a second way to end, competing with the turn marker.
    packed = np.full((len(prompts), sequence_length + 1), tokenizer.pad_token_id, dtype="int32")
    response_mask = np.zeros(packed.shape, dtype=bool)
    lengths = np.zeros(len(prompts), dtype="int64")
    shortened = lost_end = 0
    for start in range(0, len(prompts), batch_size):
        texts = responses[start:start + batch_size]
        for row, (prompt, response, text) in enumerate(zip(_token_lists(tokenizer, prompts[start:start + batch_size]),
                                                           _token_lists(tokenizer, texts), texts), start):
            if not text.endswith(END_OF_TURN):
                response.append(tokenizer.end_token_id)
            fitted_prompt, fitted_response = fit_pair(prompt, response, sequence_length, keep_tail)
            shortened += len(fitted_prompt) + len(fitted_response) < len(prompt) + len(response)
            lost_end += len(fitted_response) < len(response)
            ids = [tokenizer.start_token_id, *fitted_prompt, *fitted_response]
            packed[row, :len(ids)] = ids
            response_mask[row, 1 + len(fitted_prompt):len(ids)] = True
            lengths[row] = len(ids)
    if shortened:
        log.warning(
            "%d of %d examples are longer than %d tokens: their prompts were shortened in the middle, keeping "
            "the instruction's start, the template's end and the whole response%s; raise train.sequence_length "
            "to keep them whole", shortened, len(prompts), sequence_length,
            f" (for {lost_end} of them too long: its end was cut)" if lost_end else "",
        )
    padding_mask = np.arange(sequence_length + 1) < lengths[:, None]
    return EncodedExamples(
        packed[:, :-1], padding_mask[:, :-1], packed[:, 1:], response_mask[:, 1:].astype("float32")
    )


def fit_pair(prompt: list[int], response: list[int], budget: int, keep_tail: int) -> tuple[list[int], list[int]]:
    """Shorten a prompt/response pair of token ids to at most ``budget`` tokens together.

    The prompt's middle gives way first (it keeps its first tokens, the instruction, and its last
    ``keep_tail``, where the template hands over to the answer), because the response and its closing
    ``<end_of_turn>``/``<eos>`` are what the model learns from: a cut-off response never teaches it
    to stop. keras-hub's packer would cut both alike. Only a response too long to fit beside a
    quarter of the budget (or the whole prompt, when shorter) loses its end.

    >>> fit_pair([1, 2, 3, 4, 5, 6], [7, 8], budget=6, keep_tail=2)
    ([1, 2, 5, 6], [7, 8])
    >>> fit_pair([1, 2, 3, 4, 5, 6, 7, 8], [9] * 10, budget=8, keep_tail=1)
    ([1, 8], [9, 9, 9, 9, 9, 9])
    """
    if len(prompt) + len(response) <= budget:
        return prompt, response
    least_prompt = min(len(prompt), max(budget // 4, keep_tail + 1), budget - 1)
    prompt_room = max(budget - len(response), least_prompt)
    if prompt_room < len(prompt):
        tail = min(keep_tail, prompt_room - 1)
        prompt = prompt[:prompt_room - tail] + prompt[len(prompt) - tail:]
    return prompt, response[:budget - len(prompt)]


def prompt_tail_tokens(tokenizer) -> int:
    """How many of a prompt's last tokens are its template's hand-over to the answer (in the longer of the
    prompt formats), plus two for tokens that merge across the join."""
    context = "CONTEXT"
    return max(len(_token_lists(tokenizer, [rendered[rendered.index(context) + len(context):]])[0])
               for rendered in (format_prompt("I", context, f) for f in PROMPT_FORMATS)) + 2


def _token_lists(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    ids = tokenizer(list(texts))
    ids = ids.to_list() if hasattr(ids, "to_list") else ids
    return [[int(t) for t in row] for row in ids]
