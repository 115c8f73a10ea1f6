"""data.eval_source: the user's own held-out set in Dolly's schema, used whole as the evaluation split
instead of a slice of the training source, part of the data stage's cache key, named in the manifest
and the report."""

import json

import pytest

from gemma_core.config import ConfigError, DataConfig, load_config
from gemma_core.dolly_prepare import format_dolly_to_parquet, read_split
from gemma_core.dolly_sources import SAMPLE_PATH, DataSourceError
from gemma_core.manifest import read_manifest, sha256_file


def _records(n, category="open_qa", prefix="Held-out question"):
    return [{"instruction": f"{prefix} {i}?", "context": "", "response": f"Answer {i}.", "category": category}
            for i in range(n)]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def held_out(tmp_path):
    return _write_jsonl(tmp_path / "held_out.jsonl", _records(3, "open_qa") + _records(2, "closed_qa", "Closed one"))


def test_eval_source_is_the_whole_eval_split_and_the_training_source_is_not_cut(tmp_path, held_out):
    sliced = format_dolly_to_parquet(DataConfig(train_limit=None), tmp_path / "a")
    own = format_dolly_to_parquet(DataConfig(train_limit=None, eval_source=str(held_out)), tmp_path / "b")
    evaluation = read_split(own.eval_path)
    assert sorted(evaluation["instruction"]) == sorted(r["instruction"] for r in _records(3) + _records(2, prefix="Closed one"))
    # interleaved across categories, as the sliced split is, so the first N prompts are balanced
    assert list(evaluation["category"][:2]) == ["closed_qa", "open_qa"]
    assert own.counts == {"train": sliced.counts["train"] + sliced.counts["eval"], "eval": 5}
    assert own.eval_source == str(held_out) and sliced.eval_source is None
    manifest = read_manifest(own.train_path.parent)
    assert manifest["eval_source"] == {"source": str(held_out), "sha256": sha256_file(held_out),
                                       "license": manifest["eval_source"]["license"],
                                       "dropped": dict.fromkeys(manifest["eval_source"]["dropped"], 0)}
    assert manifest["eval_split"] == f"data.eval_source ({held_out})"
    assert read_manifest(sliced.train_path.parent)["eval_split"].startswith("data.eval_fraction=0.1")
    assert (evaluation["prompt"].str.startswith("Instruction:\nHeld-out") | evaluation["prompt"].str.startswith(
        "Instruction:\nClosed")).all()


def test_eval_source_prompts_are_taken_out_of_training(tmp_path):
    sample = [json.loads(line) for line in SAMPLE_PATH.read_text().splitlines() if line.strip()]
    overlap = _write_jsonl(tmp_path / "overlap.jsonl", sample[:4] + _records(1))
    prepared = format_dolly_to_parquet(DataConfig(train_limit=None, eval_source=str(overlap)), tmp_path / "out")
    train = read_split(prepared.train_path)
    taken = {(r["instruction"], r["context"]) for r in sample[:4]}
    assert not taken & set(zip(train["instruction"], train["context"]))
    assert prepared.dropped["also_in_eval_source"] == 4 and prepared.counts["eval"] == 5


def test_eval_source_content_is_part_of_the_cache_key(tmp_path, held_out):
    from tasks.data import source_fingerprint

    cfg = DataConfig(eval_source=str(held_out))
    first = format_dolly_to_parquet(cfg, tmp_path)
    key = source_fingerprint(cfg)
    assert key == f"sample eval:sha256:{sha256_file(held_out)}" and source_fingerprint(DataConfig()) == "sample"
    _write_jsonl(held_out, _records(4))  # same path, other content
    second = format_dolly_to_parquet(cfg, tmp_path)
    assert second.content_hash != first.content_hash and second.counts["eval"] == 4
    assert source_fingerprint(cfg) != key
    assert source_fingerprint(DataConfig(eval_source="hf://someone/held-out")) == "sample eval:hf://someone/held-out"


def test_eval_source_in_the_data_result_and_the_report(tmp_path, held_out):
    from gemma_core.report import Report, intro
    from tasks.data import prepare_data, source_fingerprint

    cfg = load_config(overrides=[f"data.eval_source={held_out}"]).data
    result = prepare_data.fn(cfg, str(tmp_path), source_fingerprint(cfg))
    assert result.eval_source == str(held_out) and result.counts["eval"] == 5 and result.prompt_format == "instruction"
    manifest = {"model": {"spec": "embedded:gemma3-270m"},
                "data": {"source": result.source, "prompt_format": result.prompt_format, "eval_split": result.eval_source}}
    text = "".join(str(part) for part in intro(Report({"num_prompts": 5, "answers_changed": 1}, [], [], manifest)))
    assert str(held_out) in text and "instruction" in text


def test_eval_source_bad_values_are_named_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="data.eval_source"):
        load_config(overrides=["data.eval_source=' '"])
    with pytest.raises(DataSourceError, match=r"missing\.jsonl does not exist"):
        format_dolly_to_parquet(DataConfig(eval_source=str(tmp_path / "missing.jsonl")), tmp_path)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "Hi?", "answer": "Hello."}\n')
    with pytest.raises(DataSourceError, match="not Dolly-shaped: missing column"):
        format_dolly_to_parquet(DataConfig(eval_source=str(wrong)), tmp_path)
    sample = _write_jsonl(tmp_path / "same.jsonl",
                          [json.loads(line) for line in SAMPLE_PATH.read_text().splitlines() if line.strip()])
    with pytest.raises(ValueError, match="no training rows.*data.eval_source"):
        format_dolly_to_parquet(DataConfig(eval_source=str(sample)), tmp_path)
