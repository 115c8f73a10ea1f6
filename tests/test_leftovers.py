"""Leftovers of killed writers (hidden ``.tmp`` files and directories of gemma_core/atomic.py) are removed
by the next run, never while their writer lives, and never in a directory whose lock a live process holds.

The leftovers are made by real writers, killed for real: a child process enters ``atomic_path`` /
``atomic_directory``, writes half of its output, says so, and gets SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemma_core.atomic import TEMP_SUFFIX, remove_leftovers

REPO = Path(__file__).resolve().parents[1]

# A writer that stops halfway: inside the atomic block, half of its output written.
WRITER = """
import sys, time
from pathlib import Path
from gemma_core.atomic import atomic_directory, atomic_path
kind, target = sys.argv[1], Path(sys.argv[2])
with (atomic_directory(target) if kind == "dir" else atomic_path(target)) as tmp:
    (tmp / "train.parquet" if kind == "dir" else tmp).write_bytes(b"half of it")
    print(tmp, flush=True)
    time.sleep(600)
"""

# A process holding a lock file the way gemma_core.lora_train._one_trainer does (filelock).
LOCK_HOLDER = """
import sys, time, filelock
lock = filelock.FileLock(sys.argv[1]); lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _start(code: str, *args) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = proc.stdout.readline().strip()
    assert line, f"the child process ended early (rc {proc.poll()})"
    return proc, line


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()


def killed_writer(kind: str, target: Path) -> Path:
    """The temporary path a writer of ``target`` left when it was SIGKILLed halfway."""
    proc, tmp = _start(WRITER, kind, target)
    _kill(proc)
    assert Path(tmp).exists() and not target.exists()
    return Path(tmp)


def hidden_temporaries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(f".*{TEMP_SUFFIX}"))


def test_leftovers_of_crashed_writers_are_removed_and_a_live_writers_are_kept(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gemma_core.atomic")
    root = tmp_path / "runs"
    dead = [killed_writer("dir", root / "data" / "data-abc"), killed_writer("file", root / "eval" / "e1" / "eval.json"),
            killed_writer("file", root / "reports" / "latest.json")]
    live, live_tmp = _start(WRITER, "file", root / "reports" / "report-1" / "report.md")
    try:
        removed = remove_leftovers(root)
        assert sorted(removed) == sorted(dead)
        assert hidden_temporaries(root) == [Path(live_tmp)]  # its writer is still at work
        assert all(str(p) in caplog.text for p in dead)
    finally:
        _kill(live)
    assert remove_leftovers(root) == [Path(live_tmp)]  # once it is dead, it goes too
    assert hidden_temporaries(root) == []


def test_leftover_rules_after_a_crash_other_host_reused_pid_and_unnamed(tmp_path):
    other_host = tmp_path / ".x.json.some_other_host-12.abc123.tmp"
    unnamed = tmp_path / ".x.json.k2j3h4.tmp"  # the form written before temporaries named their writer
    reused_pid = tmp_path / f".y.json.{_this_host()}-1.abc123.tmp"  # pid 1 lives, but started after this was written
    not_ours = tmp_path / ".cache.tmp.d" / "keep"
    for path in (other_host, unnamed, reused_pid, not_ours):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    os.utime(reused_pid, (0, 0))
    assert remove_leftovers(tmp_path) == [reused_pid]
    # the holder of the directory's lock removes every temporary, whoever wrote it
    assert sorted(remove_leftovers(tmp_path, any_writer=True)) == sorted([other_host, unnamed])
    assert not_ours.exists()


def _this_host() -> str:
    from gemma_core import atomic

    return atomic._HOST


def test_crash_leftovers_in_a_directory_whose_training_lock_is_held_stay(tmp_path):
    from gemma_core.lora_train import TRAIN_LOCK, _one_trainer

    root = tmp_path / "runs"
    train_dir = root / "train" / "train-abc"
    leftover = killed_writer("dir", train_dir / "checkpoints" / "step-00000002")
    foreign = train_dir / ".adapter.lora.h5.other_host-7.abc.tmp"
    foreign.write_text("x")
    holder, _ = _start(LOCK_HOLDER, train_dir / TRAIN_LOCK)
    try:
        assert remove_leftovers(root) == []  # a live trainer holds it: its own sweep is the one that counts
        assert leftover.exists() and foreign.exists()
    finally:
        _kill(holder)
    # The next trainer takes the lock and sweeps under it: the killed writer's and the other host's go.
    with _one_trainer(train_dir):
        assert hidden_temporaries(root) == []


@pytest.mark.slow
def test_crash_leftovers_are_gone_after_the_next_run_of_the_pipeline(tiny_preset, tmp_path):
    """The stages' next run sweeps the output root (flows/stages.start_flow); a locked training dir stays."""
    from gemma_core.lora_train import TRAIN_LOCK
    from tests.helpers.in_process import run_pipeline
    from tests.helpers.tiny_config import tiny_pipeline_config

    root = tmp_path / "runs"
    dead = [killed_writer("dir", root / "data" / "data-0123456789abcdef"),
            killed_writer("file", root / "eval" / "eval-0123456789abcdef" / "eval.json"),
            killed_writer("file", root / "reports" / "report-0123456789abcdef" / "report.html"),
            killed_writer("dir", root / "export" / "export-0123456789abcdef" / "keras_preset"),
            killed_writer("file", root / "registry" / "default" / "champion.json")]
    locked_dir = root / "train" / "train-held-by-a-live-trainer"
    locked = killed_writer("dir", locked_dir / "checkpoints" / "step-00000002")
    holder, _ = _start(LOCK_HOLDER, locked_dir / TRAIN_LOCK)
    try:
        state, states = run_pipeline(tiny_pipeline_config(tiny_preset, root), str(tmp_path / "results"))
        assert state.is_completed(), state.message
        assert not [p for p in dead if p.exists()], [p for p in dead if p.exists()]
        assert hidden_temporaries(root) == [locked]
    finally:
        _kill(holder)
