"""Batched generation on a tiny random Gemma: padding, determinism, stopping, compile reuse, and the
compact decode loop against keras-hub's own."""

import numpy as np
import pytest

from gemma_core.config import GenerationConfig
from gemma_core import decode
from gemma_core.decode import CompactDecoder, greedy_next_token
from gemma_core.generation import generate_answers, make_sampler


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


def test_compact_loop_gives_keras_hub_greedy_answers(tiny_model, sample_splits):
    """Prompts of very different lengths share a batch, each row answering from its own position;
    answers must equal keras-hub's loop at batch 1."""
    mixed = ["Hi"] + prompts(sample_splits, 4) + ["Instruction:\nSay yes.\n\nResponse:\n"]
    cfg = GenerationConfig(max_new_tokens=12, batch_size=3)
    compact = generate_answers(tiny_model, mixed, cfg)
    plain = generate_answers(tiny_model, mixed, cfg.model_copy(update={"batch_size": 1, "compact_decode": False}))
    assert [a.text for a in compact.answers] == [a.text for a in plain.answers]
    assert [a.new_tokens for a in compact.answers] == [a.new_tokens for a in plain.answers]


def test_rows_prefilled_in_groups_decode_as_when_prefilled_together(tiny_model, sample_splits, monkeypatch):
    """Rows in no particular order of length, prefilled two at a time (each pair to its own longest
    prompt, the caches put back in the rows' order), answer as the same rows prefilled in one group."""
    mixed = [prompts(sample_splits, 3)[2], "Hi", "Instruction:\nSay yes.\n\nResponse:\n",
             *prompts(sample_splits, 2), "Ok"]
    inputs = tiny_model.preprocessor.generate_preprocess(mixed, sequence_length=256)
    token_ids = np.asarray(inputs["token_ids"])
    lengths = np.asarray(inputs["padding_mask"]).sum(axis=1)
    assert len(set(lengths)) > 3 and not np.all(np.diff(lengths) >= 0)
    decoder = CompactDecoder(tiny_model, make_sampler(GenerationConfig()), stop_token_ids=(1,))
    outputs = {}
    for group in (len(mixed), 2):
        monkeypatch.setattr(decode, "PREFILL_GROUP", group)
        outputs[group] = decoder(token_ids, lengths, 12, decoder.initial_sampler_state())[:2]
    np.testing.assert_array_equal(outputs[2][0], outputs[len(mixed)][0])
    np.testing.assert_array_equal(outputs[2][1], outputs[len(mixed)][1])


def test_greedy_next_token_is_the_argmax_of_the_softmax():
    """The first index of the largest logit, as GreedySampler's argmax over the softmax: ties, a
    vocabulary that is not a multiple of the chunk, the maximum in the last (padded) chunk."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 1000)).astype("float32") * 4
    logits[1, [3, 700]] = 50.0       # a tie across chunks: the first index wins
    logits[2, [600, 601]] = 50.0     # a tie within a chunk
    logits[3, 999] = 50.0            # in the last, partly padded chunk
    logits[4, :] = -7.0              # all equal
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected = np.argmax(probabilities / probabilities.sum(axis=1, keepdims=True), axis=1)
    assert list(expected[1:]) == [3, 600, 999, 0]
    for chunk in (7, 64, 512, 1000, 4096):
        np.testing.assert_array_equal(np.asarray(greedy_next_token(logits, chunk=chunk)), expected)


def test_a_step_at_per_row_positions_equals_the_models_own_step_at_each(tiny_model):
    """The batched step (keras-hub's serving hook, attend_at_positions) against call_with_cache one row
    at a time, on the same cache: one row inside the tiny model's 64-token sliding window, one past it."""
    backbone = tiny_model.backbone
    assert backbone.sliding_window_size == 64
    rng = np.random.default_rng(0)
    shape = (2, 128, backbone.num_key_value_heads, backbone.head_dim)
    cache = tuple((rng.normal(size=shape).astype("float32"), rng.normal(size=shape).astype("float32"))
                  for _ in range(backbone.num_layers))
    tokens, positions = np.array([5, 9], "int32"), np.array([10, 100], "int32")
    decoder = CompactDecoder(tiny_model, make_sampler(GenerationConfig()), stop_token_ids=(1,))
    logits, new_cache = decoder._batch_step(tokens, cache, positions)
    for row in range(2):
        row_cache = tuple((k[row:row + 1], v[row:row + 1]) for k, v in cache)
        position = int(positions[row])
        expected, _, expected_cache = tiny_model.call_with_cache(tokens[row:row + 1, None], row_cache, position)
        np.testing.assert_allclose(np.asarray(logits[row]), np.asarray(expected[0, 0]), rtol=1e-5, atol=1e-5)
        for (k, v), (ek, ev) in zip(new_cache, expected_cache):
            np.testing.assert_allclose(np.asarray(k[row]), np.asarray(ek[0]), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(v[row]), np.asarray(ev[0]), rtol=1e-5, atol=1e-6)


def test_compact_loop_generates_with_an_adapter_enabled_after_its_first_use(tiny_model, sample_splits):
    """The evaluation stages generate with the base model, then LoRA is enabled on the same model
    and trained: the next generation must use the adapter, as keras-hub's loop does."""
    cfg = GenerationConfig(max_new_tokens=8, batch_size=4)
    before = generate_answers(tiny_model, prompts(sample_splits, 4), cfg)
    tiny_model.backbone.enable_lora(2)
    rng = np.random.default_rng(0)
    for variable in tiny_model.trainable_variables:  # the LoRA kernels only: move B away from zero
        variable.assign(rng.normal(0, 0.5, variable.shape).astype("float32"))
    after = generate_answers(tiny_model, prompts(sample_splits, 4), cfg)
    plain = generate_answers(tiny_model, prompts(sample_splits, 4), cfg.model_copy(update={"compact_decode": False}))
    assert [a.text for a in after.answers] == [a.text for a in plain.answers]
    assert [a.text for a in after.answers] != [a.text for a in before.answers]
    assert len(tiny_model._compact_decoders) == 1


def test_other_models_use_keras_hub_loop(sample_splits):
    """A Gemma (1) model keeps its cache in one stacked tensor, which the compact loop does not build:
    generation falls back to keras-hub's loop rather than failing."""
    import keras_hub

    from tests.helpers.tiny_gemma import train_tiny_tokenizer_proto

    tokenizer = keras_hub.models.GemmaTokenizer(proto=train_tiny_tokenizer_proto())
    backbone = keras_hub.models.GemmaBackbone(vocabulary_size=tokenizer.vocabulary_size(), num_layers=2,
                                              num_query_heads=2, num_key_value_heads=1, hidden_dim=32,
                                              intermediate_dim=64, head_dim=16)
    model = keras_hub.models.GemmaCausalLM(
        backbone=backbone, preprocessor=keras_hub.models.GemmaCausalLMPreprocessor(tokenizer, sequence_length=256))
    assert not CompactDecoder.supports(model)
    with pytest.raises(ValueError, match="needs a Gemma3CausalLM on jax or tensorflow"):
        CompactDecoder(model, make_sampler(GenerationConfig()), (1,))
    cfg = GenerationConfig(max_new_tokens=5, batch_size=2)
    default = generate_answers(model, prompts(sample_splits, 3), cfg)
    plain = generate_answers(model, prompts(sample_splits, 3), cfg.model_copy(update={"compact_decode": False}))
    assert [a.text for a in default.answers] == [a.text for a in plain.answers]
    assert not hasattr(model, "_compact_decoders")


def _right_padded(model, texts, total_length):
    inputs = model.preprocessor.generate_preprocess(texts, sequence_length=total_length)
    return np.asarray(inputs["token_ids"]), np.asarray(inputs["padding_mask"]).sum(axis=1)


def test_compact_loop_stops_after_max_new_tokens_or_stop_tokens(tiny_model, sample_splits):
    token_ids, lengths = _right_padded(tiny_model, prompts(sample_splits, 3), 256)
    assert len(set(lengths)) == 3  # every row answers from its own position
    greedy = make_sampler(GenerationConfig())
    never_stops = CompactDecoder(tiny_model, greedy, stop_token_ids=(-1,))
    out, ends, _ = never_stops(token_ids, lengths, 5, never_stops.initial_sampler_state())
    assert (ends == lengths + 5).all()
    for row, (length, end) in enumerate(zip(lengths, ends)):
        assert (out[row, :length] == token_ids[row, :length]).all()  # prompt kept
        assert (out[row, end:] == token_ids[row, end:]).all()  # nothing written past the last step

    # Every row's first answer token made a stop token: the loop ends after one step.
    firsts = tuple(sorted({int(out[row, length]) for row, length in enumerate(lengths)}))
    stops_at_once = CompactDecoder(tiny_model, greedy, stop_token_ids=firsts)
    _, ends, _ = stops_at_once(token_ids, lengths, 5, stops_at_once.initial_sampler_state())
    assert (ends == lengths + 1).all()

    with pytest.raises(ValueError, match="too short"):
        never_stops(token_ids, lengths, 256, never_stops.initial_sampler_state())


@pytest.mark.parametrize("compact", [True, False])
def test_same_seed_same_answers_for_sampling(tiny_model, sample_splits, compact):
    for sampler in ("top_k", "top_p"):
        cfg = GenerationConfig(sampler=sampler, max_new_tokens=8, batch_size=4, seed=7, temperature=2.0,
                               compact_decode=compact)
        first = generate_answers(tiny_model, prompts(sample_splits, 4), cfg)
        again = generate_answers(tiny_model, prompts(sample_splits, 4), cfg)
        other = generate_answers(tiny_model, prompts(sample_splits, 4), cfg.model_copy(update={"seed": 8}))
        assert [a.text for a in first.answers] == [a.text for a in again.answers]
        assert [a.text for a in first.answers] != [a.text for a in other.answers]


def test_generate_loop_compiles_once_per_sampler(tiny_model, sample_splits):
    cfg = GenerationConfig(max_new_tokens=6, batch_size=4)
    plain = cfg.model_copy(update={"compact_decode": False})
    generate_answers(tiny_model, prompts(sample_splits, 3), plain)
    compiled = tiny_model.generate_function
    generate_answers(tiny_model, prompts(sample_splits, 7), plain)
    assert tiny_model.generate_function is compiled

    generate_answers(tiny_model, prompts(sample_splits, 7), cfg)
    (decoder,) = tiny_model._compact_decoders.values()
    compiled_shapes = decoder._decode._cache_size()
    generate_answers(tiny_model, prompts(sample_splits, 7), cfg)
    assert tiny_model._compact_decoders == {next(iter(tiny_model._compact_decoders)): decoder}
    assert decoder._decode._cache_size() == compiled_shapes


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


_TENSORFLOW = r"""
import json, sys
import keras
from gemma_core.config import GenerationConfig
from gemma_core.decode import CompactDecoder
from gemma_core.generation import generate_answers
from gemma_core.models import load_model

def texts(model, cfg):
    return [a.text for a in generate_answers(model, prompts, cfg).answers]

prompts = ["Instruction:\nName a colour.\n\nResponse:\n", "Instruction:\nWhat is a cat? Say more.\n\nResponse:\n",
           "Hi", "Instruction:\nWrite about the sea, the wind and a boat.\n\nResponse:\n"] * 2
cfg = GenerationConfig(max_new_tokens=24, batch_size=4)
model = load_model(sys.argv[1])
compact = texts(model, cfg)
keras_hub_loop = texts(model, cfg.model_copy(update={"compact_decode": False, "batch_size": 1}))
top_k = cfg.model_copy(update={"sampler": "top_k", "seed": 3})
sampled = [texts(model, top_k), texts(model, top_k)]
with_xla = model.jit_compile
model = load_model(sys.argv[1])
model.jit_compile = False
without_xla = texts(model, cfg.model_copy(update={"compact_decode": False}))
print("RESULT" + json.dumps({"backend": keras.config.backend(), "jit_compile": with_xla,
                             "compact": CompactDecoder.supports(model),
                             "same_as_keras_hub_loop": compact == keras_hub_loop,
                             "same_without_xla": keras_hub_loop == without_xla,
                             "same_seed_same_samples": sampled[0] == sampled[1]}))
"""


@pytest.mark.slow
def test_tensorflow_generates_with_xla_and_the_same_answers(tiny_preset):
    """On TensorFlow the compact loop runs too (compiled with XLA) and gives keras-hub's greedy answers;
    load_model asks for XLA (Keras leaves it off on a CPU-only machine, and keras-hub's loop then runs op
    by op: bench/RESULTS.md, Backends), which changes no answer; a sampler's seed still fixes its samples."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-c", _TENSORFLOW, str(tiny_preset)], env=env, cwd=repo,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.split("RESULT", 1)[1]) == {
        "backend": "tensorflow", "jit_compile": True, "compact": True, "same_as_keras_hub_loop": True,
        "same_without_xla": True, "same_seed_same_samples": True}
