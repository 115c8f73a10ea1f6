"""Training killed with SIGKILL at five different points, in a real child process each time.

One training directory goes through a chain of processes. Each is killed at a different point
(inside an optimizer step, inside a checkpoint write, between checkpoints, right after a checkpoint,
inside the final adapter write); the next process must resume from the newest checkpoint that
verifies, redoing at most one checkpoint interval of the steps the killed one had finished. The
last process runs to the end, and its adapter, per-step losses and log must match an uninterrupted
run of the same training.

The child is ``tests/helpers/train_driver.py``: it stops at the requested point (``RELIABILITY_PAUSE``)
and the test kills it there with a real SIGKILL, so the kill lands exactly where intended.
"""

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from helpers import procs

MAX_STEPS = 10
EVERY = 2
KEEP = 2
# (pause point, what the directory must show when the process is killed there)
KILLS = [
    ("in-step:3", "inside optimizer step 3 (step 2 and its checkpoint done)"),
    ("ckpt-write:4", "inside the write of checkpoint 4 (its temp dir half full)"),
    ("after-step:5", "between checkpoints: step 5 logged, no checkpoint of it"),
    ("after-ckpt:6", "right after checkpoint 6 was published"),
    ("final-write:0", "inside the final adapter write (.partial-adapter.lora.h5 on disk)"),
]


def _driver():
    spec = importlib.util.spec_from_file_location("train_driver", procs.TRAIN_DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_adapter(path: Path) -> dict[str, np.ndarray]:
    import h5py

    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, np.asarray(obj)) if hasattr(obj, "shape") else None)
    return arrays


def valid_checkpoints(out_dir: Path) -> list[int]:
    """Steps of the checkpoints whose every file matches the sha256 in their manifest (checked here,
    independently of gemma_core)."""
    steps = []
    for path in sorted((out_dir / "checkpoints").glob("step-*")):
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            ok = bool(manifest["files"]) and all(
                hashlib.sha256((path / name).read_bytes()).hexdigest() == entry["sha256"]
                for name, entry in manifest["files"].items())
        except (OSError, ValueError, KeyError):
            ok = False
        if ok:
            steps.append(manifest["step"])
    return steps


def logged_steps(out_dir: Path) -> list[int]:
    path = out_dir / "train_log.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return steps


@pytest.fixture(scope="module")
def reference(tiny_preset, tmp_path_factory):
    """The same training, uninterrupted, in this process."""
    import keras_hub

    from gemma_core.config import LoraConfig
    from gemma_core.lora_train import train_lora

    driver = _driver()
    out = tmp_path_factory.mktemp("uninterrupted")
    model = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    result = train_lora(model, *driver.examples(), driver.train_config(MAX_STEPS, EVERY, KEEP), LoraConfig(), out,
                        driver.IDENTITY)
    return {"losses": result.losses, "adapter": read_adapter(result.adapter_path), "dir": out}


def test_sigkill_at_five_points_resumes_from_newest_valid_checkpoint(tiny_preset, tmp_path, reference):
    out = tmp_path / "train"
    options = {"max_steps": MAX_STEPS, "checkpoint_every": EVERY, "keep": KEEP}
    table = []
    expected_resume = 0
    for i, (pause, where) in enumerate(KILLS):
        child = procs.start_training(tiny_preset, out, tmp_path / f"run{i}.stderr", pause=pause, **options)
        try:
            pause_event = child.wait_for(lambda e: e.get("event") == "pause")
            # The process resumed where the previous kill left the newest valid checkpoint.
            first_step = child.of("step")[0]["step"] if child.of("step") else None
            resumes = child.of("resume")
            if expected_resume:
                assert resumes and resumes[0]["step"] == expected_resume, (pause, child.events)
                assert resumes[0]["path"].endswith(f"step-{expected_resume:08d}")
            else:
                assert not resumes
            if first_step is not None:
                assert first_step == expected_resume + 1, (pause, child.events)
            # What the directory shows at the kill point.
            point, step = pause.split(":")
            if point == "ckpt-write":
                temp = list((out / "checkpoints").glob(f".step-{int(step):08d}.*.tmp"))
                assert temp and (temp[0] / "adapter.lora.h5").is_file() and not (temp[0] / "manifest.json").exists()
            if point == "final-write":
                assert (out / ".partial-adapter.lora.h5").is_file() and not (out / "adapter.lora.h5").exists()
            child.sigkill()
        finally:
            child.close()
        # Independent check of what the next process must do.
        valid = valid_checkpoints(out)
        done = logged_steps(out)
        newest = max(valid, default=0)
        redo = max(done, default=0) - newest
        assert 0 <= redo <= EVERY, (pause, valid, done)
        assert not (out / "adapter.lora.h5").exists(), "a killed run must not leave a final adapter"
        table.append((where, pause_event["step"], newest, redo))
        expected_resume = newest

    done = procs.train_to_end(tiny_preset, out, tmp_path / "final.stderr", **options)
    assert done["resumed_from_step"] == expected_resume == MAX_STEPS
    assert done["steps"] == MAX_STEPS

    # The result equals the uninterrupted run's: losses of every step, the log, the adapter.
    np.testing.assert_allclose(done["losses"], reference["losses"], rtol=1e-5, atol=1e-6)
    assert logged_steps(out) == list(range(1, MAX_STEPS + 1))
    adapter = read_adapter(out / "adapter.lora.h5")
    assert adapter.keys() == reference["adapter"].keys()
    for name, value in reference["adapter"].items():
        np.testing.assert_allclose(adapter[name], value, atol=1e-5, err_msg=name)
    # No partial file is left where a reader looks for a complete one.
    assert not (out / ".partial-adapter.lora.h5").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000008", "step-00000010"]
    for where, killed_at, resumed, redo in table:
        print(f"killed {where}: newest valid checkpoint {resumed}, steps redone {redo}")


@pytest.mark.slow
def test_sigkill_at_random_moments(tiny_preset, tmp_path):
    """Kills at unplanned moments (seeded: RELIABILITY_SEED, default 0), which land anywhere: inside XLA,
    inside an HDF5 or log write, between the files of a checkpoint. The same rules hold after each.
    600 steps with a checkpoint every 8, so a kill has many places to land."""
    import os
    import random
    import signal
    import time

    import keras_hub

    from gemma_core.config import LoraConfig
    from gemma_core.lora_train import train_lora

    steps, every = 600, 8  # about 5 ms a step here: a kill within 0.5 s lands inside training
    driver = _driver()
    model = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    straight = train_lora(model, *driver.examples(), driver.train_config(steps, every, KEEP), LoraConfig(),
                          tmp_path / "uninterrupted", driver.IDENTITY)

    seed = int(os.environ.get("RELIABILITY_SEED", "0"))
    rng = random.Random(seed)
    out = tmp_path / "train"
    options = {"max_steps": steps, "checkpoint_every": every, "keep": KEEP}
    expected_resume, kills = 0, []
    for i in range(6):
        child = procs.start_training(tiny_preset, out, tmp_path / f"random{i}.stderr", **options)
        try:
            child.wait_for(lambda e: e.get("event") in ("step", "done"))
            delay = rng.uniform(0.0, 0.5)
            time.sleep(delay)
            if child.proc.poll() is None:
                os.kill(child.proc.pid, signal.SIGKILL)
            rc = child.finish()  # reads what it printed before it died
        finally:
            child.close()
        resumes = child.of("resume")
        assert (resumes[0]["step"] if resumes else 0) == expected_resume, (i, child.events)
        newest = max(valid_checkpoints(out), default=0)
        done = max(logged_steps(out), default=0)
        assert 0 <= done - newest <= every, (valid_checkpoints(out), logged_steps(out))
        seen = [e["step"] for e in child.of("step")]
        kills.append((round(delay, 2), f"steps {seen[0]}-{seen[-1]}" if seen else "no step", f"resume at {newest}"))
        expected_resume = newest
        if rc == 0:
            break  # the run finished before the kill landed
    result = procs.train_to_end(tiny_preset, out, tmp_path / "random-final.stderr", **options)
    print(f"seed {seed}; kills (delay after the first step, steps run, newest valid checkpoint): {kills}")
    np.testing.assert_allclose(result["losses"], straight.losses, rtol=1e-5, atol=1e-6)
    assert logged_steps(out) == list(range(1, steps + 1))
    expected = read_adapter(straight.adapter_path)
    adapter = read_adapter(out / "adapter.lora.h5")
    for name, value in expected.items():
        np.testing.assert_allclose(adapter[name], value, atol=1e-5, err_msg=name)
