"""GPU benchmark (issue 17, item 5): this project's own LoRA training and decoder on randomly
initialised Gemma 3 models of about 1B and 4B parameters, bf16, JAX.

NO GPU FIGURE HAS BEEN MEASURED WITH THIS SCRIPT YET. It was written on a machine without a GPU and
checked there only with ``--smoke`` (a tiny config on CPU, which says nothing about GPU speed). Do not
quote any number from it until it has run on a GPU.

Per model size (``--sizes 1b,4b``), in one process:
1. The bf16 matrix-multiply rate of this device, measured here: jit(a @ b) on random bf16 8192^2
   matrices, 20 calls back to back per trial, best of 3 trials; again at the end; the higher of the
   two is the ceiling (so MFU is never flattered).
2. Training through :func:`gemma_core.lora_train.train_encoded`, the path ``gemma-lora run`` takes:
   length buckets, the response-only head, AdamW, checkpoints, the per-step log. The examples are
   made up (random token ids; prompt and response lengths drawn from a wide spread up to the sequence
   length; the loss on the response), because the model is random and has no tokenizer: the device
   image has no TensorFlow for keras-hub's tokenizer. The whole model is in bf16 (keras' "bfloat16"
   policy; keras keeps the LoRA factors float32).
3. Batched greedy decoding through :class:`gemma_core.decode.CompactDecoder` (the evaluation's and
   ``generate``'s loop) with no stop token, so every row makes ``--gen-new`` tokens; the first call
   (compilation) is reported apart, then the median of the timed calls.

Useful tokens/s is the steady state from ``train_log.jsonl``: real (non-padding) tokens over step
time, leaving out each bucket shape's first step (it compiles). MFU counts the matmul FLOPs the
training must do, as bench/bench_train.py does on CPU: 4 x N_body per useful token (forward, and the
activation gradients through the frozen weights) plus 4 x V x d per response token (the tied head
runs only there). Left out, so MFU is not flattered: attention scores (QK^T, PV; under 2% here at
these lengths, less with Gemma 3's sliding windows), the LoRA factors, norms and the optimizer.
Peak device memory is JAX's ``peak_bytes_in_use`` for the process, read after each size; the sizes
run smallest first, so each figure is that size's own peak.

Run on the device machine: its image has JAX with CUDA but not keras, keras-hub or pydantic, which
travel as wheels (/work/.library/device/README.md). Once, here, in the repository root:

    echo /.whl/ >> .git/info/exclude   # /.whl/ is also in .gitignore
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl keras==3.15.1 keras-hub==0.32.0 namex==0.1.0 optree==0.20.0 pydantic==2.14.4 \\
        pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5

(the versions of this project's lock: ``.venv/bin/python -m pip show NAME`` here), then one device
``run`` with carry [".whl"] and a timeout of about 540 s:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; \\
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \\
    KERAS_BACKEND=jax PYTHONUNBUFFERED=1 python3 bench/gpu_lora.py 2>&1 | tee $OUT/gpu_lora.log

It prints a table per size and writes $OUT/gpu_lora.json (or --out PATH). Without a GPU:

    .venv/bin/python bench/gpu_lora.py --smoke

shrinks everything (a 2-layer, 64-wide model, a few steps, 256^3 matmuls) to check that it runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_GEMMA3 = dict(query_head_dim_normalize=True, use_query_key_norm=True, use_post_ffw_norm=True,
               use_post_attention_norm=True, attention_logit_soft_cap=None, final_logit_soft_cap=None,
               use_sliding_window_attention=True, layer_norm_epsilon=1e-6, image_size=None, vision_encoder=None)
# The text models of Gemma 3 1B and 4B (their published configs; gate and up projections are each
# intermediate_dim wide in Gemma 3).
SIZES = {
    "1b": dict(vocabulary_size=262144, num_layers=26, num_query_heads=4, num_key_value_heads=1, hidden_dim=1152,
               intermediate_dim=6912, head_dim=256, sliding_window_size=512, **_GEMMA3),
    "4b": dict(vocabulary_size=262144, num_layers=34, num_query_heads=8, num_key_value_heads=4, hidden_dim=2560,
               intermediate_dim=10240, head_dim=256, sliding_window_size=1024, global_rope_scaling_factor=8.0,
               **_GEMMA3),
    "smoke": dict(vocabulary_size=1024, num_layers=2, num_query_heads=2, num_key_value_heads=1, hidden_dim=64,
                  intermediate_dim=128, head_dim=32, sliding_window_size=64, **_GEMMA3),
}


def body_params(cfg: dict) -> int:
    """N_body: the weights of the matmuls one token meets in the decoder blocks."""
    d, H, K, Dh, f = (cfg[k] for k in ("hidden_dim", "num_query_heads", "num_key_value_heads", "head_dim",
                                       "intermediate_dim"))
    return cfg["num_layers"] * (d * H * Dh + 2 * d * K * Dh + H * Dh * d + 3 * d * f)


def model_flops(cfg: dict, useful_tokens: int, response_tokens: int) -> float:
    """Matmul FLOPs the training must do for these tokens (the module docstring's formula)."""
    return 4 * body_params(cfg) * useful_tokens + 4 * cfg["vocabulary_size"] * cfg["hidden_dim"] * response_tokens


def log(msg: str) -> None:
    print(msg, flush=True)


def measure_matmul_rate(n: int, calls: int, trials: int = 3) -> float:
    """bf16 TFLOP/s of jit(a @ b) on n x n matrices, best of ``trials``."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype=jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), dtype=jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(calls):
            c = f(a, b)
        c.block_until_ready()
        best = min(best, (time.perf_counter() - t) / calls)
    return 2 * n ** 3 / best / 1e12


def peak_device_memory_gib() -> float | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # CPU devices may have none
        return None
    return stats["peak_bytes_in_use"] / 2 ** 30 if "peak_bytes_in_use" in stats else None


def made_up_examples(n: int, sequence_length: int, vocabulary_size: int, seed: int):
    """``n`` examples in :class:`~gemma_core.encoding.EncodedExamples`' layout: a start token, a prompt,
    a response closed by the end token, padding; the loss weight on the response and its end token."""
    import numpy as np

    from gemma_core.encoding import EncodedExamples

    rng = np.random.default_rng(seed)
    token_ids = np.zeros((n, sequence_length), "int32")
    labels = np.zeros((n, sequence_length), "int32")
    weight = np.zeros((n, sequence_length), "float32")
    mask = np.zeros((n, sequence_length), bool)
    for i in range(n):
        length = int(rng.integers(sequence_length // 8, sequence_length + 1))  # start .. end token, inclusive
        prompt = int(rng.integers(2, max(3, length // 2)))  # the start token and the prompt
        row = rng.integers(3, vocabulary_size, size=length + 1).astype("int32")
        row[0], row[length] = 2, 1  # <bos> ... <eos>
        token_ids[i, :length] = row[:length]
        labels[i, :length] = row[1:length + 1]
        weight[i, prompt - 1:length] = 1.0  # labels from the response's first token to the end token
        mask[i, :length] = True
    return EncodedExamples(token_ids, mask, labels, weight)


def build_model(cfg: dict):
    import keras_hub

    backbone = keras_hub.models.Gemma3Backbone(**cfg)  # random initialisation, in the global dtype policy
    return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)


def steady_state(log_path: Path, cfg: dict) -> dict:
    """Useful tokens/s and model FLOP/s over the steps after each shape's first (compiling) one."""
    from gemma_core.lora_train import read_train_log, steady_steps

    steps = read_train_log(log_path)
    kept = steady_steps(steps)
    seconds = sum(s["seconds"] for s in kept)
    useful = sum(s["useful_tokens"] for s in kept)
    response = sum(s["response_tokens"] for s in kept)
    return {"steps": len(steps), "steady_steps": len(kept), "shapes": len({tuple(s["shape"]) for s in steps}),
            "first_step_seconds": steps[0]["seconds"] if steps else None,
            "compile_steps_seconds": sum(s["seconds"] for s in steps) - seconds,
            "useful_tokens_per_s": useful / seconds if seconds else None,
            "model_flops_per_s": model_flops(cfg, useful, response) / seconds if seconds else None,
            "losses_first_last": [steps[0]["loss"], steps[-1]["loss"]] if steps else None}


def bench_train(lm, cfg: dict, args, out_dir: Path) -> dict:
    from gemma_core.config import LoraConfig, TrainConfig
    from gemma_core.lora_train import train_encoded

    examples = made_up_examples(args.examples, args.seq, cfg["vocabulary_size"], args.seed)
    train_cfg = TrainConfig(sequence_length=args.seq, batch_size=args.batch, epochs=args.epochs,
                            learning_rate=1e-4, checkpoint_every=10_000, seed=args.seed)
    t = time.perf_counter()
    result = train_encoded(lm, examples, train_cfg, LoraConfig(rank=args.rank), out_dir,
                           {"model_id": "random", "data_hash": "made-up"})
    wall = time.perf_counter() - t
    figures = steady_state(result.log_path, cfg)
    log(f"  {result.steps} steps in {wall:.1f} s ({figures['shapes']} shapes; first step "
        f"{figures['first_step_seconds']:.1f} s); steady: {figures['useful_tokens_per_s']:.0f} useful tok/s")
    return {"examples": args.examples, "sequence_length": args.seq, "batch": args.batch, "epochs": args.epochs,
            "rank": args.rank, "wall_seconds": wall, **figures}


def bench_generate(lm, cfg: dict, batch: int, args) -> dict:
    import keras_hub
    import numpy as np

    from gemma_core.decode import CompactDecoder

    rng = np.random.default_rng(args.seed + batch)
    lengths = rng.integers(args.gen_prompt // 2, args.gen_prompt + 1, size=batch)
    token_ids = np.zeros((batch, args.gen_prompt + args.gen_new), "int32")
    for i, length in enumerate(lengths):
        token_ids[i, :length] = rng.integers(3, cfg["vocabulary_size"], size=length)
        token_ids[i, 0] = 2
    decoder = CompactDecoder(lm, keras_hub.samplers.GreedySampler(), stop_token_ids=())

    def call() -> float:
        t = time.perf_counter()
        out, ends, _ = decoder(token_ids, lengths, args.gen_new, decoder.initial_sampler_state())
        assert (ends - lengths == args.gen_new).all(), "every row makes --gen-new tokens (no stop token)"
        return time.perf_counter() - t

    first = call()
    timed = [call() for _ in range(args.gen_calls)]
    median = statistics.median(timed)
    rate = batch * args.gen_new / median
    log(f"  batch {batch}: first call {first:.1f} s, then {median:.3f} s -> {rate:.1f} new tok/s")
    return {"batch": batch, "prompt_tokens_max": args.gen_prompt, "new_tokens_per_row": args.gen_new,
            "first_call_seconds": first, "seconds": timed, "new_tokens_per_s": rate}


def bench_size(size: str, args, work: Path) -> dict:
    import keras

    cfg = SIZES[size]
    keras.config.set_dtype_policy(args.policy)
    keras.utils.set_random_seed(args.seed)
    t = time.perf_counter()
    lm = build_model(cfg)
    built = time.perf_counter() - t
    params = lm.backbone.count_params()
    log(f"{size}: {params:,} parameters, built in {built:.1f} s; training {args.examples} examples of up to "
        f"{args.seq} tokens, batch {args.batch}, rank {args.rank}")
    train = bench_train(lm, cfg, args, work / f"train-{size}")
    generate = [bench_generate(lm, cfg, b, args) for b in args.gen_batches]
    return {"size": size, "config": {k: v for k, v in cfg.items() if k != "vision_encoder"}, "parameters": params,
            "build_seconds": built, "train": train, "generate": generate,
            "peak_device_memory_gib": peak_device_memory_gib()}


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a tiny model and a few steps: a CPU check that it runs")
    p.add_argument("--sizes", default="1b,4b", help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--seq", type=int, default=1024, help="sequence length (examples are up to this long)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--policy", default="bfloat16", choices=["bfloat16", "mixed_bfloat16", "float32"])
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--matmul-calls", type=int, default=20)
    p.add_argument("--gen-batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--gen-prompt", type=int, default=256, help="longest prompt (prompts are half to all of it)")
    p.add_argument("--gen-new", type=int, default=128)
    p.add_argument("--gen-calls", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: $OUT/gpu_lora.json if OUT is set)")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.examples, args.seq, args.batch, args.rank = "smoke", 24, 64, 4, 2
        args.matmul_n, args.matmul_calls, args.gen_batches, args.gen_prompt, args.gen_new, args.gen_calls = \
            256, 3, "1,4", 16, 8, 1
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        p.error(f"--sizes {','.join(unknown)}: unknown; use {', '.join(SIZES)}")
    args.gen_batches = [int(b) for b in args.gen_batches.split(",") if b.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    import jax
    import keras
    import keras_hub

    import gemma_core  # noqa: F401  (the project's backend defaults)

    if keras.config.backend() != "jax":
        sys.exit(f"KERAS_BACKEND must be jax, got {keras.config.backend()}")
    device = jax.devices()[0]
    log(f"gpu_lora: {getattr(device, 'device_kind', device)} ({device.platform}), jax {jax.__version__}, "
        f"keras {keras.__version__}, keras-hub {keras_hub.__version__}, policy {args.policy}"
        f"{', SMOKE' if args.smoke else ''}")
    if device.platform != "gpu" and not args.smoke:
        log("WARNING: no GPU found; these are not GPU figures")
    before = measure_matmul_rate(args.matmul_n, args.matmul_calls)
    log(f"bf16 matmul {args.matmul_n}^3: {before:.1f} TFLOP/s")
    sizes = []
    with tempfile.TemporaryDirectory(prefix="gpu-lora-") as work:
        for size in args.sizes:
            sizes.append(bench_size(size, args, Path(work)))
            keras.backend.clear_session()  # the last size's model and programs go before the next one
            gc.collect()
    after = measure_matmul_rate(args.matmul_n, args.matmul_calls)
    ceiling = max(before, after)
    log(f"bf16 matmul again: {after:.1f} TFLOP/s; ceiling {ceiling:.1f}")

    log("\ngpu_lora results" + (" (SMOKE: a tiny model on this machine, not a benchmark)" if args.smoke else ""))
    for s in sizes:
        train = s["train"]
        s["train"]["mfu"] = train["model_flops_per_s"] / 1e12 / ceiling if train["model_flops_per_s"] else None
        mem = s["peak_device_memory_gib"]
        log(f"  {s['size']}: {s['parameters'] / 1e9:.2f} B parameters; useful {train['useful_tokens_per_s']:.0f} tok/s, "
            f"MFU {100 * (train['mfu'] or 0):.1f}% (goal at 4B: 40%), first step {train['first_step_seconds']:.1f} s, "
            f"peak memory {'n/a' if mem is None else f'{mem:.1f} GiB'}; "
            + ", ".join(f"generate batch {g['batch']} {g['new_tokens_per_s']:.1f} new tok/s" for g in s["generate"]))
    result = {"script": "bench/gpu_lora.py", "smoke": args.smoke, "measured_on_gpu": device.platform == "gpu",
              "device": {"platform": device.platform, "kind": getattr(device, "device_kind", str(device)),
                         "count": jax.device_count()},
              "host": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
              "versions": {"jax": jax.__version__, "keras": keras.__version__, "keras_hub": keras_hub.__version__},
              "policy": args.policy, "matmul_tflops": {"before": before, "after": after, "ceiling": ceiling},
              "sizes": sizes, "total_seconds": time.perf_counter() - started}
    out = args.out or (Path(os.environ["OUT"]) / "gpu_lora.json" if os.environ.get("OUT") else None)
    if out is not None:
        write_json_atomic(Path(out), result)
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
