"""Kaggle and Hugging Face credentials never show up in what the project writes or says.

Distinctive fake values are set where a user keeps them: ``KAGGLE_USERNAME``/``KAGGLE_KEY`` and
``KAGGLE_API_TOKEN`` in the environment, ``~/.kaggle/kaggle.json`` under a temporary HOME, ``HF_TOKEN``,
and a Prefect ``Secret`` block on the server. Then:

- fast, in this process: every path that reads credentials (Kaggle presets, ``kaggle://``, ``hf://``
  models and datasets; offline, so each ends in an error) says what is wrong without the secret, in
  the exception and in any log record, at DEBUG;
- slow, end to end: the ``gemma-lora`` command runs the tiny pipeline against a real Prefect server,
  then fails at the Kaggle and Hugging Face checks; every file written (outputs, result storage, both
  PREFECT_HOMEs with the server's database, the temporary HOME, the XLA cache entries written by the
  run) and everything printed is searched for each secret.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SECRETS = {
    "KAGGLE_KEY": "kgl-env-key-SECRET-5f1e9a7c44",
    "KAGGLE_API_TOKEN": "kgl-api-token-SECRET-0b3d2e91",
    "kaggle.json key": "kgl-json-key-SECRET-a41d7720",
    "HF_TOKEN": "hf_SECRETtoken3c8e1f6b2a",
    "Prefect Secret block": "block-SECRET-9e2f41c07d",
}


def leaks(text: str) -> list[str]:
    """The names of the secrets found in ``text``, whole or by their first 16 characters."""
    return [name for name, value in SECRETS.items() if value in text or value[:16] in text]


def write_kaggle_json(home: Path, content: str | None = None) -> Path:
    folder = home / ".kaggle"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kaggle.json"
    path.write_text(content if content is not None else
                    json.dumps({"username": "reliability-user", "key": SECRETS["kaggle.json key"]}))
    path.chmod(0o600)
    return path


@pytest.fixture
def credentials(monkeypatch, tmp_path):
    home = tmp_path / "home"
    write_kaggle_json(home)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(home / ".kaggle"))  # kagglehub fixed ~ at its import
    monkeypatch.setenv("KAGGLE_USERNAME", "reliability-user")
    monkeypatch.setenv("KAGGLE_KEY", SECRETS["KAGGLE_KEY"])
    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    monkeypatch.setenv("GEMMA_LORA_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


KAGGLE_SPECS = ["gemma3_1b", "kaggle://keras/gemma3/keras/gemma3_1b"]


def resolve_error(spec: str, caplog) -> str:
    from gemma_core.models import ModelResolutionError, resolve_preset

    with caplog.at_level(logging.DEBUG):
        with pytest.raises(ModelResolutionError) as caught:
            resolve_preset(spec)
    return str(caught.value) + "\n" + repr(caught.value) + "\n" + caplog.text


@pytest.mark.parametrize("source", ["env key", "env api token", "kaggle.json"])
@pytest.mark.parametrize("spec", KAGGLE_SPECS)
def test_kaggle_credentials_stay_out_of_errors_and_logs(credentials, monkeypatch, caplog, spec, source):
    if source != "env key":
        monkeypatch.delenv("KAGGLE_USERNAME")
        monkeypatch.delenv("KAGGLE_KEY")
    if source == "env api token":
        monkeypatch.setenv("KAGGLE_API_TOKEN", SECRETS["KAGGLE_API_TOKEN"])
    text = resolve_error(spec, caplog)
    assert "cannot be reached" in text  # it got past the credentials, to the (forced) offline check
    assert leaks(text) == []


@pytest.mark.parametrize("content", [
    '{"username": "u", "key": "%s"' % SECRETS["kaggle.json key"],  # cut short
    '["%s"]' % SECRETS["kaggle.json key"],
    '{"user": "u", "key": "%s"}' % SECRETS["kaggle.json key"],
    "42",
    '"%s"' % SECRETS["kaggle.json key"],
])
def test_a_broken_kaggle_json_is_reported_without_its_content(credentials, monkeypatch, caplog, content):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    write_kaggle_json(credentials, content)
    text = resolve_error("gemma3_1b", caplog)
    assert "kaggle.json" in text or "Kaggle credentials" in text
    assert leaks(text) == []


def test_hugging_face_token_stays_out_of_model_and_data_errors(credentials, caplog):
    from gemma_core.dolly_sources import DataSourceError, read_dolly_source

    text = resolve_error("hf://google/gemma-3-1b-pt", caplog)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(DataSourceError) as caught:
            read_dolly_source("hf://databricks/databricks-dolly-15k")
    text += str(caught.value) + caplog.text
    assert "HF_HUB_OFFLINE" in text and leaks(text) == []


def test_cli_errors_do_not_print_credentials(credentials, capsys):
    from flows.cli import main

    assert main(["run", "--set", "train.learning_rate=-1"]) == 2
    assert main(["report", "--set", f"output.root={credentials / 'nothing'}"]) == 1
    captured = capsys.readouterr()
    assert leaks(captured.out + captured.err) == []


# --- end to end ---------------------------------------------------------------------------------------------

def searchable_files(*roots: Path, since: float | None = None, skip: tuple[Path, ...] = ()) -> list[Path]:
    found = []
    for root in roots:
        if not root.exists():
            continue
        for path in root.rglob("*"):
            if not path.is_file() or path in skip or path.is_symlink():
                continue
            if since is not None and path.stat().st_mtime < since:
                continue
            found.append(path)
    return found


@pytest.mark.slow
def test_nothing_a_run_writes_or_prints_holds_a_credential(tiny_preset, tmp_path):
    from helpers import procs
    from helpers.prefect_server import isolated_server

    started = time.time()
    home = tmp_path / "home"
    kaggle_json = write_kaggle_json(home)
    server = isolated_server(tmp_path / "server-home", tmp_path / "prefect-server.log").start()
    try:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_", "GEMMA_LORA_", "RELIABILITY_", "KAGGLE_", "HF_"))}
        env.update(
            HOME=str(home), PYTHONPATH=str(procs.REPO), PREFECT_HOME=str(tmp_path / "client-home"),
            PREFECT_API_URL=server.api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
            PREFECT_LOGGING_LEVEL="DEBUG", KAGGLE_USERNAME="reliability-user", KAGGLE_KEY=SECRETS["KAGGLE_KEY"],
            KAGGLE_API_TOKEN=SECRETS["KAGGLE_API_TOKEN"], HF_TOKEN=SECRETS["HF_TOKEN"], GEMMA_LORA_OFFLINE="1",
            # the XLA cache stays where the test session keeps it (a cold one costs minutes), and is searched
            JAX_COMPILATION_CACHE_DIR=os.environ["JAX_COMPILATION_CACHE_DIR"],
        )
        block = subprocess.run(
            [sys.executable, "-c", "import sys; from prefect.blocks.system import Secret; "
             "Secret(value=sys.argv[1]).save('hf-token', overwrite=True)", SECRETS["Prefect Secret block"]],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert block.returncode == 0, block.stderr[-2000:]

        root = tmp_path / "runs"
        base = ["run", "--result-storage", str(root / "prefect-results")]
        runs = {
            "tiny pipeline": (procs.tiny_overrides(tiny_preset, root), 0, "pipeline finished"),
            "Kaggle preset": (procs.tiny_overrides(tiny_preset, root, **{"model.spec": "gemma3_1b"}), 1,
                              "www.kaggle.com cannot be reached"),
            "Hugging Face model": (procs.tiny_overrides(tiny_preset, root,
                                                         **{"model.spec": "hf://google/gemma-3-1b-pt"}), 1,
                                   "huggingface.co cannot be reached"),
            "Hugging Face data": (procs.tiny_overrides(tiny_preset, root, **{
                "data.source": "hf://databricks/databricks-dolly-15k"}), 1, "HF_HUB_OFFLINE=1 is set"),
        }
        for name, (options, expected, says) in runs.items():
            run = procs.PipelineRun(tmp_path, name.replace(" ", "-"), [*base, *options],
                                    {**env, "HF_HUB_OFFLINE": "1"} if "data" in name else env)
            rc = run.finish(900)
            assert rc == expected and says in run.output(), (name, run.tail())
    finally:
        server.stop()

    jax_cache = Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    files = searchable_files(root, tmp_path / "client-home", tmp_path / "server-home", home, tmp_path,
                             skip=(kaggle_json,))
    files += searchable_files(jax_cache, since=started)
    assert any(p.name.endswith(".db") for p in files), "the server's database must be searched too"
    found = {}
    for path in set(files):
        data = path.read_bytes()
        hits = [name for name, value in SECRETS.items() if value.encode() in data or value[:16].encode() in data]
        if hits:
            found[str(path)] = hits
    print(f"searched {len(set(files))} files ({sum(p.stat().st_size for p in set(files)) >> 20} MiB)")
    assert found == {}, found
