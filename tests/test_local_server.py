"""The temporary local Prefect server that `gemma-lora run` starts before its imports: it answers, it
stops with the run (even a killed one), a failed start is reported, and a server named in the
active Prefect profile is used instead of it."""

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.local_server import LocalServer, free_port
from tests.helpers import procs


def _gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "\nState:\tZ" in status.read_text()


def _wait_gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _gone(pid)


def test_starts_answers_and_stops(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    server = LocalServer.start()
    try:
        server.wait_ready()
        with urllib.request.urlopen(f"{server.api_url}/health", timeout=5) as response:
            assert response.status == 200
    finally:
        server.stop()
    assert server.process.poll() is not None


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_killed_run_takes_its_server_with_it(tmp_path):
    starter = ("from flows.local_server import LocalServer\n"
               "server = LocalServer.start(); server.wait_ready(); print(server.process.pid, flush=True)\n"
               "import time; time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True,
                              env=procs.child_env(PREFECT_HOME=str(tmp_path / ".prefect")), cwd=procs.REPO)
    try:
        server_pid = int(parent.stdout.readline())
        assert not _gone(server_pid)
    finally:
        parent.kill()
        parent.wait()
    assert _wait_gone(server_pid), f"the server (pid {server_pid}) outlived its killed parent"


def test_a_server_that_does_not_answer_in_time_is_reported_and_stopped(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    server = LocalServer.start()
    with pytest.raises(RuntimeError, match=r"local Prefect server did not start \(.*did not answer.*prefect\.db"):
        server.wait_ready(timeout=0.2)
    assert server.process.poll() is not None


def test_a_server_named_by_the_prefect_profile_is_used(tmp_path):
    """No PREFECT_API_URL in the environment, but the active profile names a server: the run talks to
    that server (here: nobody listens, so it says so) and not to a local one."""
    dead = f"http://127.0.0.1:{free_port()}/api"
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(f'active = "remote"\n\n[profiles.remote]\nPREFECT_API_URL = "{dead}"\n')
    env = procs.child_env(PREFECT_HOME=str(tmp_path / ".prefect"), PREFECT_PROFILES_PATH=str(profiles))
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--set", f"output.root={tmp_path / 'runs'}"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"the Prefect server at {dead} (PREFECT_API_URL) does not answer" in done.stderr
