"""``train.data_parallel=auto`` (gemma_core/distribute.py) on two devices: JAX's simulated host
devices (``--xla_force_host_platform_device_count=2``), which only take effect before JAX starts, so
each training runs in a child process. The same batches on one device and split over two give the
same losses and adapter within 1e-5, the adapter really lived on both devices, and the split is in
the training log (train_log.jsonl)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from gemma_core.config import TrainConfig
from gemma_core.distribute import training_distribution

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent('''
    import json, sys
    import keras
    from gemma_core.config import LoraConfig, TrainConfig
    from gemma_core.distribute import describe_split, distribution_scope, training_distribution
    from gemma_core.lora_train import train_lora
    from gemma_core.models import load_model

    preset, out, mode = sys.argv[1:4]
    cfg = TrainConfig(max_steps=3, batch_size=4, sequence_length=64, learning_rate=1e-2, checkpoint_every=3,
                      data_parallel=mode)
    prompts = [f"Instruction:\\nName item {i}.\\n\\nResponse:\\n" for i in range(12)]
    responses = [f"Item {i} is number {i * 7}." for i in range(12)]
    distribution = training_distribution(cfg.data_parallel, cfg.batch_size)
    with distribution_scope(distribution):
        model = load_model(preset)
        result = train_lora(model, prompts, responses, cfg, LoraConfig(rank=2), out,
                            run_identity={"model_id": "tiny", "data_hash": "dp"})
        lora = [v for v in model.backbone.trainable_variables if "lora" in v.path]
        devices = sorted({len(v.value.sharding.device_set) for v in lora})
    steps = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    print(json.dumps({"devices": len(keras.distribution.list_devices()), "lora_devices": devices,
                      "losses": result.losses, "adapter": str(result.adapter_path),
                      "split": [step.get("devices") for step in steps],
                      "described": describe_split(distribution, (cfg.batch_size, cfg.sequence_length))}))
''')


def two_devices_env() -> dict[str, str]:
    """A child's environment with two simulated host devices for JAX."""
    return {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(REPO),
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def train_in_child(tmp_path: Path, preset: Path, mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(preset), str(tmp_path / mode), mode], env=two_devices_env(),
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def adapter_arrays(path: str) -> dict[str, np.ndarray]:
    import h5py

    arrays = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def test_data_parallel_on_two_devices_trains_as_one_device_does(tmp_path, tiny_preset):
    one = train_in_child(tmp_path, tiny_preset, "off")
    two = train_in_child(tmp_path, tiny_preset, "auto")
    assert one["devices"] == two["devices"] == 2
    assert one["lora_devices"] == [1] and two["lora_devices"] == [2]  # replicated on both devices
    # the split, in the training log's every step (train_log.jsonl) and in words (the task logs this)
    assert two["split"] == [2, 2, 2] and one["split"] == [None, None, None]
    assert two["described"] == "4 rows: 2 on each of 2 devices (cpu:0, cpu:1)" and one["described"] is None
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5, atol=1e-6)
    a, b = adapter_arrays(one["adapter"]), adapter_arrays(two["adapter"])
    assert a.keys() == b.keys() and a
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    print(f"losses {one['losses']} vs {two['losses']}; largest adapter difference {worst:.2e}")
    assert worst <= 1e-5


def test_data_parallel_refusal_names_the_batch_size_and_the_fix():
    assert TrainConfig().data_parallel == "off" and training_distribution("off", 3) is None
    code = ("from gemma_core.distribute import training_distribution, DataParallelError\n"
            "try:\n    training_distribution('auto', 3)\nexcept DataParallelError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], env=two_devices_env(), capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert "train.batch_size=3 does not split evenly over the 2 devices" in done.stdout, done.stderr[-2000:]
    assert "train.batch_size=4" in done.stdout and "train.data_parallel=off" in done.stdout
