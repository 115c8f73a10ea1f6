"""The load test's load (tests/test_load_postgres.py, tests/helpers/load.py) on PostgreSQL or SQLite:
24 tiny pipeline runs created at once through the Run button's API, three `cpu` process workers,
the `gpu` pool limited to 2, results in an s3:// storage on moto's S3 server. Prints the figures
(runs/minute, p50/p95 queue and run times, server errors, client retries) as JSON and a Markdown table.

    .venv/bin/python bench/bench_load.py --database postgres
    .venv/bin/python bench/bench_load.py --database sqlite
    .venv/bin/python bench/bench_load.py --database sqlite --database postgres --out bench/results/load.json

Each database runs on a fresh stack in a fresh temporary directory (removed afterwards unless --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("KERAS_BACKEND", "jax")
# the bench's own client and the embedded preset builder never talk to a developer's server
for var in ("PREFECT_API_URL", "PREFECT_PROFILE", "GEMMA_LORA_RESULT_STORAGE"):
    os.environ.pop(var, None)
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="bench-load-prefect-")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", action="append", choices=("postgres", "sqlite"), required=True)
    parser.add_argument("--runs", type=int, default=24)
    parser.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    parser.add_argument("--keep", action="store_true", help="keep the stacks' directories (logs, databases)")
    args = parser.parse_args()

    from flows.env import apply_defaults

    apply_defaults()
    from tests.helpers.load import load_config, max_concurrent, run_load, running_intervals, start_load, table
    from tests.helpers.tiny_gemma import save_tiny_gemma3_preset

    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    preset = save_tiny_gemma3_preset(work / "tiny-preset")
    results, details = {}, {}
    try:
        for database in args.database:
            root = work / database
            root.mkdir()
            t = time.monotonic()
            load = start_load(root, database)
            setup = time.monotonic() - t
            try:
                result = run_load(load, preset, args.runs)
                figures = result.figures()
                figures["setup_s"] = setup
                figures["max_trainings_at_once"] = max_concurrent(running_intervals(load.stack, result.trainings))
                failed = [(r["name"], r["state"]["name"], (r["state"]["message"] or "")[:200])
                          for r in result.runs if r["state"]["type"] != "COMPLETED"]
                results[database] = figures
                details[database] = {"failed": failed, "create_errors": result.create_errors[:5],
                                     "server_errors": result.server_error_lines[:10]}
            finally:
                load.close()
            print(f"{database}: {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()})}",
                  flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    machine = {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d", time.gmtime())}
    report = {"machine": machine, "runs": args.runs, "config": load_config(preset, Path("<root>"), 1e-3),
              "figures": results, "details": details}
    print(json.dumps(report, indent=1, default=str))
    print(table({k: {**v} for k, v in results.items()}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        from gemma_core.atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps(report, indent=1, default=str) + "\n")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "")
                vec = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags]
                return f"{line.split(':', 1)[1].strip()} ({', '.join(vec)})"
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
