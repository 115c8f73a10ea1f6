"""Score a model on held-out rows: completion loss, perplexity, ROUGE-L, how answers ended, length.

The same function scores the base and the tuned model, on the same prompts, seeds and settings,
so the two are compared like for like. Every metric is reported overall and per Dolly category.

The loss is on the row's ``completion`` (the response in the data's prompt format, so in
``gemma_chat`` it includes the closing ``<end_of_turn>``); ROUGE-L compares the answer with the bare
``response``. Each row records which stop token ended its answer (``ended_by``: ``eos``,
``end_of_turn``, or None when it ran into ``max_new_tokens``); ``ended_with_eos`` stays what it always
was, "ended on a stop token", so older readers of these rows keep working.

>>> report = evaluate_model(model, eval_frame, GenerationConfig(), sequence_length=128)  # doctest: +SKIP
>>> report.overall["completion_loss"], report.per_category["closed_qa"]["rouge_l_f1"]     # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import keras
import numpy as np
import pandas as pd
from rouge_score import rouge_scorer

from gemma_core.batching import PlannedBatch, step_arrays
from gemma_core.config import GenerationConfig
from gemma_core.encoding import encode_examples
from gemma_core.endings import ending_rates
from gemma_core.generation import generate_answers
from gemma_core.response_head import ResponseNLL

LOSS_BATCH = 4
HEAD_SLOTS_STEP = 16  # head positions per row, rounded up to this: one compiled shape for the whole split


@dataclass(frozen=True)
class EvalReport:
    overall: dict[str, float]
    per_category: dict[str, dict[str, float]]
    rows: list[dict]  # one per prompt: category, instruction, reference, answer and its scores
    generation_seconds: float
    new_tokens_per_second: float

    def to_dict(self) -> dict:
        return asdict(self)


def completion_nll(model, prompts, responses, sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Per example: summed negative log-likelihood of the response tokens, and their count.

    The output head runs at response positions only (:class:`ResponseNLL`), and every batch has one
    shape (the last one topped up with weightless rows), so it compiles once.
    """
    examples = encode_examples(model.preprocessor, prompts, responses, sequence_length)
    nll = np.zeros(len(prompts))
    count = np.zeros(len(prompts))
    if not len(examples):
        return nll, count
    length = examples.token_ids.shape[1]
    starts = range(0, len(examples), LOSS_BATCH)
    per_batch = [int(np.count_nonzero(examples.sample_weight[s:s + LOSS_BATCH])) for s in starts]
    slots = min(length, HEAD_SLOTS_STEP * math.ceil(max(1, *per_batch) / LOSS_BATCH / HEAD_SLOTS_STEP))
    scorer = ResponseNLL(model.backbone)
    for start in starts:
        rows = np.arange(start, min(start + LOSS_BATCH, len(examples)))
        # Training's batch layout: the last batch topped up with weightless repeats, one shape throughout.
        x, labels, weight = step_arrays(examples, PlannedBatch(np.resize(rows, LOSS_BATCH), len(rows), length, slots),
                                        response_only=True)
        token_nll = keras.ops.convert_to_numpy(scorer.predict_on_batch({**x, "labels": labels}))
        used = weight > 0
        row = start + x["positions"][used] // length
        np.add.at(nll, row, token_nll[used].astype(np.float64))
        np.add.at(count, row, 1)
    return nll, count


def evaluate_model(
    model,
    eval_frame: pd.DataFrame,
    generation: GenerationConfig,
    sequence_length: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Generate an answer for every row of ``eval_frame`` and score it against the reference."""
    prompts, references = list(eval_frame["prompt"]), list(eval_frame["response"])
    # A split written before prompt formats had no completion column: its targets were the bare responses.
    targets = list(eval_frame["completion"]) if "completion" in eval_frame else references
    nll, count = completion_nll(model, prompts, targets, sequence_length)
    run = generate_answers(model, prompts, generation, on_batch=on_batch)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rows = []
    for i, answer in enumerate(run.answers):
        rows.append({
            "category": eval_frame["category"].iloc[i],
            "instruction": eval_frame["instruction"].iloc[i],
            "reference": references[i],
            "answer": answer.text,
            "rouge_l_f1": scorer.score(references[i], answer.text)["rougeL"].fmeasure,
            "ended_with_eos": answer.ended,
            "ended_by": answer.ended_by,
            "new_tokens": answer.new_tokens,
            "nll": float(nll[i]),
            "response_tokens": int(count[i]),
        })
    table = pd.DataFrame(rows)
    per_category = {str(cat): _summarise(group) for cat, group in table.groupby("category", sort=True)}
    return EvalReport(_summarise(table), per_category, rows, run.seconds, run.new_tokens_per_second)


def _summarise(table: pd.DataFrame) -> dict[str, float]:
    tokens = table["response_tokens"].sum()
    loss = float(table["nll"].sum() / tokens) if tokens else float("nan")
    return {
        "examples": int(len(table)),
        "completion_loss": loss,
        "perplexity": math.exp(loss) if tokens else float("nan"),
        "rouge_l_f1": float(table["rouge_l_f1"].mean()),
        **ending_rates(table.to_dict("records")),
        "mean_answer_tokens": float(table["new_tokens"].mean()),
    }

