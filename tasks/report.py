"""Stage 6: the comparison report as files (report.md, standalone report.html, metrics.json).

Rendering is pure (:mod:`gemma_core.report`); this task gathers its inputs from the upstream
results, writes the files into a directory named by its inputs' hash, and returns their hashes.
Publishing the Prefect artifacts is :func:`tasks.artifacts.publish_report`, called by the flow on
every run, so a cached report still shows on each run's page.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from gemma_core.atomic import atomic_write_text
from gemma_core.report import build_report, curve_data_uri, library_versions, render_markdown, write_report
from tasks.caching import input_fingerprint
from tasks.common import CACHED
from tasks.evaluate import read_eval
from tasks.promotion import GateResult, read_gate
from tasks.results import DataResult, EvalResult, FileRef, ModelResult, ReportResult, TrainOutput
from tasks.runtime import logger, maybe_fail, peak_rss_mb, timed
from tasks.stages import RENDER_REPORT

ARTIFACT_MARKDOWN = "artifact.md"  # report.md with the curve inlined as a data: URI (for the Prefect UI)


def read_losses(train: TrainOutput) -> list[float]:
    losses = []
    for line in train.path("log").read_text().splitlines():
        try:
            losses.append(float(json.loads(line)["loss"]))
        except (ValueError, KeyError, TypeError):
            continue
    return losses


@task(name=RENDER_REPORT, **CACHED)
def render_report(
    base: EvalResult,
    tuned: EvalResult,
    train: TrainOutput,
    data: DataResult,
    model: ModelResult,
    config: dict[str, Any],
    num_side_by_side: int,
    out_root: str,
    gate: GateResult | None = None,
    leaderboard: list[dict[str, Any]] | None = None,
) -> ReportResult:
    """The comparison of the base and the tuned model (the challenger), with the gate's verdict and,
    after a sweep, the leaderboard of every point."""
    maybe_fail(RENDER_REPORT)
    fingerprint = input_fingerprint("report", {
        "base": base, "tuned": tuned, "train": train, "data": data, "model": model, "config": config,
        "num_side_by_side": num_side_by_side, "gate": gate, "leaderboard": leaderboard,
    })
    out_dir = Path(out_root) / "reports" / f"report-{fingerprint[:16]}"
    with timed() as t:
        losses = read_losses(train)
        stages = [data, model, base, train, tuned]
        manifest = {
            "model": {"spec": model.spec, "content_hash": model.model_hash, "preset_dir": model.preset_dir},
            "data": {"source": data.source, "content_hash": data.data_hash, "is_sample": data.is_sample,
                     "prompt_format": data.prompt_format,
                     "eval_split": data.eval_source or "data.eval_fraction of data.source",
                     "counts": data.counts, "dropped": {k: v for k, v in data.dropped.items() if v}},
            "training": {"steps": train.steps, "resumed_from_step": train.resumed_from_step,
                         "learning_rate": train.learning_rate, "adapter_sha256": train.files["adapter"].sha256},
            "training_tokens_per_second": train.useful_tokens_per_second,
            "generation_new_tokens_per_second": {
                "base": read_eval(base)["new_tokens_per_second"], "tuned": read_eval(tuned)["new_tokens_per_second"]
            },
            "stage_seconds": {s.stage: s.seconds for s in stages},
            "peak_memory_mb": max(s.peak_rss_mb for s in stages),
            "versions": library_versions(),
            "config": config,
        }
        report = build_report(
            read_eval(base), read_eval(tuned),
            {"losses": losses, "steps": train.steps, "learning_rate": train.learning_rate,
             "useful_tokens_per_second": train.useful_tokens_per_second, "final_loss": train.final_loss},
            manifest, num_side_by_side, gate=read_gate(gate) if gate is not None else None, leaderboard=leaderboard,
        )
        paths = write_report(report, out_dir)
        png = paths["training_curve"].read_bytes()
        paths["artifact"] = atomic_write_text(out_dir / ARTIFACT_MARKDOWN, render_markdown(report, curve_data_uri(png)))
    changed = report.metrics["answers_changed"]
    logger().info("report: %d of %d answers changed; %s", changed, report.metrics["num_prompts"],
                  paths["html"].resolve())
    return ReportResult(
        stage=RENDER_REPORT,
        fingerprint=fingerprint,
        files={name: FileRef.of(path) for name, path in paths.items()},
        seconds=t.seconds,
        peak_rss_mb=peak_rss_mb(),
        report_dir=str(out_dir.resolve()),
        answers_changed=changed,
        num_prompts=report.metrics["num_prompts"],
    )
