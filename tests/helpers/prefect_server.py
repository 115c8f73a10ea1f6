"""A real ``prefect server start`` on 127.0.0.1, a free port and its own PREFECT_HOME, for tests that
run the pipeline against a server, stop it under a run, and start it again (same port, same database)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from flows.local_server import free_port, wait_healthy

PREFECT = Path(sys.executable).parent / "prefect"


class PrefectServer:
    def __init__(self, home: Path, log_dir: Path, port: int | None = None):
        self.home, self.log_dir = Path(home), Path(log_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(self.home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
                   PREFECT_UI_ENABLED="false")
        return env

    def start(self, timeout: float = 180) -> "PrefectServer":
        self.starts += 1
        log = open(self.log_dir / f"prefect-server-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True,
        )
        log.close()
        try:
            wait_healthy(self.url, timeout, self.proc)
        except RuntimeError as err:
            raise RuntimeError(f"{err}: {self.log_text()[-2000:]}") from err
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        # the port must be free again before a restart binds it
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("prefect-server-*.log")))
