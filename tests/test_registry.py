"""The champion registry (gemma_core/registry.py): promotion, compare-and-swap, history, rollback, and a
damaged file always named, never read as "no champion". Small fake adapter files; no model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gemma_core.manifest import sha256_bytes
from gemma_core.registry import Champion, ChampionChanged, NothingToRollBack, Registry, RegistryError

REPO = Path(__file__).resolve().parents[1]
LORA = {"rank": 4, "target_layer_names": None}


def fake_adapter(tmp_path: Path, content: bytes, name: str = "adapter.lora.h5") -> Path:
    path = tmp_path / "runs" / "train" / f"train-{sha256_bytes(content)[:8]}" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def promote(registry: Registry, adapter: Path | None, token: str | None = None, **fields) -> Champion:
    base = dict(
        adapter=adapter, adapter_sha256=sha256_bytes(adapter.read_bytes()) if adapter and adapter.exists() else None,
        lora=LORA if adapter else None, model_spec="embedded:gemma3-270m", model_hash="m" * 16, data_hash="d" * 16,
        run_id="run-1", config={"lora": {"rank": 4}}, metrics={"completion_loss": 1.5},
        report="/runs/reports/report-x/report.html", promoted_by="gate", reason="passed the gate",
    )
    return registry.promote(registry.token() if token is None else token, **{**base, **fields})


@pytest.fixture
def out_root(tmp_path) -> Path:
    return tmp_path / "out"


def test_before_any_promotion_the_champion_is_the_base_model(out_root):
    registry = Registry(out_root)
    assert registry.champion() is None
    assert registry.token() == ""
    assert registry.history() == []
    assert not registry.dir.exists()  # reading creates nothing


def test_promote_champion_history_round_trip(tmp_path, out_root):
    a, b = fake_adapter(tmp_path, b"adapter A"), fake_adapter(tmp_path, b"adapter B")
    registry = Registry(out_root)
    first = promote(registry, a, run_id="run-a")
    assert first.sequence == 1 and first.promoted_by == "gate" and first.rollback_to == 0
    assert first.adapter == str((registry.adapters_dir / f"{first.adapter_sha256}.lora.h5").resolve())
    assert Path(first.adapter).read_bytes() == b"adapter A"
    assert first.promoted_at.endswith("+00:00")

    second = promote(registry, b, run_id="run-b", promoted_by="approval:looks good", metrics={"completion_loss": 1.2})
    assert second.sequence == 2 and second.rollback_to == 1
    # Another Registry object (another worker) sees the same champion and history.
    other = Registry(out_root)
    assert other.champion() == second
    assert [c.run_id for c in other.history()] == ["run-a", "run-b"]
    assert other.history()[0] == first
    assert other.record(1) == first
    assert Champion.model_validate_json(second.model_dump_json()) == second

    # On disk: immutable history records, a pointer, the copies; each JSON file self-checksummed.
    assert sorted(p.name for p in registry.history_dir.iterdir()) == ["000001.json", "000002.json"]
    for path in [registry.champion_path, *registry.history_dir.iterdir()]:
        envelope = json.loads(path.read_text())
        canonical = json.dumps(envelope["body"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert envelope["sha256"] == sha256_bytes(canonical.encode())
    record = json.loads(registry.record_path(2).read_text())["body"]
    assert record["adapter"] == f"adapters/{second.adapter_sha256}.lora.h5"  # relative: output.root may move
    assert registry.token() == json.loads(registry.champion_path.read_text())["sha256"]


def test_a_stale_token_raises_champion_changed_and_writes_nothing(tmp_path, out_root):
    a, b = fake_adapter(tmp_path, b"adapter A"), fake_adapter(tmp_path, b"adapter B")
    mine, theirs = Registry(out_root), Registry(out_root)
    promote(mine, a)
    stale = mine.token()
    winner = promote(theirs, b, run_id="their-run", reason="their gate passed")
    with pytest.raises(ChampionChanged) as caught:
        promote(mine, a, token=stale)
    message = str(caught.value)
    assert "record 2" in message and "their-run" in message and "Rerun" in message
    assert caught.value.current == winner and caught.value.expected == stale
    assert mine.champion() == winner and len(mine.history()) == 2
    # The token of "never promoted" is "": it is stale once anything was promoted.
    with pytest.raises(ChampionChanged):
        promote(mine, a, token="")


_RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from gemma_core.registry import ChampionChanged, Registry
    from gemma_core.manifest import sha256_file
    root, adapter, go, who = sys.argv[1:5]
    registry = Registry(root)
    token = registry.token()
    Path(go + "." + who).touch()  # ready: the token is read
    while not Path(go).exists():
        time.sleep(0.005)
    try:
        registry.promote(token, adapter=adapter, adapter_sha256=sha256_file(adapter), lora={{"rank": 4}},
                         model_spec="m", model_hash="h", run_id=who, promoted_by="gate", reason=who)
    except ChampionChanged as err:
        print("LOST", err)
    else:
        print("WON")
""")


def test_two_processes_promoting_at_once_exactly_one_wins(tmp_path, out_root):
    script = tmp_path / "racer.py"
    script.write_text(_RACER.format(repo=str(REPO)))
    go = tmp_path / "go"
    adapters = [fake_adapter(tmp_path, f"adapter {i}".encode()) for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(out_root), str(adapter), str(go), f"run-{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, adapter in enumerate(adapters)]
    deadline = time.monotonic() + 60
    while not all(Path(f"{go}.run-{i}").exists() for i in range(2)):  # both have read the token ("")
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    go.touch()
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = sorted(out.split()[0] for out, _ in outputs)
    assert results == ["LOST", "WON"], outputs
    winner = next(i for i, (out, _) in enumerate(outputs) if out.startswith("WON"))
    champion = Registry(out_root).champion()
    assert champion.run_id == f"run-{winner}" and champion.sequence == 1
    assert len(Registry(out_root).history()) == 1


def test_a_damaged_champion_json_is_named_never_read_as_no_champion(tmp_path, out_root):
    registry = Registry(out_root)
    promote(registry, fake_adapter(tmp_path, b"adapter A"))
    good = registry.champion_path.read_text()

    registry.champion_path.write_text(good.replace('"sequence": 1', '"sequence": 2'))  # checksum now wrong
    for call in (registry.champion, registry.token, registry.history):
        with pytest.raises(RegistryError, match="champion.json: damaged.*restore it from backup.*--repair"):
            call()
    registry.champion_path.write_text(good[:40])
    with pytest.raises(RegistryError, match="champion.json: not valid JSON"):
        registry.champion()
    registry.champion_path.unlink()
    with pytest.raises(RegistryError, match="champion.json: missing, but .*history"):
        registry.champion()
    with pytest.raises(RegistryError, match="champion.json"):
        promote(registry, fake_adapter(tmp_path, b"adapter B"), token="")

    repaired = registry.repair()
    assert repaired.sequence == 1 and registry.champion() == repaired


def test_a_damaged_or_missing_history_record_is_named(tmp_path, out_root):
    registry = Registry(out_root)
    promote(registry, fake_adapter(tmp_path, b"adapter A"))
    promote(registry, fake_adapter(tmp_path, b"adapter B"))
    current = registry.record_path(2)
    good = current.read_text()

    current.write_text(good.replace("passed the gate", "passed the gate!"))
    with pytest.raises(RegistryError, match=r"000002\.json: damaged.*restore it from backup"):
        registry.champion()
    # Re-signed after an edit: the checksum is right, but champion.json recorded another one.
    envelope = json.loads(current.read_text())
    envelope["sha256"] = sha256_bytes(json.dumps(envelope["body"], sort_keys=True, separators=(",", ":"),
                                                 ensure_ascii=False).encode())
    current.write_text(json.dumps(envelope))
    with pytest.raises(RegistryError, match=r"000002\.json: its sha256 .* champion\.json recorded"):
        registry.champion()
    current.write_text(good)
    assert registry.champion().sequence == 2

    registry.record_path(1).unlink()
    with pytest.raises(RegistryError, match=r"000001\.json: history record 1 is missing"):
        registry.history()
    with pytest.raises(RegistryError, match=r"000001\.json"):
        registry.rollback()
    assert registry.champion().sequence == 2  # the champion itself is still intact


def test_a_damaged_adapter_copy_is_named(tmp_path, out_root):
    registry = Registry(out_root)
    champion = promote(registry, fake_adapter(tmp_path, b"adapter A"))
    Path(champion.adapter).write_bytes(b"adapter A, bit-flipped")
    with pytest.raises(RegistryError, match=r"\.lora\.h5: the adapter copy of champion record 1 is damaged"):
        registry.champion()
    Path(champion.adapter).unlink()
    with pytest.raises(RegistryError, match=r"\.lora\.h5: the adapter copy of champion record 1 is missing"):
        registry.champion()
    # Promoting the same adapter again from its run restores the copy.
    promote(registry, fake_adapter(tmp_path, b"adapter A"))
    assert Path(registry.champion().adapter).read_bytes() == b"adapter A"


def test_rollback_twice_returns_to_the_base_model(tmp_path, out_root):
    registry = Registry(out_root)
    a = promote(registry, fake_adapter(tmp_path, b"adapter A"), run_id="run-a")
    promote(registry, fake_adapter(tmp_path, b"adapter B"), run_id="run-b")

    back = registry.rollback()
    assert back.sequence == 3 and back.promoted_by == "rollback"
    assert (back.adapter, back.adapter_sha256, back.run_id, back.metrics) == (a.adapter, a.adapter_sha256, "run-a",
                                                                              a.metrics)
    assert "from record 2 to record 1" in back.reason

    base = registry.rollback(by="ops")
    assert base.sequence == 4 and base.is_base_model and base.adapter_sha256 is None and base.lora is None
    assert "by ops" in base.reason and "the base model" in base.reason
    assert registry.champion() == base  # a record (with its lineage), not None
    assert [c.promoted_by for c in registry.history()] == ["gate", "gate", "rollback", "rollback"]
    with pytest.raises(NothingToRollBack, match="base model already"):
        registry.rollback()

    # A promotion after a rollback rolls back to the record it replaced (the base model here).
    promote(registry, fake_adapter(tmp_path, b"adapter C"))
    assert registry.rollback().is_base_model


def test_rollback_of_a_re_promotion_returns_to_what_it_replaced(tmp_path, out_root):
    registry = Registry(out_root)
    a = promote(registry, fake_adapter(tmp_path, b"adapter A"))
    b = promote(registry, fake_adapter(tmp_path, b"adapter B"))
    old = registry.record(1)
    again = promote(registry, Path(old.adapter), **{k: getattr(old, k) for k in (
        "adapter_sha256", "lora", "model_spec", "model_hash", "data_hash", "run_id", "config", "metrics", "report")},
        promoted_by="user", reason="re-promoted record 1")
    assert again.sequence == 3 and again.adapter == a.adapter and again.rollback_to == 2
    assert registry.rollback().adapter_sha256 == b.adapter_sha256


def test_the_adapter_copy_survives_deleting_the_run(tmp_path, out_root):
    registry = Registry(out_root)
    original = fake_adapter(tmp_path, b"adapter A")
    champion = promote(registry, original)
    shutil.rmtree(original.parent)
    assert Registry(out_root).champion() == champion
    assert Path(champion.adapter).read_bytes() == b"adapter A"


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, out_root):
    for bad in ("", "-x", "Prod", "a/b", "..", "a b", "x" * 101):
        with pytest.raises(ValueError, match="registry name"):
            Registry(out_root, bad)
    assert Registry(out_root, "nightly_v2-1").dir == out_root / "registry" / "nightly_v2-1"

    registry = Registry(out_root)
    adapter = fake_adapter(tmp_path, b"adapter A")
    with pytest.raises(ValueError, match="promoted_by"):
        promote(registry, adapter, promoted_by="cron")
    with pytest.raises(ValueError, match="lora config"):
        promote(registry, adapter, lora=None)
    with pytest.raises(RegistryError, match="sha256 .* not the recorded"):
        promote(registry, adapter, adapter_sha256="0" * 64)
    with pytest.raises(RegistryError, match="adapter to promote is missing"):
        promote(registry, tmp_path / "gone.lora.h5")
    assert registry.champion() is None and registry.token() == ""
    assert not registry.history_dir.exists()


def test_an_interrupted_first_promotion_still_reads_as_never_promoted(tmp_path, out_root):
    registry = Registry(out_root)
    promote(registry, fake_adapter(tmp_path, b"adapter A"))
    # As if the process died between the history record and the pointer of a first promotion.
    registry._write_pointer(0, None)
    assert registry.champion() is None and registry.token() == "" and registry.history() == []
    again = promote(registry, fake_adapter(tmp_path, b"adapter B"), token="")
    assert again.sequence == 1 and Path(again.adapter).read_bytes() == b"adapter B"
