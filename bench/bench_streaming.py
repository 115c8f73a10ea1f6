"""The chat's streaming decoder on the embedded Gemma 3 270M: time to the first token and tokens per
second, and whether its greedy tokens are batched generation's.

For each of the first ``--prompts`` held-out prompts of the offline sample (as chat turns,
``gemma_core.prompts.format_prompt(..., "gemma_chat")``), the prompt is streamed twice with
``gemma_core.streaming.StreamingDecoder`` (the first pass compiles the step and each prefill
length); the second pass is timed: seconds to the first token (prefill plus one step) and new
tokens per second after it. The same prompts go through ``generate_answers`` (the compact batched
loop) and the token ids are compared.

    .venv/bin/python bench/bench_streaming.py --prompts 8 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--context-tokens", type=int, default=1024)
    args = parser.parse_args()

    import tempfile

    from gemma_core.config import DataConfig, GenerationConfig
    from gemma_core.dolly_prepare import format_dolly_to_parquet, read_split
    from gemma_core.generation import generate_answers, make_sampler, stop_token_ids
    from gemma_core.models import load_model
    from gemma_core.prompts import format_prompt
    from gemma_core.streaming import StreamingDecoder, TextStream, prompt_ids

    with tempfile.TemporaryDirectory() as tmp:
        held_out = read_split(format_dolly_to_parquet(DataConfig(), tmp).eval_path).head(args.prompts)
    prompts = [format_prompt(r.instruction, r.context or "", "gemma_chat") for r in held_out.itertuples()]
    started = time.perf_counter()
    model = load_model()
    print(f"model loaded in {time.perf_counter() - started:.1f} s")
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=min(8, len(prompts)))
    tokenizer, stops = model.preprocessor.tokenizer, stop_token_ids(model)
    decoder = StreamingDecoder(model, make_sampler(cfg), stops, cache_length=args.context_tokens)

    first_token, rates, streamed = [], [], []
    compile_started = time.perf_counter()
    for prompt in prompts:  # first pass: compiles
        list(decoder.stream(prompt_ids(tokenizer, prompt), args.max_new_tokens))
    compile_seconds = time.perf_counter() - compile_started
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt)
        text = TextStream(tokenizer, stops)
        t0 = time.perf_counter()
        times = []
        for token in decoder.stream(ids, args.max_new_tokens):
            text.push(token)
            times.append(time.perf_counter())
        first_token.append(times[0] - t0)
        if len(times) > 1:
            rates.append((len(times) - 1) / (times[-1] - times[0]))
        streamed.append(text.text.strip())
    batched = [a.text for a in generate_answers(model, prompts, cfg).answers]
    same = sum(s == b for s, b in zip(streamed, batched))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {os.cpu_count()} CPUs, {cpu}")
    print(f"prompts {len(prompts)}, max_new_tokens {args.max_new_tokens}, context {args.context_tokens}")
    print(f"first pass (compiles the step and each prefill length): {compile_seconds:.1f} s")
    print(f"time to first token: median {statistics.median(first_token):.3f} s "
          f"(min {min(first_token):.3f}, max {max(first_token):.3f})")
    print(f"streamed new tokens per second after the first: median {statistics.median(rates):.1f} "
          f"(min {min(rates):.1f}, max {max(rates):.1f})")
    print(f"greedy answers identical to batched generate_answers: {same} of {len(prompts)}")


if __name__ == "__main__":
    main()
