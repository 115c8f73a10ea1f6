"""LoRA fine-tuning that resumes mid-epoch from its newest valid checkpoint: :func:`train_lora` reads
top to bottom as the whole run (setup, resume, loop with checkpoints, final adapter).

The recipe is the Keras Gemma LoRA tutorial's: ``enable_lora`` on the backbone (query and value by
default), AdamW with biases and scales excluded from weight decay, sparse categorical
cross-entropy from logits with the loss on response tokens only. What it adds is the loop around
``train_on_batch``: batches chosen by a pure function of (seed, step) so a resumed run sees exactly
the batches the uninterrupted one would, adapter-only checkpoints every N steps, a JSONL training
log, and two speed-ups that leave the loss unchanged: length buckets in a few fixed shapes
(:mod:`gemma_core.batching`) and the output head computed only at response tokens, with the
same cross-entropy computed without a one-hot over the vocabulary (:mod:`gemma_core.response_head`).
``bucketing=False, response_only_head=False`` is the plain keras-hub path, kept for honest
benchmarks.

>>> result = train_lora(model, prompts, responses, TrainConfig(max_steps=8), LoraConfig(), "runs/train",
...                     run_identity={"model_id": "embedded:gemma3-270m", "data_hash": "abc"})  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import filelock
import keras

from gemma_core.atomic import atomic_write_text, remove_leftovers
from gemma_core.batching import TrainingSchedule, step_arrays
from gemma_core.checkpoints import latest_valid_checkpoint, restore_optimizer, save_checkpoint, write_adapter_manifest
from gemma_core.config import LoraConfig, TrainConfig
from gemma_core.distribute import data_parallel_devices
from gemma_core.encoding import EncodedExamples, encode_examples
from gemma_core.models import enable_lora
from gemma_core.response_head import ResponseCrossEntropy, ResponseOnlyLM
from gemma_core.token_rows import enable_token_rows, load_adapter, save_adapter, token_ids_for, trainable_token_names

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"
FINAL_ADAPTER = "adapter.lora.h5"
TRAIN_LOCK = ".train.lock"  # held by the one process training in a directory (see _one_trainer)


@dataclass(frozen=True)
class StepReport:
    """What a progress callback receives after every optimizer step."""

    step: int
    total_steps: int
    loss: float
    tokens_per_second: float
    elapsed_s: float


@dataclass(frozen=True)
class TrainResult:
    adapter_path: Path
    log_path: Path
    steps: int
    losses: list[float]
    resumed_from_step: int
    useful_tokens_per_second: float
    train_seconds: float


class EmptyTrainingSetError(ValueError):
    pass


def compile_for_training(model, cfg: TrainConfig) -> None:
    optimizer = keras.optimizers.AdamW(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["bias", "scale"])
    model.compile(
        optimizer=optimizer,
        **_loss_and_metrics(model),
        # Keras leaves XLA off for TensorFlow on CPU, which trains much faster with it. JAX always jits.
        jit_compile=True,
    )
    optimizer.build(model.trainable_variables)


def _loss_and_metrics(model) -> dict[str, Any]:
    """Cross-entropy averaged over response tokens only (sample weight), so the loss does not shrink
    with padding or prompt length.

    The plain path is keras-hub's tutorial setup (its loss, plus token accuracy). The response-only
    head computes the same loss without a one-hot over the vocabulary and skips the accuracy, which
    nothing reads and which costs another pass over every logit.
    """
    if isinstance(model, ResponseOnlyLM):
        return {"loss": ResponseCrossEntropy()}
    return {
        "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"),
        "weighted_metrics": [keras.metrics.SparseCategoricalAccuracy()],
    }


def train_lora(
    model,
    prompts: Sequence[str],
    responses: Sequence[str],
    cfg: TrainConfig,
    lora: LoraConfig,
    out_dir: str | Path,
    run_identity: dict[str, Any],
    on_step: Callable[[StepReport], None] | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place and write its adapter to ``out_dir/adapter.lora.h5``.

    ``run_identity`` names the model and data (``model_id``, ``data_hash``, ``prompt_format``);
    together with the LoRA and batch settings it guards resume against another run's checkpoints,
    and it is recorded beside the final adapter (``adapter.manifest.json``).
    ``stop_after_steps`` ends the call early (the run stays resumable), as an interrupted run would.
    """
    if len(prompts) == 0:
        raise EmptyTrainingSetError("the training split is empty: check data.source and data.train_limit")
    model.preprocessor.sequence_length = cfg.sequence_length
    examples = encode_examples(model.preprocessor, prompts, responses, cfg.sequence_length)
    if len(examples) == 0:
        raise EmptyTrainingSetError(
            f"no training example fits train.sequence_length={cfg.sequence_length}: raise it"
        )
    return train_encoded(model, examples, cfg, lora, out_dir, run_identity, on_step, stop_after_steps)


def train_encoded(
    model,
    examples: EncodedExamples,
    cfg: TrainConfig,
    lora: LoraConfig,
    out_dir: str | Path,
    run_identity: dict[str, Any],
    on_step: Callable[[StepReport], None] | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """:func:`train_lora` on examples already encoded (:func:`gemma_core.encoding.encode_examples`'s
    arrays, or made up: ``bench/gpu_lora.py`` trains a model that has no tokenizer this way)."""
    out_dir = Path(out_dir)
    with _one_trainer(out_dir):
        # --- setup: seed, adapters, optimizer, schedule -------------------------------------------
        keras.utils.set_random_seed(cfg.seed)
        enable_lora(model, lora)
        row_tokens = trainable_token_names(lora.trainable_tokens, run_identity.get("prompt_format"))
        if row_tokens:
            enable_token_rows(model.backbone, token_ids_for(model.preprocessor.tokenizer, row_tokens))
        # The response-only head shares the backbone, so LoRA weights and checkpoints are the same.
        trainer = ResponseOnlyLM(model.backbone) if cfg.response_only_head else model
        compile_for_training(trainer, cfg)
        schedule = TrainingSchedule(examples, cfg)
        steps = schedule.total_steps
        devices = data_parallel_devices(keras.distribution.distribution())  # None: one device, batch whole

        # --- resume from the newest valid checkpoint of this very run -----------------------------
        ckpt_root = out_dir / "checkpoints"
        identity = {
            **run_identity,
            "lora_rank": lora.rank,
            "lora_targets": list(lora.target_layer_names or []),
            # Only where rows train, so that the identity of a run without them is what it always was.
            **({"trainable_tokens": list(row_tokens)} if row_tokens else {}),
            "batch_size": cfg.batch_size,
            "sequence_length": cfg.sequence_length,
            "seed": cfg.seed,
        }
        start_step, losses = 0, []
        checkpoint = latest_valid_checkpoint(ckpt_root, identity)
        if checkpoint is not None:
            load_adapter(model.backbone, checkpoint.adapter_path)
            restore_optimizer(trainer.optimizer, checkpoint)
            start_step, losses = checkpoint.step, list(checkpoint.manifest["losses"])
            log.info("resuming training from %s (step %d)", checkpoint.path, start_step)
        log_path = out_dir / TRAIN_LOG
        _truncate_log(log_path, start_step)

        # --- the loop: one optimizer step per planned batch, a checkpoint every N steps -----------
        end_step = min(steps, start_step + stop_after_steps) if stop_after_steps else steps
        useful_tokens, train_seconds = 0, 0.0
        run_started = time.perf_counter()
        for step in range(start_step, end_step):
            planned = schedule.batch(step)
            batch = step_arrays(examples, planned, cfg.response_only_head)
            started = time.perf_counter()
            loss = _train_step(trainer, batch)
            seconds = time.perf_counter() - started
            tokens = int(batch[0]["padding_mask"][: planned.real].sum())
            if step > start_step:  # the first step of a process includes compilation
                useful_tokens, train_seconds = useful_tokens + tokens, train_seconds + seconds
            losses.append(loss)
            _append_log(log_path, {"step": step + 1, "loss": loss, "useful_tokens": tokens,
                                   "response_tokens": int((batch[2][: planned.real] > 0).sum()),
                                   "shape": [planned.length, planned.slots],
                                   **({"devices": devices} if devices else {}),
                                   "tokens_per_second": round(tokens / seconds, 2), "seconds": round(seconds, 3),
                                   "elapsed_s": round(time.perf_counter() - run_started, 3)})
            if on_step:
                on_step(StepReport(step + 1, steps, loss, tokens / seconds, seconds))
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
                save_checkpoint(ckpt_root, step + 1, model.backbone, trainer.optimizer, identity, losses,
                                cfg.keep_checkpoints)

        # --- the final adapter, once every step is done -------------------------------------------
        adapter_path = out_dir / FINAL_ADAPTER
        if end_step == steps:
            # save_lora_weights insists on the .lora.h5 suffix, so the temp name keeps it.
            partial = out_dir / ".partial-adapter.lora.h5"
            save_adapter(model.backbone, partial)
            os.replace(partial, adapter_path)
            write_adapter_manifest(adapter_path, identity, steps=steps)
    return TrainResult(
        adapter_path=adapter_path,
        log_path=log_path,
        steps=end_step,
        losses=losses,
        resumed_from_step=start_step,
        useful_tokens_per_second=useful_tokens / train_seconds if train_seconds else float("nan"),
        train_seconds=train_seconds,
    )


def read_train_log(log_path: str | Path) -> list[dict[str, Any]]:
    """The per-step records of ``train_log.jsonl``."""
    return [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]


def steady_steps(steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The logged steps after each batch shape's first one (which compiled that shape): the steady
    state that throughput is measured on when one epoch is all there is."""
    seen: set[tuple[int, ...]] = set()
    kept = []
    for step in steps:
        shape = tuple(step["shape"])
        if shape in seen:
            kept.append(step)
        seen.add(shape)
    return kept


@contextlib.contextmanager
def _one_trainer(out_dir: Path):
    """Two processes training into one ``out_dir`` (two pipeline runs started at once) would append to
    one train_log.jsonl and race on its checkpoints: the second waits for the first, then resumes
    from its final checkpoint (no step is trained twice)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(out_dir / TRAIN_LOCK))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.warning("another process is training in %s; waiting for it to finish", out_dir)
        lock.acquire()
    try:
        remove_leftovers(out_dir, any_writer=True)  # under the lock: only a killed trainer's temporaries
        yield
    finally:
        lock.release()


def _train_step(trainer, batch) -> float:
    """One optimizer step on already-tokenized arrays.

    A keras-hub task runs its preprocessor inside ``train_on_batch``; our batches are tokenized
    once up front, so the preprocessor is detached for the step.
    """
    preprocessor = getattr(trainer, "preprocessor", None)
    if preprocessor is not None:
        trainer.preprocessor = None
    try:
        return float(trainer.train_on_batch(*batch, return_dict=True)["loss"])
    finally:
        if preprocessor is not None:
            trainer.preprocessor = preprocessor


def _truncate_log(log_path: Path, keep_through_step: int) -> None:
    """Drop log lines of steps that will be redone after a resume."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= keep_through_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a killed process
    atomic_write_text(log_path, "".join(line + "\n" for line in kept))


def _append_log(log_path: Path, record: dict[str, Any]) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
