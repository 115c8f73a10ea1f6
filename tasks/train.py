"""Stage 4: LoRA fine-tuning (:func:`gemma_core.lora_train.train_lora`), resumable from its newest checkpoint.

The output directory is named by the hash of everything that changes the adapter (the train config
as its cache key sees it, LoRA config, data and model content, code), so a failed run's rerun finds
its own checkpoints there and continues, and a changed learning rate never resumes another run's
checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from gemma_core.checkpoints import adapter_manifest_name
from gemma_core.config import LoraConfig, TrainConfig
from tasks.caching import input_fingerprint
from tasks.common import CACHED
from tasks.model import load_stage_model, release
from tasks.results import DataResult, FileRef, ModelResult, TrainOutput
from tasks.runtime import Progress, logger, maybe_fail, peak_rss_mb, timed
from tasks.stages import TRAIN_LORA


@task(name=TRAIN_LORA, **CACHED)
def train_adapter(
    train: TrainConfig, lora: LoraConfig, data: DataResult, model: ModelResult, out_root: str, backend: str = "jax",
) -> TrainOutput:
    """Fine-tune the base model on the training split; write the adapter and a per-step log."""
    from gemma_core.distribute import describe_split, distribution_scope, training_distribution
    from gemma_core.dolly_prepare import read_split
    from gemma_core.lora_train import train_lora

    maybe_fail(TRAIN_LORA)
    fingerprint = input_fingerprint("train", {"train": train, "lora": lora, "data": data, "model": model,
                                            "backend": backend})
    out_dir = Path(out_root) / "train" / f"train-{fingerprint[:16]}"
    distribution = training_distribution(train.data_parallel, train.batch_size)
    if distribution is not None:
        logger().info("data parallel: each batch of %s",
                      describe_split(distribution, (train.batch_size, train.sequence_length)))
    with timed() as t, distribution_scope(distribution):  # the model is created where it is trained
        frame = read_split(data.path("train"))
        loaded = load_stage_model(model)
        progress = Progress("lora-training", "LoRA fine-tuning")

        def on_step(report) -> None:
            progress.update(report.step, report.total_steps,
                            f"loss {report.loss:.3f}, {report.tokens_per_second:.0f} tokens/s")
            maybe_fail(TRAIN_LORA, step=report.step)

        logger().info("fine-tuning on %d examples (%s format, lr %g, rank %d, batch %d, sequence length %d) in %s",
                      len(frame), data.prompt_format, train.learning_rate, lora.rank, train.batch_size,
                      train.sequence_length, out_dir)
        # "completion" is the response in the data's prompt format (closed by <end_of_turn> in gemma_chat).
        result = train_lora(
            loaded, list(frame["prompt"]), list(frame["completion"]), train, lora, out_dir,
            run_identity={"model_id": model.model_hash, "data_hash": data.data_hash,
                          "prompt_format": data.prompt_format},
            on_step=on_step,
        )
        del loaded
        release()
    if result.resumed_from_step:
        logger().info("training resumed from its checkpoint at step %d", result.resumed_from_step)
    tps = result.useful_tokens_per_second
    logger().info("training done: %d steps, loss %.3f -> %.3f, %.0f useful tokens/s",
                  result.steps, result.losses[0], result.losses[-1], tps if tps == tps else 0.0)
    return TrainOutput(
        stage=TRAIN_LORA,
        fingerprint=fingerprint,
        files={"adapter": FileRef.of(result.adapter_path), "log": FileRef.of(result.log_path),
               "adapter_manifest": FileRef.of(result.adapter_path.with_name(adapter_manifest_name(result.adapter_path)))},
        seconds=t.seconds,
        peak_rss_mb=peak_rss_mb(),
        out_dir=str(out_dir.resolve()),
        steps=result.steps,
        resumed_from_step=result.resumed_from_step,
        final_loss=result.losses[-1] if result.losses else None,
        useful_tokens_per_second=tps if tps == tps else None,
        learning_rate=train.learning_rate,
        lora=lora.model_dump(mode="json"),
        prompt_format=data.prompt_format,
    )
