"""The temporary local Prefect server of an embedded run, started before the pipeline's imports.

Left to itself, Prefect starts its temporary server at a run's first API call: it imports the
server's code into the calling process (about 5 s on 2 cores), then starts uvicorn in a subprocess
and waits for it (about 7 s more). That was most of a fully cached rerun (18.5 s). ``gemma-lora
run`` instead starts the same server in the same way, uvicorn serving Prefect's app factory in
Prefect's ephemeral mode on the SQLite database under ``PREFECT_HOME``, as its first step. The
server then starts up while this process imports the pipeline, and the run talks to it through
``PREFECT_API_URL``. The server stops when this process exits, and on Linux also when it is killed.

>>> server = LocalServer.start()                             # doctest: +SKIP
>>> ...  # heavy imports                                      # doctest: +SKIP
>>> server.wait_ready(); server.use()                       # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

# What Prefect 3.9's own temporary server (prefect.server.api.server.SubprocessASGIServer) sets:
# no UI, and the reduced set of background services of its ephemeral mode.
EPHEMERAL_MODE = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api_url: str, timeout: float = 180, proc: subprocess.Popen | None = None) -> float:
    """Wait until ``api_url``/health answers; returns the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with {proc.returncode} before it was healthy")
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{api_url}/health did not answer within {timeout:.0f} s")
        time.sleep(0.1 if proc is not None else 0.5)


def _stop_with_parent() -> None:  # runs in the child between fork and exec
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalServer:
    def __init__(self, process: subprocess.Popen, port: int):
        self.process = process
        self.port = port
        self.api_url = f"http://127.0.0.1:{port}/api"

    @classmethod
    def start(cls) -> "LocalServer":
        """Start the server (returns at once); call before anything imports Prefect's server code."""
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, **EPHEMERAL_MODE}, stdin=subprocess.DEVNULL,
            preexec_fn=_stop_with_parent if sys.platform == "linux" else None,
        )
        server = cls(process, port)
        atexit.register(server.stop)
        return server

    def wait_ready(self, timeout: float | None = None) -> float:
        """Block until the server answers; returns the seconds waited. Raises RuntimeError naming
        PREFECT_HOME if it exits or does not answer in time (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)."""
        if timeout is None:
            timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 180))
        try:
            return wait_healthy(self.api_url, timeout, self.process)
        except (RuntimeError, TimeoutError) as err:
            self.stop()
            home = os.environ.get("PREFECT_HOME", "~/.prefect")
            raise RuntimeError(f"the temporary local Prefect server did not start ({err}); see its output "
                               f"above (its database is {home}/prefect.db), run again, or set PREFECT_API_URL "
                               "to a running server") from err

    def use(self) -> None:
        """Point this process (and its children) at the server."""
        from prefect.context import refresh_global_settings_context

        os.environ["PREFECT_API_URL"] = self.api_url
        # It serves no UI and stops with the run: no "View at" links to it in the logs.
        os.environ.setdefault("PREFECT_UI_URL", "")
        refresh_global_settings_context()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
