"""Export: adapter, merged preset, Hugging Face safetensors that hold exactly base + adapter delta."""

from pathlib import Path

import keras_hub
import numpy as np
from safetensors.numpy import load_file

from gemma_core.config import LoraConfig, TrainConfig
from gemma_core.export import export_all, export_transformers
from gemma_core.lora_train import train_lora


def hf_layout(kernel):
    """keras-hub's (heads, hidden, head_dim) attention kernel as Hugging Face's (heads*head_dim, hidden)."""
    heads, hidden, head_dim = kernel.shape
    return kernel.transpose(1, 0, 2).reshape(hidden, heads * head_dim).T


def test_exports_hold_base_plus_adapter_delta(tiny_preset, sample_splits, tmp_path):
    train, evaluation = sample_splits
    model = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    train_lora(model, list(train["prompt"][:8]), list(train["response"][:8]),
               TrainConfig(max_steps=3, batch_size=2, sequence_length=64, learning_rate=5e-2),
               LoraConfig(rank=2), tmp_path / "train", {"model_id": "tiny", "data_hash": "d"})
    paths = export_all(model, tmp_path / "export")
    base = load_file(str(export_transformers(tiny_preset, tmp_path / "base_hf") / "model.safetensors"))
    tuned = load_file(str(paths["transformers"] / "model.safetensors"))
    assert base.keys() == tuned.keys()

    changed = set()
    for i in range(model.backbone.num_layers):
        attention = model.backbone.get_layer(f"decoder_block_{i}").attention
        for layer, name in ((attention.query_dense, "q_proj"), (attention.value_dense, "v_proj")):
            a, b = np.asarray(layer.lora_kernel_a), np.asarray(layer.lora_kernel_b)
            delta = (layer.lora_alpha / layer.lora_rank) * np.einsum("ndr,rh->ndh", a, b)
            assert np.abs(delta).max() > 1e-4, "training must have moved the adapter"
            key = f"model.layers.{i}.self_attn.{name}.weight"
            np.testing.assert_allclose(tuned[key] - base[key], hf_layout(delta), atol=1e-6)
            changed.add(key)
    for key in base.keys() - changed:
        np.testing.assert_array_equal(base[key], tuned[key], err_msg=f"{key} must be untouched")

    # The adapter alone, on a fresh base model, and the merged preset reproduce the tuned logits.
    inputs = {"token_ids": np.array([[2, 10, 11, 12]], "int32"), "padding_mask": np.ones((1, 4), bool)}
    expected = np.asarray(model(inputs))
    fresh = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    fresh.backbone.load_lora_weights(str(paths["adapter"]))
    np.testing.assert_allclose(np.asarray(fresh(inputs)), expected, atol=1e-5)
    merged = keras_hub.models.CausalLM.from_preset(str(paths["keras_preset"]))
    np.testing.assert_allclose(np.asarray(merged(inputs)), expected, atol=1e-5)


def test_export_stage_keeps_what_the_adapter_was_trained_on(tiny_preset, sample_splits, tmp_path):
    """The exported adapter carries its training identity (adapter.manifest.json), so `generate --model
    EXPORT_DIR` knows its prompt format and base model as it does for the training directory."""
    from flows.model_choice import _training_identity
    from gemma_core.checkpoints import adapter_identity
    from gemma_core.config import ExportConfig, GenerationConfig
    from tasks.export import export_model
    from tasks.results import AdapterRef, FileRef, ModelResult

    train, _ = sample_splits
    model = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    trained = train_lora(model, list(train["prompt"][:4]), list(train["response"][:4]),
                         TrainConfig(max_steps=1, batch_size=2, sequence_length=64), LoraConfig(rank=2),
                         tmp_path / "train", {"model_id": "tiny", "data_hash": "d", "prompt_format": "gemma_chat"})
    base = ModelResult(stage="resolve-model", fingerprint="tiny", files={}, seconds=0.0, peak_rss_mb=0.0,
                       spec=str(tiny_preset), preset_dir=str(tiny_preset), model_hash="tiny")
    adapter = AdapterRef(file=FileRef.of(trained.adapter_path), lora={"rank": 2, "target_layer_names": None},
                         prompt_format="gemma_chat")
    out = export_model.fn(base, adapter, str(tmp_path / "runs"), ExportConfig(), GenerationConfig())

    exported = Path(out.exports["adapter"])
    assert "adapter.manifest.json" in out.files
    assert adapter_identity(exported) == adapter_identity(trained.adapter_path)
    assert _training_identity(exported)["prompt_format"] == "gemma_chat"
    exported.write_bytes(exported.read_bytes() + b"changed")  # a changed file is vouched for no more
    assert adapter_identity(exported) is None
