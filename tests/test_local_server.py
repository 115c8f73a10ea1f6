"""flows.prefect_server. The temporary local Prefect server that `gemma-lora run` starts before its
imports: it answers, it stops with the run (even a killed one), a failed start is reported, and a
server named in the active Prefect profile is used instead of it. The full `prefect server start`
(setup_local.py, the tests): a failed start is reported with the end of its log; it restarts on the
same port with the same database."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.prefect_server import PrefectServer, free_port
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
    server = PrefectServer.temporary()
    try:
        server.wait_healthy()
        with urllib.request.urlopen(f"{server.api_url}/health", timeout=5) as response:
            assert response.status == 200
    finally:
        server.stop()
    assert server.process.poll() is not None


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_killed_run_takes_its_server_with_it(tmp_path):
    starter = ("from flows.prefect_server import PrefectServer\n"
               "server = PrefectServer.temporary(); server.wait_healthy(); print(server.process.pid, flush=True)\n"
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
    server = PrefectServer.temporary()
    with pytest.raises(RuntimeError, match=r"local Prefect server did not start \(.*did not answer.*prefect\.db"):
        server.wait_healthy(timeout=0.2)
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


def test_a_full_server_that_exits_is_reported_with_the_end_of_its_log(tmp_path):
    with socket.socket() as taken:  # its port is in use: `prefect server start` refuses it and exits
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = PrefectServer.full(tmp_path / "home", tmp_path / "server.log", port, ui=False)
        with pytest.raises(RuntimeError) as failure:
            server.start(timeout=120)
    message = str(failure.value)
    assert f"the Prefect server on 127.0.0.1:{port} did not start (the Prefect server exited with" in message
    assert f"see its log {tmp_path / 'server.log'}" in message and "prefect.db" in message
    assert f"Port {port} is already in use" in message  # the end of its log
    assert not server.running


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_a_full_server_restarts_on_the_same_port_with_the_same_database(tmp_path):
    server = PrefectServer.full(tmp_path / "home", tmp_path / "server.log", ui=False)
    try:
        server.start()
        flow = _post(f"{server.api_url}/flows/", {"name": "kept-across-restarts"})
        pid = server.process.pid
        server.stop()
        assert not server.running and _gone(pid)
        server.start()
        assert server.process.pid != pid and server.starts == 2
        with urllib.request.urlopen(f"{server.api_url}/flows/{flow['id']}", timeout=30) as response:
            assert json.loads(response.read())["name"] == "kept-across-restarts"
    finally:
        server.stop()
    assert server.log_text().count("Configure Prefect to communicate with the server") == 2  # both starts' output
