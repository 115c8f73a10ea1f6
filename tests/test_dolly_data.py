"""The data stage: sources, cleaning, template, split, atomic Parquet output, clear errors."""

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from gemma_core import dolly_prepare
from gemma_core.config import DataConfig
from gemma_core.dolly_prepare import (
    METADATA_KEY,
    clean_dolly_records,
    format_dolly_to_parquet,
    read_split,
    stratified_split,
)
from gemma_core.dolly_sources import DataSourceError, read_dolly_source
from gemma_core.prompts import format_prompt, strip_citations

CATEGORIES = ["open_qa", "closed_qa", "summarization", "brainstorming"]


def make_records(n=40):
    return [
        {
            "instruction": f"Question {i}?",
            "context": f"Context paragraph {i}.[{i % 7}]" if i % 2 else "",
            "response": f"Answer {i}.",
            "category": CATEGORIES[i % len(CATEGORIES)],
        }
        for i in range(n)
    ]


def write_source(tmp_path, records, suffix):
    path = tmp_path / f"data{suffix}"
    frame = pd.DataFrame(records)
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".parquet":
        frame.to_parquet(path)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_each_local_source_type(tmp_path, suffix):
    path = write_source(tmp_path, make_records(), suffix)
    prepared = format_dolly_to_parquet(DataConfig(source=str(path), eval_fraction=0.25), tmp_path / "out")
    train, evaluation = read_split(prepared.train_path), read_split(prepared.eval_path)
    assert len(train) + len(evaluation) == 40 and len(evaluation) == 8
    assert not prepared.is_sample
    assert set(train.columns) >= {"instruction", "context", "response", "category", "prompt"}


def test_sample_source_is_default_and_marked_as_sample(tmp_path):
    assert DataConfig().source == "sample"
    prepared = format_dolly_to_parquet(DataConfig(train_limit=None), tmp_path)
    meta = json.loads(pq.read_schema(prepared.train_path).metadata[METADATA_KEY])
    assert prepared.is_sample and meta["is_sample"] and "not Dolly" in meta["license"]
    assert sum(prepared.counts.values()) >= 300
    assert len(meta["per_category"]["train"]) == 8
    assert len(meta["per_category"]["eval"]) == 8


def test_metadata_records_provenance_counts_and_licence(tmp_path):
    records = make_records() + [make_records()[0]]  # one exact duplicate
    path = write_source(tmp_path, records, ".jsonl")
    prepared = format_dolly_to_parquet(DataConfig(source=str(path)), tmp_path / "out")
    meta = json.loads(pq.read_schema(prepared.eval_path).metadata[METADATA_KEY])
    assert meta["source"] == str(path) and len(meta["source_sha256"]) == 64
    assert meta["dropped"]["duplicate"] == 1 and meta["counts"] == prepared.counts
    assert set(meta["per_category"]["train"]) == set(CATEGORIES)
    assert "CC BY-SA 3.0" in meta["license"] and meta["config_hash"]


def test_each_drop_reason_is_counted():
    rows = make_records(8) + [
        {"instruction": "", "context": "", "response": "r", "category": "open_qa"},
        {"instruction": None, "context": "", "response": "r", "category": "open_qa"},
        {"instruction": "q", "context": "", "response": "   ", "category": "open_qa"},
        {"instruction": "q", "context": 7, "response": "r", "category": "open_qa"},
        {"instruction": ["q"], "context": "", "response": "r", "category": "open_qa"},
        make_records(1)[0],
    ]
    kept, dropped = clean_dolly_records(pd.DataFrame(rows).astype(object))
    assert dropped == {"missing_instruction": 2, "missing_response": 1, "non_string_field": 2, "duplicate": 1}
    assert len(kept) == 8


def test_template_with_and_without_context():
    assert format_prompt("Say hi.") == "Instruction:\nSay hi.\n\nResponse:\n"
    assert format_prompt("Who?", "Ann wrote it.") == "Instruction:\nWho?\n\nContext:\nAnn wrote it.\n\nResponse:\n"
    assert strip_citations("A fact.[1] Another [23] one.") == "A fact. Another one."


def test_citations_stripped_only_when_asked(tmp_path):
    path = write_source(tmp_path, make_records(), ".jsonl")
    kept = format_dolly_to_parquet(DataConfig(source=str(path), strip_citations=False), tmp_path / "a")
    stripped = format_dolly_to_parquet(DataConfig(source=str(path)), tmp_path / "b")
    assert read_split(kept.train_path)["prompt"].str.contains(r"\[\d\]").any()
    assert not read_split(stripped.train_path)["prompt"].str.contains(r"\[\d\]").any()


def test_split_is_deterministic_and_stratified():
    frame, _ = clean_dolly_records(pd.DataFrame(make_records(200)).astype(object))
    train_a, eval_a = stratified_split(frame, 0.1, seed=3)
    train_b, eval_b = stratified_split(frame, 0.1, seed=3)
    _, eval_c = stratified_split(frame, 0.1, seed=4)
    assert eval_a.equals(eval_b) and train_a.equals(train_b)
    assert not eval_a.equals(eval_c)
    assert eval_a["category"].value_counts().to_dict() == {c: 5 for c in CATEGORIES}
    assert set(train_a["instruction"]).isdisjoint(eval_a["instruction"])
    # Interleaved: the first four held-out rows cover all four categories.
    assert set(eval_a["category"].head(4)) == set(CATEGORIES)


def test_limits_keep_balance(tmp_path):
    path = write_source(tmp_path, make_records(200), ".jsonl")
    prepared = format_dolly_to_parquet(
        DataConfig(source=str(path), train_limit=8, eval_limit=4), tmp_path / "out"
    )
    assert prepared.counts == {"train": 8, "eval": 4}
    assert set(read_split(prepared.eval_path)["category"]) == set(CATEGORIES)


def test_outputs_are_content_addressed_and_reused(tmp_path):
    path = write_source(tmp_path, make_records(), ".jsonl")
    cfg = DataConfig(source=str(path))
    first = format_dolly_to_parquet(cfg, tmp_path / "out")
    again = format_dolly_to_parquet(cfg, tmp_path / "out")
    other = format_dolly_to_parquet(DataConfig(source=str(path), seed=1), tmp_path / "out")
    assert first == again and other.content_hash != first.content_hash
    path.write_text(path.read_text().replace("Answer 3.", "Answer three."))
    changed = format_dolly_to_parquet(cfg, tmp_path / "out")
    assert changed.content_hash != first.content_hash


def test_corrupted_cached_output_is_rebuilt(tmp_path):
    path = write_source(tmp_path, make_records(), ".jsonl")
    cfg = DataConfig(source=str(path))
    first = format_dolly_to_parquet(cfg, tmp_path / "out")
    first.train_path.write_bytes(first.train_path.read_bytes()[:100])
    rebuilt = format_dolly_to_parquet(cfg, tmp_path / "out")
    assert len(read_split(rebuilt.train_path)) == first.counts["train"]


def test_failure_mid_write_leaves_no_file(tmp_path, monkeypatch):
    path = write_source(tmp_path, make_records(), ".jsonl")
    real_write = dolly_prepare._write_parquet
    calls = []

    def write_then_fail(frame, target, metadata):
        real_write(frame, target, metadata)
        calls.append(target)
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(dolly_prepare, "_write_parquet", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        format_dolly_to_parquet(DataConfig(source=str(path)), tmp_path / "out")
    assert calls, "the injected failure must have happened after a real write"
    assert list((tmp_path / "out").iterdir()) == []


# --- clear errors for bad input ------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataSourceError, match=r"nope\.jsonl does not exist"):
        read_dolly_source(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(DataSourceError, match="is empty"):
        read_dolly_source(str(path))


def test_wrong_columns(tmp_path):
    path = tmp_path / "wrong.csv"
    path.write_text("question,answer\nq,a\n")
    with pytest.raises(DataSourceError, match=r"wrong\.csv is not Dolly-shaped: missing column\(s\) instruction, context, response, category"):
        read_dolly_source(str(path))


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(make_records(1)[0]).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + '{"instruction": "café"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataSourceError, match=r"latin1\.jsonl, line 3: not valid UTF-8"):
        read_dolly_source(str(path))


def test_broken_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    good = json.dumps(make_records(1)[0])
    path.write_text(f"{good}\n{good}\n\n{{\"instruction\": \"q\", \n{good}\n")
    with pytest.raises(DataSourceError, match=r"broken\.jsonl, line 4: broken JSON line"):
        read_dolly_source(str(path))


def test_non_object_jsonl_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(DataSourceError, match="line 1: expected a JSON object, got list"):
        read_dolly_source(str(path))


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(DataSourceError, match=r"bad\.parquet: not a readable Parquet file"):
        read_dolly_source(str(path))


def test_unknown_source_form(tmp_path):
    with pytest.raises(DataSourceError, match="hf://org/name"):
        read_dolly_source(str(tmp_path / "data.xlsx"))


def test_hub_source_fails_fast_offline_naming_alternatives(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # a closed port: unreachable at once
    with pytest.raises(DataSourceError) as err:
        read_dolly_source("hf://databricks/databricks-dolly-15k")
    assert "data.source=sample" in str(err.value) and "local Dolly file" in str(err.value)


def test_all_rows_dropped_is_a_clear_error(tmp_path):
    path = write_source(tmp_path, [{"instruction": "", "context": "", "response": "", "category": "x"}], ".jsonl")
    with pytest.raises(ValueError, match="no usable rows.*missing_instruction=1"):
        format_dolly_to_parquet(DataConfig(source=str(path)), tmp_path / "out")
