"""Every Prefect server this project starts, started one way: a process on 127.0.0.1 that is waited
for until healthy, stopped by its PID, and whose output can be read back.

Two kinds:

- :meth:`PrefectServer.temporary`, the one ``gemma-lora run`` starts as its very first step. Left to
  itself, Prefect starts its temporary server at a run's first API call: it imports the server's
  code into the calling process, then starts uvicorn in a subprocess and waits for it; that was
  most of a fully cached rerun (bench/RESULTS.md, Orchestration). The CLI instead
  starts the same server in the same way, uvicorn serving Prefect's app factory in Prefect's
  ephemeral mode on the SQLite database under ``PREFECT_HOME``, before it imports the pipeline, so
  the server starts up meanwhile; the run talks to it through ``PREFECT_API_URL``. It serves no UI,
  writes to the CLI's own output, and stops when the CLI exits, on Linux also when it is killed.

  >>> server = PrefectServer.temporary()                    # doctest: +SKIP
  >>> ...  # heavy imports                                   # doctest: +SKIP
  >>> server.wait_healthy(); server.use()                   # doctest: +SKIP

- :meth:`PrefectServer.full`, a ``prefect server start`` (UI, all services) with its own
  ``PREFECT_HOME``, on a free or a given port, its output appended to a log file, in a process
  group of its own: what ``deployments/setup_local.py`` and the tests start. It can be stopped and
  started again on the same port with the same database.

  >>> server = PrefectServer.full(home, log_path).start()  # doctest: +SKIP
  >>> server.stop(); server.start()                         # doctest: +SKIP

Only the standard library is imported here: the CLI imports this module before anything else.
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
from pathlib import Path
from typing import Mapping

HOST = "127.0.0.1"
# What Prefect 3.9's own temporary server (prefect.server.api.server.SubprocessASGIServer) sets:
# no UI, and the reduced set of background services of its ephemeral mode.
EPHEMERAL_MODE = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
# Settings of a Prefect client, not of a server: a server started here must not inherit them.
CLIENT_SETTINGS = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE")
LOG_TAIL_CHARS = 2000


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def stop_by_pid(proc: subprocess.Popen, steps, group: bool = False) -> int | None:
    """Send each ``(signal, seconds to wait)`` of ``steps`` in turn to ``proc`` (with ``group``, to its
    process group) until it exits; returns its exit code (None if it outlived every step)."""
    for sig, wait in steps:
        if proc.poll() is not None:
            break
        try:
            (os.killpg if group else os.kill)(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def prefect_cli() -> list[str]:
    """The `prefect` command of this interpreter's environment."""
    exe = Path(sys.executable).parent / "prefect"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]


def _poll_health(api_url: str, timeout: float, proc: subprocess.Popen) -> float:
    """Seconds until ``api_url``/health answers. RuntimeError if ``proc`` exits first, TimeoutError
    after ``timeout`` seconds."""
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with {proc.returncode} before it was healthy")
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{api_url}/health did not answer within {timeout:.0f} s")
        time.sleep(0.1)


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def _stop_with_parent() -> None:  # runs in the child between fork and exec
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class PrefectServer:
    """One Prefect server on 127.0.0.1:``port``; make one with :meth:`temporary` or :meth:`full`.

    ``process`` is the running (or last) process, ``api_url`` its API, ``home`` its PREFECT_HOME (the
    SQLite database is ``home/prefect.db``), ``ui`` whether it serves the UI, ``log_path`` where its
    output goes (None: this process's own output), ``starts`` how often it was started.
    """

    def __init__(self, command: list[str], env: Mapping[str, str], port: int, home: Path, *, name: str,
                 ui: bool = True, log_path: Path | None = None, own_process_group: bool = True,
                 stop_with_parent: bool = False, stop_grace: float = 30, startup_timeout: float = 180):
        self.command, self.env, self.port, self.home = list(command), dict(env), port, Path(home)
        self.name, self.ui = name, ui
        self.log_path = Path(log_path) if log_path is not None else None
        self.api_url = f"http://{HOST}:{port}/api"
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self._own_process_group = own_process_group
        self._stop_with_parent = stop_with_parent and sys.platform == "linux"
        self._stop_grace = stop_grace
        self._startup_timeout = startup_timeout

    # --- the two kinds ---------------------------------------------------------------------------

    @classmethod
    def temporary(cls) -> "PrefectServer":
        """The CLI's temporary server, started at once (returns without waiting; see wait_healthy).
        Call it before anything imports Prefect's server code. Its database is under this process's
        PREFECT_HOME; it stops when this process exits or dies."""
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                   "--host", HOST, "--port", str(port), "--log-level", "error", "--lifespan", "on"]
        server = cls(command, {**os.environ, **EPHEMERAL_MODE}, port,
                     Path(os.environ.get("PREFECT_HOME", "~/.prefect")),
                     name="temporary local Prefect server", ui=False, own_process_group=False,
                     stop_with_parent=True, stop_grace=5,
                     startup_timeout=float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 180)))
        server.spawn()
        atexit.register(server.stop)
        return server

    @classmethod
    def full(cls, home: Path, log_path: Path, port: int | None = None, *, ui: bool = True,
             env: Mapping[str, str] | None = None, database_url: str | None = None) -> "PrefectServer":
        """`prefect server start` on 127.0.0.1:``port`` (default: a free one) with PREFECT_HOME ``home``
        and its output appended to ``log_path``; not started yet (see start). ``env`` is the
        environment it starts from (default this process's), less a Prefect client's settings.
        ``database_url`` (``postgresql+asyncpg://...``, see flows/postgres_server.py) replaces the
        SQLite database under ``home``."""
        port = port or free_port()
        base = os.environ if env is None else env
        server_env = {k: v for k, v in base.items() if k not in CLIENT_SETTINGS}
        server_env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
                          PREFECT_UI_API_URL=f"http://{HOST}:{port}/api")
        if not ui:
            server_env["PREFECT_UI_ENABLED"] = "false"
        if database_url:
            server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
        command = [*prefect_cli(), "server", "start", "--host", HOST, "--port", str(port)]
        return cls(command, server_env, port, Path(home), name=f"Prefect server on {HOST}:{port}", ui=ui,
                   log_path=log_path)

    @property
    def database(self) -> str:
        """Where its database is: the PostgreSQL URL it was given, else the SQLite file under ``home``."""
        return self.env.get("PREFECT_SERVER_DATABASE_CONNECTION_URL") or f"{self.home}/prefect.db"

    # --- start, wait, stop ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self) -> "PrefectServer":
        """Start the process and return at once. Again after stop: the same port and database."""
        if self.running:
            raise RuntimeError(f"the {self.name} is already running (pid {self.process.pid})")
        self.home.expanduser().mkdir(parents=True, exist_ok=True)
        out = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                start_new_session=self._own_process_group,
                preexec_fn=_stop_with_parent if self._stop_with_parent else None,
            )
        finally:
            if out is not None:
                out.close()
        self.starts += 1
        return self

    def wait_healthy(self, timeout: float | None = None) -> float:
        """Block until the server answers /health; returns the seconds waited. If it exits first or
        does not answer within ``timeout`` (default: the kind's start-up limit), it is stopped and
        RuntimeError raised with the reason, its database and the end of its log."""
        if timeout is None:
            timeout = self._startup_timeout
        try:
            return _poll_health(self.api_url, timeout, self.process)
        except (RuntimeError, TimeoutError) as err:
            self.stop()
            seen = "see its output above" if self.log_path is None else f"see its log {self.log_path}"
            message = (f"the {self.name} did not start ({err}); {seen} (its database is {self.database}), "
                       "run again, or set PREFECT_API_URL to a running server")
            tail = self.log_text()[-LOG_TAIL_CHARS:]
            if tail:
                message += f"\n--- the end of its log ---\n{tail}"
            raise RuntimeError(message) from err

    def start(self, timeout: float | None = None) -> "PrefectServer":
        """spawn, then wait_healthy."""
        self.spawn()
        self.wait_healthy(timeout)
        return self

    def stop(self) -> int | None:
        """Stop it by its PID (a full server: its process group): SIGTERM, SIGKILL if it has not
        exited within the kind's grace period; then wait until its port is free, so that a restart
        can bind it. Returns its exit code; does nothing if it is not running."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        stop_by_pid(proc, ((signal.SIGTERM, self._stop_grace), (signal.SIGKILL, 30)), group=self._own_process_group)
        deadline = time.monotonic() + 30
        while _port_in_use(self.port) and time.monotonic() < deadline:
            time.sleep(0.2)
        return proc.poll()

    def log_text(self) -> str:
        """Everything it wrote to its log, every start's; "" where its output is this process's."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def use(self) -> None:
        """Point this process (and its children) at the server."""
        from prefect.context import refresh_global_settings_context

        os.environ["PREFECT_API_URL"] = self.api_url
        # The temporary one serves no UI and stops with the run: no "View at" links to it in the logs.
        os.environ.setdefault("PREFECT_UI_URL", self.api_url.removesuffix("/api") if self.ui else "")
        refresh_global_settings_context()
