"""Run the ``gemma-lora`` command line (``flows.cli.main``) in a process of its own, with optional pause
points, so a test can SIGKILL the pipeline in a chosen stage, or stop the Prefect server under it.

    python tests/helpers/pipeline_driver.py run --set ... [--result-storage ...]

Events go, one JSON object per line, to the file named by ``RELIABILITY_EVENTS`` (stdout and stderr
stay the command line's own). ``RELIABILITY_PAUSE=<point>`` stops the process there and waits, printing
a ``pause`` event: until ``RELIABILITY_GO`` (a path) exists, then it goes on; without it, until killed.
The points:

- ``data``: the data stage has written train.parquet into its temporary directory, eval.parquet and
  the manifest not yet;
- ``generation``: the base model's first batch of held-out prompts is answered, the rest not;
- ``training:<N>``: optimizer step N is done (and logged), its checkpoint, if any, not yet written;
- ``report``: report.md and training_curve.png are written, report.html and metrics.json not yet.

The pauses wrap gemma_core functions in this process only; nothing in the project changes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

EVENTS = os.environ.get("RELIABILITY_EVENTS")
PAUSE = os.environ.get("RELIABILITY_PAUSE", "")
GO = os.environ.get("RELIABILITY_GO")


def emit(**record) -> None:
    if EVENTS:
        with open(EVENTS, "a") as f:
            f.write(json.dumps(record) + "\n")


def pause(point: str, **detail) -> None:
    emit(event="pause", point=point, pid=os.getpid(), **detail)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if GO and Path(GO).exists():
            emit(event="go", point=point)
            return
        time.sleep(0.2)
    emit(event="pause-timeout", point=point)


def install() -> None:
    if not PAUSE:
        return
    point, _, arg = PAUSE.partition(":")
    if point == "data":
        import gemma_core.dolly_prepare as prepare

        original = prepare._write_parquet

        def write_parquet(frame, path, metadata):
            original(frame, path, metadata)
            if path.name == "train.parquet":
                pause("data", path=str(path))

        prepare._write_parquet = write_parquet
    elif point == "generation":
        import gemma_core.evaluation as evaluation

        original = evaluation.evaluate_model
        done = {"paused": False}

        def evaluate_model(*args, on_batch=None, **kwargs):
            def batch(finished, total):
                if on_batch:
                    on_batch(finished, total)
                if not done["paused"]:
                    done["paused"] = True
                    pause("generation", finished=finished, total=total)

            return original(*args, on_batch=batch, **kwargs)

        evaluation.evaluate_model = evaluate_model
    elif point == "training":
        import gemma_core.lora_train as lora_train

        original = lora_train.train_lora
        at = int(arg)

        def train_lora(*args, on_step=None, **kwargs):
            def step(report):
                if on_step:
                    on_step(report)
                if report.step == at:
                    pause("training", step=report.step)

            return original(*args, on_step=step, **kwargs)

        lora_train.train_lora = train_lora
    elif point == "report":
        import gemma_core.report as report

        original = report.atomic_write_text

        def atomic_write_text(target, text):
            if Path(target).name == "report.html":
                pause("report", dir=str(Path(target).parent))
            return original(target, text)

        report.atomic_write_text = atomic_write_text
    else:
        raise SystemExit(f"unknown RELIABILITY_PAUSE point {PAUSE!r}")


def main() -> int:
    emit(event="start", pid=os.getpid())
    install()
    from flows.cli import main as cli_main

    rc = cli_main(sys.argv[1:])
    emit(event="exit", rc=rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
