"""The README's main command on the real default (embedded Gemma 3 270M, offline sample), end to end
through the console script: one cold run, in which the short LoRA training lowers the held-out loss
by at least 10% and teaches the model to stop, then an identical rerun that must be all Cached in
under 60 s. Each run is a fresh process, as a user's would be, with its own PREFECT_HOME and output root.

The converted model comes from the shared cache (the ``gemma3_270m_preset`` fixture converts it once
per machine), so "cold" here means a cold pipeline: nothing cached for the data, evaluation,
training or report.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.stages import PIPELINE_STAGES as STAGES, PROMOTE
COLD_LIMIT_S = 15 * 60
CACHED_LIMIT_S = 60


def gemma_lora(tmp_path, *args, timeout):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "GEMMA_LORA_RESULT", "GEMMA_LORA_FAIL"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    command = [str(Path(sys.executable).parent / "gemma-lora"), *args, "--set", f"output.root={tmp_path / 'runs'}"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return done.stdout, seconds


@pytest.mark.slow
def test_default_run_cold_then_all_cached(tmp_path, gemma3_270m_preset):
    out, cold_s = gemma_lora(tmp_path, "run", timeout=COLD_LIMIT_S + 120)
    latest = json.loads((tmp_path / "runs" / "reports" / "latest.json").read_text())
    assert latest["states"] == dict.fromkeys((*STAGES, PROMOTE), "Completed")
    assert latest["results"]["model"]["spec"] == "embedded:gemma3-270m"
    # the default tuned adapter passes the gate over the base model (the first champion) and is promoted
    assert latest["gate"]["promote"] and latest["promotion"]["promoted"], latest["gate"]
    print(f"gate: {latest['gate']['reasons']}")
    assert latest["answers_changed"] > 0, "the tuned model should answer visibly differently"
    # the default short training helps on the 16 held-out prompts: a lower loss, and it learns to stop
    base, tuned = latest["base"], latest["tuned"]
    assert tuned["completion_loss"] <= 0.9 * base["completion_loss"], (base, tuned)
    assert tuned["eos_rate"] > base["eos_rate"], (base, tuned)
    print(f"\ncold run: {cold_s:.0f} s; stages: {latest['stage_seconds']}")
    assert cold_s < COLD_LIMIT_S

    out, cached_s = gemma_lora(tmp_path, "run", timeout=CACHED_LIMIT_S * 3)
    latest = json.loads((tmp_path / "runs" / "reports" / "latest.json").read_text())
    assert latest["states"] == dict.fromkeys(STAGES, "Cached"), out
    assert latest["promotion"] == {"promoted": False, "sequence": 1,
                                   "why": "the challenger already is the champion (record 1)"}
    print(f"cached rerun: {cached_s:.0f} s")
    assert cached_s < CACHED_LIMIT_S

    report, _ = gemma_lora(tmp_path, "report", timeout=60)
    assert "## Overall metrics" in report and "## Side-by-side answers" in report
