"""Run ``gemma_core.lora_train.train_lora`` on the tiny random Gemma in a process of its own, so a
test can SIGKILL it at a chosen point and run it again.

    python tests/helpers/train_driver.py PRESET_DIR OUT_DIR [--max-steps N] [--checkpoint-every N]

It prints JSON lines on stdout (flushed): ``start``, ``resume`` (gemma_core's own log record when it
resumes from a checkpoint, with the checkpoint path and step), ``step`` after every optimizer step,
``pause`` when it reaches the point the test asked for, and ``done`` with the TrainResult.
The training data are fixed synthetic prompt/response pairs, so every run trains on the same batches.

``RELIABILITY_PAUSE=<point>:<step>`` stops the process at a precise point and waits there (printing a
``pause`` event) until the test SIGKILLs it. The points, for optimizer step N:

- ``in-step:N``: inside step N, its batch built, before the optimizer update is applied;
- ``after-step:N``: step N applied and its line in train_log.jsonl written, its checkpoint (if any)
  not yet started (``on_step``): "between checkpoints";
- ``ckpt-write:N``: inside the write of checkpoint N: the adapter is in the temporary
  ``checkpoints/.step-0000000N.*.tmp`` directory, the optimizer state and manifest are not;
- ``after-ckpt:N``: checkpoint N published (and older ones pruned), step N+1 not started;
- ``final-write:0``: ``.partial-adapter.lora.h5`` written, not yet renamed to ``adapter.lora.h5``.

``RELIABILITY_FILL=<step>:<bytes>:<dir>`` fills the file system of ``<dir>`` right after checkpoint
``<step>`` is published, leaving ``<bytes>`` free, and training goes on into the full disk. Any
exception ends the process with an ``error`` event (type and message) and exit status 1.
``RELIABILITY_SKIP_ROOM_CHECK=1`` disables gemma_core's free-space check before a checkpoint, so the
checkpoint write itself runs into the full disk (inside HDF5).

The pauses wrap functions that gemma_core calls (patched in this process only); gemma_core is not
changed, and the kill is a real SIGKILL from the test.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PAUSE_ENV = "RELIABILITY_PAUSE"
IDENTITY = {"model_id": "tiny-reliability", "data_hash": "fixed-synthetic"}
WORDS = ("alpha beta gamma delta river stone cloud paper green small quick bright north table water "
         "light seven music garden window").split()


def examples(n: int = 12) -> tuple[list[str], list[str]]:
    prompts, responses = [], []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 4)]
        prompts.append(f"Repeat the words backwards: {' '.join(words)}")
        responses.append(" ".join(reversed(words)) + ".")
    return prompts, responses


def train_config(max_steps: int, checkpoint_every: int, keep: int):
    from gemma_core.config import TrainConfig

    return TrainConfig(max_steps=max_steps, epochs=1000, batch_size=2, sequence_length=64, learning_rate=1e-2,
                       checkpoint_every=checkpoint_every, keep_checkpoints=keep)


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def _pause_at() -> tuple[str, int] | None:
    wanted = os.environ.get(PAUSE_ENV, "").strip()
    if not wanted:
        return None
    point, _, step = wanted.partition(":")
    return point, int(step or 0)


def pause_if(point: str, step: int, **detail) -> None:
    if _pause_at() == (point, step):
        emit(event="pause", point=point, step=step, **detail)
        time.sleep(600)  # the test SIGKILLs us here
        emit(event="pause-timeout", point=point, step=step)


def install_pause_points() -> None:
    import keras_hub

    import gemma_core.lora_train as lora_train

    original_step = lora_train._train_step
    step_counter = {"next": None}

    def train_step(trainer, batch):
        pause_if("in-step", step_counter["next"])
        return original_step(trainer, batch)

    original_save_checkpoint = lora_train.save_checkpoint

    def save_checkpoint(ckpt_root, step, *args, **kwargs):
        checkpoint = original_save_checkpoint(ckpt_root, step, *args, **kwargs)
        pause_if("after-ckpt", step, path=str(checkpoint.path))
        fill_at = os.environ.get("RELIABILITY_FILL", "")
        if fill_at:
            at, leave, where = fill_at.split(":", 2)
            if int(at) == step:
                fill_disk(Path(where), int(leave))
                emit(event="disk-filled", step=step, leave=int(leave))
        return checkpoint

    backbone_cls = keras_hub.models.Gemma3Backbone
    original_save_lora = backbone_cls.save_lora_weights

    def save_lora_weights(self, filepath, *args, **kwargs):
        result = original_save_lora(self, filepath, *args, **kwargs)
        path = Path(filepath)
        if path.name == ".partial-adapter.lora.h5":
            pause_if("final-write", 0, path=str(path))
        elif path.parent.name.startswith(".step-"):
            pause_if("ckpt-write", int(path.parent.name.split(".")[1].removeprefix("step-")), path=str(path))
        return result

    if os.environ.get("RELIABILITY_SKIP_ROOM_CHECK") == "1":
        import gemma_core.checkpoints as checkpoints

        checkpoints._check_room = lambda *args, **kwargs: None
    lora_train._train_step = train_step
    lora_train.save_checkpoint = save_checkpoint
    backbone_cls.save_lora_weights = save_lora_weights
    return step_counter


def fill_disk(where: Path, leave: int = 0) -> Path:
    """Write zeros into ``where/filler.bin`` until the device is full, then free ``leave`` bytes again;
    returns the filler file (delete it to free the space)."""
    import errno

    filler = where / "filler.bin"
    with open(filler, "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


class _ResumeEvents(logging.Handler):
    """Turns gemma_core's resume and skip log records into events the test can read."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("resuming training from"):
            emit(event="resume", path=str(record.args[0]), step=int(record.args[1]), message=message)
        elif message.startswith("skipping checkpoint"):
            emit(event="skip", message=message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("preset")
    parser.add_argument("out_dir")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--keep", type=int, default=2)
    args = parser.parse_args(argv)

    import keras_hub

    from gemma_core.config import LoraConfig
    from gemma_core.lora_train import train_lora

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gemma_core").addHandler(_ResumeEvents())
    counter = install_pause_points()
    cfg = train_config(args.max_steps, args.checkpoint_every, args.keep)
    model = keras_hub.models.CausalLM.from_preset(args.preset)
    emit(event="start", pid=os.getpid())

    def on_step(report) -> None:
        emit(event="step", step=report.step, loss=report.loss)
        counter["next"] = report.step + 1
        pause_if("after-step", report.step)

    # The first step of this process is the one after the checkpoint it resumes from.
    from gemma_core import checkpoints

    original_latest = checkpoints.latest_valid_checkpoint

    def latest(*a, **k):
        found = original_latest(*a, **k)
        counter["next"] = (found.step if found else 0) + 1
        return found

    import gemma_core.lora_train as lora_train

    lora_train.latest_valid_checkpoint = latest
    try:
        result = train_lora(model, *examples(), cfg, LoraConfig(), args.out_dir, IDENTITY, on_step=on_step)
    except Exception as err:
        emit(event="error", type=type(err).__name__, message=str(err), errno=getattr(err, "errno", None))
        return 1
    emit(event="done", steps=result.steps, resumed_from_step=result.resumed_from_step, losses=result.losses,
         adapter=str(result.adapter_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
