"""The pipeline flow. It reads like the README's diagram:

prepare data → resolve model → baseline generation + eval → LoRA fine-tuning (here, or on the GPU
pool) → tuned generation + eval (same prompts, seeds) → report

Every stage is a cached task (see ``tasks/``): a rerun with nothing changed is all Cached, a
changed input reruns the stages that depend on it, and a rerun after a failure starts at the
failed stage (training continues from its newest checkpoint).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.stages import start_flow
from flows.storage import LATEST
from flows.training import run_training
from gemma_core.atomic import atomic_write_text
from gemma_core.config import PipelineConfig
from tasks.artifacts import publish_report
from tasks.data import prepare_data, source_fingerprint
from tasks.evaluate import evaluate
from tasks.model import resolve_model_preset, spec_fingerprint
from tasks.report import render_report
from tasks.stages import EVALUATE_BASE, EVALUATE_TUNED


@flow(name="gemma-lora-pipeline")
def gemma_lora_pipeline(
    config: PipelineConfig = PipelineConfig(),
    result_storage: str | None = None,
    training_deployment: str | None = None,
) -> dict[str, Any]:
    """Fine-tune Gemma with LoRA and compare the tuned model with the base model.

    Args:
        config: the typed config (any sections; defaults for the rest). Typed, so a deployment's
            run form shows every field with its default and refuses a wrong value.
        result_storage: where cached results persist: a directory or fsspec URL (default
            $GEMMA_LORA_RESULT_STORAGE, else <output.root>/prefect-results).
        training_deployment: run fine-tuning as a run of this deployment (e.g. "lora-training/gpu",
            on the GPU work pool) and wait for it; empty: fine-tune in this process.
    """
    run = start_flow(config, result_storage)
    cfg, out_root, stages = run.cfg, run.out_root, run.stages
    config_json = cfg.model_dump(mode="json")
    gen, ev, seq_len = cfg.generation, cfg.evaluation, cfg.train.sequence_length

    data = stages.run(prepare_data, cfg.data, out_root, source_fingerprint(cfg.data.source))
    model = stages.run(resolve_model_preset, cfg.model, spec_fingerprint(cfg.model.spec))
    base = stages.run(evaluate, "base", gen, ev.num_prompts, seq_len, data, model, out_root,
                      backend=cfg.backend, stage=EVALUATE_BASE)
    train = run_training(config_json, data, model, run.result_storage, stages=stages,
                         deployment=training_deployment)
    tuned = stages.run(evaluate, "tuned", gen, ev.num_prompts, seq_len, data, model, out_root,
                       adapter=train, backend=cfg.backend, stage=EVALUATE_TUNED)
    report = stages.run(render_report, base, tuned, train, data, model, config_json, ev.num_side_by_side, out_root)

    summary = {
        "flow_run_id": str(flow_run.get_id()),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "states": stages.states,
        "stage_seconds": {r.stage: r.seconds for r in (data, model, base, train, tuned, report)},
        "report_dir": report.report_dir,
        "answers_changed": report.answers_changed,
        "num_prompts": report.num_prompts,
        "base": base.overall,
        "tuned": tuned.overall,
        "results": {
            "data": data.model_dump(mode="json"),
            "model": model.model_dump(mode="json"),
            "train": train.model_dump(mode="json"),
            "report": report.model_dump(mode="json"),
        },
        "result_storage": run.result_storage,
        "artifacts": publish_report(report),
        "config": config_json,
    }
    atomic_write_text(Path(out_root) / LATEST, json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary
