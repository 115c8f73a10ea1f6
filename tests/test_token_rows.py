"""Trainable token rows (gemma_core.token_rows) on the tiny random Gemma: both sides of the tied
embedding, merging, the adapter file, training in gemma_chat, resume, decoding, bad input."""

import json

import keras
import keras_hub
import numpy as np
import pytest

from gemma_core.adapter_file import AdapterMismatchError, check_adapter_fits, read_adapter_file, read_token_rows
from gemma_core.config import LoraConfig, TrainConfig
from gemma_core.gguf_export import merged_backbone
from gemma_core.lora_train import train_lora
from gemma_core.prompts import END_OF_TURN, START_OF_TURN
from gemma_core.token_rows import TokenRowsError, enable_token_rows, load_adapter, save_adapter, token_ids_for

CHAT = {"model_id": "tiny", "data_hash": "d1", "prompt_format": "gemma_chat"}
CFG = TrainConfig(max_steps=6, epochs=3, batch_size=2, sequence_length=64, learning_rate=1e-2, checkpoint_every=3)
IDS = np.array([[2, 5, 9, 6, 3, 5, 6, 0]], "int32")
INPUTS = {"token_ids": IDS, "padding_mask": IDS > 0}


def _logits(backbone):
    return np.asarray(backbone.token_embedding(backbone(INPUTS), reverse=True), np.float64)


def _with_random_rows(model, ids=(5, 6)):
    layer = enable_token_rows(model.backbone, ids)
    layer.row_deltas.assign(np.random.default_rng(3).normal(0, 0.5, layer.row_deltas.shape).astype("float32"))
    return layer


def _examples(sample_splits, n=10):
    train, _ = sample_splits
    return list(train["prompt"][:n]), list(train["response"][:n])


def test_rows_start_at_zero_and_are_the_only_new_trainable_weights(tiny_model):
    tiny_model.backbone.enable_lora(2)
    before, lora = _logits(tiny_model.backbone), len(tiny_model.backbone.trainable_weights)
    layer = enable_token_rows(tiny_model.backbone, token_ids_for(tiny_model.preprocessor.tokenizer,
                                                                 (START_OF_TURN, END_OF_TURN)))
    assert layer.row_ids == (5, 6) and not layer._embeddings.trainable
    assert len(tiny_model.backbone.trainable_weights) == lora + 1
    np.testing.assert_array_equal(_logits(tiny_model.backbone), before)
    assert enable_token_rows(tiny_model.backbone, (5, 6)) is layer  # again: a no-op


def test_a_row_delta_changes_its_token_on_both_sides_and_merges_exactly(tiny_model):
    tiny_model.backbone.enable_lora(2)
    plain = _logits(tiny_model.backbone)
    layer = _with_random_rows(tiny_model)
    tuned = _logits(tiny_model.backbone)
    # Output side: column 9 (no delta) moves only through the changed inputs; rows 5 and 6 appear in
    # the input, so every later position differs; position 0 (token 2) sees no changed input.
    embedded = np.asarray(layer(IDS))
    np.testing.assert_allclose(embedded[0, 1], np.asarray(layer._embeddings)[5] + np.asarray(layer.row_deltas)[0],
                               rtol=1e-6)
    np.testing.assert_allclose(tuned[0, 0, [0, 1, 2, 9]], plain[0, 0, [0, 1, 2, 9]], rtol=1e-5)
    assert np.abs(tuned[0, 0, [5, 6]] - plain[0, 0, [5, 6]]).min() > 1e-3
    merged = merged_backbone(tiny_model.backbone)
    assert type(merged.token_embedding) is keras.layers.ReversibleEmbedding
    np.testing.assert_allclose(_logits(merged), tuned, rtol=1e-5, atol=1e-5 * np.abs(tuned).max())


def test_adapter_file_carries_the_rows_and_loads_them_into_a_fresh_model(tiny_preset, tiny_model, tmp_path):
    tiny_model.backbone.enable_lora(2)
    _with_random_rows(tiny_model)
    path = tmp_path / "adapter.lora.h5"
    save_adapter(tiny_model.backbone, path)
    assert read_token_rows(path)[0] == (5, 6)
    assert read_adapter_file(path).token_rows == (5, 6)
    fresh = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    load_adapter(fresh.backbone, path)
    np.testing.assert_array_equal(_logits(fresh.backbone), _logits(tiny_model.backbone))


def test_an_adapter_without_rows_loads_as_before(tiny_preset, tiny_model, tmp_path):
    tiny_model.backbone.enable_lora(2)
    path = tmp_path / "adapter.lora.h5"
    save_adapter(tiny_model.backbone, path)
    assert read_token_rows(path) is None
    fresh = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    load_adapter(fresh.backbone, path)
    assert type(fresh.backbone.token_embedding) is keras.layers.ReversibleEmbedding


def test_gemma_chat_training_tunes_the_turn_rows_and_nothing_else_of_the_embedding(tiny_model, sample_splits,
                                                                                     tmp_path):
    embeddings = np.asarray(tiny_model.backbone.token_embedding.embeddings).copy()
    result = train_lora(tiny_model, *_examples(sample_splits), CFG, LoraConfig(), tmp_path, CHAT)
    layer = tiny_model.backbone.token_embedding
    assert layer.row_ids == (5, 6) and np.abs(np.asarray(layer.row_deltas)).min(axis=1).max() > 0
    np.testing.assert_array_equal(np.asarray(layer._embeddings), embeddings)
    manifest = json.loads((tmp_path / "adapter.manifest.json").read_text())
    assert manifest["identity"]["trainable_tokens"] == [START_OF_TURN, END_OF_TURN]
    assert read_token_rows(result.adapter_path)[0] == (5, 6)


def test_instruction_training_and_an_empty_list_train_no_rows(tiny_preset, sample_splits, tmp_path):
    for name, identity, lora in (("instruction", {**CHAT, "prompt_format": "instruction"}, LoraConfig()),
                                 ("off", CHAT, LoraConfig(trainable_tokens=()))):
        model = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
        result = train_lora(model, *_examples(sample_splits), CFG.model_copy(update={"max_steps": 1}), lora,
                            tmp_path / name, identity)
        assert read_token_rows(result.adapter_path) is None, name
        assert type(model.backbone.token_embedding) is keras.layers.ReversibleEmbedding


def test_resume_restores_the_rows_and_their_optimizer_state(tiny_preset, sample_splits, tmp_path):
    prompts, responses = _examples(sample_splits)
    straight = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    full = train_lora(straight, prompts, responses, CFG, LoraConfig(), tmp_path / "a", CHAT)
    first = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    train_lora(first, prompts, responses, CFG, LoraConfig(), tmp_path / "b", CHAT, stop_after_steps=3)
    second = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    resumed = train_lora(second, prompts, responses, CFG, LoraConfig(), tmp_path / "b", CHAT)
    assert resumed.resumed_from_step == 3
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(second.backbone.token_embedding.row_deltas),
                               np.asarray(straight.backbone.token_embedding.row_deltas), atol=1e-5)


def test_a_checkpoint_without_rows_is_refused_for_a_run_with_them(tiny_preset, sample_splits, tmp_path):
    prompts, responses = _examples(sample_splits)
    model = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    train_lora(model, prompts, responses, CFG, LoraConfig(trainable_tokens=()), tmp_path, CHAT, stop_after_steps=3)
    again = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    with pytest.raises(ValueError, match=r"trainable_tokens.*lora\.trainable_tokens back"):
        train_lora(again, prompts, responses, CFG, LoraConfig(), tmp_path, CHAT)


def test_the_compact_decoder_generates_what_the_merged_model_does(tiny_preset, tiny_model):
    from gemma_core.decode import CompactDecoder

    tiny_model.backbone.enable_lora(2)
    _with_random_rows(tiny_model)
    merged = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    merged.backbone.set_weights(merged_backbone(tiny_model.backbone).get_weights())
    token_ids = np.zeros((2, 24), "int32")
    token_ids[:, :4] = [[2, 9, 5, 11], [2, 6, 12, 7]]
    lengths = np.array([4, 4])
    answers = []
    for model in (tiny_model, merged):
        decoder = CompactDecoder(model, keras_hub.samplers.GreedySampler(), stop_token_ids=(1,))
        answers.append(decoder(token_ids.copy(), lengths, 12, decoder.initial_sampler_state())[0])
    np.testing.assert_array_equal(answers[0], answers[1])


@pytest.mark.parametrize("tokens, message", [
    (("<start_of_turn>", "not-a-token"), "'not-a-token' is not a single token"),
    (("<end_of_turn>", "<end_of_turn>"), "must be distinct"),
])
def test_bad_token_lists_are_refused_with_the_fix(tiny_model, tokens, message):
    with pytest.raises(TokenRowsError, match=message):
        enable_token_rows(tiny_model.backbone, token_ids_for(tiny_model.preprocessor.tokenizer, tokens))


def test_another_set_of_rows_and_a_soft_capped_head_are_refused(tiny_model):
    enable_token_rows(tiny_model.backbone, (5, 6))
    with pytest.raises(TokenRowsError, match=r"already trainable.*load the model fresh"):
        enable_token_rows(tiny_model.backbone, (5,))
    capped = keras.layers.ReversibleEmbedding(50, 8, logit_soft_cap=30.0)
    capped.build()

    class Backbone:
        token_embedding = capped

    with pytest.raises(TokenRowsError, match="soft cap"):
        enable_token_rows(Backbone(), (1,))


def test_an_adapter_whose_rows_do_not_fit_the_model_is_refused(tiny_model, tmp_path):
    tiny_model.backbone.enable_lora(2)
    _with_random_rows(tiny_model)
    path = tmp_path / "adapter.lora.h5"
    save_adapter(tiny_model.backbone, path)
    adapter = read_adapter_file(path)
    wider = type(adapter)(adapter.path, adapter.rank, adapter.layers, adapter.token_rows, adapter.token_row_width + 8)
    with pytest.raises(AdapterMismatchError, match="another base model.*embedding rows"):
        check_adapter_fits(tiny_model, wider)


def test_a_merged_preset_is_a_plain_model_with_the_rows_folded_in(tiny_model, tmp_path):
    from gemma_core.export import export_merged_preset

    tiny_model.backbone.enable_lora(2)
    _with_random_rows(tiny_model)
    export_merged_preset(tiny_model, tmp_path / "merged")
    plain = keras_hub.models.CausalLM.from_preset(str(tmp_path / "merged"))
    assert type(plain.backbone.token_embedding) is keras.layers.ReversibleEmbedding
    tuned = _logits(tiny_model.backbone)
    np.testing.assert_allclose(_logits(plain.backbone), tuned, rtol=1e-5, atol=1e-5 * np.abs(tuned).max())


def test_the_config_takes_a_token_list_or_none():
    from gemma_core.config import load_config

    assert load_config().lora.trainable_tokens is None
    assert load_config(overrides=["lora.trainable_tokens=[]"]).lora.trainable_tokens == ()
    assert load_config(overrides=["lora.trainable_tokens=[<end_of_turn>]"]).lora.trainable_tokens == ("<end_of_turn>",)
