"""The report's sections about the decision: the gate between the champion and the challenger, and,
with a sweep, the leaderboard of every point. Data in, :class:`gemma_core.report.Section` out; the
report's two renderers draw them like every other section.

>>> sections = decision_sections(gate_doc, leaderboard)          # doctest: +SKIP
>>> [s.title for s in sections]                                   # doctest: +SKIP
['Promotion gate', 'Leaderboard']
"""

from __future__ import annotations

from typing import Any

from gemma_core.formatting import format_metric, truncate
from gemma_core.gate import METRIC_NAMES
from gemma_core.report import Cell, Section, Table

GATE_TITLE = "Promotion gate"
LEADERBOARD_TITLE = "Leaderboard"
FLIP_KINDS = {"loss_rose": "got worse (held-out loss rose)", "rouge_fell": "got worse (ROUGE-L fell)",
              "stopped_eos": "stopped ending on a stop token (<eos> or <end_of_turn>)",
              "started_eos": "started ending on a stop token (<eos> or <end_of_turn>)"}


def decision_sections(gate: dict[str, Any] | None, leaderboard: list[dict[str, Any]] | None) -> tuple[Section, ...]:
    """The gate's section (when there was a gate) and the leaderboard's (when a sweep trained several points)."""
    out = []
    if gate is not None:
        out.append(gate_section(gate))
    if leaderboard and len(leaderboard) > 1:
        out.append(leaderboard_section(leaderboard))
    return tuple(out)


def gate_section(gate: dict[str, Any]) -> Section:
    verdict = "promote the challenger" if gate.get("promote") else "keep the champion"
    blocks: list[Any] = [(f"Verdict: {verdict}. ", *(f"{reason} " for reason in gate.get("reasons", ())))]
    intervals = gate.get("intervals") or {}
    if intervals:
        blocks.append(Table(("metric", "improvement", "interval low", "interval high", "confidence"), tuple(
            (Cell(METRIC_NAMES.get(metric, metric)), *(Cell(format_metric(iv.get(k))) for k in ("estimate", "low", "high")),
             Cell(format_metric(iv.get("confidence"))))
            for metric, iv in intervals.items()
        ), numbers_from=1))
    categories = gate.get("categories") or ()
    if categories:
        blocks.append(Table(
            ("category", "n", "loss champion → challenger", "ROUGE-L champion → challenger", "blocks"),
            tuple((Cell(c["category"]), Cell(str(c["n"])),
                   Cell(f"{format_metric(c['champion_loss'])} → {format_metric(c['challenger_loss'])}"),
                   Cell(f"{format_metric(c['champion_rouge_l'])} → {format_metric(c['challenger_rouge_l'])}"),
                   Cell(c.get("reason") or "yes" if c.get("blocked") else "no"))
                  for c in categories),
            numbers_from=1,
        ))
    flips = gate.get("flips") or ()
    if flips:
        blocks.append(Table(("#", "category", "prompt", "what changed", "before → after"), tuple(
            (Cell(str(f["index"] + 1)), Cell(f["category"]), Cell(truncate(f["instruction"], 120)),
             Cell(FLIP_KINDS.get(f["kind"], f["kind"])), Cell(f"{_value(f['before'])} → {_value(f['after'])}"))
            for f in flips
        )))
    elif categories:
        blocks.append(("No prompt flipped.",))
    return Section(GATE_TITLE, tuple(blocks))


def leaderboard_section(leaderboard: list[dict[str, Any]]) -> Section:
    categories = sorted({c for point in leaderboard for c in point.get("per_category", {})})
    columns = ("point", "held-out loss", "ROUGE-L", "EOS rate", "end-of-turn rate", "training s", *categories, "role")
    rows = []
    for point in leaderboard:
        overall, per_category = point.get("overall", {}), point.get("per_category", {})
        rows.append((
            Cell(point["label"]),
            *(Cell(format_metric(overall.get(k))) for k in ("completion_loss", "rouge_l_f1", "eos_rate", "end_of_turn_rate")),
            Cell(format_metric(point.get("train_seconds"))),
            *(Cell(format_metric(per_category.get(c, {}).get("completion_loss"))) for c in categories),
            Cell(point.get("role", "")),
        ))
    note = ("Per-category columns: held-out loss. The challenger is the point with the best "
            f"{METRIC_NAMES.get(leaderboard[0].get('metric', ''), 'primary metric')}; only it meets the gate.",)
    return Section(LEADERBOARD_TITLE, (Table(columns, tuple(rows), numbers_from=1), note))


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format_metric(value) if isinstance(value, (int, float)) else str(value)
