"""The pipeline flow. It reads like the README's diagram:

prepare data → resolve model → baseline generation + eval → LoRA fine-tuning of every sweep point
(here, or on the GPU pool) → tuned generation + eval of each (same prompts, seeds) → the best point
is the challenger → gate against the champion → report → (approval) → promotion

Every stage but the champion's lookup and the promotion is a cached task (see ``tasks/``): a rerun
with nothing changed is all Cached and promotes nothing new, a changed input reruns the stages that
depend on it, and a rerun after a failure starts at the failed stage (training continues from its
newest checkpoint).
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from prefect import flow, pause_flow_run
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from prefect.runtime import flow_run

from flows.stages import start_flow
from flows.storage import write_latest
from flows.training import train_points
from gemma_core.config import PipelineConfig
from gemma_core.redact import redact_text
from gemma_core.sweep import sweep_points
from tasks.artifacts import publish_decision, publish_report
from tasks.data import prepare_data, source_fingerprint
from tasks.evaluate import evaluate, read_eval
from tasks.model import resolve_model_preset, spec_fingerprint
from tasks.promotion import Promotion, gate_challenger, promote_challenger, read_champion, read_gate
from tasks.report import render_report
from tasks.stages import EVALUATE_BASE, EVALUATE_CHAMPION, EVALUATE_TUNED, TRAIN_LORA, point_stage

APPROVAL_KEY = "gemma-lora-approval"


class Approval(RunInput):
    """What a person answers when a run waits for approval after a passing gate (the UI shows a form)."""

    approve: bool
    comment: str = ""


@flow(name="gemma-lora-pipeline")
def gemma_lora_pipeline(
    config: PipelineConfig = PipelineConfig(),
    result_storage: str | None = None,
    training_deployment: str | None = None,
) -> dict[str, Any]:
    """Fine-tune Gemma with LoRA, compare the tuned model with the base model, and promote it when it
    beats the champion.

    Args:
        config: the typed config (any sections; defaults for the rest). Typed, so a deployment's
            run form shows every field with its default and refuses a wrong value.
        result_storage: where cached results persist: a directory or fsspec URL (default
            $GEMMA_LORA_RESULT_STORAGE, else <output.root>/prefect-results).
        training_deployment: run fine-tuning as runs of this deployment (e.g. "lora-training/gpu",
            on the GPU work pool) and wait for them; empty: fine-tune in this process.
    """
    run = start_flow(config, result_storage)
    cfg, out_root, stages = run.cfg, run.out_root, run.stages
    points = sweep_points(cfg)  # a sweep that cannot be expanded fails here, before any work
    config_json = cfg.model_dump(mode="json")
    gen, ev, seq_len = cfg.generation, cfg.evaluation, cfg.train.sequence_length

    def evaluation(stage: str, adapter=None):
        return stages.run(evaluate, gen, ev.num_prompts, seq_len, data, model, out_root, adapter=adapter,
                          backend=cfg.backend, stage=stage)

    data = stages.run(prepare_data, cfg.data, out_root, source_fingerprint(cfg.data))
    model = stages.run(resolve_model_preset, cfg.model, spec_fingerprint(cfg.model.spec))
    base = evaluation(EVALUATE_BASE)

    labels = [point.label if len(points) > 1 else "" for point in points]
    trained = train_points({point_stage(TRAIN_LORA, label): point.config.model_dump(mode="json")
                            for label, point in zip(labels, points)},
                           data, model, run.result_storage, stages=stages, deployment=training_deployment)
    tuned = [evaluation(point_stage(EVALUATE_TUNED, label), train.adapter()) for label, train in
             zip(labels, trained.values())]
    best = _best(tuned, cfg.promotion.primary_metric)
    challenger, challenger_train = tuned[best], list(trained.values())[best]

    found = read_champion(out_root, cfg.promotion.registry, model.model_hash)
    opponent = found.opponent(challenger.adapter_sha256)
    champion = base if opponent is None else evaluation(EVALUATE_CHAMPION, opponent)
    gate = stages.run(gate_challenger, champion, challenger, cfg.promotion, out_root)

    leaderboard = _leaderboard(points, list(trained.values()), tuned, best, gate.promote, cfg.promotion.primary_metric)
    report = stages.run(render_report, base, challenger, challenger_train, data, model, config_json,
                        ev.num_side_by_side, out_root, gate=gate, leaderboard=leaderboard if len(points) > 1 else None)
    artifacts = publish_report(report)

    summary = {
        "flow_run_id": str(flow_run.get_id()),
        "states": stages.states,  # the live record: the promotion's state joins it below
        "stage_seconds": {r.stage: r.seconds for r in (data, model, base, *trained.values(), *tuned, report)},
        "report_dir": report.report_dir,
        "answers_changed": report.answers_changed,
        "num_prompts": report.num_prompts,
        "base": base.overall,
        "tuned": challenger.overall,
        "champion": {"registry": found.registry, "sequence": found.sequence, "metrics": champion.overall},
        "gate": {"promote": gate.promote, "reasons": gate.reasons},
        "leaderboard": leaderboard,
        "results": {
            "data": data.model_dump(mode="json"),
            "model": model.model_dump(mode="json"),
            "train": challenger_train.model_dump(mode="json"),
            "report": report.model_dump(mode="json"),
        },
        "result_storage": redact_text(run.result_storage),  # the flow's result and latest.json hold no credential
        "config": config_json,
    }
    promotion = _promote_if_allowed(found, gate, challenger_train, challenger, model, data, report, config_json,
                                    summary, require_approval=cfg.promotion.require_approval,
                                    timeout=cfg.promotion.approval_timeout_s, stages=stages, out_root=out_root)
    artifacts.update(publish_decision(read_gate(gate), leaderboard, promotion.why))
    summary.update(promotion=promotion.model_dump(mode="json"), artifacts=artifacts,
                   finished_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    _write_latest(out_root, summary)
    return summary


def _leaderboard(points, trained, tuned, best: int, promote: bool, metric: str) -> list[dict[str, Any]]:
    """Every sweep point: its overrides, metrics overall and per category, training time, role."""
    role = "challenger: " + ("passed the gate" if promote else "did not pass the gate")
    return [
        {**point.to_dict(), "metric": metric, "overall": result.overall,
         "per_category": read_eval(result)["per_category"], "train_seconds": train.seconds,
         "adapter_sha256": train.files["adapter"].sha256, "role": role if i == best else ""}
        for i, (point, train, result) in enumerate(zip(points, trained, tuned))
    ]


def _best(evaluations, metric: str) -> int:
    """Index of the point with the best primary metric (lowest held-out loss, highest ROUGE-L)."""
    sign = 1 if metric == "completion_loss" else -1
    scores = [math.inf if e.overall.get(metric) is None else sign * e.overall[metric] for e in evaluations]
    return min(range(len(scores)), key=scores.__getitem__)


def _promote_if_allowed(found, gate, train, challenger, model, data, report, config_json, summary, *,
                        require_approval: bool, timeout: int, stages, out_root: str) -> Promotion:
    """A passing gate promotes, after a person's approval when ``promotion.require_approval``; the run's
    summary is written before the pause, so `gemma-lora report` shows the verdict while it waits."""
    if found.is_champion(challenger.adapter_sha256):
        return Promotion(promoted=False, sequence=found.sequence,
                         why=f"the challenger already is the champion (record {found.sequence})")
    if not gate.promote:
        return Promotion(promoted=False, why="the gate kept the champion: " + "; ".join(gate.reasons))
    promoted_by = "gate"
    if require_approval:
        _write_latest(out_root, {**summary, "promotion": {"promoted": False, "why": "waiting for approval"}})
        try:
            answer = pause_flow_run(wait_for_input=Approval, timeout=timeout, key=APPROVAL_KEY)
        except FlowPauseTimeout:
            _running_again()
            return Promotion(promoted=False, why=f"no approval within {timeout} s: rejected")
        if not answer.approve:
            return Promotion(promoted=False, why=f"rejected by a person: {answer.comment or 'no comment'}")
        promoted_by = f"approval:{answer.comment}" if answer.comment else "approval"
    return stages.run(promote_challenger, found, gate, train, challenger, model, data, report, config_json,
                      str(flow_run.get_id()), promoted_by=promoted_by)


def _running_again() -> None:
    """After a pause that timed out the run is still Paused: a timeout is a rejection, not a failure,
    so the run goes on (Running) to publish its verdict and complete."""
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.get_id(), Running(message="approval timed out: rejected"), force=True)


def _write_latest(out_root: str, summary: dict[str, Any]) -> None:
    write_latest(out_root, summary)
