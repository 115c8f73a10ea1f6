"""GGUF export: the merged model written for llama.cpp, read back through the project's own GGUF path.

The read-back is :func:`gemma_core.preset_cache.convert_gguf_to_preset` (GGUF -> Hugging Face folder ->
keras-hub), the path the embedded model takes, so a wrong name, layout, norm offset or metadata field
shows up as different logits.
"""

from pathlib import Path

import keras_hub
import numpy as np
import pytest

from gemma_core.config import ConfigError, GenerationConfig, load_config
from gemma_core.gguf_export import (
    CHAT_TEMPLATE,
    OLLAMA_CHAT_TEMPLATE,
    GGUFExportError,
    export_gguf_bundle,
    modelfile_text,
    write_gguf,
)
from gemma_core.preset_cache import convert_gguf_to_preset
from gemma_core.prompts import chat_prompt
from gemma_core.token_rows import TURN_TOKENS, enable_token_rows, token_ids_for

PROMPTS = ["Instruction:\nName a primary colour.\n\nResponse:\n", "The capital of France is",
           "<start_of_turn>user\nWho wrote it?<end_of_turn>\n<start_of_turn>model\n", "one two three"]
GREEDY_STEPS = 8


@pytest.fixture(scope="module")
def tuned_tiny(tiny_preset):
    """The tiny Gemma with rank-2 adapters on query and value whose A and B are both non-zero, and
    trained-looking embedding rows for the turn markers (gemma_chat's trainable tokens)."""
    model = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    model.backbone.enable_lora(2)
    rng = np.random.default_rng(7)
    moved = 0
    for variable in model.backbone.weights:
        if "lora_kernel" in variable.path:
            variable.assign(rng.normal(0.0, 0.2, size=tuple(variable.shape)).astype("float32"))
            moved += 1
    assert moved == 2 * 2 * model.backbone.num_layers  # a and b, query and value, every layer
    rows = enable_token_rows(model.backbone, token_ids_for(model.preprocessor.tokenizer, TURN_TOKENS))
    rows.row_deltas.assign(rng.normal(0.0, 0.2, size=tuple(rows.row_deltas.shape)).astype("float32"))
    return model


def _inputs(model, texts):
    tokenizer = model.preprocessor.tokenizer
    rows = [[tokenizer.token_to_id("<bos>")] + list(np.asarray(tokenizer(t))) for t in texts]
    width = max(map(len, rows))
    ids = np.array([r + [0] * (width - len(r)) for r in rows], "int32")
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], bool)
    return {"token_ids": ids, "padding_mask": mask}


def _logits(model, texts):
    inputs = _inputs(model, texts)
    return np.asarray(model(inputs), dtype=np.float64), inputs["padding_mask"]


def _greedy(model, texts, steps=GREEDY_STEPS):
    """Greedy continuation ids of each text: a full forward pass per step at one fixed padded width, so
    the model compiles once and nothing but the weights differs between the two sides."""
    tokenizer = model.preprocessor.tokenizer
    rows = [[tokenizer.token_to_id("<bos>")] + list(np.asarray(tokenizer(t))) for t in texts]
    width = max(map(len, rows)) + steps
    for _ in range(steps):
        ids = np.array([r + [0] * (width - len(r)) for r in rows], "int32")
        mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], bool)
        logits = np.asarray(model({"token_ids": ids, "padding_mask": mask}))
        for i, row in enumerate(rows):
            row.append(int(np.argmax(logits[i, len(row) - 1])))
    return [row[-steps:] for row in rows]


def _read_back(gguf_path: Path, work: Path):
    preset = convert_gguf_to_preset(gguf_path, work / "preset", work_dir=work)
    return keras_hub.models.CausalLM.from_preset(str(preset))


def _relative_error(actual, expected, mask):
    diff, ref = (actual - expected)[mask], expected[mask]
    return float(np.linalg.norm(diff) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def exported(tuned_tiny, tmp_path_factory):
    """quant -> (GGUF path, read-back model), each written once for the module."""
    out = {}
    for quant in ("f32", "f16", "bf16", "q8_0"):
        work = tmp_path_factory.mktemp(f"gguf-{quant}")
        path = write_gguf(tuned_tiny, work / f"model-{quant}.gguf", quant)
        out[quant] = (path, _read_back(path, work))
    return out


def test_gguf_export_f32_gives_the_merged_models_logits(tuned_tiny, exported, tiny_preset):
    expected, mask = _logits(tuned_tiny, PROMPTS)
    actual, _ = _logits(exported["f32"][1], PROMPTS)
    assert _relative_error(actual, expected, mask) <= 1e-5
    # The adapter is in the file: the base model's logits are far from the tuned ones.
    base, _ = _logits(keras_hub.models.CausalLM.from_preset(str(tiny_preset)), PROMPTS)
    assert _relative_error(base, expected, mask) > 1e-2


@pytest.mark.parametrize("quant, bound", [
    # Relative logit error (norm of the difference over the norm of the merged model's logits, on PROMPTS)
    # measured on this tiny model, jax backend, 2026-12-01: f16 7.2e-4, bf16 5.4e-3, q8_0 1.7e-2. The
    # tiny model's logits are small (weights N(0, 0.02)), so q8_0's per-block rounding weighs more than
    # on a real model; the bounds leave about 2x room.
    ("f16", 2e-3), ("bf16", 1.2e-2), ("q8_0", 4e-2),
])
def test_gguf_export_quantized_keeps_the_greedy_tokens(tuned_tiny, exported, quant, bound):
    model = exported[quant][1]
    expected, mask = _logits(tuned_tiny, PROMPTS)
    actual, _ = _logits(model, PROMPTS)
    error = _relative_error(actual, expected, mask)
    assert 0 < error <= bound, f"{quant}: relative logit error {error:.2e}"  # 0 would mean nothing was quantized
    assert _greedy(model, PROMPTS) == _greedy(tuned_tiny, PROMPTS), f"{quant}: greedy tokens differ"


def test_gguf_export_metadata_passes_ggufs_reader(tuned_tiny, exported):
    import gguf

    reader = gguf.GGUFReader(str(exported["q8_0"][0]))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    backbone, tokenizer = tuned_tiny.backbone, tuned_tiny.preprocessor.tokenizer
    assert field("general.architecture") == "gemma3"
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field("gemma3.block_count") == backbone.num_layers
    assert field("gemma3.embedding_length") == backbone.hidden_dim
    assert field("gemma3.attention.head_count") == backbone.num_query_heads
    assert field("gemma3.attention.head_count_kv") == backbone.num_key_value_heads
    assert field("gemma3.attention.key_length") == backbone.head_dim
    assert field("gemma3.attention.sliding_window") == backbone.sliding_window_size
    assert field("gemma3.context_length") == 32768
    assert field("gemma3.rope.freq_base") == 1_000_000.0
    for key, token in (("bos", "<bos>"), ("eos", "<eos>"), ("unknown", "<unk>"), ("padding", "<pad>"),
                       ("eot", "<end_of_turn>")):
        assert field(f"tokenizer.ggml.{key}_token_id") == tokenizer.token_to_id(token)
    assert len(field("tokenizer.ggml.tokens")) == tokenizer.vocabulary_size()
    types = field("tokenizer.ggml.token_type")
    assert types[tokenizer.token_to_id("<end_of_turn>")] == gguf.TokenType.CONTROL
    assert field("tokenizer.chat_template") == CHAT_TEMPLATE
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert all(kind == gguf.GGMLQuantizationType.F32 for name, kind in kinds.items() if "norm" in name)
    assert "output.weight" not in kinds  # tied to token_embd


def test_gguf_export_chat_templates_render_chat_prompts_turns():
    import jinja2

    turns = [("user", "Hi"), ("model", "Hello."), ("user", "Name a colour.")]
    messages = [{"role": "assistant" if role == "model" else role, "content": text} for role, text in turns]
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    rendered = template.render(messages=messages, add_generation_prompt=True, bos_token="<bos>")
    assert rendered == "<bos>" + chat_prompt(turns)
    with_system = template.render(messages=[{"role": "system", "content": "Be brief."}] + messages[:1],
                                  add_generation_prompt=True, bos_token="")
    assert with_system == chat_prompt([("user", "Be brief.\n\nHi")])

    # Ollama renders its TEMPLATE once per (prompt, response) pair; the answer being generated is cut at .Response.
    def ollama(prompt, response=None):
        text = OLLAMA_CHAT_TEMPLATE.replace("{{ .Prompt }}", prompt)
        return text.split("{{ .Response }}")[0] if response is None else text.replace("{{ .Response }}", response)

    assert ollama("Hi", "Hello.") + ollama("Name a colour.") == chat_prompt(turns)


def test_gguf_export_modelfile_has_stops_and_the_configs_sampler():
    greedy = modelfile_text("model-q8_0.gguf", GenerationConfig(max_new_tokens=48), "gemma_chat")
    assert "FROM ./model-q8_0.gguf" in greedy
    assert 'PARAMETER stop "<end_of_turn>"' in greedy and 'PARAMETER stop "<eos>"' in greedy
    assert "PARAMETER temperature 0" in greedy and "PARAMETER num_predict 48" in greedy
    top_p = modelfile_text("m.gguf", GenerationConfig(sampler="top_p", top_p=0.8, temperature=0.7), "gemma_chat")
    assert "PARAMETER top_p 0.8" in top_p and "PARAMETER temperature 0.7" in top_p and "PARAMETER top_k 0" in top_p
    instruction = modelfile_text("m.gguf", GenerationConfig(), "instruction")
    assert 'TEMPLATE """Instruction:\n{{ .Prompt }}\n\nResponse:\n{{ .Response }}"""' in instruction


def test_gguf_export_bundle_writes_gguf_modelfile_and_readme(tuned_tiny, tmp_path):
    paths = export_gguf_bundle(tuned_tiny, tmp_path, "f16", GenerationConfig(), "instruction")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "README.md", "model-f16.gguf"]
    assert "llama-cli -m model-f16.gguf" in paths["gguf_readme"].read_text()
    assert "ollama create" in paths["gguf_readme"].read_text()


def test_gguf_export_refuses_a_bad_quant_and_an_existing_target(tuned_tiny, tmp_path):
    with pytest.raises(GGUFExportError, match=r"'q4_k'.*f32, f16, bf16, q8_0"):
        write_gguf(tuned_tiny, tmp_path / "m.gguf", "q4_k")
    with pytest.raises(ConfigError, match=r"export.quant = 'q4_k'"):
        load_config(overrides=["export.quant=q4_k"])
    with pytest.raises(ConfigError, match=r"export.format = 'onnx'"):
        load_config(overrides=["export.format=onnx"])
    target = tmp_path / "m.gguf"
    target.write_bytes(b"someone's file")
    with pytest.raises(GGUFExportError, match=r"m.gguf exists; pass --overwrite"):
        write_gguf(tuned_tiny, target, "f32")
    assert target.read_bytes() == b"someone's file"
    write_gguf(tuned_tiny, target, "f32", overwrite=True)
    assert target.read_bytes()[:4] == b"GGUF"


def test_gguf_export_token_embedding_quant_changes_only_token_embd(tuned_tiny, exported, tmp_path):
    """The bench's q8_0 variants (bench/RESULTS.md): token_embd, the tied embedding and output head, in
    another type; every other tensor as in the plain q8_0 file. A bad type is refused like a bad quant."""
    import gguf

    def types(path):
        return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}

    plain = types(exported["q8_0"][0])
    assert plain["token_embd.weight"] == "Q8_0"
    for embedding_quant in ("f16", "f32"):
        variant = types(write_gguf(tuned_tiny, tmp_path / f"m-{embedding_quant}.gguf", "q8_0",
                                   token_embedding_quant=embedding_quant))
        assert variant.pop("token_embd.weight") == embedding_quant.upper()
        assert variant == {name: kind for name, kind in plain.items() if name != "token_embd.weight"}
    with pytest.raises(GGUFExportError, match=r"'q4_k'.*f32, f16, bf16, q8_0"):
        write_gguf(tuned_tiny, tmp_path / "bad.gguf", "q8_0", token_embedding_quant="q4_k")


def test_gguf_export_leaves_no_half_written_file(tuned_tiny, tmp_path, monkeypatch):
    import gemma_core.gguf_export as gguf_export

    real_encode, calls = gguf_export._encode, []

    def fail_midway(array, quant, is_norm):  # a failure after some tensors were already added
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real_encode(array, quant, is_norm)

    monkeypatch.setattr(gguf_export, "_encode", fail_midway)
    with pytest.raises(OSError):
        write_gguf(tuned_tiny, tmp_path / "out" / "m.gguf", "q8_0")
    assert list((tmp_path / "out").iterdir()) == []


def test_gguf_export_refuses_a_model_llama_cpp_would_run_differently(tiny_preset, tmp_path):
    model = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    config = {**model.backbone.get_config(), "final_logit_soft_cap": 30.0}
    capped = keras_hub.models.Gemma3CausalLM(backbone=type(model.backbone).from_config(config),
                                             preprocessor=model.preprocessor)
    with pytest.raises(GGUFExportError, match="final_logit_soft_cap=30.0"):
        write_gguf(capped, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_export_cli_refuses_an_unknown_format_or_quant(capsys):
    from flows.cli import build_parser

    for argv, value in ((["export", "--quant", "q4_k"], "'q4_k'"), (["export", "--format", "onnx"], "'onnx'")):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"invalid choice: {value}" in err
    assert "f32" in err or "keras" in err  # the allowed values are listed


@pytest.fixture(scope="module")
def tiny_run(tiny_preset, tmp_path_factory):
    """One tiny pipeline run (outside any test's output capture: Prefect's console keeps the stream)."""
    from tests.helpers.in_process import run_pipeline
    from tests.helpers.tiny_config import tiny_pipeline_config

    root = tmp_path_factory.mktemp("gguf-run")
    cfg = tiny_pipeline_config(tiny_preset, root / "runs")
    state, _ = run_pipeline(cfg, str(root / "results"))
    assert state.is_completed(), state.message
    return cfg, root


def test_gguf_export_cli_writes_the_last_runs_model_as_gguf(tiny_preset, tiny_run, capsys):
    """After the tiny pipeline, ``gemma-lora export --run latest --format gguf --quant q8_0``: the GGUF holds
    the run's adapter (its greedy tokens are the tuned model's); a rerun is cached."""
    from flows.cli import main
    from gemma_core.config import validate_config

    cfg, tmp_path = tiny_run
    argv = ["export", "--run", "latest", "--format", "gguf", "--quant", "q8_0", "--set", f"output.root={tmp_path / 'runs'}"]
    assert main(argv) == 0
    lines = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines() if line.strip())
    assert set(lines) == {"gguf", "modelfile", "gguf_readme"}
    gguf_path = Path(lines["gguf"])
    assert gguf_path.name == "model-q8_0.gguf" and gguf_path.parent == Path(lines["modelfile"]).parent
    prompt_format = validate_config(cfg).data.prompt_format  # the adapter's: the run trained in it
    assert f"FROM ./{gguf_path.name}" in Path(lines["modelfile"]).read_text()
    assert f"`{prompt_format}` prompt format" in Path(lines["gguf_readme"]).read_text()

    from flows.storage import read_latest
    from gemma_core.config import LoraConfig
    from gemma_core.models import load_model
    from tasks.results import TrainOutput

    adapter = TrainOutput.model_validate(read_latest(tmp_path / "runs")["results"]["train"]).adapter()
    tuned = load_model(str(tiny_preset), None, lora=LoraConfig(**adapter.lora), adapter=adapter.path)
    expected, mask = _logits(tuned, PROMPTS)
    actual, _ = _logits(_read_back(gguf_path, tmp_path / "back"), PROMPTS)
    assert _relative_error(actual, expected, mask) <= 4e-2  # q8_0, as in the tiny-model test above
    assert _greedy(_read_back(gguf_path, tmp_path / "back2"), PROMPTS) == _greedy(tuned, PROMPTS)

    mtime = gguf_path.stat().st_mtime_ns
    assert main(argv) == 0  # cached: the same paths, the file untouched
    assert Path(dict(l.split(maxsplit=1) for l in capsys.readouterr().out.splitlines() if l.strip())["gguf"]) == gguf_path
    assert gguf_path.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_gguf_export_of_the_untuned_270m_equals_the_embedded_conversion(gemma3_270m, tmp_path):
    """The embedded 270M, exported as f32 without an adapter, converts (gguf_convert: config, tokenizer,
    weights) to exactly what the embedded GGUF converts to: the preset the project loads."""
    import gguf

    from gemma_core.gguf_convert import dequantized_weights, hf_config_from_gguf, sentencepiece_proto_from_gguf
    from gemma_core.preset_cache import embedded_gguf_path

    ours = gguf.GGUFReader(str(write_gguf(gemma3_270m, tmp_path / "base-f32.gguf", "f32")))
    embedded = gguf.GGUFReader(str(embedded_gguf_path()))
    config = hf_config_from_gguf(embedded)
    assert hf_config_from_gguf(ours) == config
    assert sentencepiece_proto_from_gguf(ours) == sentencepiece_proto_from_gguf(embedded)
    layers = config["num_hidden_layers"]
    for (name, mine), (same_name, theirs) in zip(dequantized_weights(ours, layers), dequantized_weights(embedded, layers)):
        assert name == same_name
        if name.endswith("norm.weight"):  # (w + 1) - 1 + 1 - 1 in float32: equal to the last bit or one ulp of 1
            np.testing.assert_allclose(mine, theirs, rtol=0, atol=2.5e-7, err_msg=name)
        else:
            np.testing.assert_array_equal(mine, theirs, err_msg=name)
