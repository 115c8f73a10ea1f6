"""Why does the 270M tuned in gemma_chat end with <eos> instead of <end_of_turn>? Teacher-forced look at the
position where <end_of_turn> is the target, after training with several settings."""
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
import gemma_core  # noqa: F401,E402  (backend defaults before Keras loads)
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path
from gemma_core.preset_cache import ensure_converted
from gemma_core.models import default_cache_dir
from gemma_core.config import load_config
from gemma_core.dolly_prepare import format_dolly_to_parquet, read_split
from gemma_core.encoding import encode_examples
from gemma_core.lora_train import train_lora
preset = str(ensure_converted(default_cache_dir()))
cfg = load_config(overrides=["data.prompt_format=gemma_chat"])
tmp = Path(tempfile.mkdtemp())
prep = format_dolly_to_parquet(cfg.data, tmp / "data")
train, held = read_split(prep.train_path), read_split(prep.eval_path).head(16)

def probe(model, label):
    ex = encode_examples(model.preprocessor, list(held["prompt"]), list(held["completion"]), 128)
    pre, model.preprocessor = model.preprocessor, None
    logits = np.asarray(model.predict_on_batch({"token_ids": ex.token_ids, "padding_mask": ex.padding_mask}), dtype=np.float64)
    model.preprocessor = pre
    rows, cols = np.nonzero((ex.labels == 106) & (ex.sample_weight > 0))
    picked = logits[rows, cols]; picked = np.exp(picked - picked.max(-1, keepdims=True)); picked /= picked.sum(-1, keepdims=True)
    top = picked.argmax(-1)
    print(json.dumps({"run": label, "n": len(rows), "p_eot": round(float(picked[:, 106].mean()), 4),
                      "p_eos": round(float(picked[:, 1].mean()), 4),
                      "argmax_eot": int((top == 106).sum()), "argmax_eos": int((top == 1).sum())}), flush=True)

base = keras_hub.models.CausalLM.from_preset(preset)
emb = np.asarray(base.backbone.token_embedding.embeddings.numpy())
norms = np.linalg.norm(emb, axis=1)
print("embedding norms: eot", norms[106], "eos", norms[1], "median", np.median(norms), flush=True)
probe(base, "base")
del base
for label, overrides in (("default lr5e-4 40 steps", {}), ("lr 2e-3 40 steps", {"learning_rate": 2e-3})):
    t = time.perf_counter()
    m = keras_hub.models.CausalLM.from_preset(preset)
    tc = cfg.train.model_copy(update=overrides)
    # LoRA alone, as measured before the turn markers' rows trained too (lora.trainable_tokens).
    r = train_lora(m, list(train["prompt"]), list(train["completion"]), tc, cfg.lora.model_copy(update={"trainable_tokens": ()}),
                   tmp / label.replace(" ", "_"),
                   run_identity={"model_id": "x", "data_hash": "y", "prompt_format": "gemma_chat"})
    probe(m, f"{label} ({r.steps} steps, {time.perf_counter() - t:.0f} s, final loss {r.losses[-1]:.3f})")
    del m
