"""The report's Prefect artifacts: a Markdown report under a stable key (the UI keeps its history
across runs) and a table with one row per held-out prompt. Progress artifacts are created by the
long stages themselves (:class:`tasks.runtime.Progress`). What goes into an artifact is redacted
(:mod:`gemma_core.redact`): the report's config section holds every config value."""

from __future__ import annotations

import json
from typing import Any

from gemma_core.formatting import format_fixed, truncate
from gemma_core.redact import redact, redact_text
from tasks.results import ReportResult

REPORT_KEY = "gemma-lora-report"
PROMPTS_KEY = "gemma-lora-prompts"
TABLE_CHARS = 300


def publish_report(report: ReportResult) -> dict[str, str]:
    """Create this run's report artifacts from the report's files; returns their ids."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    markdown = report.path("artifact").read_text()
    metrics = json.loads(report.path("metrics").read_text())
    rows = [
        {
            "#": r["index"] + 1,
            "category": r["category"],
            "prompt": truncate(r["instruction"], TABLE_CHARS),
            "reference": truncate(r["reference"], TABLE_CHARS),
            "base answer": truncate(r["base_answer"], TABLE_CHARS),
            "tuned answer": truncate(r["tuned_answer"], TABLE_CHARS),
            "ROUGE-L base": r["base_rouge_l"],
            "ROUGE-L tuned": r["tuned_rouge_l"],
            "EOS base": r["base_ended"],
            "EOS tuned": r["tuned_ended"],
        }
        for r in metrics["prompts"]
    ]
    rouge, loss = metrics["overall"]["rouge_l_f1"], metrics["overall"]["completion_loss"]
    summary = (
        f"ROUGE-L {format_fixed(rouge['base'])} → {format_fixed(rouge['tuned'])}, "
        f"held-out loss {format_fixed(loss['base'])} → {format_fixed(loss['tuned'])}; "
        f"{metrics['answers_changed']} of {metrics['num_prompts']} answers changed"
    )
    return {
        "report": str(create_markdown_artifact(redact_text(markdown), key=REPORT_KEY, description=summary)),
        "prompts": str(create_table_artifact(redact(rows), key=PROMPTS_KEY, description="one row per held-out prompt")),
    }


GATE_KEY = "gemma-lora-gate"
LEADERBOARD_KEY = "gemma-lora-leaderboard"


def publish_decision(gate: dict[str, Any] | None, leaderboard: list[dict[str, Any]], outcome: str) -> dict[str, str]:
    """The gate's verdict as the Markdown artifact gemma-lora-gate (intervals, per-category table, flipped
    prompts: the report's own section) and, after a sweep, the leaderboard as a table artifact."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from gemma_core.report import markdown_sections
    from gemma_core.report_gate import gate_section

    ids = {}
    if gate is not None:
        page = markdown_sections([gate_section(gate)])
        ids["gate"] = str(create_markdown_artifact(redact_text(f"{page}\n\n**Outcome:** {outcome}\n"), key=GATE_KEY,
                                                   description=redact_text(outcome)))
    if len(leaderboard) > 1:
        rows = [{"point": p["label"], **{k: p["overall"].get(k) for k in ("completion_loss", "rouge_l_f1", "eos_rate")},
                 "training s": p.get("train_seconds"), "role": p.get("role", ""),
                 **{f"loss {c}": v.get("completion_loss") for c, v in sorted(p.get("per_category", {}).items())}}
                for p in leaderboard]
        ids["leaderboard"] = str(create_table_artifact(redact(rows), key=LEADERBOARD_KEY,
                                                       description="every sweep point; the challenger met the gate"))
    return ids
