"""bench/gpu_lora.py --smoke: the GPU benchmark's code (this project's train_encoded and CompactDecoder
on a made-up Gemma 3 in bf16) still runs, on CPU at a tiny size. It measures nothing about a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_smoke_runs_the_projects_training_and_decoder(tmp_path):
    out = tmp_path / "gpu_lora.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run([sys.executable, "bench/gpu_lora.py", "--smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] and not result["measured_on_gpu"]
    (size,) = result["sizes"]
    train = size["train"]
    assert train["steps"] == 6 and train["steady_steps"] > 0 and train["useful_tokens_per_s"] > 0
    assert all(map(lambda x: x == x, train["losses_first_last"])), train  # finite, not NaN
    assert [g["batch"] for g in size["generate"]] == [1, 4]
    assert 0 < train["mfu"] < 1
