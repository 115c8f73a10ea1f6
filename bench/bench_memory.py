"""Peak memory of LoRA training as sequence length and batch size grow (issue 7, target 4).

Worst case on purpose: every example fills the whole sequence (half prompt, half response), so a
length bucket cannot shrink the batch and the response-only head carries about half the tokens.
Each (variant, sequence length, batch) runs three training steps in its own process; its peak
resident memory (ru_maxrss) includes the model, the compiled step and every activation.

    .venv/bin/python bench/bench_memory.py                         # ~6 min on 2 cores
    .venv/bin/python bench/bench_memory.py --grid 256x4,512x4 --variants fast
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_train import VARIANTS  # noqa: E402  (one definition of what plain and fast mean)

DEFAULT_GRID = "128x4,256x4,512x4,256x8,256x16"


def run_one(variant: str, sequence_length: int, batch_size: int) -> dict:
    from gemma_core.config import EMBEDDED_MODEL, LoraConfig, TrainConfig
    from gemma_core.lora_train import train_lora
    from gemma_core.models import load_model

    model = load_model(EMBEDDED_MODEL)
    words = "the quick brown fox jumps over a lazy dog near the river bank".split()
    text = " ".join(words[i % len(words)] for i in range(sequence_length))
    # Both longer than the sequence: keras-hub truncates prompt and response alike, so each example
    # fills every position, about half of them response.
    prompts, responses = [text] * batch_size * 3, [text] * batch_size * 3
    cfg = TrainConfig(sequence_length=sequence_length, batch_size=batch_size, max_steps=3, checkpoint_every=10_000,
                      **VARIANTS[variant])
    with tempfile.TemporaryDirectory() as tmp:
        result = train_lora(model, prompts, responses, cfg, LoraConfig(), tmp, {"model_id": "bench", "data_hash": "m"})
        shapes = {tuple(json.loads(line)["shape"]) for line in Path(result.log_path).read_text().splitlines()}
    return {"variant": variant, "sequence_length": sequence_length, "batch_size": batch_size,
            "shapes": sorted(shapes), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", default=DEFAULT_GRID, help="SEQxBATCH,... (default %(default)s)")
    parser.add_argument("--variants", default="fast,plain")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: VARIANT:SEQ:BATCH in this process
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    args = parser.parse_args()
    if args.one:
        variant, seq, batch = args.one.split(":")
        print("RESULT" + json.dumps(run_one(variant, int(seq), int(batch))))
        return

    rows = []
    for variant in args.variants.split(","):
        for cell in args.grid.split(","):
            seq, batch = (int(v) for v in cell.split("x"))
            if variant == "plain" and (seq, batch) != (256, 4):
                continue  # the plain path is measured at the target's point only
            print(f"{variant} seq {seq} batch {batch} ...", flush=True)
            out = subprocess.run([sys.executable, __file__, "--one", f"{variant}:{seq}:{batch}"], cwd=ROOT,
                                 capture_output=True, text=True)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT")), None)
            if out.returncode != 0 or line is None:
                rows.append({"variant": variant, "sequence_length": seq, "batch_size": batch,
                             "error": (out.stderr or out.stdout)[-500:]})
                continue
            rows.append(json.loads(line[len("RESULT"):]))

    print("\n| variant | sequence | batch | tokens per step | shapes (length, slots) | peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['sequence_length']} | {r['batch_size']} | | failed: {r['error'][-120:]!r} | |")
            continue
        print(f"| {r['variant']} | {r['sequence_length']} | {r['batch_size']} | {r['sequence_length'] * r['batch_size']} "
              f"| {r['shapes']} | {r['peak_rss_gib']:.2f} |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
