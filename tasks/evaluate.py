"""Stages 3 and 5: generate and score answers on the held-out prompts, for the base or the tuned model.

Both, and the champion's evaluation, use this one task with the same prompts (the head of the eval
split, interleaved across categories), the same generation config and seeds; only ``adapter`` differs.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.runtime import task_run

from gemma_core.atomic import atomic_write_text
from gemma_core.config import GenerationConfig
from gemma_core.prompts import check_same_prompt_format
from tasks.caching import input_fingerprint
from tasks.common import CACHED
from tasks.model import load_stage_model, release
from tasks.results import AdapterRef, DataResult, EvalResult, FileRef, ModelResult
from tasks.runtime import Progress, logger, maybe_fail, peak_rss_mb, timed

EVAL_FILE = "eval.json"


@task(name="evaluate", **CACHED)
def evaluate(
    generation: GenerationConfig,
    num_prompts: int,
    sequence_length: int,
    data: DataResult,
    model: ModelResult,
    out_root: str,
    adapter: AdapterRef | None = None,
    backend: str = "jax",
) -> EvalResult:
    """Answer and score the first ``num_prompts`` held-out prompts with the base model, or with the
    base model plus ``adapter``; write ``eval.json``.

    The key is the model and adapter content, not the stage's name: the champion's evaluation of
    an adapter that was evaluated as a run's tuned model is that same (Cached) result.
    """
    from gemma_core.dolly_prepare import read_split
    from gemma_core.evaluation import evaluate_model

    stage = task_run.get_name() or "evaluate"
    who = stage.removeprefix("evaluate-")
    maybe_fail(stage)
    fingerprint = input_fingerprint("evaluate", {
        "generation": generation, "num_prompts": num_prompts, "sequence_length": sequence_length,
        "data": data, "model": model, "adapter": adapter, "backend": backend,
    })
    out_dir = Path(out_root) / "eval" / f"eval-{fingerprint[:16]}"
    if adapter is not None:  # an adapter answers in the format it learned, or wrongly
        check_same_prompt_format(adapter.prompt_format, data.prompt_format, f"the {who} adapter {adapter.path}")
    with timed() as t:
        frame = read_split(data.path("eval")).head(num_prompts)
        if len(frame) < num_prompts:
            logger().warning("evaluation.num_prompts=%d but the eval split holds %d rows: using all of them",
                             num_prompts, len(frame))
        loaded = load_stage_model(model, adapter)
        progress = Progress(f"generation-{who}", f"generation ({who} model)")
        logger().info("evaluating the %s model on %d held-out prompts", who, len(frame))
        report = evaluate_model(
            loaded, frame, generation, sequence_length, on_batch=lambda done, total: progress.update(done, total)
        )
        del loaded
        release()
        path = atomic_write_text(out_dir / EVAL_FILE, json.dumps(report.to_dict(), indent=1, sort_keys=True) + "\n")
    overall = {k: (None if v != v else float(v)) for k, v in report.overall.items()}
    logger().info(
        "%s model: loss %.3f, ROUGE-L %.3f, ended by <eos> %.2f, by <end_of_turn> %.2f, %.1f new tokens/s",
        who, report.overall["completion_loss"], report.overall["rouge_l_f1"], report.overall["eos_rate"],
        report.overall["end_of_turn_rate"], report.new_tokens_per_second,
    )
    return EvalResult(
        stage=stage,
        fingerprint=fingerprint,
        files={"eval": FileRef.of(path)},
        seconds=t.seconds,
        peak_rss_mb=peak_rss_mb(),
        adapter_sha256=adapter.file.sha256 if adapter is not None else None,
        overall=overall,
        num_prompts=len(frame),
    )


def read_eval(result: EvalResult) -> dict:
    return json.loads(result.path("eval").read_text())
