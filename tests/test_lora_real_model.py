"""Proof on the real embedded Gemma 3 270M: a short LoRA run on the offline sample helps.

The default run's settings: 40 steps at sequence length 128 and batch 4 (160 examples), learning
rate 5e-4 (see the measurements beside ``TrainConfig.learning_rate``). Base and tuned model are scored by the same function on the same 16 held-out
prompts with the same greedy settings.
"""

import json

import pytest

from gemma_core.config import EMBEDDED_MODEL, DataConfig, GenerationConfig, LoraConfig, TrainConfig
from gemma_core.dolly_prepare import format_dolly_to_parquet, read_split
from gemma_core.evaluation import evaluate_model

pytestmark = pytest.mark.slow

TRAIN = TrainConfig(learning_rate=5e-4, sequence_length=128, batch_size=4, max_steps=40, checkpoint_every=20)
GENERATION = GenerationConfig(max_new_tokens=48, batch_size=8)


def test_short_lora_run_lowers_held_out_loss_and_teaches_stopping(tmp_path):
    from gemma_core.lora_train import train_lora
    from gemma_core.models import load_model

    prepared = format_dolly_to_parquet(DataConfig(train_limit=160), tmp_path / "data")
    train, evaluation = read_split(prepared.train_path), read_split(prepared.eval_path).head(16)

    model = load_model(EMBEDDED_MODEL)
    base = evaluate_model(model, evaluation, GENERATION, TRAIN.sequence_length)
    result = train_lora(model, list(train["prompt"]), list(train["response"]), TRAIN, LoraConfig(),
                        tmp_path / "train", {"model_id": EMBEDDED_MODEL, "data_hash": prepared.content_hash})
    tuned = evaluate_model(model, evaluation, GENERATION, TRAIN.sequence_length)

    summary = {
        "steps": result.steps,
        "train_loss_first_last": [result.losses[0], result.losses[-1]],
        "useful_tokens_per_second": result.useful_tokens_per_second,
        "base": base.overall,
        "tuned": tuned.overall,
    }
    print(json.dumps(summary, indent=1))
    assert result.steps == 40
    assert tuned.overall["completion_loss"] <= 0.9 * base.overall["completion_loss"], summary
    assert tuned.overall["eos_rate"] > base.overall["eos_rate"], summary
