"""Model specs and the GGUF cache, on the tiny Gemma 3 (seconds, no network, no 270M conversion).

The converter is exercised end to end on a tiny GGUF written the way llama.cpp writes Gemma 3
(norms stored as w + 1, chat markers typed CONTROL): converting it must give back the tiny model's
exact logits and tokens. The real 270M is covered by tests/test_gemma3_270m.py (slow).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gemma_core import preset_cache
from gemma_core.config import EMBEDDED_MODEL
from gemma_core.gguf_convert import ConversionError
from gemma_core.manifest import read_manifest, sha256_file
from gemma_core.preset_cache import PRESET_MANIFEST as MANIFEST_FILE, ensure_converted
from gemma_core.models import CACHE_ENV_VAR, ModelResolutionError, default_cache_dir, load_model, resolve_preset

REPO = Path(__file__).resolve().parents[1]
CHAT = "<start_of_turn>user\nName  two   things.<end_of_turn>\n<start_of_turn>model\n"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tests.helpers.tiny_gemma import save_tiny_gemma3_gguf

    return save_tiny_gemma3_gguf(tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf")


@pytest.fixture(scope="module")
def tiny_reference():
    from tests.helpers.tiny_gemma import make_tiny_gemma3

    return make_tiny_gemma3(seed=0)


@pytest.fixture
def no_kaggle_credentials(monkeypatch, tmp_path):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _logits(model, token_ids):
    ids = np.array([token_ids], dtype="int32")
    return np.asarray(model({"token_ids": ids, "padding_mask": np.ones_like(ids)}), dtype=np.float64)


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)


# --- the tiny model through load_model -------------------------------------------------------------

def test_tiny_preset_resolves_generates_and_trains(tiny_preset):
    import keras

    model = load_model(str(tiny_preset))
    assert type(model).__name__ == "Gemma3CausalLM"
    model.compile(sampler="greedy")
    text = model.generate("Instruction:\nName a colour.\n\nResponse:\n", max_length=24)
    assert text.startswith("Instruction:\nName a colour.")

    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), weighted_metrics=[])
    before = np.asarray(model.backbone.token_embedding.embeddings).copy()
    history = model.fit({"prompts": ["The capital of France is"] * 2, "responses": [" Paris."] * 2},
                        batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.array_equal(before, np.asarray(model.backbone.token_embedding.embeddings))


def test_tiny_model_is_a_function_of_its_seed(tiny_reference):
    from tests.helpers.tiny_gemma import make_tiny_gemma3

    other_seed = make_tiny_gemma3(seed=1)
    ids = [2, 40, 41, 42]
    assert not np.allclose(_logits(tiny_reference.backbone, ids), _logits(other_seed.backbone, ids))
    same_seed = make_tiny_gemma3(seed=0)
    np.testing.assert_array_equal(_logits(tiny_reference.backbone, ids), _logits(same_seed.backbone, ids))


def test_tiny_tokenizer_keeps_chat_markers_whole(tiny_reference):
    tokenizer = tiny_reference.preprocessor.tokenizer
    ids = np.asarray(tokenizer("<start_of_turn>user\nhi<end_of_turn>")).tolist()
    assert ids[0] == tokenizer.token_to_id("<start_of_turn>")
    assert tokenizer.token_to_id("<end_of_turn>") in ids
    assert [tokenizer.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>")] == [0, 1, 2]


# --- spec errors ----------------------------------------------------------------------------------------

def test_unknown_spec_lists_the_accepted_forms_and_a_close_name():
    with pytest.raises(ModelResolutionError) as err:
        resolve_preset("gemma3_1bb")
    message = str(err.value)
    assert "'gemma3_1bb'" in message
    assert "Did you mean 'gemma3_1b'" in message
    for form in (EMBEDDED_MODEL, "hf://org/name", "keras-hub preset name", "local Keras preset directory"):
        assert form in message


@pytest.mark.parametrize("spec, expected", [
    ("", "model spec is empty"),
    ("embedded:gemma-7b", "embedded models: 'embedded:gemma3-270m'"),
    ("hf://no-org-here", "must look like 'hf://org/name'"),
])
def test_malformed_specs_say_what_is_wrong(spec, expected):
    with pytest.raises(ModelResolutionError, match=expected):
        resolve_preset(spec)


def test_missing_local_path_and_non_preset_dir(tmp_path):
    with pytest.raises(ModelResolutionError, match="does not exist"):
        resolve_preset(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelResolutionError, match="no config.json"):
        resolve_preset(str(tmp_path / "empty"))


def test_kaggle_preset_without_credentials_fails_at_once_naming_both_fixes(no_kaggle_credentials):
    started = time.perf_counter()
    with pytest.raises(ModelResolutionError) as err:
        resolve_preset("gemma3_1b")
    assert time.perf_counter() - started < 5
    message = str(err.value)
    assert "'gemma3_1b'" in message and "no Kaggle credentials" in message
    for fix in ("KAGGLE_USERNAME", "KAGGLE_KEY", "kaggle.json", EMBEDDED_MODEL, "local Keras preset directory"):
        assert fix in message


def test_kaggle_preset_with_credentials_but_offline(no_kaggle_credentials, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef")
    monkeypatch.setenv("GEMMA_LORA_OFFLINE", "1")
    with pytest.raises(ModelResolutionError) as err:
        resolve_preset("gemma3_instruct_1b")
    assert "www.kaggle.com cannot be reached" in str(err.value)
    assert EMBEDDED_MODEL in str(err.value)


@pytest.mark.parametrize("env", ["GEMMA_LORA_OFFLINE", "HF_HUB_OFFLINE"])
def test_hf_spec_offline_fails_fast_with_the_alternatives(monkeypatch, env):
    monkeypatch.setenv(env, "1")
    started = time.perf_counter()
    with pytest.raises(ModelResolutionError) as err:
        resolve_preset("hf://google/gemma-3-1b-pt")
    assert time.perf_counter() - started < 5
    message = str(err.value)
    assert "'hf://google/gemma-3-1b-pt'" in message and "huggingface.co cannot be reached" in message
    assert EMBEDDED_MODEL in message and "local Keras preset directory" in message


def test_cache_dir_from_env_var_else_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "models"))
    assert default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv(CACHE_ENV_VAR)
    assert default_cache_dir().name == "gemma-lora-flow"


# --- checksummed presets ----------------------------------------------------------------------------------

@pytest.mark.parametrize("damage, expected", [
    (lambda d: _flip_byte(d / "model.weights.h5"), r"model\.weights\.h5: sha256 differs"),
    (lambda d: os.truncate(d / "model.weights.h5", 1000), r"model\.weights\.h5: 1000 bytes.*partial"),
    (lambda d: (d / "tokenizer.json").unlink(), r"tokenizer\.json: missing"),
    (lambda d: (d / MANIFEST_FILE).write_text("{"), r"missing or unreadable"),
])
def test_damaged_local_preset_is_refused_naming_the_file(tiny_preset, tmp_path, damage, expected):
    preset = shutil.copytree(tiny_preset, tmp_path / "preset")
    assert preset_cache.verify_preset(preset) == []
    damage(preset)
    with pytest.raises(ModelResolutionError, match=expected):
        load_model(str(preset))


# --- GGUF conversion and its cache, on the tiny GGUF -------------------------------------------------------

def test_converted_tiny_gguf_reproduces_the_model(tiny_gguf, tiny_reference, tmp_path):
    preset = ensure_converted(tmp_path / "cache", tiny_gguf)
    converted = load_model(str(preset))
    ids = [2, 5, 100, 200, 300, 6, 10, 400]
    np.testing.assert_allclose(_logits(converted.backbone, ids), _logits(tiny_reference.backbone, ids),
                               rtol=1e-5, atol=1e-6)
    ours, theirs = converted.preprocessor.tokenizer, tiny_reference.preprocessor.tokenizer
    for text in (CHAT, "Plain English, 42 words.", "emoji 😀 and é", ""):
        assert np.asarray(ours(text)).tolist() == np.asarray(theirs(text)).tolist(), text
    manifest = read_manifest(preset, preset_cache.PRESET_MANIFEST)
    assert manifest["source_sha256"] == sha256_file(tiny_gguf)
    assert manifest["hf_config"]["layer_types"] == ["sliding_attention", "sliding_attention"]


def test_cached_preset_is_reused_without_reconverting(tiny_gguf, tmp_path):
    first = ensure_converted(tmp_path / "cache", tiny_gguf)
    stamp = (first / "model.weights.h5").stat().st_mtime_ns
    second = ensure_converted(tmp_path / "cache", tiny_gguf)
    assert second == first
    assert (second / "model.weights.h5").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("damage, reason", [
    (lambda d: _flip_byte(d / "model.weights.h5"), "sha256 differs"),
    (lambda d: os.truncate(d / "model.weights.h5", 10), "partial write"),
    (lambda d: (d / MANIFEST_FILE).unlink(), "missing or unreadable"),
])
def test_corrupted_cache_is_detected_logged_and_rebuilt(tiny_gguf, tmp_path, caplog, damage, reason):
    preset = ensure_converted(tmp_path / "cache", tiny_gguf)
    damage(preset)
    with caplog.at_level(logging.WARNING, logger="gemma_core.preset_cache"):
        rebuilt = ensure_converted(tmp_path / "cache", tiny_gguf)
    assert rebuilt == preset
    assert preset_cache.verify_preset(rebuilt) == []
    assert any("rebuilding" in r.getMessage() and reason in r.getMessage() for r in caplog.records), caplog.text
    assert not [p for p in rebuilt.parent.iterdir() if p.name.startswith(".")], "leftover temporary directories"


def test_a_second_publisher_keeps_the_first_complete_preset(tiny_gguf, tmp_path):
    target = ensure_converted(tmp_path / "cache", tiny_gguf)
    stamp = (target / "model.weights.h5").stat().st_mtime_ns
    preset_cache.convert_gguf_to_preset(tiny_gguf, target, work_dir=tmp_path / "cache")
    assert (target / "model.weights.h5").stat().st_mtime_ns == stamp
    assert preset_cache.verify_preset(target) == []
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == [target.name]


def test_gguf_hash_is_memoised_by_path_size_and_mtime(tiny_gguf, tmp_path):
    gguf = Path(shutil.copy2(tiny_gguf, tmp_path / "copy.gguf"))
    digest = preset_cache.gguf_sha256(gguf, tmp_path / "cache")
    assert digest == sha256_file(gguf)
    stat = gguf.stat()
    _flip_byte(gguf)  # same size; put the old mtime back: the memo cannot tell, by design
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert preset_cache.gguf_sha256(gguf, tmp_path / "cache") == digest
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert preset_cache.gguf_sha256(gguf, tmp_path / "cache") == sha256_file(gguf) != digest


def test_non_gemma3_gguf_is_refused(tmp_path):
    import gguf

    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConversionError, match="architecture is 'llama'"):
        ensure_converted(tmp_path / "cache", path)
    assert not list((tmp_path / "cache" / "presets").glob("llama-*-v*/"))


_CONVERT = """
import sys
from pathlib import Path
from gemma_core.preset_cache import ensure_converted, verify_preset
preset = ensure_converted(Path(sys.argv[1]), Path(sys.argv[2]))
print(preset, verify_preset(preset))
"""


@pytest.mark.slow
def test_two_processes_converting_at_once_leave_one_good_preset(tiny_gguf, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _CONVERT, str(cache), str(tiny_gguf)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    presets = {out.split()[0] for out, _ in outputs}
    assert len(presets) == 1 and all(out.strip().endswith("[]") for out, _ in outputs)
    published = [p for p in (cache / "presets").iterdir() if not p.name.endswith(".lock")]
    assert [p.name for p in published] == [Path(presets.pop()).name]
    assert json.loads((published[0] / MANIFEST_FILE).read_text())["files"]
