"""Do the exported GGUFs answer in llama.cpp as the project's own tuned model does?

    flock /tmp/gemma-heavy.lock .venv/bin/python bench/bench_gguf_llama_cpp.py [--adapter ADAPTER.lora.h5]

1. llama.cpp's Python binding in its own environment, ``bench/.venv-llama``: ``llama-cpp-python``
   (LLAMA_CPP_PYTHON below) built from its sdist with the machine's cmake and gcc, 2 build jobs
   (about 35 minutes on 2 shared cores); reused when it imports.
2. In the project's environment: the default config's data (the offline sample), the embedded Gemma 3
   270M with an adapter: the one given, else one trained here with the default ``train``/``lora``
   sections (what ``gemma-lora run`` trains); the tuned model's greedy answers to the first 16
   held-out prompts with ``gemma_core.generation`` (the config's generation section: greedy,
   ``max_new_tokens`` 64); the merged model written as f32, f16 and q8_0 GGUFs
   (``gemma_core.gguf_export.write_gguf``).
3. In ``bench/.venv-llama`` (this file again, ``--llama-side``, no project import): each GGUF loaded with
   ``llama_cpp.Llama`` once per KV-cache type (``--kv-cache``: f32, the precision of the project's own
   cache, and f16, llama.cpp's default, which rounds every key and value it stores), each prompt
   tokenized by llama.cpp itself (BOS added, special tokens parsed, as a chat front end does), then
   greedy decoding (argmax of the logits, one token per step) up to ``max_new_tokens`` or the first
   ``<eos>``/``<end_of_turn>``.
   Beside the export's q8_0, llama.cpp's own quantizer (``llama_model_quantize``, what ``llama-quantize``
   runs) makes a q8_0 of the exported f32 file; it is answered the same way, and compared with the
   export's q8_0 tensor by tensor (names, types, bytes).
4. Per GGUF and KV-cache type: how many answers are identical (text, stripped, as ``gemma_core.generation``
   returns it), how many prompts llama.cpp tokenized to the project's ids, the first differing answer. JSON to
   ``bench/results/gguf_llama_cpp.json`` (written atomically); a Markdown table on stdout for
   bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMA_VENV = REPO / "bench" / ".venv-llama"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
QUANTS = ("f32", "f16", "q8_0")
# llama.cpp's KV cache types (ggml type ids): f16 is its default; f32 keeps keys and values as computed.
KV_CACHE_TYPES = {"f32": 0, "f16": 1}
# Also accepted by --quants: q8_0 with token_embd (the tied embedding and output head) in another type,
# e.g. "q8_0+embd_f16", to measure what that one tensor's rounding costs in llama.cpp.
EMBEDDING_VARIANT = "+embd_"
NUM_PROMPTS = 16
STOP_TOKENS = ("<eos>", "<end_of_turn>")
# The run label of llama.cpp's own q8_0 quantization of the exported f32 file.
LLAMA_QUANTIZED = "q8_0-llama-quantize"


# --- bench/.venv-llama ---------------------------------------------------------------------------

def ensure_llama_venv() -> Path:
    """bench/.venv-llama/bin/python with llama_cpp importable, building it first if needed."""
    python = LLAMA_VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return python
    print(f"building {LLAMA_CPP_PYTHON} in {LLAMA_VENV} (compiles llama.cpp: many minutes)", file=sys.stderr)
    subprocess.run([shutil.which("python3.11") or sys.executable, "-m", "venv", str(LLAMA_VENV)], check=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2",
           "CMAKE_ARGS": "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"}
    subprocess.run([str(python), "-m", "pip", "install", "--no-binary", "llama-cpp-python", LLAMA_CPP_PYTHON],
                   check=True, env=env)
    return python


def llama_side(job_path: Path, out_path: Path) -> None:
    """Runs in bench/.venv-llama: greedy answers of every GGUF in the job, with llama.cpp's tokenizer."""
    import ctypes

    import llama_cpp
    import llama_cpp.llama_cpp as llama_c_api
    import numpy as np

    # This machine's CPU reports AMX, and llama.cpp's extra weight buffers (repacked / AMX) for q8_0 die
    # here with SIGILL (Illegal instruction) on the first evaluation; without them llama.cpp runs its
    # plain AVX-512 kernels. Llama() builds its model parameters from this default, so off it goes.
    default_params = llama_c_api.llama_model_default_params

    def without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_c_api.llama_model_default_params = without_extra_buffers
    job = json.loads(job_path.read_text())
    results = {"llama_cpp_python": llama_cpp.__version__, "runs": {}, "ggufs": dict(job["ggufs"])}
    if "f32" in job["ggufs"]:
        # llama.cpp's own quantizer (what `llama-quantize model-f32.gguf out.gguf Q8_0` runs) applied to the
        # exported f32 file: the q8_0 a llama.cpp user would make, to set beside the export's own q8_0.
        params = llama_c_api.llama_model_quantize_default_params()
        params.ftype = llama_c_api.LLAMA_FTYPE_MOSTLY_Q8_0
        params.nthread = job["threads"]
        source = Path(job["ggufs"]["f32"])
        target = source.with_name(f"{source.stem}-{LLAMA_QUANTIZED}.gguf")
        started = time.perf_counter()
        if llama_c_api.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize failed on {source}")
        results["ggufs"][LLAMA_QUANTIZED] = str(target)
        results["llama_quantize_seconds"] = time.perf_counter() - started
    runs = [(quant, path, kv) for quant, path in results["ggufs"].items() for kv in job["kv_cache_types"]]
    for quant, gguf_path, kv in runs:
        started = time.perf_counter()
        longest = max(len(ids) for ids in job["project_prompt_ids"])
        llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=longest + job["max_new_tokens"] + 16, n_batch=512,
                              n_threads=job["threads"], logits_all=True, verbose=False,
                              type_k=KV_CACHE_TYPES[kv], type_v=KV_CACHE_TYPES[kv])
        load_seconds = time.perf_counter() - started
        stops = {llm.tokenize(t.encode(), add_bos=False, special=True)[0] for t in STOP_TOKENS}
        answers, prompt_ids, new_tokens = [], [], 0
        gen_started = time.perf_counter()
        for prompt in job["prompts"]:
            ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
            prompt_ids.append(ids)
            llm.reset()
            llm.eval(ids)
            out: list[int] = []
            for _ in range(job["max_new_tokens"]):
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                new_tokens += 1
                if token in stops:
                    break
                out.append(token)
                llm.eval([token])
            answers.append(llm.detokenize(out).decode("utf-8", errors="replace").strip())
        results["runs"][run_label(quant, kv)] = {
            "quant": quant, "kv_cache": kv, "answers": answers, "prompt_ids": prompt_ids, "load_seconds": load_seconds,
            "generate_seconds": time.perf_counter() - gen_started, "new_tokens": new_tokens,
            "stop_ids": sorted(stops),
        }
        del llm
    _write_json(out_path, results)


# --- the project's side ---------------------------------------------------------------------------

def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def vector_extensions() -> list[str]:
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                        "amx_tile") if f in flags]


def project_side(args) -> dict:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    sys.path.insert(0, str(REPO))
    from gemma_core.config import PipelineConfig
    from gemma_core.dolly_prepare import format_dolly_to_parquet, read_split
    from gemma_core.generation import generate_answers
    from gemma_core.gguf_export import write_gguf
    from gemma_core.lora_train import train_lora
    from gemma_core.models import load_model

    cfg = PipelineConfig()
    work = Path(args.work)
    prepared = format_dolly_to_parquet(cfg.data, work / "data", cfg.model.spec)
    train, evaluation = read_split(prepared.train_path), read_split(prepared.eval_path)
    prompts = list(evaluation["prompt"][:NUM_PROMPTS])
    timings = {}
    started = time.perf_counter()
    if args.adapter:
        model = load_model(cfg.model.spec, cfg.model.cache_dir, lora=cfg.lora, adapter=args.adapter)
        adapter = str(Path(args.adapter).resolve())
    else:
        model = load_model(cfg.model.spec, cfg.model.cache_dir)
        result = train_lora(model, list(train["prompt"]), list(train["completion"]), cfg.train, cfg.lora,
                            work / "train", {"model_id": cfg.model.spec, "data_hash": prepared.content_hash,
                                             "prompt_format": prepared.prompt_format})
        adapter = str(result.adapter_path)
        timings["train_steps"] = result.steps
        timings["final_loss"] = result.losses[-1]
        timings["train_seconds"] = time.perf_counter() - started
    run = generate_answers(model, prompts, cfg.generation)
    project_answers = [a.text for a in run.answers]
    tokenizer = model.preprocessor.tokenizer
    bos = tokenizer.token_to_id("<bos>")
    project_ids = [[bos] + [int(t) for t in tokenizer(p)] for p in prompts]
    ggufs = {}
    for quant in args.quants:
        started = time.perf_counter()
        base_quant, _, embedding_quant = quant.partition(EMBEDDING_VARIANT)
        ggufs[quant] = str(write_gguf(model, work / f"model-{quant}.gguf", base_quant, overwrite=True,
                                      token_embedding_quant=embedding_quant or None))
        timings[f"export_{quant}_seconds"] = time.perf_counter() - started
    return {"prompts": prompts, "project_answers": project_answers, "project_prompt_ids": project_ids,
            "ggufs": ggufs, "adapter": adapter, "max_new_tokens": cfg.generation.max_new_tokens,
            "sampler": cfg.generation.sampler, "threads": args.threads, "kv_cache_types": args.kv_cache,
            "timings": timings}


def run_label(quant: str, kv_cache: str) -> str:
    return f"{quant}, KV {kv_cache}"


def compare(job: dict, llama: dict) -> dict:
    summary = {}
    for label, side in llama["runs"].items():
        quant = side["quant"]
        same = [a == b for a, b in zip(job["project_answers"], side["answers"])]
        same_ids = [a == b for a, b in zip(job["project_prompt_ids"], side["prompt_ids"])]
        first = next((i for i, s in enumerate(same) if not s), None)
        summary[label] = {
            "quant": quant, "kv_cache": side["kv_cache"], "identical_answers": sum(same), "prompts": len(same),
            "identical_prompt_tokens": sum(same_ids),
            "gguf_mib": round(Path(llama["ggufs"][quant]).stat().st_size / 2**20, 1),
            "llama_cpp_tokens_per_second": round(side["new_tokens"] / side["generate_seconds"], 1),
            "first_difference": None if first is None else {
                "prompt": job["prompts"][first][:200], "project": job["project_answers"][first],
                "llama_cpp": side["answers"][first]},
            "answers_identical": same,
        }
    return summary


def same_tensors(ours: str, theirs: str) -> dict:
    """Tensor by tensor: the same names, types, shapes and bytes in both GGUFs?"""
    import numpy as np
    from gguf import GGUFReader

    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    differing = sorted(name for name in a.keys() & b.keys()
                       if a[name].tensor_type != b[name].tensor_type
                       or list(a[name].shape) != list(b[name].shape)
                       or not np.array_equal(np.asarray(a[name].data).view(np.uint8),
                                             np.asarray(b[name].data).view(np.uint8)))
    return {"tensors": len(a), "only_in_ours": sorted(a.keys() - b.keys()),
            "only_in_theirs": sorted(b.keys() - a.keys()), "identical": len(a.keys() & b.keys()) - len(differing),
            "differing": differing}


def project_reads_gguf(args) -> int:
    """``--project-reads QUANT``: the project's own model loaded from the bench's QUANT GGUF (the
    gguf_convert path: weights dequantized to float32, float32 arithmetic) answers the same prompts. Set
    against the tuned model and llama.cpp's answers from the same file, it tells the weights' rounding
    apart from llama.cpp's own arithmetic (which also rounds activations to 8 bits in q8_0 products)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    sys.path.insert(0, str(REPO))
    import keras_hub

    from gemma_core.config import PipelineConfig
    from gemma_core.generation import generate_answers
    from gemma_core.preset_cache import convert_gguf_to_preset

    work, quant = Path(args.work), args.project_reads
    job = json.loads((work / "job.json").read_text())
    kv_cache = job["kv_cache_types"][0]
    llama = json.loads((work / "llama.json").read_text())["runs"][run_label(quant, kv_cache)]["answers"]
    preset = convert_gguf_to_preset(Path(job["ggufs"][quant]), work / f"preset-{quant}", work_dir=work)
    model = keras_hub.models.CausalLM.from_preset(str(preset))
    answers = [a.text for a in generate_answers(model, job["prompts"], PipelineConfig().generation).answers]
    same_tuned = sum(a == b for a, b in zip(answers, job["project_answers"]))
    same_llama = sum(a == b for a, b in zip(answers, llama))
    out = Path(args.out).with_name(f"gguf_project_reads_{quant}.json")
    _write_json(out, {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quant": quant,
                      "identical_to_tuned_model": same_tuned, "identical_to_llama_cpp": same_llama,
                      "prompts": len(answers), "answers": answers})
    print(f"{quant} GGUF read by the project: {same_tuned}/{len(answers)} answers identical to the tuned model, "
          f"{same_llama}/{len(answers)} identical to llama.cpp's from the same file (KV cache {kv_cache})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", help="a tuned adapter (.lora.h5) of the embedded 270M (default: train one)")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-gguf"), help="scratch directory")
    parser.add_argument("--quants", nargs="+", default=list(QUANTS),
                        choices=("f32", "f16", "bf16", "q8_0", "q8_0+embd_f16", "q8_0+embd_f32"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-cache", nargs="+", default=list(KV_CACHE_TYPES), choices=tuple(KV_CACHE_TYPES),
                        help="llama.cpp's KV-cache types to run each GGUF with (f16 is llama.cpp's default)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gguf_llama_cpp.json"))
    parser.add_argument("--project-reads", choices=("f32", "f16", "bf16", "q8_0"),
                        help="after a run: answer with the project's own model loaded from that GGUF in --work")
    parser.add_argument("--llama-side", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.project_reads:
        return project_reads_gguf(args)
    if args.llama_side:
        llama_side(Path(args.llama_side[0]), Path(args.llama_side[1]))
        return 0

    python = ensure_llama_venv()
    job = project_side(args)
    work = Path(args.work)
    _write_json(work / "job.json", job)
    subprocess.run([str(python), str(Path(__file__).resolve()), "--llama-side", str(work / "job.json"),
                    str(work / "llama.json")], check=True)
    llama = json.loads((work / "llama.json").read_text())
    summary = compare(job, llama)
    tensors = (same_tensors(llama["ggufs"]["q8_0"], llama["ggufs"][LLAMA_QUANTIZED])
               if {"q8_0", LLAMA_QUANTIZED} <= llama["ggufs"].keys() else None)
    result = {"q8_0_tensors_vs_llama_quantize": tensors, "llama_quantize_seconds": llama.get("llama_quantize_seconds"),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_model(),
              "vector_extensions": vector_extensions(), "cores": os.cpu_count(),
              "llama_cpp_python": llama["llama_cpp_python"], "adapter": job["adapter"],
              "max_new_tokens": job["max_new_tokens"], "timings": job["timings"], "summary": summary,
              "prompts": job["prompts"], "project_answers": job["project_answers"],
              "llama_cpp_answers": {label: s["answers"] for label, s in llama["runs"].items()}}
    _write_json(Path(args.out), result)
    print("| GGUF | KV cache | GGUF MiB | identical answers | prompts tokenized identically | llama.cpp new tokens/s |")
    print("|---|---|---|---|---|---|")
    for s in summary.values():
        print(f"| {s['quant']} | {s['kv_cache']} | {s['gguf_mib']} | {s['identical_answers']}/{s['prompts']} | "
              f"{s['identical_prompt_tokens']}/{s['prompts']} | {s['llama_cpp_tokens_per_second']} |")
    if tensors:
        print(f"the export's q8_0 against llama-quantize's q8_0 of the exported f32: {tensors['identical']} of "
              f"{tensors['tensors']} tensors byte-identical; differing: {tensors['differing'][:8]}; only in ours: "
              f"{tensors['only_in_ours'][:8]}; only in llama-quantize's: {tensors['only_in_theirs'][:8]}")
    print(json.dumps({label: s["first_difference"] for label, s in summary.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
