"""Time and memory of getting the embedded Gemma 3 270M: first conversion, then cached loads.

Each phase runs in its own Python process, so its peak resident memory (ru_maxrss) is its own and
no phase benefits from another's warm imports or page cache of Python objects:

- convert: ``ensure_converted`` into an empty cache (hash the GGUF, dequantize, write the Hugging
  Face folder, keras-hub conversion, save_to_preset, manifest);
- load:    ``load_model("embedded:gemma3-270m")`` from that cache (manifest check + from_preset),
           once per Keras backend asked for.

Targets (issue 3): conversion < 60 s, cached load < 20 s, peak memory < 6 GiB. "call s" is the
timed call alone; "process s" adds the interpreter start and the TensorFlow/JAX/keras-hub imports.

    .venv/bin/python bench/bench_model_load.py                 # jax, temporary cache
    .venv/bin/python bench/bench_model_load.py --backends jax,tensorflow --keep /tmp/cache
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"convert": 60.0, "load": 20.0}
PEAK_TARGET_GIB = 6.0

_CHILD = """
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
from gemma_core.preset_cache import ensure_converted
from gemma_core.models import load_model
import keras_hub  # imported before the clock starts: the call time is the work, not the imports
phase, cache = sys.argv[1], Path(sys.argv[2])
t1 = time.perf_counter()
if phase == "convert":
    ensure_converted(cache)
else:
    model = load_model("embedded:gemma3-270m", cache)
t2 = time.perf_counter()
print("RESULT" + json.dumps({"imports_s": t1 - t0, "call_s": t2 - t1,
                             "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def run_phase(phase: str, cache: Path, backend: str) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, phase, str(cache)], env=env, cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{phase} ({backend}) failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    return {"phase": phase, "backend": backend, "process_s": time.perf_counter() - started, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description="Time and peak memory of converting and loading the 270M.")
    parser.add_argument("--backends", default=os.environ.get("KERAS_BACKEND", "jax"),
                        help="comma-separated Keras backends for the cached-load phase (jax,tensorflow)")
    parser.add_argument("--keep", type=Path, help="use (and keep) this cache dir; it must not hold the model yet")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    with tempfile.TemporaryDirectory(prefix="bench-model-cache-") as scratch:
        cache = args.keep or Path(scratch)
        if (cache / "presets").exists() and any((cache / "presets").iterdir()):
            raise SystemExit(f"{cache} already holds a converted model; the first-conversion time needs an empty one")
        rows = [run_phase("convert", cache, backends[0])]
        rows += [run_phase("load", cache, backend) for backend in backends]

    print(f"{'phase':<8} {'backend':<11} {'call s':>7} {'process s':>10} {'peak GiB':>9}  target")
    ok = True
    for row in rows:
        target = TARGETS[row["phase"]]
        met = row["call_s"] < target and row["peak_gib"] < PEAK_TARGET_GIB
        ok &= met
        print(f"{row['phase']:<8} {row['backend']:<11} {row['call_s']:>7.1f} {row['process_s']:>10.1f} "
              f"{row['peak_gib']:>9.2f}  < {target:.0f} s, < {PEAK_TARGET_GIB:.0f} GiB: {'met' if met else 'MISSED'}")
    print(f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
