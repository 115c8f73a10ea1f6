"""Batched generation on a tiny random Gemma: padding, determinism, stopping, compile reuse."""

import numpy as np

from gemma_core.config import GenerationConfig
from gemma_core.generation import generate_answers


def prompts(sample_splits, n):
    return list(sample_splits[1]["prompt"][:n])


def test_last_batch_is_padded_and_every_prompt_answered(tiny_model, sample_splits):
    run = generate_answers(tiny_model, prompts(sample_splits, 5), GenerationConfig(max_new_tokens=6, batch_size=4))
    assert [a.prompt for a in run.answers] == prompts(sample_splits, 5)
    assert all(0 < a.new_tokens <= 6 for a in run.answers)
    assert run.seconds > 0 and run.first_batch_seconds > 0


def test_batching_does_not_change_greedy_answers(tiny_model, sample_splits):
    cfg = GenerationConfig(max_new_tokens=6, batch_size=4)
    batched = generate_answers(tiny_model, prompts(sample_splits, 4), cfg)
    single = generate_answers(tiny_model, prompts(sample_splits, 4), cfg.model_copy(update={"batch_size": 1}))
    assert [a.text for a in batched.answers] == [a.text for a in single.answers]


def test_same_seed_same_answers_for_sampling(tiny_model, sample_splits):
    for sampler in ("top_k", "top_p"):
        cfg = GenerationConfig(sampler=sampler, max_new_tokens=8, batch_size=4, seed=7, temperature=2.0)
        first = generate_answers(tiny_model, prompts(sample_splits, 4), cfg)
        again = generate_answers(tiny_model, prompts(sample_splits, 4), cfg)
        other = generate_answers(tiny_model, prompts(sample_splits, 4), cfg.model_copy(update={"seed": 8}))
        assert [a.text for a in first.answers] == [a.text for a in again.answers]
        assert [a.text for a in first.answers] != [a.text for a in other.answers]


def test_generate_loop_compiles_once_per_sampler(tiny_model, sample_splits):
    cfg = GenerationConfig(max_new_tokens=6, batch_size=4)
    generate_answers(tiny_model, prompts(sample_splits, 3), cfg)
    compiled = tiny_model.generate_function
    generate_answers(tiny_model, prompts(sample_splits, 7), cfg)
    assert tiny_model.generate_function is compiled


def test_answer_stops_at_end_of_sequence_and_respects_max_new_tokens(tiny_model):
    """The post-processing of one generated row: prompt stripped, cut at <eos> or the limit."""
    from gemma_core.generation import _answer

    tokenizer = tiny_model.preprocessor.tokenizer
    eos = tokenizer.end_token_id
    word = [int(t) for t in tokenizer("Paris")]
    prompt_mask = np.array([True] * 3 + [False] * 9)
    ids = np.array([2, 5, 6] + word + [eos] + [0] * (9 - len(word) - 1))
    out_mask = np.array([True] * (4 + len(word)) + [False] * (8 - len(word)))
    stopped = _answer(tokenizer, "p", ids, out_mask, prompt_mask, (eos,), GenerationConfig(max_new_tokens=8))
    assert stopped.text == "Paris" and stopped.ended and stopped.new_tokens == len(word) + 1

    cut = _answer(tokenizer, "p", ids, out_mask, prompt_mask, (eos,), GenerationConfig(max_new_tokens=len(word)))
    assert not cut.ended and cut.new_tokens == len(word)


def test_empty_prompt_list(tiny_model):
    assert generate_answers(tiny_model, [], GenerationConfig()).answers == []
