"""Bad input, fuzzed with hypothesis: data files through the data stage, configs through load_config.

Every generated case must end in one of two ways:

- a clear error: exactly ``DataSourceError``, ``ValueError`` or ``ConfigError`` (not a subclass such as
  UnicodeEncodeError or ArrowInvalid that leaks from a library), whose message names the file or the
  config field; and then the output directory holds nothing, not even a hidden temporary file;
- or success, where every input row is accounted for: kept in train/eval or dropped and counted by
  reason, and the output directory holds exactly the published data directory.

Never another exception type, and never a hang: each case runs under a SIGALRM limit (a real
interrupt, not only hypothesis' after-the-fact deadline). The number of cases run, and how each
ended, is printed at the end of the module (``-rA`` or ``-s`` is not needed).
"""

from __future__ import annotations

import collections
import csv
import contextlib
import io
import json
import math
import signal
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma_core.config import ConfigError, DataConfig, PipelineConfig, load_config
from gemma_core.dolly_prepare import format_dolly_to_parquet
from gemma_core.dolly_sources import DOLLY_COLUMNS, DataSourceError

CASES: collections.Counter = collections.Counter()
CASE_LIMIT_S = 20
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)


@pytest.fixture(scope="module", autouse=True)
def _report_case_counts(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"{name}: {count}" for name, count in sorted(CASES.items())]
    total = sum(v for k, v in CASES.items() if k.endswith(("-> error", "-> ok", "-> rows dropped")))
    text = "\nfuzz cases by outcome (total %d):\n  %s\n" % (total, "\n  ".join(lines))
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(text)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(text)


@contextlib.contextmanager
def time_limit(seconds: int, what: str):
    def _alarm(signum, frame):
        raise TimeoutError(f"{what} ran longer than {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def all_entries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def run_data_stage(kind: str, suffix: str, payload: bytes, rows: int | None = None, **data) -> str:
    """Write ``payload`` as a data file, run the data stage on it, check the outcome; returns it."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        tmp = Path(tmp)
        source = tmp / f"input{suffix}"
        source.write_bytes(payload)
        out = tmp / "out"
        cfg = DataConfig(source=str(source), train_limit=None, **data)
        try:
            with time_limit(CASE_LIMIT_S, f"the data stage on {kind}"):
                prepared = format_dolly_to_parquet(cfg, out)
        except (DataSourceError, ValueError) as err:
            assert type(err) in (DataSourceError, ValueError), f"{type(err).__name__} leaked: {err}"
            message = str(err)
            assert str(source) in message, f"the error does not name the file: {message}"
            assert all_entries(out) == [], f"partial output after an error: {all_entries(out)}"
            outcome = "error"
        else:
            kept = sum(prepared.counts.values())
            dropped = sum(prepared.dropped.values())
            if rows is not None:
                assert kept + dropped == rows, (prepared.counts, prepared.dropped, rows)
            names = all_entries(out)
            data_dir = prepared.train_path.parent.name
            assert names == [data_dir, f"{data_dir}/eval.parquet", f"{data_dir}/manifest.json",
                             f"{data_dir}/train.parquet"], names
            outcome = "rows dropped" if dropped else "ok"
    CASES[f"data {kind} -> {outcome}"] += 1
    return outcome


# --- data files ------------------------------------------------------------------------------------------

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), payload=st.binary(max_size=3000))
def test_random_bytes(suffix, payload):
    run_data_stage("random bytes", suffix, payload)


surrogates = st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3)
field_values = st.one_of(
    st.text(max_size=40),
    st.just(""),
    st.sampled_from([" ", "\t\n", "\u00a0", "\x00", "\ufeff"]),
    st.builds(lambda c, n: c * n, st.sampled_from("xé😀"), st.sampled_from([10_000, 200_000])),  # huge
    st.builds(lambda a, s: a + s, st.text(max_size=5), surrogates),  # lone surrogates (\\udXXX in JSON)
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
GOOD_ROWS = [{"instruction": f"Question {i}?", "context": "" if i % 2 else f"Context {i}.",
              "response": f"Answer {i}.", "category": ["open_qa", "summarization"][i % 2]} for i in range(8)]
good_text = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=30)
unknown_keys = {"extra": field_values, "Instruction": field_values, "": field_values}
records = st.one_of(
    # any subset of the fields, any values: mostly a clear error
    st.lists(st.fixed_dictionaries({}, optional={**{c: field_values for c in DOLLY_COLUMNS}, **unknown_keys}),
             max_size=30),
    # bad rows among good ones (the real-world case): the bad ones dropped and counted, or an error
    st.lists(st.fixed_dictionaries({**{c: st.one_of(good_text, field_values)
                                       for c in ("instruction", "context", "response")},
                                    "category": st.one_of(st.sampled_from(["open_qa", "summarization"]),
                                                          field_values)},
                                   optional=unknown_keys),
             max_size=30).flatmap(lambda bad: st.permutations(GOOD_ROWS + bad)),
)


def encode_records(rows: list[dict], suffix: str) -> bytes:
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if suffix == ".json":
        return json.dumps(rows).encode()
    if suffix == ".csv":  # a CSV holds text only: values as their string form
        columns = list(dict.fromkeys(k for r in rows for k in r))
        if not columns:
            return b""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else str(v)) for k, v in r.items()} for r in rows)
        return buffer.getvalue().encode("utf-8", errors="surrogatepass")
    raise AssertionError(suffix)


@FUZZ
@given(rows=records, suffix=st.sampled_from((".jsonl", ".json", ".csv")))
def test_records_with_wrong_types_huge_empty_missing_and_unknown_fields(rows, suffix):
    payload = encode_records(rows, suffix)
    has_all_columns = bool(rows) and all(any(c in r for r in rows) for c in DOLLY_COLUMNS)
    outcome = run_data_stage(f"records{suffix}", suffix, payload, rows=len(rows) if suffix != ".csv" else None)
    if not has_all_columns and suffix != ".csv":
        assert outcome == "error"


parquet_types = st.sampled_from(["string", "large_string", "int64", "float64", "bool", "list", "null", "binary",
                                 "timestamp"])
mostly_strings = st.one_of(st.just("string"), st.just("string"), parquet_types)


def parquet_column(kind: str, values: list, n: int, name: str = "") -> pa.Array:
    if kind in ("string", "large_string") and name == "category":  # few categories, so the split has both
        values = [None if v is None else ["open_qa", "summarization", ""][i % 3] for i, v in enumerate(values)]
    if kind in ("string", "large_string"):
        return pa.array([None if v is None else str(v) for v in values[:n]],
                        type=pa.string() if kind == "string" else pa.large_string())
    if kind == "int64":
        return pa.array([i * -7 for i in range(n)], type=pa.int64())
    if kind == "float64":
        return pa.array([float("nan"), -1.5, float("inf"), None][:1] * n if n else [], type=pa.float64())
    if kind == "bool":
        return pa.array([bool(i % 2) for i in range(n)])
    if kind == "list":
        return pa.array([[str(i)] * (i % 3) for i in range(n)], type=pa.list_(pa.string()))
    if kind == "null":
        return pa.nulls(n)
    if kind == "binary":
        return pa.array([b"\xff\xfe" + bytes([i % 256]) for i in range(n)], type=pa.binary())
    return pa.array([i * 10**15 for i in range(n)], type=pa.timestamp("ns"))


@FUZZ
@given(
    kinds=st.one_of(
        st.fixed_dictionaries({}, optional={c: parquet_types for c in (*DOLLY_COLUMNS, "unknown_key")}),
        st.fixed_dictionaries({c: mostly_strings for c in DOLLY_COLUMNS}, optional={"unknown_key": parquet_types}),
    ),
    values=st.lists(st.one_of(st.text(max_size=20), st.none(), st.just(""), st.sampled_from(["x", "y"])),
                    min_size=0, max_size=30),
)
def test_parquet_columns_of_every_type(kinds, values):
    n = len(values)
    table = pa.table({name: parquet_column(kind, values, n, name) for name, kind in kinds.items()}) if kinds else None
    buffer = io.BytesIO()
    if table is None:
        pq.write_table(pa.table({"x": pa.array([], pa.int64())}), buffer)
    else:
        pq.write_table(table, buffer)
    run_data_stage("parquet", ".parquet", buffer.getvalue(), rows=n if kinds.keys() >= set(DOLLY_COLUMNS) else None)


def test_parquet_string_column_holding_invalid_utf8():
    """Bytes that are not UTF-8 inside a column typed as string (written without validation)."""
    n = 3
    data = b"ok\xff\xfeok\xc3"
    offsets = pa.array([0, 2, 6, 7], type=pa.int32()).buffers()[1]
    bad = pa.Array.from_buffers(pa.string(), n, [None, offsets, pa.py_buffer(data)])
    good = pa.array(["a", "b", "c"])
    buffer = io.BytesIO()
    pq.write_table(pa.table({"instruction": bad, "context": good, "response": good, "category": good}), buffer)
    assert run_data_stage("parquet invalid utf-8", ".parquet", buffer.getvalue()) == "error"


ENCODINGS = ("utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252", "utf-8-sig", "shift_jis", "gb18030")


@FUZZ
@given(encoding=st.sampled_from(ENCODINGS), suffix=st.sampled_from((".jsonl", ".json", ".csv")),
       text=st.text(alphabet=st.characters(min_codepoint=0xA0, max_codepoint=0x2FFF), min_size=1, max_size=20))
def test_wrong_text_encodings(encoding, suffix, text):
    rows = [{"instruction": f"q{i} {text}", "context": "", "response": f"a {text}", "category": "c"} for i in range(6)]
    payload = encode_records(rows, suffix).decode().encode(encoding, errors="replace")
    outcome = run_data_stage(f"encoding {encoding}", suffix, payload)
    if encoding in ("utf-16", "utf-16-le", "utf-32"):
        assert outcome == "error"  # NUL bytes and BOMs: never silently read as UTF-8


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), cut=st.floats(min_value=0.0, max_value=1.0))
def test_truncated_files(suffix, cut):
    rows = [{"instruction": f"question {i}", "context": "ctx" if i % 2 else "", "response": f"answer {i}",
             "category": ["a", "b"][i % 2]} for i in range(40)]
    if suffix == ".parquet":
        buffer = io.BytesIO()
        pd.DataFrame(rows).to_parquet(buffer)
        payload = buffer.getvalue()
    else:
        payload = encode_records(rows, suffix)
    run_data_stage(f"truncated{suffix}", suffix, payload[: int(len(payload) * cut)])


@FUZZ
@given(numbers=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**80), 2**80)),
                        min_size=1, max_size=4),
       fraction=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5)))
def test_negative_and_nan_numbers_in_data_and_its_config(numbers, fraction):
    """Numbers where text belongs (dropped, counted), and as data.eval_fraction (ConfigError)."""
    rows = [{"instruction": f"q{i}", "context": numbers[i % len(numbers)] if i % 3 == 0 else "",
             "response": f"a{i}" if i % 4 else numbers[i % len(numbers)], "category": "c"} for i in range(12)]
    payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
    run_data_stage("numbers", ".jsonl", payload, rows=len(rows))
    try:
        cfg = DataConfig(eval_fraction=fraction)
    except Exception as err:  # pydantic's ValidationError, which load_config turns into ConfigError
        with pytest.raises(ConfigError, match="data.eval_fraction"):
            load_config(overrides={"data.eval_fraction": fraction})
        CASES["config eval_fraction -> error"] += 1
        del err
    else:
        assert 0 < cfg.eval_fraction <= 0.5 and not math.isnan(cfg.eval_fraction)
        CASES["config eval_fraction -> ok"] += 1


def test_deeply_nested_json_is_a_clear_error():
    assert run_data_stage("deep nesting", ".json", b"[" * 200_000) == "error"
    assert run_data_stage("deep nesting", ".jsonl", b'{"instruction": ' + b"[" * 200_000 + b"\n") == "error"


def test_many_distinct_unknown_keys_stay_fast():
    """20,000 rows, each with its own unknown key: a frame of every key would be 20,000 x 20,000."""
    rows = [{"instruction": f"q{i}", "context": "", "response": f"a{i}", "category": "c", f"unknown_{i}": i}
            for i in range(20_000)]
    started = time.perf_counter()
    assert run_data_stage("20k unknown keys", ".jsonl", encode_records(rows, ".jsonl"), rows=20_000) == "ok"
    assert time.perf_counter() - started < 15


def test_300k_duplicate_rows_are_dropped_and_counted():
    """'Millions of duplicates', scaled to what a 2-core test affords: 300,000 rows, 12 distinct."""
    distinct = [{"instruction": f"Question {i}?", "context": "", "response": f"Answer {i}.",
                 "category": ["open_qa", "closed_qa", "brainstorming"][i % 3]} for i in range(12)]
    lines = [json.dumps(r) + "\n" for r in distinct]
    payload = "".join(lines[i % 12] for i in range(300_000)).encode()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "dupes.jsonl"
        source.write_bytes(payload)
        prepared = format_dolly_to_parquet(DataConfig(source=str(source), train_limit=None), Path(tmp) / "out")
    seconds = time.perf_counter() - started
    assert prepared.dropped["duplicate"] == 300_000 - 12
    assert sum(prepared.counts.values()) == 12
    CASES["data 300k duplicate rows -> rows dropped"] += 1
    print(f"300,000 rows ({prepared.dropped['duplicate']} duplicates dropped) in {seconds:.1f} s")
    assert seconds < 60


# --- configs ---------------------------------------------------------------------------------------------

FIELDS = [f"{section}.{name}" for section, info in PipelineConfig.model_fields.items()
          for name in (getattr(info.annotation, "model_fields", None) or {})] + ["backend"]
config_values = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.none(), st.booleans(), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                                   st.integers(), max_size=2),
)


def check_config(kind: str, call) -> None:
    try:
        with time_limit(CASE_LIMIT_S, f"load_config on {kind}"):
            cfg = call()
    except ConfigError as err:
        assert type(err) is ConfigError and str(err).strip()
        CASES[f"config {kind} -> error"] += 1
        return err
    assert isinstance(cfg, PipelineConfig)
    CASES[f"config {kind} -> ok"] += 1
    return None


@FUZZ
@given(field=st.sampled_from(FIELDS), value=config_values)
def test_config_field_values(field, value):
    err = check_config("field value", lambda: load_config(overrides={field: value}))
    if err is not None:
        assert field in str(err), str(err)  # the message names the field


@FUZZ
@given(overrides=st.lists(st.text(max_size=40), max_size=4))
def test_config_override_strings(overrides):
    check_config("override string", lambda: load_config(overrides=overrides))


yaml_trees = st.recursive(
    st.one_of(config_values, st.sampled_from(FIELDS)),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.one_of(st.sampled_from(["train", "data", "lora", "model",
                                                                          "learning_rate", "rank", "extra"]),
                                                         st.text(max_size=6)), children, max_size=4)),
    max_leaves=12,
)


@FUZZ
@given(tree=yaml_trees)
def test_config_yaml_structures(tree):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(tree, allow_unicode=True))
        err = check_config("yaml structure", lambda: load_config(path))
        if err is not None:
            assert "config" in str(err)


@FUZZ
@given(payload=st.one_of(st.binary(max_size=500),
                         st.text(max_size=300).map(lambda t: t.encode("utf-8", errors="surrogatepass"))))
def test_config_yaml_random_bytes(payload):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_bytes(payload)
        check_config("yaml bytes", lambda: load_config(path))


def test_config_yaml_pathological():
    cases = {
        "deep nesting": "[" * 20_000,
        "alias loop": "train: &a [*a]",
        "python tag": "train: !!python/object/apply:os.system ['true']",
        "billion laughs": "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
            for i in range(8)),
        "NUL in a path": "output: {root: \"a\\0b\"}",
        "huge number": "train: {max_steps: 1" + "0" * 5000 + "}",
    }
    for name, text in cases.items():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(text)
            err = check_config(f"yaml {name}", lambda: load_config(path))
            assert err is not None, name
