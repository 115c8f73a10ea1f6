"""Task logic without orchestration (``task.fn``), the cache-key rules, storage and CLI defaults."""

import os
from pathlib import Path

import pytest

from gemma_core.config import DataConfig, load_config


def test_prepare_data_result_points_to_verified_files(tmp_path):
    from tasks.data import prepare_data, source_fingerprint

    result = prepare_data.fn(DataConfig(), str(tmp_path), source_fingerprint("sample"))
    assert result.verify() is None and result.is_sample and result.counts["train"] == DataConfig().train_limit
    assert result.path("train").parent.name == f"data-{result.data_hash}"
    train = result.path("train")
    train.write_bytes(train.read_bytes() + b"x")
    assert "sha256 differs" in result.verify()
    train.unlink()
    assert ": missing" in result.verify()


def test_cache_identity_is_content_not_timing(tmp_path):
    from tasks.caching import identity, input_fingerprint
    from tasks.results import FileRef, StageResult

    f = tmp_path / "a.txt"
    f.write_text("hello")
    one = StageResult(stage="s", fingerprint="k", files={"a": FileRef.of(f)}, seconds=1.0, peak_rss_mb=10)
    two = StageResult(stage="s", fingerprint="k", files={"a": FileRef.of(f)}, seconds=9.0, peak_rss_mb=99)
    assert identity(one) == identity(two)
    assert input_fingerprint("x", {"r": one}) == input_fingerprint("x", {"r": two})
    f.write_text("changed")
    three = StageResult(stage="s", fingerprint="k", files={"a": FileRef.of(f)}, seconds=1.0, peak_rss_mb=10)
    assert input_fingerprint("x", {"r": one}) != input_fingerprint("x", {"r": three})
    # a config section counts by its values
    a, b = load_config(overrides=["train.learning_rate=1e-3"]), load_config()
    assert input_fingerprint("x", {"t": a.train}) != input_fingerprint("x", {"t": b.train})


def test_code_hash_covers_gemma_core_sources_and_sample_data():
    import gemma_core
    from tasks.caching import _package_files

    names = {p.name for p in _package_files(Path(gemma_core.__file__).parent)}
    assert {"lora_train.py", "encoding.py", "evaluation.py", "dolly_sample.jsonl"} <= names


def test_source_and_spec_fingerprints_follow_file_content(tmp_path):
    from tasks.data import source_fingerprint
    from tasks.model import spec_fingerprint

    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "context": "", "response": "b", "category": "open_qa"}\n')
    before = source_fingerprint(str(data))
    data.write_text(data.read_text() * 2)
    assert source_fingerprint(str(data)) != before
    assert source_fingerprint("sample") == "sample"
    preset = tmp_path / "preset"
    preset.mkdir()
    (preset / "config.json").write_text("{}")
    first = spec_fingerprint(str(preset))
    (preset / "model.weights.h5").write_bytes(b"123")
    assert spec_fingerprint(str(preset)) != first
    assert spec_fingerprint("embedded:gemma3-270m").startswith("embedded:gemma3-270m@")


def test_injected_failures(monkeypatch):
    from tasks.runtime import InjectedFailure, maybe_fail

    monkeypatch.setenv("GEMMA_LORA_FAIL_AT", "train-lora:3")
    maybe_fail("evaluate-base")
    maybe_fail("train-lora", step=2)
    with pytest.raises(InjectedFailure, match="after step 3"):
        maybe_fail("train-lora", step=3)
    monkeypatch.setenv("GEMMA_LORA_FAIL_AT", "render-report")
    with pytest.raises(InjectedFailure):
        maybe_fail("render-report")


def test_result_storage_location_and_kinds(tmp_path, monkeypatch):
    from flows.storage import make_result_storage, result_storage_location

    monkeypatch.delenv("GEMMA_LORA_RESULT_STORAGE", raising=False)
    assert result_storage_location(None, tmp_path) == str(tmp_path / "prefect-results")
    monkeypatch.setenv("GEMMA_LORA_RESULT_STORAGE", str(tmp_path / "env"))
    assert result_storage_location(None, tmp_path) == str(tmp_path / "env")
    assert result_storage_location("s3://b/p", tmp_path) == "s3://b/p"
    local = make_result_storage(f"file://{tmp_path}/x")
    assert isinstance(local, Path) and local.is_dir()


def test_cli_environment_defaults_do_not_override_the_user():
    from flows.env import apply_defaults

    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "true"}
    applied = apply_defaults(env)
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true" and "PREFECT_SERVER_ANALYTICS_ENABLED" not in applied
    assert env["DO_NOT_TRACK"] == "1" and int(env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) > 20
    assert env["PREFECT_HOME"].endswith(".prefect") and env["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] == "true"
    remote = apply_defaults({"PREFECT_API_URL": "http://server:4200/api"})
    assert "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE" not in remote


def test_cli_rejects_bad_config_and_reports_nothing_yet(tmp_path, capsys):
    from flows.cli import main

    assert main(["run", "--set", "train.learning_rate=0"]) == 2
    assert "train.learning_rate" in capsys.readouterr().err
    assert main(["report", "--set", f"output.root={tmp_path}"]) == 1
    assert "run `gemma-lora run` first" in capsys.readouterr().err
    assert os.environ.get("GEMMA_LORA_FAIL_AT") is None
