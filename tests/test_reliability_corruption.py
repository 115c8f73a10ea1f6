"""Corrupted and truncated files on disk: a training checkpoint, the cached Parquet of the data stage,
the converted model cache, the JAX compilation cache. (A persisted Prefect task result is in
test_reliability_pipeline.py, which runs the flow.)

Each damage is real: bytes cut off, a byte flipped, a file deleted, a manifest rewritten as valid JSON of
the wrong shape. Each must be detected (checksum or schema), never loaded as if it were good; the stage
falls back (the previous checkpoint) or rebuilds, and the log names the file and the reason.
Extends tests/test_lora_train.py (truncated adapter), tests/test_dolly_data.py (truncated train.parquet)
and tests/test_models.py (flipped/truncated weights, deleted manifest) without repeating them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import keras_hub
import numpy as np
import pytest

from gemma_core import preset_cache
from gemma_core.manifest import read_manifest
from gemma_core.checkpoints import latest_valid_checkpoint
from gemma_core.config import DataConfig, LoraConfig, TrainConfig
from gemma_core.dolly_prepare import format_dolly_to_parquet, read_prepared
from gemma_core.lora_train import train_lora

IDENTITY = {"model_id": "tiny", "data_hash": "corruption"}
CFG = TrainConfig(max_steps=6, epochs=3, batch_size=2, sequence_length=64, learning_rate=1e-2, checkpoint_every=2,
                  keep_checkpoints=3)


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "emptied": lambda p: os.truncate(p, 0),
    "cut in half": lambda p: os.truncate(p, p.stat().st_size // 2),
    "last byte cut": lambda p: os.truncate(p, p.stat().st_size - 1),
    "byte flipped": flip_byte,
    "deleted": lambda p: p.unlink(),
}
WRONG_SHAPES = {
    "empty object": "{}",
    "array": "[]",
    "null": "null",
    "no checksums": None,  # filled per case: the real manifest with its map of files emptied
}


def adapter_arrays(path: Path) -> dict[str, np.ndarray]:
    import h5py

    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, np.asarray(obj)) if hasattr(obj, "shape") else None)
    return arrays


# --- checkpoints -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_preset, sample_splits, tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at steps 2, 4 and 6."""
    train, _ = sample_splits
    data = list(train["prompt"][:10]), list(train["response"][:10])
    out = tmp_path_factory.mktemp("trained")
    model = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    result = train_lora(model, *data, CFG, LoraConfig(), out, IDENTITY)
    identity = json.loads((out / "checkpoints" / "step-00000006" / "manifest.json").read_text())["identity"]
    return {"dir": out, "data": data, "result": result, "identity": identity}


def damaged_copy(trained, tmp_path) -> Path:
    root = tmp_path / "checkpoints"
    shutil.copytree(trained["dir"] / "checkpoints", root)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004", "step-00000006"]
    return root


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", ["adapter.lora.h5", "optimizer.npz", "manifest.json"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, caplog, name, damage):
    root = damaged_copy(trained, tmp_path)
    DAMAGES[damage](root / "step-00000006" / name)
    with caplog.at_level(logging.WARNING, logger="gemma_core.checkpoints"):
        found = latest_valid_checkpoint(root, trained["identity"])
    assert found is not None and found.step == 4
    warning = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(warning) == 1 and "step-00000006" in warning[0]
    # The reason names the file: the damaged one, or the manifest that can no longer vouch for it.
    assert name in warning[0] or "manifest.json" in warning[0], warning[0]


@pytest.mark.parametrize("shape", WRONG_SHAPES)
def test_checkpoint_manifest_rewritten_as_wrong_json_is_skipped(trained, tmp_path, caplog, shape):
    root = damaged_copy(trained, tmp_path)
    manifest = root / "step-00000006" / "manifest.json"
    text = WRONG_SHAPES[shape]
    if text is None:
        text = json.dumps({**json.loads(manifest.read_text()), "files": {}})
    manifest.write_text(text)
    with caplog.at_level(logging.WARNING, logger="gemma_core.checkpoints"):
        found = latest_valid_checkpoint(root, trained["identity"])
    assert found is not None and found.step == 4
    assert "step-00000006" in caplog.text and "manifest.json" in caplog.text


def test_every_checkpoint_damaged_starts_over_and_says_why_for_each(trained, tmp_path, caplog):
    root = damaged_copy(trained, tmp_path)
    for step, damage in zip((2, 4, 6), ("byte flipped", "cut in half", "deleted")):
        DAMAGES[damage](root / f"step-{step:08d}" / "optimizer.npz")
    with caplog.at_level(logging.WARNING, logger="gemma_core.checkpoints"):
        assert latest_valid_checkpoint(root, trained["identity"]) is None
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 3 and all("optimizer.npz" in m for m in skipped)


def test_resume_past_a_corrupted_optimizer_state_matches_the_uninterrupted_run(trained, tiny_preset, tmp_path, caplog):
    """End to end: the newest checkpoint's optimizer state is flipped; training resumes from the one
    before, redoes two steps, and ends with the uninterrupted run's adapter and losses."""
    out = tmp_path / "train"
    shutil.copytree(trained["dir"] / "checkpoints", out / "checkpoints")
    shutil.copy(trained["dir"] / "train_log.jsonl", out / "train_log.jsonl")
    flip_byte(out / "checkpoints" / "step-00000006" / "optimizer.npz")
    model = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    with caplog.at_level(logging.INFO, logger="gemma_core"):
        resumed = train_lora(model, *trained["data"], CFG, LoraConfig(), out, IDENTITY)
    assert resumed.resumed_from_step == 4
    assert "step-00000006" in caplog.text and "optimizer.npz: sha256 differs" in caplog.text
    np.testing.assert_allclose(resumed.losses, trained["result"].losses, rtol=1e-5, atol=1e-6)
    expected = adapter_arrays(trained["result"].adapter_path)
    got = adapter_arrays(resumed.adapter_path)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, atol=1e-5, err_msg=key)
    assert [json.loads(line)["step"] for line in resumed.log_path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_train_log_with_a_torn_last_line_is_repaired_on_resume(trained, tiny_preset, tmp_path):
    """A process killed mid-write leaves half a JSON line; the resumed run's log is whole again."""
    out = tmp_path / "train"
    shutil.copytree(trained["dir"] / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    lines = (trained["dir"] / "train_log.jsonl").read_text().splitlines()
    (out / "train_log.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])
    model = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    resumed = train_lora(model, *trained["data"], CFG, LoraConfig(), out, IDENTITY)
    records = [json.loads(line) for line in resumed.log_path.read_text().splitlines()]
    assert resumed.resumed_from_step == 4 and [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]


# --- the data stage's cached Parquet ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-cache")
    first = format_dolly_to_parquet(DataConfig(), root)
    data_dir = first.train_path.parent
    return {"root": root, "dir": data_dir, "manifest": json.loads((data_dir / "manifest.json").read_text())}


def _rebuild_after(prepared, tmp_path, caplog, damage_fn) -> tuple:
    root = tmp_path / "out"
    shutil.copytree(prepared["root"], root)
    data_dir = root / prepared["dir"].name
    damage_fn(data_dir)
    with caplog.at_level(logging.WARNING, logger="gemma_core.dolly_prepare"):
        again = format_dolly_to_parquet(DataConfig(), root)
    return data_dir, again


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", ["train.parquet", "eval.parquet", "manifest.json"])
def test_damaged_cached_parquet_is_detected_logged_and_rebuilt(prepared, tmp_path, caplog, name, damage):
    data_dir, again = _rebuild_after(prepared, tmp_path, caplog, lambda d: DAMAGES[damage](d / name))
    warning = [r.getMessage() for r in caplog.records if "is unusable" in r.getMessage()]
    assert len(warning) == 1 and data_dir.name in warning[0] and name in warning[0], caplog.text
    assert "rebuilding" in warning[0]
    # Rebuilt, to the very bytes of the original; nothing of the damaged copy survives.
    assert read_prepared(data_dir) == again
    assert json.loads((data_dir / "manifest.json").read_text())["files"] == prepared["manifest"]["files"]
    assert sorted(p.name for p in data_dir.parent.iterdir()) == [data_dir.name]


@pytest.mark.parametrize("shape", WRONG_SHAPES)
def test_data_manifest_rewritten_as_wrong_json_is_rebuilt(prepared, tmp_path, caplog, shape):
    def damage(data_dir):
        text = WRONG_SHAPES[shape]
        if text is None:  # a manifest that vouches for nothing, next to a damaged train.parquet
            text = json.dumps({**prepared["manifest"], "files": {}})
            flip_byte(data_dir / "train.parquet")
        (data_dir / "manifest.json").write_text(text)

    data_dir, again = _rebuild_after(prepared, tmp_path, caplog, damage)
    assert "manifest.json" in caplog.text and "rebuilding" in caplog.text
    assert json.loads((data_dir / "manifest.json").read_text())["files"] == prepared["manifest"]["files"]
    assert read_prepared(data_dir) == again


# --- the converted model cache ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tests.helpers.tiny_gemma import save_tiny_gemma3_gguf

    return save_tiny_gemma3_gguf(tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf")


@pytest.mark.parametrize("cut", [0.0, 0.1, 0.5, 0.99])
def test_truncated_preset_manifest_is_never_trusted(tiny_preset, tmp_path, cut):
    preset = shutil.copytree(tiny_preset, tmp_path / "preset")
    manifest = preset / preset_cache.PRESET_MANIFEST
    os.truncate(manifest, int(manifest.stat().st_size * cut))
    assert preset_cache.verify_preset(preset) == [f"{preset_cache.PRESET_MANIFEST}: missing or unreadable "
                                                    "(an interrupted or foreign write)"]


@pytest.mark.parametrize("entry", [{}, [], None, "abc", {"size": 1}])
def test_damaged_manifest_entry_is_a_problem_not_a_crash(tiny_preset, tmp_path, entry):
    preset = shutil.copytree(tiny_preset, tmp_path / "preset")
    manifest_path = preset / preset_cache.PRESET_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["model.weights.h5"] = entry
    manifest_path.write_text(json.dumps(manifest))
    problems = preset_cache.verify_preset(preset)
    assert len(problems) == 1 and problems[0].startswith("model.weights.h5: the manifest's entry is damaged")


def test_converted_cache_with_a_damaged_manifest_entry_and_config_is_rebuilt(tiny_gguf, tmp_path, caplog):
    """End to end through ensure_converted: a damaged manifest entry and a truncated config.json
    (the existing tests damage the weights and delete the manifest)."""
    cache = tmp_path / "cache"
    preset = preset_cache.ensure_converted(cache, tiny_gguf)
    good = read_manifest(preset, preset_cache.PRESET_MANIFEST)["files"]
    manifest = json.loads((preset / preset_cache.PRESET_MANIFEST).read_text())
    manifest["files"]["tokenizer.json"] = {"size": "?"}
    (preset / preset_cache.PRESET_MANIFEST).write_text(json.dumps(manifest))
    os.truncate(preset / "config.json", 7)
    with caplog.at_level(logging.WARNING, logger="gemma_core.preset_cache"):
        rebuilt = preset_cache.ensure_converted(cache, tiny_gguf)
    assert rebuilt == preset and preset_cache.verify_preset(rebuilt) == []
    # (The bytes may differ: Keras numbers layer names per process, gemma3_backbone_1, _2, ...)
    assert read_manifest(rebuilt, preset_cache.PRESET_MANIFEST)["files"]["config.json"]["size"] == good["config.json"]["size"]
    assert json.loads((rebuilt / "config.json").read_text())["class_name"] == "Gemma3Backbone"
    message = next(r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage())
    assert "tokenizer.json: the manifest's entry is damaged" in message and "config.json: 7 bytes" in message


# --- the JAX compilation cache (persistent, under the user cache) --------------------------------------------

@pytest.mark.slow
def test_truncated_jax_compilation_cache_entries_are_recompiled(tiny_preset, tmp_path):
    """Every entry of the persistent XLA cache cut in half: the next run warns per entry and recompiles."""
    from helpers import procs

    cache = tmp_path / "jax-cache"
    env = procs.child_env(JAX_COMPILATION_CACHE_DIR=str(cache))
    argv = [procs.sys.executable, str(procs.TRAIN_DRIVER), str(tiny_preset)]
    first = procs.Child([*argv, str(tmp_path / "a"), "--max-steps", "2"], tmp_path / "a.stderr", env)
    assert first.finish() == 0, first.describe()
    first.close()
    entries = [p for p in cache.iterdir() if p.is_file()]
    assert entries
    for entry in entries:
        os.truncate(entry, entry.stat().st_size // 2)
    second = procs.Child([*argv, str(tmp_path / "b"), "--max-steps", "2"], tmp_path / "b.stderr", env)
    assert second.finish() == 0, second.describe()
    second.close()
    assert second.of("done")[0]["losses"] == pytest.approx(first.of("done")[0]["losses"], rel=1e-6)
    assert "Error reading persistent compilation cache entry" in (tmp_path / "b.stderr").read_text()
