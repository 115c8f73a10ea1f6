"""JAX against TensorFlow (issue 17, item 7): generation and steady training on the embedded Gemma 3
270M, each backend in a fresh process of its own, one after the other in one run.

Per backend: the 8 first held-out prompts of the offline sample, greedy, 64 new tokens, batch 8, as
the evaluation stage generates them (``generate_answers``, the compact decode loop on both backends),
twice: the first call compiles, the second is timed. Then the default training (``train_lora``:
sequence length 128, batch 4, rank 4) for ``--steps`` steps; steady useful tokens/s over the steps
after each bucket shape's first (compiling) one. Two earlier states of TensorFlow generation, which
do not train: ``tensorflow-keras-hub-loop`` (keras-hub's generate loop with XLA,
``generation.compact_decode=false``; TensorFlow's only loop before the compact one ran there) and
``tensorflow-no-xla`` (that loop with Keras' own choice on a CPU-only machine, XLA off, as before
``load_model`` asked for XLA on TensorFlow).

    .venv/bin/python bench/bench_backends.py                 # about 15 minutes on 2 cores
    .venv/bin/python bench/bench_backends.py --variants jax,tensorflow --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name: (backend, XLA, compact decode loop)
VARIANTS = {"jax": ("jax", True, True), "tensorflow": ("tensorflow", True, True),
            "tensorflow-keras-hub-loop": ("tensorflow", True, False), "tensorflow-no-xla": ("tensorflow", False, False)}

CHILD = r'''
import json, sys, tempfile, time
from pathlib import Path
from gemma_core.config import EMBEDDED_MODEL, DataConfig, GenerationConfig, LoraConfig, TrainConfig
from gemma_core.dolly_prepare import format_dolly_to_parquet, read_split
from gemma_core.generation import generate_answers
from gemma_core.lora_train import read_train_log, steady_steps, train_lora
from gemma_core.models import load_model

xla, steps, prompts_n, compact = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
work = Path(tempfile.mkdtemp(prefix="glf-bench-backends-"))
prepared = format_dolly_to_parquet(DataConfig(), work / "data")
train, held = read_split(prepared.train_path), read_split(prepared.eval_path)
started = time.perf_counter()
model = load_model(EMBEDDED_MODEL)
if not xla:
    model.jit_compile = False
out = {"load_s": time.perf_counter() - started, "jit_compile": model.jit_compile}
cfg = GenerationConfig(max_new_tokens=64, batch_size=8, compact_decode=compact)
prompts = list(held["prompt"][:prompts_n])
first = generate_answers(model, prompts, cfg)
timed = generate_answers(model, prompts, cfg)
out |= {"generate_first_s": first.seconds, "generate_s": timed.seconds,
        "new_tokens_per_s": timed.new_tokens_per_second, "answers": [a.text for a in timed.answers]}
if steps and xla and compact:
    result = train_lora(model, list(train["prompt"]), list(train["response"]),
                        TrainConfig(max_steps=steps), LoraConfig(), work / "train",
                        {"model_id": EMBEDDED_MODEL, "data_hash": prepared.content_hash})
    log = read_train_log(result.log_path)
    kept = steady_steps(log)
    seconds = sum(s["seconds"] for s in kept)
    out |= {"train_steps": len(log), "steady_steps": len(kept), "first_step_s": log[0]["seconds"],
            "useful_tokens_per_s": sum(s["useful_tokens"] for s in kept) / seconds if seconds else None,
            "losses": [s["loss"] for s in log]}
print("RESULT " + json.dumps(out), flush=True)
'''


def run_variant(name: str, steps: int, prompts: int) -> dict:
    backend, xla, compact = VARIANTS[name]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["KERAS_BACKEND"] = backend
    # a fresh JAX compile cache: JAX's compile times are as cold as TensorFlow's (which keeps none)
    env["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="glf-bench-jax-")
    done = subprocess.run([sys.executable, "-c", CHILD, "1" if xla else "0", str(steps), str(prompts),
                           "1" if compact else "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return {"variant": name, **json.loads(lines[-1].removeprefix("RESULT "))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="jax,tensorflow,tensorflow-keras-hub-loop")
    parser.add_argument("--steps", type=int, default=12, help="training steps per backend (0: no training)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "backends.json")
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants {','.join(unknown)}: unknown; use {', '.join(VARIANTS)}")
    rows = []
    for name in names:
        print(f"running {name} ...", flush=True)
        rows.append(run_variant(name, args.steps, args.prompts))
    jax_row = next((r for r in rows if r["variant"] == "jax"), None)
    print("| variant | load s | generate: first call s | timed s | new tok/s | vs JAX | same answers as JAX | "
          "first train step s | steady useful tok/s | vs JAX |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gen_ratio = r["new_tokens_per_s"] / jax_row["new_tokens_per_s"] if jax_row else float("nan")
        same = sum(a == b for a, b in zip(r["answers"], jax_row["answers"])) if jax_row else "-"
        train = r.get("useful_tokens_per_s")
        train_ratio = train / jax_row["useful_tokens_per_s"] if train and jax_row and jax_row.get("useful_tokens_per_s") else None
        print(f"| {r['variant']} | {r['load_s']:.1f} | {r['generate_first_s']:.1f} | {r['generate_s']:.1f} | "
              f"{r['new_tokens_per_s']:.1f} | {gen_ratio:.2f}x | {same} of {len(r['answers'])} | "
              f"{r.get('first_step_s', float('nan')):.1f} | {train or float('nan'):.1f} | "
              f"{'-' if train_ratio is None else f'{train_ratio:.2f}x'} |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.results.with_name(f".{args.results.name}.tmp")
    tmp.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                           "processor": platform.processor()},
                               "settings": vars(args) | {"results": str(args.results)}, "rows": rows}, indent=1))
    os.replace(tmp, args.results)


if __name__ == "__main__":
    main()
