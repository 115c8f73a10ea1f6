"""How each answer ended: on ``<eos>``, on ``<end_of_turn>``, or at ``max_new_tokens``.

Evaluation rows record it as ``ended_by``; the report and the gate summarise it as two rates. Rows
written before ``ended_by`` existed hold only ``ended_with_eos`` (ended on any stop token) and are read
here, the one place that knows both forms.
"""

from __future__ import annotations

STOP_TOKENS = ("eos", "end_of_turn")  # as ``ended_by`` names them (the token without its brackets)


def ended_by(row: dict) -> str | None:
    """Which stop token ended a row's answer. A row written before ``ended_by`` was recorded has only
    ``ended_with_eos``; it is read as ``eos``, so its ``eos_rate`` is the one it was reported with."""
    if "ended_by" in row:
        return row["ended_by"]
    return "eos" if row["ended_with_eos"] else None


def ending_rates(rows: list[dict]) -> dict[str, float]:
    """Share of answers ended by ``<eos>`` and by ``<end_of_turn>`` (the rest ran into max_new_tokens).

    >>> ending_rates([{"ended_by": "eos"}, {"ended_by": "end_of_turn"}, {"ended_by": None}, {"ended_with_eos": True}])
    {'eos_rate': 0.5, 'end_of_turn_rate': 0.25}
    """
    ends = [ended_by(r) for r in rows]
    return {f"{name}_rate": sum(e == name for e in ends) / len(ends) if ends else float("nan") for name in STOP_TOKENS}
