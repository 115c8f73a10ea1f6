"""Evaluation on a tiny random Gemma: the loss is the response-token cross-entropy, metrics per category."""

import math

import numpy as np

from gemma_core.config import GenerationConfig
from gemma_core.encoding import encode_examples
from gemma_core.evaluation import completion_nll, evaluate_model


def test_completion_nll_matches_a_direct_computation(tiny_model, sample_splits):
    _, evaluation = sample_splits
    prompts, responses = list(evaluation["prompt"][:3]), list(evaluation["response"][:3])
    nll, count = completion_nll(tiny_model, prompts, responses, sequence_length=128)
    encoded = encode_examples(tiny_model.preprocessor, prompts, responses, 128)
    x = {"token_ids": encoded.token_ids, "padding_mask": encoded.padding_mask}
    y, weight = encoded.labels, encoded.sample_weight
    logits = np.asarray(tiny_model(x), dtype=np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(log_probs, np.asarray(y)[..., None], axis=-1)[..., 0]
    weight = np.asarray(weight)
    np.testing.assert_allclose(nll, -(picked * weight).sum(axis=1), rtol=1e-4)
    np.testing.assert_array_equal(count, weight.sum(axis=1))


def test_report_overall_and_per_category(tiny_model, sample_splits):
    _, evaluation = sample_splits
    frame = evaluation.head(8)
    report = evaluate_model(tiny_model, frame, GenerationConfig(max_new_tokens=4, batch_size=4), sequence_length=128)
    assert report.overall["examples"] == 8 and len(report.rows) == 8
    assert set(report.per_category) == set(frame["category"])
    vocab = tiny_model.preprocessor.tokenizer.vocabulary_size()
    # a random model is close to uniform over its vocabulary
    assert abs(report.overall["completion_loss"] - math.log(vocab)) < 1.0
    assert math.isclose(report.overall["perplexity"], math.exp(report.overall["completion_loss"]))
    for row in report.rows:
        assert 0.0 <= row["rouge_l_f1"] <= 1.0 and row["new_tokens"] <= 4
    assert 0.0 <= report.overall["eos_rate"] <= 1.0
    assert sum(v["examples"] for v in report.per_category.values()) == 8
