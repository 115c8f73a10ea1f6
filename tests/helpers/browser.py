"""Headless Chromium for the browser tests (every one named ``*browser*``).

- :func:`chromium_or_skip`: the browser, else a skip that says how to install it; under CI
  (``CI=true``) a missing browser fails instead, so CI never passes with the browser tests skipped.
  ``make test`` installs Debian's ``chromium`` first where it is missing and it can (root, apt-get).
- :func:`chromium_cli`: one ``--dump-dom`` or ``--screenshot`` call (the Prefect UI tests).
- :class:`DevToolsPage`: a page driven over the DevTools protocol (Chromium's own remote-debugging
  websocket, with the ``websockets`` package that Prefect already installs): console messages and
  uncaught exceptions, JavaScript evaluated in the page, a screenshot. No browser driver package.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flows.prefect_server import stop_by_pid

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
INSTALL_HINT = "no chromium (Debian: apt-get install -y chromium; `make test` does it as root)"


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_or_skip() -> str:
    exe = chromium_path()
    if exe:
        return exe
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {INSTALL_HINT}: a browser test may not skip in CI")
    pytest.skip(INSTALL_HINT)


def chromium_cli(url: str, out: Path, tmp: Path, *, screenshot: bool) -> str:
    """A screenshot of ``url`` to ``out``, or (``screenshot=False``) its DOM after scripts ran."""
    exe = chromium_or_skip()
    profile = tmp / f"profile-{out.stem}-{screenshot}"
    profile.mkdir()
    action = [f"--screenshot={out}"] if screenshot else ["--dump-dom"]
    done = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1800",
                           "--virtual-time-budget=20000", *action, url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class DevToolsPage:
    """One Chromium with one page, over the DevTools protocol; ``with DevToolsPage(tmp) as page:``.

    ``console`` collects every console message and uncaught exception as ``(level, text)``; levels
    are the protocol's (``error`` for console.error, uncaught exceptions and failed loads)."""

    def __init__(self, tmp: Path, width: int = 1400, height: int = 1800):
        self.tmp, self.width, self.height = Path(tmp), width, height
        self.console: list[tuple[str, str]] = []
        self._ids = itertools.count(1)

    def __enter__(self) -> "DevToolsPage":
        from websockets.sync.client import connect

        exe = chromium_or_skip()
        profile = self.tmp / "devtools-profile"
        profile.mkdir(parents=True, exist_ok=True)
        self.log = open(self.tmp / "chromium.log", "w+")
        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                      f"--window-size={self.width},{self.height}", "--remote-debugging-port=0",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=self.log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        port_file = profile / "DevToolsActivePort"  # Chromium writes the port it chose here
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not open its DevTools port: {self._log_tail()}")
            time.sleep(0.1)
        port = port_file.read_text().splitlines()[0]
        import urllib.request

        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=64 * 2 ** 20, open_timeout=30)
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        stop_by_pid(self.proc, ((signal.SIGTERM, 10), (signal.SIGKILL, 10)), group=True)
        self.log.close()

    def _log_tail(self) -> str:
        self.log.flush()
        return (self.tmp / "chromium.log").read_text(errors="replace")[-2000:]

    def _record(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append((params.get("type", "log"), text))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.console.append(("error", details.get("exception", {}).get("description") or details.get("text", "")))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.console.append((entry.get("level", "info"), f"{entry.get('text', '')} {entry.get('url', '')}".strip()))

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        """Send one command; returns its result (events seen meanwhile are recorded)."""
        call_id = next(self._ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._record(message)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            self._record(message)
            if message.get("method") == method:
                return message.get("params", {})

    def open(self, url: str, timeout: float = 60) -> None:
        """Navigate and wait for the load event (images included)."""
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired", timeout)

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (beyond the window's height)."""
        height = int(self.evaluate("document.documentElement.scrollHeight") or self.height)
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": self.width, "height": height, "scale": 1})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def errors(self) -> list[str]:
        return [text for level, text in self.console if level == "error"]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


