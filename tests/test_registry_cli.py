"""`gemma-lora champion | promote | rollback` and what `gemma-lora export` picks, against a fake last-run
summary (latest.json) and fake adapter files in a temporary output.root: no model, no Prefect run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from flows.cli_champion import CommandError, export_inputs
from flows.storage import LATEST
from gemma_core.config import load_config
from gemma_core.manifest import sha256_bytes
from gemma_core.registry import Registry
from tasks.results import FileRef, ModelResult, TrainOutput

REPO = Path(__file__).resolve().parents[1]
RUN_ID = "0b9d5c1e-7f0a-4a53-9d1c-3f5e2a1b8c7d"


def write_latest(root: Path, adapter_bytes: bytes = b"tuned adapter", run_id: str = RUN_ID,
                 model_hash: str = "a1b2c3d4e5f60718", loss: float = 1.25) -> dict:
    """A latest.json as the pipeline writes it (the fields the commands read), with a real adapter file."""
    train_dir = root / "train" / f"train-{sha256_bytes(adapter_bytes)[:16]}"
    train_dir.mkdir(parents=True, exist_ok=True)
    (train_dir / "adapter.lora.h5").write_bytes(adapter_bytes)
    (train_dir / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    train = TrainOutput(
        stage="train-lora", fingerprint="f" * 64,
        files={"adapter": FileRef.of(train_dir / "adapter.lora.h5"), "log": FileRef.of(train_dir / "train_log.jsonl")},
        seconds=3.0, peak_rss_mb=100.0, out_dir=str(train_dir), steps=5, resumed_from_step=0, final_loss=1.9,
        useful_tokens_per_second=50.0, learning_rate=5e-4, lora={"rank": 4, "target_layer_names": None},
    )
    model = ModelResult(stage="resolve-model", fingerprint="spec", files={}, seconds=0.1, peak_rss_mb=1.0,
                        spec="embedded:gemma3-270m", preset_dir="/cache/preset", model_hash=model_hash)
    report_dir = root / "reports" / "report-0123456789abcdef"
    summary = {
        "flow_run_id": run_id, "finished_at": "2026-01-01T00:00:00+00:00", "report_dir": str(report_dir),
        "base": {"completion_loss": 2.5}, "tuned": {"completion_loss": loss, "rouge_l_f1": 0.31, "eos_rate": 0.5,
                                                    "mean_answer_tokens": 21.0},
        "results": {"train": train.model_dump(mode="json"), "model": model.model_dump(mode="json"),
                    "data": {"data_hash": "dddd0000dddd0000"}},
        "result_storage": str(root / "prefect-results"),
        "config": {"output": {"root": str(root)}, "train": {"learning_rate": 5e-4}, "lora": {"rank": 4}},
    }
    (root / LATEST).parent.mkdir(parents=True, exist_ok=True)
    (root / LATEST).write_text(json.dumps(summary))
    return summary


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "runs"


def cli(root: Path, *args: str, capsys) -> tuple[int, str, str]:
    rc = main([*args, "--set", f"output.root={root}"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_champion_before_and_after_promote_latest(root, capsys):
    summary = write_latest(root)
    rc, out, _ = cli(root, "champion", capsys=capsys)
    assert rc == 0 and "the base model: nothing promoted yet" in out

    rc, out, _ = cli(root, "promote", "latest", capsys=capsys)
    adapter_sha = summary["results"]["train"]["files"]["adapter"]["sha256"]
    assert rc == 0 and f"promoted the last run ({RUN_ID})" in out and adapter_sha[:12] in out and "record 1" in out

    rc, out, _ = cli(root, "champion", capsys=capsys)
    assert rc == 0
    for expected in ("a tuned adapter, record 1, promoted by user", f"run          {RUN_ID}",
                     "embedded:gemma3-270m (model hash a1b2c3d4e5f60718)", "dddd0000dddd0000", adapter_sha,
                     "rank 4", "report-0123456789abcdef/report.html", "held-out loss", "1.250", "ROUGE-L F1",
                     "promoted by hand (gemma-lora promote latest)", "history (1 record"):
        assert expected in out, (expected, out)

    rc, out, _ = cli(root, "champion", "--format", "json", capsys=capsys)
    shown = json.loads(out)
    assert shown["champion"]["adapter_sha256"] == adapter_sha and shown["champion"]["promoted_by"] == "user"
    assert shown["champion"]["metrics"] == summary["tuned"] and len(shown["history"]) == 1
    # The registry holds its own copy.
    assert Path(shown["champion"]["adapter"]).read_bytes() == b"tuned adapter"
    assert shown["champion"]["adapter"].startswith(str((root / "registry" / "default").resolve()))


def test_promote_by_flow_run_id_and_by_history_record_then_rollback(root, capsys):
    write_latest(root, b"adapter one", run_id="run-one", loss=1.5)
    assert cli(root, "promote", "run-one", "--reason", "first by hand", capsys=capsys)[0] == 0
    write_latest(root, b"adapter two", run_id="run-two", loss=1.2)
    assert cli(root, "promote", "latest", capsys=capsys)[0] == 0
    rc, out, _ = cli(root, "promote", "1", capsys=capsys)
    assert rc == 0 and "promoted history record 1" in out and "record 3" in out
    registry = Registry(root)
    assert registry.champion().run_id == "run-one" and registry.champion().reason.endswith("promote 1)")

    rc, out, _ = cli(root, "rollback", capsys=capsys)
    assert rc == 0 and "rolled back" in out and "record 4" in out
    assert registry.champion().run_id == "run-two"
    rc, out, _ = cli(root, "champion", capsys=capsys)
    lines = [line for line in out.splitlines() if line.startswith("  #")]
    assert len(lines) == 4 and "rollback" in lines[3] and "first by hand" in lines[0]

    assert cli(root, "rollback", capsys=capsys)[0] == 0  # to run-one
    rc, out, _ = cli(root, "rollback", capsys=capsys)
    assert rc == 0 and "the base model is the champion" in out
    rc, _, err = cli(root, "rollback", capsys=capsys)
    assert rc == 1 and "base model already" in err
    rc, out, _ = cli(root, "champion", capsys=capsys)
    assert "champion of 'default': the base model, record 6, promoted by rollback" in out


def test_a_bad_run_value_names_it_and_the_accepted_forms(root, capsys):
    rc, _, err = cli(root, "promote", "latest", capsys=capsys)
    assert rc == 1 and "latest.json is missing" in err and "gemma-lora run" in err
    write_latest(root)
    rc, _, err = cli(root, "promote", "some-other-run", capsys=capsys)
    assert rc == 1
    assert "'some-other-run'" in err and "`latest`" in err and RUN_ID in err and "history record number" in err
    rc, _, err = cli(root, "promote", "7", capsys=capsys)
    assert rc == 1 and "no history record 7" in err
    assert Registry(root).champion() is None

    rc, _, err = cli(root, "champion", "--name", "Bad/Name", capsys=capsys)
    assert rc == 1 and "registry name 'Bad/Name'" in err


def test_promote_refuses_an_adapter_deleted_or_changed_since_its_run(root, capsys):
    summary = write_latest(root)
    adapter = Path(summary["results"]["train"]["files"]["adapter"]["path"])
    adapter.write_bytes(b"edited after training")
    rc, _, err = cli(root, "promote", "latest", capsys=capsys)
    assert rc == 1 and str(adapter) in err and "changed after training" in err
    adapter.unlink()
    rc, _, err = cli(root, "promote", "latest", capsys=capsys)
    assert rc == 1 and "missing" in err
    assert Registry(root).champion() is None


def test_a_damaged_registry_is_reported_with_its_path_and_the_fix(root, capsys):
    write_latest(root)
    assert cli(root, "promote", "latest", capsys=capsys)[0] == 0
    champion_json = root / "registry" / "default" / "champion.json"
    champion_json.write_text(champion_json.read_text().replace('"sequence": 1', '"sequence": 9'))
    for command in (["champion"], ["promote", "latest"], ["rollback"], ["export"]):
        rc, out, err = cli(root, *command, capsys=capsys)
        assert rc == 1 and str(champion_json) in err and "restore it from backup" in err, (command, err)
        assert "nothing promoted" not in out + err
    rc, out, _ = cli(root, "champion", "--repair", capsys=capsys)
    assert rc == 0 and "points at record 1" in out and "a tuned adapter, record 1" in out


def test_export_picks_the_champion_by_default_and_the_last_run_with_run_latest(root, capsys):
    cfg = load_config(None, [f"output.root={root}"])
    write_latest(root, b"champion adapter", run_id="run-one")
    with pytest.raises(CommandError, match="nothing promoted yet.*--run latest"):
        export_inputs(cfg)
    rc, _, err = cli(root, "export", capsys=capsys)  # fails before any Prefect or Keras work
    assert rc == 1 and "nothing promoted yet: the champion is the base model" in err
    assert cli(root, "promote", "latest", capsys=capsys)[0] == 0
    last = write_latest(root, b"newer adapter", run_id="run-two")

    champion = export_inputs(cfg)
    held = Registry(root).champion()
    assert champion.adapter.file == FileRef(path=held.adapter, sha256=held.adapter_sha256)
    assert champion.adapter.lora == held.lora and "record 1" in champion.what
    assert champion.model.model_hash == held.model_hash and champion.config == last["config"]

    latest = export_inputs(cfg, "latest")
    assert latest.adapter.file.sha256 == sha256_bytes(b"newer adapter")
    assert latest.adapter == TrainOutput.model_validate(last["results"]["train"]).adapter() and "run-two" in latest.what

    write_latest(root, b"newer adapter", run_id="run-three", model_hash="ffff000011112222")
    with pytest.raises(CommandError, match="model hash a1b2c3d4e5f60718.*ffff000011112222.*--run latest"):
        export_inputs(cfg)
    assert export_inputs(cfg, "latest").model.model_hash == "ffff000011112222"

    Registry(root).rollback()
    with pytest.raises(CommandError, match=r"nothing promoted yet \(record 2: rollback"):
        export_inputs(cfg)


def test_the_registry_commands_import_neither_prefect_nor_keras(root):
    write_latest(root)
    script = (
        "import sys; from flows.cli import main\n"
        f"root = {str(root)!r}\n"
        "for args in (['promote', 'latest'], ['champion'], ['rollback'], ['champion', '--format', 'json']):\n"
        "    assert main([*args, '--set', 'output.root=' + root]) == 0, args\n"
        "heavy = [m for m in ('prefect', 'keras', 'keras_hub', 'tensorflow', 'jax') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
