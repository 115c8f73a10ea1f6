"""The peer users would pick instead: Hugging Face transformers + PEFT LoRA on torch CPU.

Runs in its own environment, bench/.venv-ref (built as documented at the top of
bench/make_parity_fixture.py, plus ``peft``), never in the project's. bench/bench_train.py and
bench/bench_generate.py call it as a subprocess with exactly the examples, batch order and prompts they
give the Keras variants, so the two sides do the same work.

Training (one run = the batches of EX.json, in order):

    bench/.venv-ref/bin/python bench/peer_hf_peft.py --examples EX.json --out RESULT.json [--threads 2]

EX.json: {"gguf_path", "sequence_length", "batch_size", "learning_rate", "weight_decay", "lora_rank",
"seed", "examples": [{"token_ids": [...], "response_start": int}, ...], "batches": [[i, j, ...], ...]}.
token_ids are prompt+response ids from the same Gemma tokenizer, already truncated to
sequence_length + 1 (BOS first, EOS last when it fits); response_start is the index of the first response
token. Per batch, what a user's training loop with a padding DataCollator does:
- input_ids = ids[:-1], labels = ids[1:]; the label of position t is ids[t + 1], kept only where
  t + 1 >= response_start (the response), else -100;
- padded on the right to the longest example *in the batch* (dynamic padding), pad id 0 (Gemma's <pad>),
  label -100 and attention_mask 0 on padding;
- loss = mean cross entropy over the response tokens of the batch: exactly transformers'
  ForCausalLMLoss (``F.cross_entropy(..., ignore_index=-100)``, mean) applied to labels that are already
  shifted, so the model sees the same len(ids) - 1 input tokens as the Keras variants (passing
  ``labels=`` would shift a second time).
Model: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=float32)`` (transformers
dequantizes the GGUF to float32; ``dtype`` is transformers 5's name for ``torch_dtype``), the library's
default attention implementation unless --attn is given, PEFT ``LoraConfig(r=rank, lora_alpha=rank,
target_modules=["q_proj", "v_proj"], lora_dropout=0.0, bias="none")`` (alpha = rank: a scale of 1, as
keras-hub's enable_lora), ``torch.optim.AdamW(trainable, lr, weight_decay)`` (torch defaults otherwise:
betas 0.9/0.999, eps 1e-8; Keras' AdamW has eps 1e-7), model.train(), ``use_cache=False``,
torch.manual_seed(seed) before the adapters are made.

RESULT.json: per step {seconds (perf_counter around zero_grad + forward + backward + optimizer step),
loss, useful_tokens (non-padding input tokens), response_tokens, padded_shape}; load_seconds
(from_pretrained + get_peft_model), first_step_seconds_from_process_start (process creation to the end of
the first step: interpreter start, imports, load, first step), peak_rss_gib (ru_maxrss), versions,
threads, and summary rates. Written atomically (temp file + os.replace).

Generation:

    bench/.venv-ref/bin/python bench/peer_hf_peft.py --generate GEN.json --out RESULT.json [--threads 2]

GEN.json: {"gguf_path", "prompts_ids": [[...], ...], "max_new_tokens", "batch_sizes": [1, 8],
optional "ignore_eos": false, optional "stop_token_ids": [...]}. The base model (no adapters),
model.eval(), greedy ``model.generate`` with left padding (pad id 0). For each batch size the prompts
are taken in order, in chunks of that size (cycled to fill one full batch when there are fewer prompts
than the batch size); one untimed warm-up call of 2 new tokens on the first chunk comes first (its time
is reported). New tokens per row count up to and including the first end token (the GGUF's
generation_config eos ids, [1] for the embedded 270M, unless stop_token_ids is given, e.g. [1, 106] to
also stop at <end_of_turn>), or all max_new_tokens with ignore_eos; tokens/s = new tokens / seconds of
the timed generate calls. The generated ids of each prompt (first occurrence) are returned so greedy
outputs can be compared with the Keras side.

Smoke numbers from this script on a shared 2-core machine are not benchmark results.
"""

from __future__ import annotations

import time

_T_SCRIPT = time.perf_counter()  # before the heavy imports

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
from pathlib import Path

PAD_ID = 0  # Gemma's <pad>
IGNORE = -100


def process_start_epoch() -> float:
    """Wall-clock time at which this process was created (falls back to this script's start)."""
    try:
        import psutil  # an accelerate dependency, present in bench/.venv-ref

        return psutil.Process(os.getpid()).create_time()
    except Exception:  # pragma: no cover - psutil missing
        return time.time() - (time.perf_counter() - _T_SCRIPT)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 ** 2)  # KiB on Linux


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def environment(torch, threads: int) -> dict:
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
    }


def load_model(torch, gguf_path: str, attn: str | None):
    from transformers import AutoModelForCausalLM

    gguf = Path(gguf_path).resolve()
    kwargs = {"gguf_file": gguf.name, "dtype": torch.float32}
    if attn:
        kwargs["attn_implementation"] = attn
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs)


def collate(torch, examples: list[dict], indices: list[int]):
    """Dynamic right padding to the longest example of the batch; labels pre-shifted."""
    rows = [examples[i] for i in indices]
    width = max(len(r["token_ids"]) - 1 for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    useful = response = 0
    for b, r in enumerate(rows):
        ids = [int(t) for t in r["token_ids"]]
        start = int(r["response_start"])
        n = len(ids) - 1
        if n < 1:
            raise ValueError(f"example {indices[b]} has fewer than 2 tokens")
        input_ids[b, :n] = torch.tensor(ids[:-1])
        attention_mask[b, :n] = 1
        for t in range(n):
            if t + 1 >= start:
                labels[b, t] = ids[t + 1]
        useful += n
        response += sum(1 for t in range(n) if t + 1 >= start)
    return input_ids, attention_mask, labels, useful, response


def torch_matmul_gflops(torch, n: int = 2048) -> float:
    """float32 n^3 matmul rate through torch (after training, so it does not warm the run), median of 5."""
    a = torch.randn(n, n)
    a @ a
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[2] / 1e9


def train(args) -> dict:
    spec = json.loads(Path(args.examples).read_text(encoding="utf-8"))
    import torch

    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    import_seconds = time.perf_counter() - _T_SCRIPT
    examples, batches = spec["examples"], spec["batches"]
    seq_len = int(spec["sequence_length"])
    for i, ex in enumerate(examples):
        if len(ex["token_ids"]) > seq_len + 1:
            raise ValueError(f"example {i} has {len(ex['token_ids'])} ids > sequence_length + 1")

    t = time.perf_counter()
    model = load_model(torch, spec["gguf_path"], args.attn)
    torch.manual_seed(int(spec["seed"]))
    rank = int(spec["lora_rank"])
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"],
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    load_seconds = time.perf_counter() - t
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=float(spec["learning_rate"]),
                                  weight_decay=float(spec["weight_decay"]))
    vocab = model.config.vocab_size if hasattr(model.config, "vocab_size") else None

    steps = []
    first_step_from_start = None
    start_epoch = process_start_epoch()
    for step, indices in enumerate(batches):
        input_ids, attention_mask, labels, useful, response = collate(torch, examples, indices)
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
        loss.backward()
        optimizer.step()
        seconds = time.perf_counter() - t
        if first_step_from_start is None:
            first_step_from_start = time.time() - start_epoch
        del logits
        steps.append({"step": step, "seconds": seconds, "loss": float(loss.detach()),
                      "useful_tokens": useful, "response_tokens": response,
                      "padded_shape": list(input_ids.shape)})

    total_s = sum(s["seconds"] for s in steps)
    useful = sum(s["useful_tokens"] for s in steps)
    matmul_gflops = torch_matmul_gflops(torch)
    later = steps[1:]
    later_s = sum(s["seconds"] for s in later)
    result = {
        "variant": "hf_transformers_peft_torch_cpu",
        "mode": "train",
        "sequence_length": seq_len,
        "batch_size": int(spec["batch_size"]),
        "learning_rate": float(spec["learning_rate"]),
        "weight_decay": float(spec["weight_decay"]),
        "lora_rank": rank,
        "seed": int(spec["seed"]),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "vocab_size": vocab,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "import_seconds": import_seconds,
        "load_seconds": load_seconds,
        "matmul_gflops": matmul_gflops,
        "first_step_seconds_from_process_start": first_step_from_start,
        "steps": steps,
        "total_step_seconds": total_s,
        "useful_tokens": useful,
        "response_tokens": sum(s["response_tokens"] for s in steps),
        "useful_tokens_per_s": useful / total_s if total_s else None,
        "useful_tokens_per_s_after_first_step": (sum(s["useful_tokens"] for s in later) / later_s
                                                 if later_s else None),
        "median_step_seconds": median([s["seconds"] for s in steps]),
        "peak_rss_gib": peak_rss_gib(),
        "environment": environment(torch, args.threads),
    }
    return result


def generate(args) -> dict:
    spec = json.loads(Path(args.generate).read_text(encoding="utf-8"))
    import torch

    torch.set_num_threads(args.threads)
    import_seconds = time.perf_counter() - _T_SCRIPT
    t = time.perf_counter()
    model = load_model(torch, spec["gguf_path"], args.attn).eval()
    load_seconds = time.perf_counter() - t
    prompts = [[int(x) for x in p] for p in spec["prompts_ids"]]
    max_new = int(spec["max_new_tokens"])
    ignore_eos = bool(spec.get("ignore_eos", False))
    eos = spec.get("stop_token_ids") or model.generation_config.eos_token_id
    eos_ids = set([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)))

    def run_chunk(chunk: list[list[int]], new_tokens: int):
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, p in enumerate(chunk):  # left padding
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": PAD_ID,
                  "top_k": None, "top_p": None, "temperature": None}
        if ignore_eos:
            kwargs["eos_token_id"] = None
            kwargs["min_new_tokens"] = new_tokens
        elif eos_ids:
            kwargs["eos_token_id"] = sorted(eos_ids)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        seconds = time.perf_counter() - t0
        new_rows = []
        for row in out[:, width:].tolist():
            kept = []
            for tok in row:
                kept.append(tok)
                if not ignore_eos and tok in eos_ids:
                    break
            new_rows.append(kept)
        return seconds, new_rows

    per_batch = []
    for bs in spec["batch_sizes"]:
        bs = int(bs)
        order = list(range(len(prompts)))
        while len(order) < bs:
            order += list(range(len(prompts)))[: bs - len(order)]
        chunks = [order[i:i + bs] for i in range(0, len(order), bs)]
        warm_s, _ = run_chunk([prompts[i] for i in chunks[0]], 2)
        seconds = 0.0
        new_tokens = 0
        outputs: dict[int, list[int]] = {}
        calls = []
        for c in chunks:
            s, rows = run_chunk([prompts[i] for i in c], max_new)
            n = sum(len(r) for r in rows)
            seconds += s
            new_tokens += n
            calls.append({"rows": len(c), "seconds": s, "new_tokens": n})
            for i, r in zip(c, rows):
                outputs.setdefault(i, r)
        per_batch.append({
            "batch_size": bs,
            "warmup_seconds": warm_s,
            "seconds": seconds,
            "new_tokens": new_tokens,
            "new_tokens_per_s": new_tokens / seconds if seconds else None,
            "calls": calls,
            "generated_ids": [outputs[i] for i in range(len(prompts))],
        })
    return {
        "variant": "hf_transformers_torch_cpu_generate",
        "mode": "generate",
        "decoding": "greedy",
        "max_new_tokens": max_new,
        "ignore_eos": ignore_eos,
        "eos_token_ids": sorted(eos_ids),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "import_seconds": import_seconds,
        "load_seconds": load_seconds,
        "batch_sizes": per_batch,
        "peak_rss_gib": peak_rss_gib(),
        "environment": environment(torch, args.threads),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--examples", type=Path, help="EX.json: LoRA training run")
    mode.add_argument("--generate", type=Path, help="GEN.json: greedy generation throughput")
    parser.add_argument("--out", type=Path, required=True, help="RESULT.json (written atomically)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch intra-op threads (default: all cores)")
    parser.add_argument("--attn", default=None,
                        help="attn_implementation (default: the library's default, as a user gets)")
    args = parser.parse_args(argv)

    if args.examples:
        result = train(args)
        write_json_atomic(args.out, result)
        print(f"peer hf+peft train: {len(result['steps'])} steps, seq {result['sequence_length']}, "
              f"batch {result['batch_size']}, {result['useful_tokens_per_s']:.1f} useful tok/s "
              f"(after step 1: {result['useful_tokens_per_s_after_first_step'] or float('nan'):.1f}), "
              f"median step {result['median_step_seconds']:.2f} s, load {result['load_seconds']:.1f} s, "
              f"first step at {result['first_step_seconds_from_process_start']:.1f} s, "
              f"loss {result['steps'][0]['loss']:.4f} -> {result['steps'][-1]['loss']:.4f}, "
              f"peak RSS {result['peak_rss_gib']:.2f} GiB -> {args.out}")
    else:
        result = generate(args)
        write_json_atomic(args.out, result)
        rates = ", ".join(f"batch {b['batch_size']}: {b['new_tokens_per_s']:.1f}"
                          for b in result["batch_sizes"])
        print(f"peer hf generate (greedy, {result['max_new_tokens']} new): {rates} new tok/s, "
              f"load {result['load_seconds']:.1f} s, peak RSS {result['peak_rss_gib']:.2f} GiB "
              f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
