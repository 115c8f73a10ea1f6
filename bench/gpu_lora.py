"""GPU benchmark (issue 7, item 6): LoRA training and batched generation of a Gemma 2B-sized model, JAX, bf16.

NO GPU FIGURE HAS BEEN MEASURED WITH THIS SCRIPT YET. It was written on a machine without a GPU and
checked there only with ``--smoke`` (a tiny config on CPU, which says nothing about GPU speed). Do not
quote any number from it until it has run on an H200.

What it does, in one process (a few minutes on an H200):
1. The bf16 matrix-multiply rate of this GPU, measured here: jit(a @ b) on random bf16 8192x8192
   matrices, 20 calls back to back per trial, timed with block_until_ready, best of 3 trials. It runs
   again at the end; the higher of the two rates is the ceiling (so MFU is never flattered).
2. LoRA training: keras_hub.models.GemmaBackbone with gemma_2b_en's exact dimensions (vocabulary 256000,
   18 layers, hidden 2048, 8 query heads, 1 key/value head, head_dim 256, intermediate_dim 32768, which
   keras-hub halves into two 16384-wide gate/up projections; 2,506,172,416 parameters, the preset's
   metadata count) with random weights (no download; same FLOPs as the real ones),
   ``backbone.enable_lora(rank=4)`` (keras-hub's default targets: query and value), AdamW
   (lr 1e-4, weight decay 0.01), sparse categorical cross-entropy from logits on every position of random
   tokens (no padding: every token is a trained token), dtype policy "bfloat16" (frozen weights and
   compute in bf16; keras always makes the LoRA factors float32; ``--policy mixed_bfloat16`` keeps all
   weights float32). The step is keras' own jitted JAX
   ``train_on_batch`` (state donated), as the project's trainer uses it. Batch 8 x sequence 1024 by default;
   2 warm-up steps (the first includes XLA compilation, reported), then 10 timed steps, each timed to the
   returned loss (a host sync), median taken.
3. Batched generation: ``GemmaCausalLM.generate`` of that same LoRA model, greedy sampler, no stop token
   (so every row generates exactly --gen-new tokens), prompts of --gen-prompt random tokens, batch 32 by
   default. The first call (compilation) is reported apart; then 3 timed calls, median.
   New tokens/s = batch * new tokens / seconds.

Model FLOPs per trained token (what MFU counts; weights frozen except the LoRA factors, so there are no
weight-gradient matmuls for the 2.5B frozen parameters):

    F = 4 * N_mm  +  12 * L * H * Dh * T_avg  +  6 * P_lora

  N_mm  = matmul weights a token meets = L * (d*H*Dh + 2*d*K*Dh + H*Dh*d + 3*d*f) + V*d
          (q, k, v, o projections, gate/up/down FFN with f = intermediate_dim / 2, and the output head
          tied to the embedding; the embedding lookup itself is no matmul). 2 * N_mm for the forward
          pass, 2 * N_mm again for the activation gradients of the backward pass.
  attention: QK^T and PV are 4 * H * Dh FLOPs per (query, key) pair per layer forward, twice that
          backward (dS, dP -> dQ, dK, dV) = 12 * L * H * Dh per pair; causal, so a token at position t
          meets t + 1 keys: T_avg = (T + 1) / 2. (Counting the full T instead, as XLA may compute it,
          would add about 2% to F at T = 1024; we do not.)
  P_lora = L * r * ((H*d + Dh) + (K*d + Dh)), the adapter parameters keras makes for query and value
          (A has the kernel's shape with the last axis replaced by r, B is r x Dh); 6 FLOPs each per
          token, as if applied factored (about 0.03% of F; approximate).
  Ignored: norms, softmax, rotary embeddings, the optimizer update (element-wise, tiny against the
  matmuls), and that the first layer's input gradient is never needed (under 0.1% of F).
  Not counted, though executed: keras' EinsumDense merges W + (alpha/r) A.B into the kernel on every
  call, so the backward pass also computes a full-size kernel gradient for query and value
  (2 * L * d * (H + K) * Dh FLOPs per token, about 1.7% of F for gemma_2b_en). That is the
  implementation's overhead, not model work, so it lowers MFU rather than inflating it.
  For gemma_2b_en: N_mm = 2,506,096,640, so F is about 10.02 GFLOP + 0.23 GFLOP of attention at T = 1024.

  MFU = F * tokens per second / measured bf16 matmul rate. Issue 7's goal: at least 35%.

Run on the device machine (NVIDIA H200; its image has jax with CUDA but no keras or keras-hub, so they
travel as wheels, as /work/.library/device/README.md describes). Once, here, in the repository root:

    echo /.whl/ >> .git/info/exclude   # /.whl/ is also in .gitignore
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl keras==3.15.1 keras-hub==0.32.0 namex==0.1.0 optree==0.20.0

then one device ``run`` with carry [".whl"] and a timeout of about 420 s:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    KERAS_BACKEND=jax PYTHONUNBUFFERED=1 python3 bench/gpu_lora.py 2>&1 | tee $OUT/gpu_lora.log

It prints a table and writes $OUT/gpu_lora.json (or --out PATH). keras-hub needs neither TensorFlow nor
kagglehub for this (no tokenizer, no preset); the image's jax (0.11.x) is newer than the project's 0.10.
On a machine without a GPU:

    KERAS_BACKEND=jax .venv/bin/python bench/gpu_lora.py --smoke

shrinks everything (a 2-layer, 64-wide model, 2 steps, 256^3 matmul) to check that the script runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# gemma_2b_en's backbone config (keras-hub preset "gemma_2b_en"; 2,506,172,416 parameters).
GEMMA_2B_EN = {
    "vocabulary_size": 256000,
    "num_layers": 18,
    "num_query_heads": 8,
    "num_key_value_heads": 1,
    "hidden_dim": 2048,
    "intermediate_dim": 32768,  # keras-hub's GemmaBackbone splits it: two projections of 16384
    "head_dim": 256,
    "layer_norm_epsilon": 1e-6,
}
SMOKE = {
    "vocabulary_size": 1024,
    "num_layers": 2,
    "num_query_heads": 2,
    "num_key_value_heads": 1,
    "hidden_dim": 64,
    "intermediate_dim": 256,
    "head_dim": 32,
    "layer_norm_epsilon": 1e-6,
}


def matmul_params(cfg: dict) -> int:
    """N_mm: weights of the matmuls one token goes through (the tied head included, the lookup not)."""
    d, H, K, Dh = cfg["hidden_dim"], cfg["num_query_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    f = cfg["intermediate_dim"] // 2
    per_layer = d * H * Dh + 2 * d * K * Dh + H * Dh * d + 3 * d * f
    return cfg["num_layers"] * per_layer + cfg["vocabulary_size"] * d


def lora_params(cfg: dict, rank: int) -> int:
    d, H, K, Dh = cfg["hidden_dim"], cfg["num_query_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    return cfg["num_layers"] * rank * ((H * d + Dh) + (K * d + Dh))  # keras' shapes, query + value


def train_flops_per_token(cfg: dict, seq_len: int, rank: int) -> dict:
    """Model FLOPs per trained token for LoRA with frozen weights (formula in the module docstring)."""
    n_mm = matmul_params(cfg)
    t_avg = (seq_len + 1) / 2
    attn = 12 * cfg["num_layers"] * cfg["num_query_heads"] * cfg["head_dim"] * t_avg
    lora = 6 * lora_params(cfg, rank)
    return {"matmul": 4 * n_mm, "attention": attn, "lora": lora, "total": 4 * n_mm + attn + lora,
            "n_mm": n_mm}


def total_params(cfg: dict) -> int:
    """All backbone parameters (for checking the config against the preset's count)."""
    d, L = cfg["hidden_dim"], cfg["num_layers"]
    norms = L * 2 * d + d
    return matmul_params(cfg) + norms  # embedding == head (tied), counted once inside matmul_params


def log(msg: str) -> None:
    print(msg, flush=True)


def measure_matmul_rate(n: int, calls: int, trials: int = 3) -> dict:
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype=jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), dtype=jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()  # compile + warm
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(calls):
            c = f(a, b)
        c.block_until_ready()
        best = min(best, (time.perf_counter() - t) / calls)
    del a, b, c
    return {"n": n, "calls_per_trial": calls, "trials": trials, "seconds_per_matmul": best,
            "tflops": 2 * n ** 3 / best / 1e12}


def device_info() -> dict:
    import jax

    dev = jax.devices()[0]
    info = {"platform": dev.platform, "device_kind": getattr(dev, "device_kind", str(dev)),
            "device_count": jax.device_count()}
    return info


def peak_device_memory_gib() -> float | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2 ** 30


def build_model(cfg: dict, rank: int, lr: float, weight_decay: float):
    import keras
    import keras_hub

    backbone = keras_hub.models.GemmaBackbone(**cfg)  # random initialisation
    lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    backbone.enable_lora(rank=rank)  # keras-hub default targets: query and value
    optimizer = keras.optimizers.AdamW(learning_rate=lr, weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["bias", "scale"])
    lm.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        sampler="greedy",
    )
    return lm


def fused_attention_used(lm) -> bool | None:
    try:
        layer = lm.backbone.transformer_layers[0].attention
        return bool(layer._use_fused_attention_op())
    except Exception:
        return None


def bench_train(lm, cfg: dict, batch: int, seq_len: int, warmup: int, steps: int, seed: int) -> dict:
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg["vocabulary_size"], size=(batch, seq_len + 1), dtype=np.int32)
    x = {"token_ids": jnp.asarray(ids[:, :-1]), "padding_mask": jnp.ones((batch, seq_len), dtype="int32")}
    y = jnp.asarray(ids[:, 1:])
    sw = jnp.ones((batch, seq_len), dtype="float32")

    warm_seconds, losses = [], []
    for _ in range(warmup):
        t = time.perf_counter()
        loss = float(lm.train_on_batch(x, y, sample_weight=sw))
        warm_seconds.append(time.perf_counter() - t)
        losses.append(loss)
        log(f"  warm-up step {len(warm_seconds)}: {warm_seconds[-1]:.2f} s, loss {loss:.4f}")
    step_seconds = []
    for i in range(steps):
        t = time.perf_counter()
        loss = float(lm.train_on_batch(x, y, sample_weight=sw))
        step_seconds.append(time.perf_counter() - t)
        losses.append(loss)
    log(f"  {steps} timed steps: median {statistics.median(step_seconds):.4f} s, "
        f"min {min(step_seconds):.4f} s, loss {losses[-1]:.4f}")
    if not all(np.isfinite(losses)):
        log("  WARNING: non-finite loss")
    return {"batch": batch, "sequence_length": seq_len, "tokens_per_step": batch * seq_len,
            "warmup_step_seconds": warm_seconds, "step_seconds": step_seconds,
            "median_step_seconds": statistics.median(step_seconds), "losses": losses}


def bench_generate(lm, cfg: dict, batch: int, prompt_len: int, new_tokens: int, calls: int,
                   seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    total = prompt_len + new_tokens
    token_ids = np.zeros((batch, total), dtype=np.int32)
    token_ids[:, :prompt_len] = rng.integers(1, cfg["vocabulary_size"], size=(batch, prompt_len))
    padding_mask = np.zeros((batch, total), dtype=bool)
    padding_mask[:, :prompt_len] = True
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}

    def call():
        t = time.perf_counter()
        out = lm.generate(inputs, stop_token_ids=None)
        np.asarray(out["token_ids"])  # already numpy (keras-hub converts); forces the sync regardless
        return time.perf_counter() - t, out

    first_seconds, out = call()
    generated = int(np.asarray(out["padding_mask"]).sum()) - batch * prompt_len
    log(f"  batch {batch}: first call (compile) {first_seconds:.1f} s")
    seconds = [call()[0] for _ in range(calls)]
    med = statistics.median(seconds)
    rate = batch * new_tokens / med
    log(f"  batch {batch}: median {med:.3f} s for {batch} x {new_tokens} new tokens -> {rate:.1f} new tok/s")
    return {"batch": batch, "prompt_tokens": prompt_len, "new_tokens_per_row": new_tokens,
            "generated_tokens_first_call": generated, "first_call_seconds": first_seconds,
            "seconds": seconds, "median_seconds": med, "new_tokens_per_s": rate}


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny config, 2 steps: a CPU check that it runs")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--policy", default="bfloat16", choices=["bfloat16", "mixed_bfloat16"])
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--matmul-calls", type=int, default=20)
    p.add_argument("--gen-batches", default="32", help="comma-separated batch sizes, e.g. 1,8,32")
    p.add_argument("--gen-prompt", type=int, default=128)
    p.add_argument("--gen-new", type=int, default=128)
    p.add_argument("--gen-calls", type=int, default=3)
    p.add_argument("--no-generate", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: $OUT/gpu_lora.json if OUT is set)")
    args = p.parse_args(argv)

    cfg = dict(GEMMA_2B_EN)
    if args.smoke:
        cfg = dict(SMOKE)
        args.batch, args.seq, args.warmup, args.steps = 2, 32, 1, 2
        args.matmul_n, args.matmul_calls = 256, 3
        args.gen_batches, args.gen_prompt, args.gen_new, args.gen_calls = "2", 8, 8, 1
    gen_batches = [int(b) for b in args.gen_batches.split(",") if b.strip()]

    t_start = time.perf_counter()
    import jax
    import keras
    import keras_hub

    if keras.backend.backend() != "jax":
        sys.exit(f"KERAS_BACKEND must be jax, got {keras.backend.backend()}")
    dev = device_info()
    log(f"gpu_lora: {dev['device_kind']} ({dev['platform']}), jax {jax.__version__}, "
        f"keras {keras.__version__}, "
        f"keras-hub {keras_hub.__version__}, policy {args.policy}{', SMOKE' if args.smoke else ''}")
    if dev["platform"] != "gpu" and not args.smoke:
        log("WARNING: no GPU found; these are not GPU figures")

    log(f"1. bf16 matmul {args.matmul_n}^3")
    mm_before = measure_matmul_rate(args.matmul_n, args.matmul_calls)
    log(f"  {mm_before['tflops']:.1f} TFLOP/s")

    keras.config.set_dtype_policy(args.policy)
    keras.utils.set_random_seed(args.seed)
    log(f"2. LoRA training: {cfg['num_layers']} layers, hidden {cfg['hidden_dim']}, "
        f"vocab {cfg['vocabulary_size']}, "
        f"rank {args.rank}, batch {args.batch} x {args.seq}")
    t = time.perf_counter()
    lm = build_model(cfg, args.rank, args.lr, args.weight_decay)
    build_seconds = time.perf_counter() - t
    n_params = lm.backbone.count_params()
    n_trainable = sum(math.prod(v.shape) for v in lm.backbone.trainable_variables)
    log(f"  built in {build_seconds:.1f} s: {n_params:,} parameters ({n_trainable:,} trainable, "
        f"expected {total_params(cfg) + lora_params(cfg, args.rank):,} in all)")
    train = bench_train(lm, cfg, args.batch, args.seq, args.warmup, args.steps, args.seed)
    flops = train_flops_per_token(cfg, args.seq, args.rank)
    train["tokens_per_s"] = train["tokens_per_step"] / train["median_step_seconds"]
    train["model_tflops_per_s"] = flops["total"] * train["tokens_per_s"] / 1e12
    train["peak_device_memory_gib_after_train"] = peak_device_memory_gib()

    gens = []
    if not args.no_generate:
        log(f"3. generation: greedy, prompt {args.gen_prompt}, {args.gen_new} new tokens, no stop token")
        for b in gen_batches:
            gens.append(bench_generate(lm, cfg, b, args.gen_prompt, args.gen_new, args.gen_calls, args.seed))

    log("4. bf16 matmul again")
    mm_after = measure_matmul_rate(args.matmul_n, args.matmul_calls)
    log(f"  {mm_after['tflops']:.1f} TFLOP/s")
    ceiling = max(mm_before["tflops"], mm_after["tflops"])
    train["mfu"] = train["model_tflops_per_s"] / ceiling

    result = {
        "script": "bench/gpu_lora.py",
        "smoke": args.smoke,
        "measured_on_gpu": dev["platform"] == "gpu",
        "device": dev,
        "host": {"python": platform.python_version(), "platform": platform.platform(),
                 "cpu_count": os.cpu_count()},
        "versions": {"jax": jax.__version__, "keras": keras.__version__, "keras_hub": keras_hub.__version__},
        "dtype_policy": args.policy,
        "config": cfg,
        "parameters": n_params,
        "trainable_parameters": n_trainable,
        "lora_rank": args.rank,
        "lora_targets": "keras-hub default (query, value)",
        "fused_attention_op": fused_attention_used(lm),
        "flops_per_token": flops,
        "matmul": {"before": mm_before, "after": mm_after, "ceiling_tflops": ceiling},
        "build_seconds": build_seconds,
        "train": train,
        "generate": gens,
        "peak_device_memory_gib": peak_device_memory_gib(),
        "total_seconds": time.perf_counter() - t_start,
    }

    rows = [("bf16 matmul ceiling", f"{ceiling:.1f} TFLOP/s (before {mm_before['tflops']:.1f}, "
                                    f"after {mm_after['tflops']:.1f})"),
            ("model FLOPs / token", f"{flops['total'] / 1e9:.3f} GFLOP (matmul {flops['matmul'] / 1e9:.3f}, "
                                    f"attention {flops['attention'] / 1e9:.3f})"),
            ("train first step", f"{train['warmup_step_seconds'][0]:.1f} s (compile included)"
             if train["warmup_step_seconds"] else "-"),
            ("train step (median)",
             f"{train['median_step_seconds']:.4f} s for {train['tokens_per_step']} tokens"),
            ("train tokens/s", f"{train['tokens_per_s']:.1f}"),
            ("model TFLOP/s", f"{train['model_tflops_per_s']:.2f}"),
            ("MFU", f"{100 * train['mfu']:.1f}% of the measured matmul rate (goal >= 35%)")]
    for g in gens:
        rows.append((f"generate batch {g['batch']}", f"{g['new_tokens_per_s']:.1f} new tok/s "
                                                      f"(first call {g['first_call_seconds']:.1f} s)"))
    mem = result["peak_device_memory_gib"]
    rows.append(("peak device memory", f"{mem:.1f} GiB" if mem is not None else "n/a"))
    rows.append(("total wall", f"{result['total_seconds']:.0f} s"))
    width = max(len(k) for k, _ in rows)
    title = "gpu_lora results" + (" (SMOKE: tiny config, not a benchmark)" if args.smoke else "")
    log("\n" + title)
    for k, v in rows:
        log(f"  {k:<{width}}  {v}")

    out = args.out
    if out is None and os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "gpu_lora.json"
    if out is not None:
        write_json_atomic(Path(out), result)
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
