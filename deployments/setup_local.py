"""Set up gemma-lora-flow's deployments on one machine, in one command:

    .venv/bin/python deployments/setup_local.py

1. uses the Prefect server in PREFECT_API_URL, or starts `prefect server start` on 127.0.0.1:4200
   (its database under PREFECT_HOME, default ./.prefect) when none is set; with --database postgres
   that server runs on a PostgreSQL server started here too (flows/postgres_server.py);
2. creates the work pools: `cpu` (process) and `gpu` (process here; Docker or Kubernetes with
   --gpu-pool-type, from the base job templates in deployments/gpu/) with a concurrency limit of 1,
   so one training runs per GPU and further ones queue;
3. applies deployments/prefect.yaml (`prefect deploy --all`): the pipeline on `cpu` with the weekly
   schedule (--cron, UTC) and a trigger on new data, the training flow on `gpu`, the data watch on `cpu`;
4. installs the automations of deployments/automations.py: a run whose heartbeats stop is marked
   Crashed (freeing its pool's slot), a crashed run is resumed at most recovery.max_resumes times;
5. starts one process worker per process pool (every flow run sends heartbeats), restarts a worker
   that dies (with a back-off), and keeps running until Ctrl-C, then stops every process it started.

The recovery.* settings (gemma_core/config.py) are given as ``--set recovery.max_resumes=3``.

Nothing is built or pushed: flow runs take the code from this checkout (GEMMA_LORA_CHECKOUT in the
process pools' job template). The functions are also what the tests' deployment stack
(tests/helpers/stack.py) uses; the server is flows/prefect_server.py's, as everywhere in the project.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from deployments import automations  # noqa: E402
from flows.prefect_server import PrefectServer, prefect_cli, stop_by_pid  # noqa: E402
from gemma_core.config import ConfigError, RecoveryConfig, load_config  # noqa: E402

PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
GPU_TEMPLATES = REPO / "deployments" / "gpu"

CPU_POOL = "cpu"
GPU_POOL = "gpu"
GPU_CONCURRENCY = 1  # trainings at once on the gpu pool: one per GPU
DEFAULT_CRON = "0 3 * * 1"  # Mondays 03:00 UTC
PIPELINE_DEPLOYMENT = "gemma-lora-pipeline/cpu"
TRAINING_DEPLOYMENT = "lora-training/gpu"
WATCH_DEPLOYMENT = "gemma-lora-watch-data/cpu"
DEFAULT_PORT = 4200
# Workers poll every 10 s by default; 2 s makes a run pressed in the UI start within seconds.
WORKER_QUERY_SECONDS = "2"
# Environment values {{ $VAR }} in prefect.yaml, and who provides them.
DEPLOY_ENV = ("GEMMA_LORA_RETRAIN_CRON", "GEMMA_LORA_DEBOUNCE")  # read by `prefect deploy`
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
RUN_ENV = ("GEMMA_LORA_CHECKOUT",)  # read where each flow run starts (its pull step)

GPU_BASE_JOB_TEMPLATES = {
    "docker": GPU_TEMPLATES / "docker-gpu.base-job-template.json",
    "kubernetes": GPU_TEMPLATES / "kubernetes-gpu.base-job-template.json",
}


def base_env(api_url: str | None = None, recovery: RecoveryConfig | None = None, **extra: str) -> dict[str, str]:
    """This process's environment with the project's Prefect defaults, pointed at ``api_url``; flow
    runs started with it send a heartbeat every ``recovery.heartbeat_s`` seconds."""
    from flows.env import apply_defaults

    env = dict(os.environ)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if recovery is not None:
        env[HEARTBEAT_ENV] = str(recovery.heartbeat_s)
    env.update(extra)
    apply_defaults(env)
    return env


# --- workers (the server is flows.prefect_server.PrefectServer) -----------------------------------

def start_worker(pool: str, env: dict[str, str], log_path: Path, name: str | None = None, *,
                 limit: int | None = None, cwd: Path = REPO) -> subprocess.Popen:
    """A `process` worker for ``pool``; its flow runs inherit ``env``. ``limit``: flow runs it runs at
    once (default: no limit of its own); ``cwd``: its working directory."""
    env = dict(env)
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", WORKER_QUERY_SECONDS)
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            [*prefect_cli(), "worker", "start", "--pool", pool, "--type", "process",
             "--name", name or f"{pool}-worker-{socket.gethostname()}", "--install-policy", "never",
             *(["--limit", str(limit)] if limit else [])],
            env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    finally:
        log.close()


def stop(proc: subprocess.Popen, first_wait: float = 5, grace: float = 15) -> int | None:
    """Stop ``proc`` by its PID: SIGTERM; a second SIGTERM after ``first_wait`` seconds (a Prefect
    worker busy with a flow run ignores the first one); SIGKILL after ``grace`` more. The flow-run
    processes it had started are stopped the same way. Returns its exit code."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    stop_by_pid(proc, ((signal.SIGTERM, first_wait), (signal.SIGTERM, grace), (signal.SIGKILL, 30)))
    for child in children:  # what it started and left behind
        try:
            child.terminate()
            child.wait(first_wait)
        except psutil.TimeoutExpired:
            child.kill()
        except psutil.Error:
            pass
    return proc.poll()


class WorkerSupervisor:
    """A process worker per pool, each started again when it dies (a lost worker would leave its
    pool without anyone to run its flow runs). Restarts back off 1, 2, 4 ... up to ``max_backoff_s``
    seconds while a worker keeps dying soon after it starts; one that ran ``healthy_after_s`` resets
    the back-off. Call :meth:`check` periodically (setup_local's main loop does, every second)."""

    def __init__(self, pools: Iterable[str], env: dict[str, str], logs: Path, *, names: dict[str, str] | None = None,
                 max_backoff_s: float = 60, healthy_after_s: float = 300, say=print, spawn=None):
        self.pools, self.env, self.logs, self.say = list(pools), env, logs, say
        self.spawn = spawn or start_worker  # (pool, env, log_path, name) -> Popen
        self.names = names or {}
        self.max_backoff_s, self.healthy_after_s = max_backoff_s, healthy_after_s
        self.workers: dict[str, subprocess.Popen] = {}
        self.started_at: dict[str, float] = {}
        self.failures: dict[str, int] = {pool: 0 for pool in self.pools}
        self.restart_at: dict[str, float] = {}
        self.restarts: list[tuple[str, int, int | None]] = []  # (pool, old pid, exit code)

    def log_path(self, pool: str) -> Path:
        return self.logs / f"worker-{pool}.log"

    def start(self) -> "WorkerSupervisor":
        for pool in self.pools:
            self._spawn(pool)
        return self

    def _spawn(self, pool: str) -> None:
        self.workers[pool] = self.spawn(pool, self.env, self.log_path(pool), name=self.names.get(pool))
        self.started_at[pool] = time.monotonic()

    def check(self) -> None:
        """Start again every worker that died, once its back-off has passed."""
        now = time.monotonic()
        for pool, proc in list(self.workers.items()):
            if proc.poll() is None:
                if now - self.started_at[pool] >= self.healthy_after_s:
                    self.failures[pool] = 0
                continue
            if pool not in self.restart_at:
                self.failures[pool] += 1
                delay = min(self.max_backoff_s, 2.0 ** (self.failures[pool] - 1))
                self.restart_at[pool] = now + delay
                self.restarts.append((pool, proc.pid, proc.returncode))
                self.say(f"the {pool} worker (pid {proc.pid}) exited with {proc.returncode}; starting a new one "
                         f"in {delay:.0f} s (log {self.log_path(pool)})")
            if now >= self.restart_at[pool]:
                del self.restart_at[pool]
                self._spawn(pool)
                self.say(f"the {pool} worker runs again (pid {self.workers[pool].pid})")

    def stop(self) -> None:
        stop_all(reversed(list(self.workers.values())))


def stop_all(procs: Iterable[subprocess.Popen]) -> None:
    """Stop every process, in the order given; never raises."""
    for proc in procs:
        try:
            stop(proc)
        except Exception as err:  # keep stopping the others
            print(f"could not stop pid {proc.pid}: {err}", file=sys.stderr)


# --- pools and deployments -----------------------------------------------------------------------

def process_base_job_template(checkout: Path = REPO) -> dict[str, Any]:
    """The process worker's default job template, with GEMMA_LORA_CHECKOUT (where flow runs take
    their code from, see prefect.yaml's pull step) as the default environment."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["env"]["default"] = {"GEMMA_LORA_CHECKOUT": str(checkout)}
    return template


def load_gpu_template(kind: str) -> dict[str, Any]:
    return json.loads(GPU_BASE_JOB_TEMPLATES[kind].read_text())


def create_pools(api_url: str, checkout: Path = REPO, gpu_pool_type: str = "process",
                 gpu_concurrency: int = GPU_CONCURRENCY) -> dict[str, Any]:
    """Create (or overwrite) the `cpu` and `gpu` work pools; the `gpu` pool's concurrency limit
    makes further trainings wait for the running one."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    process_template = process_base_job_template(checkout)
    gpu_template = process_template if gpu_pool_type == "process" else load_gpu_template(gpu_pool_type)
    pools = [
        WorkPoolCreate(name=CPU_POOL, type="process", base_job_template=process_template,
                       description="gemma-lora-flow: the pipeline's CPU stages"),
        WorkPoolCreate(name=GPU_POOL, type=gpu_pool_type, base_job_template=gpu_template,
                       concurrency_limit=gpu_concurrency,
                       description=f"gemma-lora-flow: LoRA fine-tuning, {gpu_concurrency} at a time (one per GPU)"),
    ]
    created = {}
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            for pool in pools:
                try:
                    existing = client.read_work_pool(pool.name)
                except ObjectNotFound:
                    existing = None
                if existing is not None and existing.type != pool.type:
                    # Prefect keeps a pool's type on overwrite: replace the pool (its queues and
                    # deployments' links are recreated by apply_deployments)
                    client.delete_work_pool(pool.name)
                created[pool.name] = client.create_work_pool(pool, overwrite=True)
    return created


def apply_deployments(api_url: str, cron: str = DEFAULT_CRON, env: dict[str, str] | None = None,
                      timeout: float = 300, recovery: RecoveryConfig | None = None) -> str:
    """`prefect deploy --all` of deployments/prefect.yaml from the repository root; returns its output."""
    recovery = recovery or RecoveryConfig()
    env = dict(env if env is not None else base_env(api_url))
    env["PREFECT_API_URL"] = api_url
    env["GEMMA_LORA_RETRAIN_CRON"] = cron
    # an ISO 8601 duration: a {{ $VAR }} value is a string, and Prefect reads a string duration only in that form
    env["GEMMA_LORA_DEBOUNCE"] = f"PT{recovery.debounce_s}S"
    for var in RUN_ENV:  # set here, `prefect deploy` would bake this machine's value into the pull step
        env.pop(var, None)
    done = subprocess.run(
        [*prefect_cli(), "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"prefect deploy failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    set_watch_interval(api_url, recovery.watch_every_s)
    return done.stdout


def set_watch_interval(api_url: str, seconds: int) -> None:
    """The data watch's interval schedule (prefect.yaml holds the default)."""
    import httpx

    with httpx.Client(base_url=api_url, timeout=30) as client:
        deployment = client.get(f"/deployments/name/{WATCH_DEPLOYMENT}").raise_for_status().json()
        for schedule in deployment["schedules"]:
            if "interval" in schedule["schedule"] and schedule["schedule"]["interval"] != seconds:
                body = {"schedule": {**schedule["schedule"], "interval": seconds}, "active": schedule["active"]}
                client.patch(f"/deployments/{deployment['id']}/schedules/{schedule['id']}", json=body).raise_for_status()


# --- the command ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-url", default=os.environ.get("PREFECT_API_URL"),
                        help="Prefect API to use (default $PREFECT_API_URL; none: start a local server)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port of the server started here")
    parser.add_argument("--cron", default=os.environ.get("GEMMA_LORA_RETRAIN_CRON", DEFAULT_CRON),
                        help=f"retraining schedule, cron in UTC (default {DEFAULT_CRON!r}, Mondays 03:00)")
    parser.add_argument("--gpu-pool-type", choices=("process", *GPU_BASE_JOB_TEMPLATES), default="process",
                        help="process: a local worker runs training here; docker/kubernetes: the pool runs "
                             "the worker image on a GPU (deployments/gpu/), with a worker you start there")
    parser.add_argument("--gpu-concurrency", type=int, default=GPU_CONCURRENCY,
                        help="trainings at once on the gpu pool (one per GPU)")
    parser.add_argument("--no-workers", action="store_true", help="set up pools and deployments only")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite",
                        help="the database of the server started here: sqlite (under PREFECT_HOME) or postgres, "
                             "a PostgreSQL server started here too, data in PREFECT_HOME/postgres "
                             "(flows/postgres_server.py; for many workers and runs at once, see the README)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="recovery.FIELD=VALUE",
                        help="a recovery setting (heartbeat_s, crashed_after_s, max_resumes, settle_s, resume_wait_s, "
                             "watch_every_s, debounce_s; see gemma_core/config.py RecoveryConfig)")
    args = parser.parse_args(argv)
    if any(not o.startswith("recovery.") for o in args.overrides):
        parser.error(f"--set takes recovery.* settings here, not {[o for o in args.overrides if not o.startswith('recovery.')]}")
    try:
        args.recovery = load_config(overrides=args.overrides).recovery
    except ConfigError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs = REPO / ".prefect" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server: PrefectServer | None = None  # started here when no API is given; stopped last
    postgres = None  # with --database postgres: its database, stopped after it
    supervisor: WorkerSupervisor | None = None  # the workers: stopped before the server

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # also where a shell started us with SIGINT ignored
        signal.signal(sig, on_signal)
    try:
        api_url = args.api_url
        if not api_url:
            home = Path(os.environ.get("PREFECT_HOME", REPO / ".prefect"))
            if args.database == "postgres":
                from flows.postgres_server import PostgresServer

                postgres = PostgresServer(home / "postgres", logs / "postgres.log")
                try:
                    postgres.start()
                except RuntimeError as err:  # PostgresNotInstalled included: the message has the fix
                    print(f"setup_local: {err}", file=sys.stderr)
                    return 1
                print(f"PostgreSQL on {postgres.url} (data in {postgres.data_dir}; log {postgres.log_path})")
            server = PrefectServer.full(home, logs / "server.log", args.port,
                                        database_url=postgres.prefect_database_url if postgres else None)
            api_url = server.api_url
            print(f"starting the Prefect server on {api_url} (database {server.database}; log {server.log_path})")
            try:
                seconds = server.spawn().wait_healthy()
            except RuntimeError as err:
                print(f"setup_local: {err}", file=sys.stderr)
                return 1
            print(f"  healthy after {seconds:.0f} s")
        recovery = args.recovery
        env = base_env(api_url, recovery, GEMMA_LORA_CHECKOUT=str(REPO))
        pools = create_pools(api_url, REPO, args.gpu_pool_type, args.gpu_concurrency)
        print(f"work pools: {', '.join(f'{p.name} ({p.type}, concurrency {p.concurrency_limit})' for p in pools.values())}")
        apply_deployments(api_url, args.cron, env, recovery=recovery)
        print(f"deployments: {PIPELINE_DEPLOYMENT} (schedule {args.cron!r} UTC; a run on new data, debounced "
              f"{recovery.debounce_s} s), {TRAINING_DEPLOYMENT}, {WATCH_DEPLOYMENT} (every {recovery.watch_every_s} s)")
        automations.install(api_url, recovery)
        print(f"automations: a run silent for {recovery.crashed_after_s} s is marked Crashed (heartbeats every "
              f"{recovery.heartbeat_s} s); a crashed run is resumed {recovery.settle_s} s after its crash, at most "
              f"{recovery.max_resumes} times")
        if args.no_workers:
            if server is not None:
                print("--no-workers: the server started here stops now; use --api-url with a server of your own")
            return 0
        worker_pools = [CPU_POOL] + ([GPU_POOL] if args.gpu_pool_type == "process" else [])
        supervisor = WorkerSupervisor(worker_pools, env, logs, say=lambda line: print(line, file=sys.stderr, flush=True))
        supervisor.start()
        print(f"workers: {', '.join(worker_pools)} (logs in {logs}; a worker that dies is started again)")
        if args.gpu_pool_type != "process":
            print(f"  start the gpu pool's worker on the GPU machine: prefect worker start --pool {GPU_POOL} "
                  f"--type {args.gpu_pool_type}  (pip install prefect-{args.gpu_pool_type} there)")
        ui = api_url.removesuffix("/api")
        print(f"\nReady. Open {ui}/deployments and press Run on {PIPELINE_DEPLOYMENT}, or:\n"
              f"  PREFECT_API_URL={api_url} .venv/bin/prefect deployment run {PIPELINE_DEPLOYMENT}\n"
              "Ctrl-C stops the workers" + (" and the server." if server is not None else "."))
        while True:
            if server is not None and server.process.poll() is not None:
                print(f"the Prefect server (pid {server.process.pid}) exited with {server.process.returncode}; "
                      f"see {server.log_path}", file=sys.stderr)
                return 1
            supervisor.check()
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not leave processes behind
            signal.signal(sig, signal.SIG_IGN)
        workers = list(supervisor.workers.values()) if supervisor is not None else []
        if workers or server is not None:
            print(f"stopping {len(workers) + (server is not None)} processes ...", flush=True)
        if supervisor is not None:
            supervisor.stop()
        if server is not None:
            try:
                server.stop()
            except Exception as err:
                print(f"could not stop the Prefect server (pid {server.process.pid}): {err}", file=sys.stderr)
        if postgres is not None:
            postgres.stop()


if __name__ == "__main__":
    sys.exit(main())
