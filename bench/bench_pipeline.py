"""Orchestration cost: the default pipeline cold, then rerun with nothing changed, side by side.

Each run is the README's `gemma-lora run` in a fresh process, timed from outside (interpreter
start, imports, the embedded Prefect server, every stage). The cold run starts from empty
directories: output root, Prefect home and, unless ``--warm-model``, the model cache (so it
converts the GGUF and compiles every XLA program, as a new user's first run does). The rerun reuses
all of them and must finish with every stage Cached. Target (issue 7): rerun <= 5% of cold. The
cold run's outcome (metrics, the gate's verdict over the base model, the promotion) is kept in the
results file too.

The rerun is also split into phases, so its few seconds can be attributed: interpreter plus
imports (``import flows.pipeline``, timed in its own process), and the CLI's own wall time.

    .venv/bin/python bench/bench_pipeline.py                  # ~10 min on 2 cores
    .venv/bin/python bench/bench_pipeline.py --warm-model     # skip the model conversion in "cold"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "flows.cli", "run"]


def timed(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as out:
        subprocess.run(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def states(log: Path) -> dict[str, str]:
    """The stage table the CLI prints at the end: '  name   State  [seconds]'."""
    found = {}
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"^  (\S+)\s+(Completed|Cached|Failed|Crashed)\b", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--warm-model", action="store_true",
                        help="use the user's model cache (no conversion, compiled programs kept) in the cold run")
    parser.add_argument("--reruns", type=int, default=3, help="cached reruns; the median is reported")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "pipeline.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="glf-bench-pipeline-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(work / ".prefect")}
        env.pop("PREFECT_API_URL", None)
        if not args.warm_model:
            env["GEMMA_LORA_CACHE"] = str(work / "model-cache")
            env.pop("JAX_COMPILATION_CACHE_DIR", None)
        cmd = CLI + ["--set", f"output.root={work / 'runs'}"]
        print("cold run ...", flush=True)
        cold = timed(cmd, env, work, work / "cold.log")
        cold_states = states(work / "cold.log")
        latest = json.loads((work / "runs" / "reports" / "latest.json").read_text())
        gate = json.loads((Path(latest["report_dir"]) / "metrics.json").read_text()).get("gate", {})
        outcome = {"base": latest["base"], "tuned": latest["tuned"], "promotion": latest["promotion"],
                   "gate": {k: gate.get(k) for k in ("promote", "reasons", "intervals", "categories", "flips")}}
        reruns = []
        for i in range(args.reruns):
            print(f"rerun {i + 1} ...", flush=True)
            reruns.append(timed(cmd, env, work, work / f"rerun{i}.log"))
            rerun_states = states(work / f"rerun{i}.log")
            if set(rerun_states.values()) != {"Cached"}:
                raise SystemExit(f"rerun {i + 1} was not all Cached: {rerun_states}\n"
                                 + (work / f"rerun{i}.log").read_text()[-3000:])
        imports = timed([sys.executable, "-c", "import flows.pipeline"], env, work, work / "imports.log")

    rerun = sorted(reruns)[len(reruns) // 2]
    print(f"\n| run | wall s | share of cold | stages |")
    print("|---|---|---|---|")
    print(f"| cold ({'warm model cache' if args.warm_model else 'empty caches: converts the model'}) | "
          f"{cold:.1f} | 100% | {', '.join(f'{k}: {v}' for k, v in cold_states.items())} |")
    print(f"| rerun, nothing changed (median of {len(reruns)}: {', '.join(f'{r:.1f}' for r in reruns)}) | "
          f"{rerun:.1f} | {100 * rerun / cold:.1f}% | all Cached |")
    print(f"| of which: interpreter + imports (`import flows.pipeline`) | {imports:.1f} | {100 * imports / cold:.1f}% | |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "warm_model": args.warm_model, "cold_s": cold, "cold_states": cold_states, "reruns_s": reruns,
        "rerun_s": rerun, "rerun_share": rerun / cold, "imports_s": imports, "cold_outcome": outcome,
    }, indent=1))
    print(f"\ncold run's gate: {'; '.join(outcome['gate']['reasons'] or [])}; promotion: {outcome['promotion']}")


if __name__ == "__main__":
    main()
