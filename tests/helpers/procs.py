"""Subprocess helpers for the reliability tests: read a child's JSON-line events with a deadline,
SIGKILL it at a chosen event, and keep its stderr for the failure message."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from tasks.stages import PIPELINE_STAGES
from .tiny_config import tiny_pipeline_config

REPO = Path(__file__).resolve().parents[2]
TRAIN_DRIVER = REPO / "tests" / "helpers" / "train_driver.py"


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RELIABILITY_PAUSE", None)
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


class Child:
    """A child process whose stdout is JSON lines (one event each); stderr goes to a file."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str], cwd: Path | None = None):
        self.log_path = log_path
        self._stderr = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._stderr, env=env,
                                     cwd=cwd or REPO)
        self.events: list[dict] = []
        self._buffer = b""

    def _lines(self, timeout: float):
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while True:
                while b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    yield line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no expected event within {timeout:.0f} s; {self.describe()}")
                if not selector.select(left):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    if self._buffer:
                        line, self._buffer = self._buffer, b""
                        yield line
                    return
                self._buffer += chunk
        finally:
            selector.close()

    def wait_for(self, predicate, timeout: float = 180) -> dict:
        """Read events until one satisfies ``predicate``; fail if the child ends first."""
        for line in self._lines(timeout):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.append(event)
            if predicate(event):
                return event
        self.proc.wait(timeout=30)
        raise AssertionError(f"child exited (rc {self.proc.returncode}) before the expected event; {self.describe()}")

    def finish(self, timeout: float = 180) -> int:
        """Read every remaining event and wait for the exit code."""
        for line in self._lines(timeout):
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass
        return self.proc.wait(timeout=30)

    def sigkill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc.stdout.close()
        self._stderr.close()

    def describe(self) -> str:
        self._stderr.flush()
        tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
        return f"events so far {self.events[-5:]}; stderr tail:\n{tail}"

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == kind]


def start_training(preset: Path, out_dir: Path, log_path: Path, pause: str | None = None, **options) -> Child:
    argv = [sys.executable, str(TRAIN_DRIVER), str(preset), str(out_dir)]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    env = child_env(**({"RELIABILITY_PAUSE": pause} if pause else {}))
    return Child(argv, log_path, env)


def train_to_end(preset: Path, out_dir: Path, log_path: Path, **options) -> dict:
    """Run the training driver until it exits (it must exit 0); its "done" event."""
    child = start_training(preset, out_dir, log_path, **options)
    try:
        assert child.finish() == 0, child.describe()
    finally:
        child.close()
    return child.of("done")[0]


PIPELINE_DRIVER = REPO / "tests" / "helpers" / "pipeline_driver.py"
STAGES = PIPELINE_STAGES


def tiny_overrides(preset: Path, root: Path, **changes) -> list[str]:
    """``--set`` options of the tiny pipeline (tests/helpers/tiny_config.py); ``changes`` are dotted
    (``**{"model.spec": "gemma3_1b"}``)."""
    cfg = tiny_pipeline_config(preset, root, **{key.replace(".", "__", 1): value for key, value in changes.items()})
    options = []
    for section, fields in cfg.items():
        for field, value in fields.items():
            options += ["--set", f"{section}.{field}={value}"]
    return options


class PipelineRun:
    """``gemma-lora run`` (through tests/helpers/pipeline_driver.py) in a child process: its stdout and
    stderr in one file, its events in another."""

    def __init__(self, work: Path, name: str, args: list[str], env: dict[str, str]):
        self.work, self.name = Path(work), name
        self.output_path = self.work / f"{name}.out"
        self.events_path = self.work / f"{name}.events.jsonl"
        env = {**env, "RELIABILITY_EVENTS": str(self.events_path)}
        self._out = open(self.output_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(PIPELINE_DRIVER), *args], stdout=self._out,
                                     stderr=subprocess.STDOUT, env=env, cwd=self.work)

    def events(self) -> list[dict]:
        if not self.events_path.exists():
            return []
        found = []
        for line in self.events_path.read_text().splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                pass
        return found

    def wait_event(self, kind: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = [e for e in self.events() if e.get("event") == kind]
            if match:
                return match[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before {kind!r}:\n{self.tail()}")
            time.sleep(0.3)
        raise TimeoutError(f"{self.name}: no {kind!r} event within {timeout} s:\n{self.tail()}")

    def finish(self, timeout: float = 900) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._out.close()

    def sigkill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL
        self._out.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._out.close()

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.output_path.read_text(errors="replace")

    def tail(self, chars: int = 4000) -> str:
        return self.output()[-chars:]

    def states(self) -> dict[str, str]:
        """Stage -> final state, from the summary the command line prints at the end of a run."""
        import re

        found = {}
        for stage, state in re.findall(r"^  (%s)\s+(\w+)" % "|".join(STAGES), self.output(), re.M):
            found[stage] = state
        return found
