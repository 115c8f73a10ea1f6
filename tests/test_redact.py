"""Credentials inside URLs are redacted everywhere the project writes (gemma_core/redact.py), and the
value still works where it is used.

Fast: the redaction itself, the log record factory, printed lines, and each writer (manifest,
registry, latest.json, report, CLI). Slow: the tiny pipeline in this process with a result storage
URL that holds a credential (``memory://``, so fsspec really writes through it), then every file
written, the Prefect database and what the API serves (logs, artifacts, flow-run parameters) are
searched for it with the secrets test's helper.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
from pydantic import BaseModel

from gemma_core.redact import RedactingStream, has_credentials, install_log_redaction, redact, redact_text

SECRET = "pw-REDACT-SECRET-7d41c9e02b"
TOKEN = "tok-REDACT-SECRET-e83a51f6"


@pytest.mark.parametrize("text, expected", [
    (f"s3://AKIAKEY:{SECRET}@bucket/prefix", "s3://AKIAKEY:***@bucket/prefix"),
    (f"https://user:{SECRET}@host:8443/a/b.jsonl", "https://user:***@host:8443/a/b.jsonl"),
    (f"https://{TOKEN}@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
    (f"stored in 'gs://k:{SECRET}@b/p' and \"ftp://u:{SECRET}@h/x\"", "stored in 'gs://k:***@b/p' and \"ftp://u:***@h/x\""),
    (f"postgresql+asyncpg://prefect:{SECRET}@db:5432/prefect", "postgresql+asyncpg://prefect:***@db:5432/prefect"),
    (f"https://host/f.jsonl?X-Amz-Signature={SECRET}&x=1", "https://host/f.jsonl?X-Amz-Signature=***&x=1"),
    (f"https://host/f?a=1&token={TOKEN}#top", "https://host/f?a=1&token=***#top"),
    (f"(s3://:{SECRET}@bucket)", "(s3://***@bucket)"),
])
def test_redact_text_hides_the_credential_and_keeps_the_rest(text, expected):
    assert redact_text(text) == expected
    assert SECRET not in redact_text(text) and TOKEN not in redact_text(text)
    assert has_credentials(text)
    assert redact_text(expected) == expected  # idempotent


@pytest.mark.parametrize("text", [
    "s3://bucket/prefix", "hf://databricks/databricks-dolly-15k", "http://127.0.0.1:4200/api",
    "mail someone@example.com", "git@github.com:org/repo.git", "https://host/path@v1/x", "runs/data/data-ab12",
    "loss 0.35 at step=4", "key=value outside any URL", "",
])
def test_redact_text_leaves_text_without_credentials_alone(text):
    assert redact_text(text) == text and not has_credentials(text)


def test_a_credential_once_seen_is_hidden_in_other_shapes():
    secret, token = "pw-seen-only-here-51c0", "tok-seen-only-here-9e7a"  # in no other test: not yet seen
    # fsspec logs a memory:// or s3:// path without its scheme: no URL left to recognise
    assert redact_text(f"open file /key:{secret}@bucket/x") == f"open file /key:{secret}@bucket/x"
    assert has_credentials(f"memory://key:{secret}@bucket/p")  # the project checks every URL it is given
    assert redact_text(f"open file /key:{secret}@bucket/x") == "open file /key:***@bucket/x"
    assert redact_text(f"https://h/f?token={token}") == "https://h/f?token=***"
    assert redact_text(f"again: {token}") == "again: ***"
    # short values are not remembered: they would hide ordinary words
    assert redact_text("s3://k:s@b") == "s3://k:***@b" and redact_text("sums and s") == "sums and s"


class _Section(BaseModel):
    source: str
    steps: int = 3


def test_redact_goes_through_dicts_lists_and_pydantic_models():
    value = {"data": _Section(source=f"https://u:{SECRET}@h/d.jsonl"), "root": Path("runs"),
             f"s3://k:{SECRET}@b": [1, (f"s3://k:{SECRET}@b", None)], "n": 2.5}
    cleaned = redact(value)
    assert cleaned == {"data": {"source": "https://u:***@h/d.jsonl", "steps": 3}, "root": Path("runs"),
                       "s3://k:***@b": [1, ("s3://k:***@b", None)], "n": 2.5}
    assert value["data"].source.endswith("@h/d.jsonl") and SECRET in value["data"].source  # the original is untouched


def test_redact_log_records_of_every_logger_and_their_tracebacks():
    install_log_redaction()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    logger = logging.getLogger("redact-test.child")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("results in %s", f"s3://key:{SECRET}@bucket/prefix")
        logger.info({"storage": f"https://u:{TOKEN}@h"})
        try:
            raise OSError(f"cannot open s3://key:{SECRET}@bucket/x")
        except OSError:
            logger.exception("write failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "s3://key:***@bucket/prefix" in text and "https://u:***@h" in text and "write failed" in text
    assert "OSError: cannot open s3://key:***@bucket/x" in text
    assert SECRET not in text and TOKEN not in text


def test_redacting_stream_passes_on_everything_else():
    out = io.StringIO()
    stream = RedactingStream(out)
    print(f"storage s3://k:{SECRET}@b", file=stream)
    stream.flush()
    assert out.getvalue() == "storage s3://k:***@b\n" and stream.writable()


def test_redact_manifest_and_registry_writers(tmp_path):
    from gemma_core.manifest import write_manifest
    from gemma_core.registry import Registry

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x")
    manifest = write_manifest(tmp_path / "d", {"source": f"https://u:{SECRET}@h/d.jsonl"})
    assert manifest["source"] == "https://u:***@h/d.jsonl"
    assert SECRET not in (tmp_path / "d" / "manifest.json").read_text()

    registry = Registry(tmp_path / "runs")
    adapter = tmp_path / "adapter.lora.h5"
    adapter.write_bytes(b"weights")
    record = registry.promote(registry.token(), adapter=adapter, model_spec=f"hf://u:{TOKEN}@org/model",
                              model_hash="m1", promoted_by="user", reason="by hand",
                              lora={"rank": 4, "target_layer_names": ["query", "value"]},
                              config={"data": {"source": f"s3://k:{SECRET}@b/d.jsonl"}})
    assert record.model_spec == "hf://u:***@org/model"
    assert registry.champion().config["data"]["source"] == "s3://k:***@b/d.jsonl"  # reads back, checksum intact
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes() and TOKEN.encode() not in path.read_bytes(), path


def test_redact_latest_json_and_the_report(tmp_path):
    from flows.storage import LATEST, read_latest, write_latest
    from gemma_core.report import build_report, write_report
    from tests.test_report import MANIFEST, _eval

    write_latest(tmp_path, {"result_storage": f"s3://k:{SECRET}@b/p", "config": {"model": {"spec": "x"}}})
    assert read_latest(tmp_path)["result_storage"] == "s3://k:***@b/p"
    assert SECRET not in (tmp_path / LATEST).read_text()

    manifest = {**MANIFEST, "data": {**MANIFEST["data"], "source": f"https://u:{SECRET}@h/d.jsonl"},
                "config": {"data": {"source": f"https://u:{SECRET}@h/d.jsonl"}, "output": {"root": "runs"}}}
    report = build_report(_eval(["a", "b"], 0.2, 3.0), _eval(["c", "d"], 0.4, 2.0),
                          {"losses": [3.0, 2.0], "steps": 2, "learning_rate": 1e-3}, manifest, num_side_by_side=1)
    paths = write_report(report, tmp_path / "report")
    for name in ("markdown", "html", "metrics"):
        text = paths[name].read_text()
        assert SECRET not in text and "https://u:***@h/d.jsonl" in text, name
    assert json.loads(paths["metrics"].read_text())["manifest"]["config"]["data"]["source"] == "https://u:***@h/d.jsonl"


def test_redact_storage_parameter_is_refused_and_passed_by_environment(monkeypatch):
    from flows.env import RESULT_STORAGE_ENV
    from flows.storage import (CredentialInParameterError, check_storage_parameter, parameter_for_storage,
                               result_storage_location, storage_for_child_runs)

    url = f"s3://key:{SECRET}@bucket/prefix"
    monkeypatch.setenv(RESULT_STORAGE_ENV, "")  # restored after the test, whatever the call below sets
    assert parameter_for_storage("s3://bucket/prefix") == "s3://bucket/prefix"
    assert parameter_for_storage(url) is None
    # the flow finds it, intact, where the CLI put it
    assert result_storage_location(None, "runs") == url
    assert storage_for_child_runs(url) is None and storage_for_child_runs("/srv/results") == "/srv/results"
    check_storage_parameter("s3://bucket/prefix")
    with pytest.raises(CredentialInParameterError) as caught:
        check_storage_parameter(url)
    message = str(caught.value)
    assert SECRET not in message and "s3://key:***@bucket/prefix" in message and RESULT_STORAGE_ENV in message


def test_redact_cli_prints(capsys, tmp_path):
    from flows.cli import main

    bad = f"https://user:{SECRET}@host/dolly.jsonl"
    # the config error names the field and its value: the value is printed, redacted
    assert main(["run", "--set", f"data.source={bad}\x00"]) == 2
    assert main(["report", "--set", f"output.root={tmp_path / 'none'}", "--set", f"data.source={bad}"]) == 1
    captured = capsys.readouterr()
    assert "data.source" in captured.err and "https://user:***@host/dolly.jsonl" in captured.err, captured.err
    assert SECRET not in captured.out + captured.err


# --- end to end: the tiny pipeline in this process ------------------------------------------------------------

@pytest.mark.slow
def test_redact_everything_a_pipeline_run_writes(tiny_preset, tmp_path, monkeypatch):
    import fsspec
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.env import RESULT_STORAGE_ENV
    from flows.pipeline import gemma_lora_pipeline
    from flows.storage import parameter_for_storage
    from tests.helpers.tiny_config import tiny_pipeline_config
    from tests.test_reliability_secrets import searchable_files

    root = tmp_path / "runs"
    # memory:// keeps the userinfo in the path: fsspec really writes the results under the URL as given
    url = f"memory://key:{SECRET}@bucket/redact-{tmp_path.name}"
    monkeypatch.setenv(RESULT_STORAGE_ENV, "")  # restored after the test, whatever the call below sets
    parameter = parameter_for_storage(url)  # what `gemma-lora run --result-storage URL` does
    assert parameter is None
    cfg = tiny_pipeline_config(tiny_preset, root)
    with _every_log_record() as records:
        state = gemma_lora_pipeline(config=cfg, result_storage=parameter, return_state=True)
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id

    memory = fsspec.filesystem("memory")
    stored = memory.find(url)
    assert stored, f"nothing was written through {url.replace(SECRET, '***')}: the value did not reach fsspec"
    texts = {f"result storage {p}": memory.cat_file(p) for p in stored}

    with get_client(sync_client=True) as client:  # everything this session's server holds
        runs = client.read_flow_runs()
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])))
        artifacts = client.read_artifacts()
        blocks = client.read_block_documents(include_secrets=False)
        texts["flow-run parameters"] = json.dumps([r.parameters for r in runs], default=str).encode()
    assert flow_run_id in {r.id for r in runs} and logs and artifacts
    texts["block documents (API)"] = json.dumps([b.model_dump(mode="json") for b in blocks], default=str).encode()
    texts["run logs (API)"] = "\n".join(log.message for log in logs).encode()
    texts["artifacts (API)"] = json.dumps([a.model_dump(mode="json") for a in artifacts]).encode()
    # (no capsys: Prefect's console handler would keep a stream that pytest closes after the test)
    texts["log records of this process"] = records.getvalue().encode()
    assert "Finished in state Completed" in records.getvalue(), "the log capture saw nothing of the run"

    prefect_home = Path(__import__("os").environ["PREFECT_HOME"])
    files = searchable_files(root, prefect_home, tmp_path)
    assert any(p.name.endswith(".db") for p in files), "the Prefect database must be searched too"
    texts.update({str(p): p.read_bytes() for p in set(files)})
    latest = json.loads((root / "reports" / "latest.json").read_text())
    assert latest["result_storage"] == f"memory://key:***@bucket/redact-{tmp_path.name}"

    found = {where: _lines_with(data, SECRET[:16].encode()) for where, data in texts.items()
             if SECRET[:16].encode() in data}
    print(f"searched {len(texts)} files and API answers ({sum(map(len, texts.values())) >> 20} MiB)")
    assert found == {}, found


def _lines_with(data: bytes, needle: bytes, limit: int = 3) -> list[str]:
    """The first lines of ``data`` that hold ``needle``, for a failure message that says what leaked."""
    return [line[:300].decode(errors="replace") for line in data.splitlines() if needle in line][:limit]


@contextlib.contextmanager
def _every_log_record():
    """Every log record of this process at DEBUG and above, formatted, exceptions included. Not caplog:
    Prefect configures logging when it first starts a flow and replaces the root logger's handlers,
    caplog's among them, unless a handler there has a formatter of its own (prefect.logging.configuration)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
