"""A quiet terminal: ``gemma-lora run`` on the tiny model, in a child process as a user runs it, shows
its own lines and Prefect's, and none of the native libraries' start-up logging (TensorFlow, XLA,
absl, SentencePiece); ``--verbose`` shows that logging again (flows/quiet.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from flows.quiet import NOISE, VERBOSE_ENV, is_noise
from tests.helpers.procs import tiny_overrides

# What a user saw between the pipeline's lines before (issue 18); none may appear.
NOISE_SEEN = ("Could not find cuda drivers", "cuInit", "precompiled_charsmap is empty", "oneDNN custom operations",
              "absl::InitializeLog", "rebuild TensorFlow with the appropriate compiler flags")


def gemma_lora(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_", "TF_CPP", "GRPC_", "GLOG_")) and k != VERBOSE_ENV}
    environ.update(env)
    exe = Path(os.sys.executable).parent / "gemma-lora"
    return subprocess.run([str(exe), *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quiet_gemma_lora_run_shows_no_native_start_up_logging(tiny_preset, tmp_path):
    args = ["run", *tiny_overrides(tiny_preset, tmp_path / "runs")]
    done = gemma_lora(args, tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "gemma-lora: pipeline finished" in done.stdout  # its own lines
    assert "Finished in state Completed" in output  # Prefect's
    seen = [line for line in output.splitlines() if any(text in line for text in NOISE_SEEN) or is_noise(line)]
    assert not seen, seen

    # --verbose shows the native logging again: a run whose evaluations rerun, so that it loads the
    # model (an all-Cached run never imports Keras, and prints no native line either way)
    loud = gemma_lora([*args, "--set", "generation.max_new_tokens=5", "--verbose"], tmp_path)
    loud_output = loud.stdout + loud.stderr
    assert loud.returncode == 0, loud_output[-4000:]
    assert "gemma-lora: pipeline finished" in loud.stdout
    shown = [line for line in loud_output.splitlines() if NOISE.search(line)]
    assert shown, f"--verbose showed no native start-up line:\n{loud_output[-3000:]}"
    print(f"\n--verbose shows {len(shown)} native start-up lines, the quiet run none; e.g. {shown[0][:120]!r}")


def test_quiet_filter_keeps_everything_but_the_noise():
    """The filter's patterns: the start-up lines seen on this project's machines go, a real native
    error, a Python warning and Prefect's log lines stay."""
    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796169443.267856   20783 port.cc:153] oneDNN custom operations are on. You may see",
        "I0000 00:00:1796169443.271289   20783 cudart_stub.cc:31] Could not find cuda drivers on your machine",
        "E0000 00:00:1796169443.3 20783 cuda_executor.cc:1228] failed call to cuInit: UNKNOWN ERROR (303)",
        "normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity normalization.",
    ]
    kept = [
        "E0000 00:00:1796169443.3 20783 xla_ops.cc:12] INTERNAL: the compiled program failed",
        "F0000 00:00:1796169443.3 20783 check.cc:1] Check failed: shape",
        "/x/keras/src/trainers.py:12: UserWarning: something the user should see",
        "23:59:01.123 | INFO    | Flow run 'red-fox' - Finished in state Completed()",
        "gemma-lora: the run failed after 12 s: ...",
    ]
    assert [line for line in noise if not is_noise(line)] == []
    assert [line for line in kept if is_noise(line)] == []


def test_quiet_verbose_env_turns_the_filter_off():
    from flows.env import apply_defaults

    quiet, loud = {}, {VERBOSE_ENV: "1"}
    apply_defaults(quiet), apply_defaults(loud)
    assert quiet["TF_CPP_MIN_LOG_LEVEL"] == "2" and "TF_CPP_MIN_LOG_LEVEL" not in loud
