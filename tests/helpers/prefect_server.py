"""The tests' Prefect server: flows.prefect_server's full ``prefect server start`` (127.0.0.1, a free port,
its own PREFECT_HOME, stopped by PID, restartable on the same port with the same database), started
from an environment without any PREFECT_ setting, so that nothing of the session's or the developer's
Prefect configuration (a database URL, a profile) reaches it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.prefect_server import PrefectServer


def isolated_server(home: Path, log_path: Path, port: int | None = None, *, ui: bool = False,
                    database_url: str | None = None) -> PrefectServer:
    """Not started yet: call ``.start()`` (and ``.stop()``, also to restart it). ``database_url``: a
    PostgreSQL database (flows/postgres_server.py) instead of SQLite under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return PrefectServer.full(home, log_path, port, ui=ui, env=env, database_url=database_url)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> PrefectServer:
    """One isolated server per test module that uses it (``from helpers.prefect_server import server``)."""
    work = tmp_path_factory.mktemp("prefect-server")
    srv = isolated_server(work / "home", work / "prefect-server.log").start()
    yield srv
    srv.stop()
