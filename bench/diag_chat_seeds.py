"""How many held-out answers of the 270M tuned in gemma_chat end their turn, for one seed and any
config overrides: the steps of tests/test_chat_format.py::test_chat_format_real_model (default
training, 128 new tokens), printing the rate, the tuned loss and every answer that did not end.

    .venv/bin/python bench/diag_chat_seeds.py 1 train.epochs=1
"""
import sys
import tempfile
from pathlib import Path

import gemma_core  # noqa: F401  (backend defaults before Keras loads)
import keras_hub

from gemma_core.config import load_config
from gemma_core.dolly_prepare import format_dolly_to_parquet, read_split
from gemma_core.evaluation import evaluate_model
from gemma_core.lora_train import train_lora
from gemma_core.models import default_cache_dir
from gemma_core.preset_cache import ensure_converted


def main(seed: int, overrides: list[str]) -> None:
    cfg = load_config(overrides=["data.prompt_format=gemma_chat", f"train.seed={seed}", *overrides])
    out = Path(tempfile.mkdtemp(prefix="diag-chat-"))
    prepared = format_dolly_to_parquet(cfg.data, out / "data")
    train = read_split(prepared.train_path)
    held_out = read_split(prepared.eval_path).head(cfg.evaluation.num_prompts)
    model = keras_hub.models.CausalLM.from_preset(str(ensure_converted(default_cache_dir())))
    train_lora(model, list(train["prompt"]), list(train["completion"]), cfg.train, cfg.lora, out / "train",
               run_identity={"model_id": "gemma3-270m", "data_hash": prepared.content_hash,
                             "prompt_format": "gemma_chat"})
    room = cfg.generation.model_copy(update={"max_new_tokens": cfg.train.sequence_length})
    report = evaluate_model(model, held_out, room, cfg.train.sequence_length)
    print("seed", seed, overrides, "end_of_turn_rate", report.overall["end_of_turn_rate"],
          "tuned loss", report.overall["completion_loss"])
    for i, row in enumerate(report.rows):
        if row["ended_by"] != "end_of_turn":
            print(f"--- {i} ended by {row['ended_by']} ({row['category']}): {row['answer'][:300]!r}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0, sys.argv[2:])
