"""Generation speed for the evaluation stages, side by side in one run.

Baseline: keras-hub's ``generate`` one prompt at a time (batch 1), greedy, the same total length.
Ours: ``gemma_core.generation.generate_answers`` at batch 8, 16 and 32 (one compiled loop per batch
size, the last batch padded). New tokens are counted the same way for both: tokens produced up to
end-of-sequence or ``max_new_tokens``. Greedy answers must be identical to the baseline's.

    .venv/bin/python bench/bench_generate.py               # ~10 min on 2 cores
    .venv/bin/python bench/bench_generate.py --prompts 16 --batch-sizes 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def baseline_batch1(model, prompts, max_new_tokens: int, total_length: int):
    """What a keras-hub user writes: generate(prompt) per prompt, greedy, fixed max_length.

    keras-hub returns text; its new tokens are counted by re-tokenizing the answer, and it ended
    with a stop token when it stopped before ``total_length``.
    """
    model.compile(sampler="greedy")
    tokenizer = model.preprocessor.tokenizer
    texts, new_tokens, times = [], 0, []
    for prompt in prompts:
        start = time.perf_counter()
        out = model.generate(prompt, max_length=total_length, strip_prompt=True)
        times.append(time.perf_counter() - start)
        generated = [int(t) for t in tokenizer(out)]
        ended = len(tokenizer(prompt)) + 1 + len(generated) < total_length
        kept = generated[:max_new_tokens]
        new_tokens += min(len(generated) + int(ended), max_new_tokens)
        texts.append(tokenizer.detokenize(kept).strip() if kept else "")
    return texts, new_tokens, times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--baseline-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="8,16,32")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "generate.json")
    args = parser.parse_args()

    from gemma_core.config import EMBEDDED_MODEL, DataConfig, GenerationConfig
    from gemma_core.dolly_prepare import format_dolly_to_parquet, read_split
    from gemma_core.generation import LENGTH_BUCKET, generate_answers
    from gemma_core.models import resolve_model

    prepared = format_dolly_to_parquet(DataConfig(train_limit=None, eval_fraction=0.3), "/tmp/glf-bench-gen")
    prompts = list(read_split(prepared.eval_path)["prompt"][: args.prompts])
    model = resolve_model(EMBEDDED_MODEL)
    tokenizer = model.preprocessor.tokenizer
    longest = max(len(tokenizer(p)) for p in prompts) + 1
    total_length = LENGTH_BUCKET * math.ceil((longest + args.max_new_tokens) / LENGTH_BUCKET)

    rows = []
    base_prompts = prompts[: args.baseline_prompts]
    texts, new_tokens, times = baseline_batch1(model, base_prompts, args.max_new_tokens, total_length)
    steady = sum(times[1:]) / max(len(times) - 1, 1)
    rows.append({"variant": "keras-hub generate, batch 1", "prompts": len(base_prompts),
                 "new_tokens_per_s": new_tokens * (len(times) - 1) / len(times) / sum(times[1:]),
                 "first_call_s": times[0], "compile_s": times[0] - steady, "identical_greedy": True})
    baseline_texts = texts

    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=batch_size)
        run = generate_answers(model, prompts, cfg)
        batches = math.ceil(len(prompts) / batch_size)
        steady = (run.seconds - run.first_batch_seconds) / max(batches - 1, 1)
        ours = [a.text for a in run.answers[: len(base_prompts)]]
        rows.append({"variant": f"gemma_core generate_answers, batch {batch_size}", "prompts": len(prompts),
                     "new_tokens_per_s": run.new_tokens_per_second, "first_call_s": run.first_batch_seconds,
                     "compile_s": run.first_batch_seconds - steady, "identical_greedy": ours == baseline_texts,
                     "mismatches": [i for i, (a, b) in enumerate(zip(ours, baseline_texts)) if a != b]})

    base = rows[0]["new_tokens_per_s"]
    print(f"\nprompts={args.prompts} max_new_tokens={args.max_new_tokens} total_length={total_length}")
    print("| variant | new tok/s | vs batch-1 generate | first call s | compile s (approx) | identical greedy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['new_tokens_per_s']:.1f} | {r['new_tokens_per_s'] / base:.1f}x | "
              f"{r['first_call_s']:.1f} | {r['compile_s']:.1f} | {r['identical_greedy']} |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                        "total_length": total_length, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
