"""Decide whether a challenger replaces the champion, from their evaluations on the same held-out prompts.

The inputs are two evaluations as gemma_core/evaluation.py writes them (``EvalReport.to_dict()``, the
``eval.json`` of a run). The decision is a paired bootstrap over prompts: ``resamples`` times, the same
prompts are drawn with replacement for both models and the primary metric's improvement is computed on
the draw; the improvement's percentile interval must lie above ``margin``. Then no category may be worse
than its own margin on held-out loss or ROUGE-L. The verdict is data (numbers and sentences); drawing it
is the report's job.

Improvements are positive when the challenger is better: for the held-out loss (nats per response token,
token-weighted as in the evaluation) champion minus challenger, for ROUGE-L challenger minus champion.

>>> from gemma_core.config import PromotionConfig
>>> rows = [{"category": "open_qa", "instruction": f"Question {i}?", "reference": "An answer.", "answer": "An answer.",
...          "rouge_l_f1": 0.5, "ended_with_eos": True, "new_tokens": 4, "nll": 20.0, "response_tokens": 10}
...         for i in range(8)]
>>> verdict = gate({"rows": rows}, {"rows": [dict(row, nll=15.0) for row in rows]}, PromotionConfig())
>>> verdict.promote, verdict.improvement.estimate, verdict.reasons[0]
(True, 0.5, 'held-out loss improved by 0.500 (95% interval 0.500 to 0.500), above the margin 0')
>>> gate({"rows": rows}, {"rows": rows}, PromotionConfig()).promote
False
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np

from gemma_core.endings import ending_rates

from gemma_core.config import PromotionConfig
from gemma_core.formatting import json_safe, truncate

METRIC_NAMES = {"completion_loss": "held-out loss", "rouge_l_f1": "ROUGE-L"}
INSTRUCTION_CHARS = 120
_DRAWS_PER_CHUNK = 2_000_000  # prompt indices drawn at once (16 MB), so many prompts do not need much memory
_SAME_PROMPT = ("category", "instruction", "reference")


@dataclass(frozen=True)
class Improvement:
    """The challenger's improvement on one metric: on all prompts, and its bootstrap percentile interval."""

    metric: str
    estimate: float
    low: float
    high: float
    confidence: float


@dataclass(frozen=True)
class CategoryCheck:
    """One category's point estimates; changes are challenger minus champion (negative loss change: better)."""

    category: str
    n: int
    champion_loss: float
    challenger_loss: float
    loss_change: float
    champion_rouge_l: float
    challenger_rouge_l: float
    rouge_l_change: float
    blocked: bool
    reason: str | None


@dataclass(frozen=True)
class Flip:
    """A prompt that changed for the worse or changed how it ends.

    ``kind`` is ``loss_rose`` or ``rouge_fell`` (before/after: the metric), ``stopped_eos`` or ``started_eos``
    (before/after: whether the answer ended on a stop token, <eos> or <end_of_turn>).
    """

    index: int
    category: str
    instruction: str
    kind: str
    before: float | bool
    after: float | bool


@dataclass(frozen=True)
class GateVerdict:
    promote: bool
    reasons: tuple[str, ...]  # sentences for people, the primary metric's first
    metric: str  # the primary metric
    improvement: Improvement  # the primary metric's, which decides
    intervals: dict[str, Improvement]  # both metrics, from the same resamples
    margin: float
    categories: tuple[CategoryCheck, ...]  # sorted by category
    flips: tuple[Flip, ...]  # by prompt index
    overall: dict[str, dict[str, float]]  # "champion"/"challenger" -> completion_loss, rouge_l_f1, eos_rate,
    #                                        end_of_turn_rate
    prompts: int
    resamples: int
    seed: int
    thresholds: dict[str, float]  # the category margins and what counts as a flip

    @property
    def blocked_categories(self) -> list[str]:
        return [c.category for c in self.categories if c.blocked]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (no NaN: a value that cannot be computed is None)."""
        return json_safe(asdict(self))


def gate(champion: dict, challenger: dict, cfg: PromotionConfig) -> GateVerdict:
    """Compare two evaluations of the same prompts (see the module docstring); raises ValueError if they differ."""
    rows_a, rows_b = _rows(champion, "champion"), _rows(challenger, "challenger")
    _same_prompts(rows_a, rows_b)
    n = len(rows_a)
    tokens = _column(rows_a, "response_tokens")
    nll = {"champion": _column(rows_a, "nll"), "challenger": _column(rows_b, "nll")}
    rouge = {"champion": _column(rows_a, "rouge_l_f1"), "challenger": _column(rows_b, "rouge_l_f1")}
    if tokens.sum() <= 0:
        raise ValueError("no prompt has response tokens: the held-out loss cannot be compared")

    reasons = []
    for who, rows in (("champion", rows_a), ("challenger", rows_b)):
        for what, values in (("held-out loss", nll[who]), ("ROUGE-L", rouge[who])):
            bad = np.flatnonzero(~np.isfinite(values))
            if len(bad):
                reasons.append(f"the {who}'s {what} on prompt {bad[0]} ({rows[bad[0]]['instruction'][:60]!r}) "
                               "is not a finite number: nothing is promoted")
    finite = not reasons

    with np.errstate(invalid="ignore", divide="ignore"):
        loss_draws, rouge_draws = _bootstrap(nll, rouge, tokens, cfg)
        intervals = {
            "completion_loss": _interval("completion_loss",
                                         (nll["champion"].sum() - nll["challenger"].sum()) / tokens.sum(),
                                         loss_draws, cfg.confidence),
            "rouge_l_f1": _interval("rouge_l_f1", rouge["challenger"].mean() - rouge["champion"].mean(),
                                    rouge_draws, cfg.confidence),
        }
    improvement = intervals[cfg.primary_metric]
    passed = finite and improvement.low > cfg.margin
    reasons.insert(0, _primary_sentence(improvement, cfg.margin, passed))

    categories = tuple(_category(name, idx, nll, rouge, tokens, cfg) for name, idx in _by_category(rows_a))
    blocked = [c for c in categories if c.blocked]
    reasons += [c.reason for c in blocked] or [
        f"no category got worse by more than its margins (held-out loss {cfg.category_loss_margin:g}, "
        f"ROUGE-L {cfg.category_rouge_margin:g})"]

    return GateVerdict(
        promote=bool(passed and not blocked),
        reasons=tuple(reasons),
        metric=cfg.primary_metric,
        improvement=improvement,
        intervals=intervals,
        margin=cfg.margin,
        categories=categories,
        flips=tuple(_flips(rows_a, rows_b, cfg)),
        overall={who: _summary(rows, nll[who], rouge[who], tokens)
                 for who, rows in (("champion", rows_a), ("challenger", rows_b))},
        prompts=n,
        resamples=cfg.resamples,
        seed=cfg.seed,
        thresholds={"category_loss_margin": cfg.category_loss_margin,
                    "category_rouge_margin": cfg.category_rouge_margin,
                    "flip_rouge_drop": cfg.flip_rouge_drop, "flip_loss_rise": cfg.flip_loss_rise},
    )


# --- inputs ------------------------------------------------------------------------------------------

_NUMBERS = ("rouge_l_f1", "nll", "response_tokens")


def _rows(evaluation: dict, who: str) -> list[dict]:
    rows = evaluation.get("rows") if isinstance(evaluation, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"the {who}'s evaluation has no prompts (no 'rows'): nothing to compare")
    for i, row in enumerate(rows):
        missing = [k for k in (*_SAME_PROMPT, *_NUMBERS, "ended_with_eos") if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"the {who}'s evaluation, prompt {i}: missing {', '.join(missing)} "
                             "(not an evaluation written by gemma_core.evaluation)")
    return rows


def _same_prompts(rows_a: list[dict], rows_b: list[dict]) -> None:
    for i in range(max(len(rows_a), len(rows_b))):
        if i >= len(rows_a) or i >= len(rows_b):
            longer, who = (rows_a, "champion") if i < len(rows_a) else (rows_b, "challenger")
            raise ValueError(f"the champion was evaluated on {len(rows_a)} prompts, the challenger on {len(rows_b)}: "
                             f"prompt {i} ({longer[i]['instruction'][:80]!r}) is only the {who}'s; both must be "
                             "evaluated on the same prompts, seeds and settings")
        a, b = rows_a[i], rows_b[i]
        for key in _SAME_PROMPT:
            if a[key] != b[key]:
                raise ValueError(f"prompt {i} differs: its {key} is {str(a[key])[:80]!r} for the champion and "
                                 f"{str(b[key])[:80]!r} for the challenger; both must be evaluated on the same "
                                 "prompts in the same order")
        if a["response_tokens"] != b["response_tokens"]:
            raise ValueError(f"prompt {i} ({a['instruction'][:80]!r}) was scored on {a['response_tokens']} reference "
                             f"tokens for the champion and {b['response_tokens']} for the challenger: the held-out "
                             "losses are not comparable (evaluated at different train.sequence_length?)")


def _column(rows: list[dict], key: str) -> np.ndarray:
    try:
        return np.array([float(row[key]) for row in rows], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"the evaluation's {key} values must be numbers") from None


def _by_category(rows: list[dict]) -> Iterable[tuple[str, np.ndarray]]:
    names = np.array([str(row["category"]) for row in rows])
    for name in sorted(set(names.tolist())):
        yield name, np.flatnonzero(names == name)


# --- statistics --------------------------------------------------------------------------------------

def _bootstrap(nll: dict, rouge: dict, tokens: np.ndarray, cfg: PromotionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Both metrics' improvement on each resample; the same drawn prompts for both models and both metrics."""
    rng = np.random.default_rng(cfg.seed)
    n = len(tokens)
    nll_diff = nll["champion"] - nll["challenger"]
    rouge_diff = rouge["challenger"] - rouge["champion"]
    loss, rouge_l = [], []
    chunk = max(1, _DRAWS_PER_CHUNK // n)
    for start in range(0, cfg.resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, cfg.resamples - start), n))
        loss.append(nll_diff[idx].sum(axis=1) / tokens[idx].sum(axis=1))  # a draw without tokens: NaN, left out
        rouge_l.append(rouge_diff[idx].mean(axis=1))
    return np.concatenate(loss), np.concatenate(rouge_l)


def _interval(metric: str, estimate: float, draws: np.ndarray, confidence: float) -> Improvement:
    tail = (1 - confidence) / 2
    draws = draws[~np.isnan(draws)]
    low, high = np.quantile(draws, [tail, 1 - tail]) if len(draws) else (math.nan, math.nan)
    return Improvement(metric, float(estimate), float(low), float(high), confidence)


def _category(name: str, idx: np.ndarray, nll: dict, rouge: dict, tokens: np.ndarray,
              cfg: PromotionConfig) -> CategoryCheck:
    count = tokens[idx].sum()
    loss = {who: float(nll[who][idx].sum() / count) if count else math.nan for who in nll}
    rouge_l = {who: float(rouge[who][idx].mean()) for who in rouge}
    loss_change = loss["challenger"] - loss["champion"]
    rouge_change = rouge_l["challenger"] - rouge_l["champion"]
    why = []
    if loss_change > cfg.category_loss_margin:
        why.append(f"held-out loss rose by {loss_change:.3f} ({loss['champion']:.3f} to {loss['challenger']:.3f}), "
                   f"more than its margin {cfg.category_loss_margin:g}")
    if -rouge_change > cfg.category_rouge_margin:
        why.append(f"ROUGE-L fell by {-rouge_change:.3f} ({rouge_l['champion']:.3f} to "
                   f"{rouge_l['challenger']:.3f}), more than its margin {cfg.category_rouge_margin:g}")
    return CategoryCheck(
        category=name, n=int(len(idx)),
        champion_loss=loss["champion"], challenger_loss=loss["challenger"], loss_change=loss_change,
        champion_rouge_l=rouge_l["champion"], challenger_rouge_l=rouge_l["challenger"], rouge_l_change=rouge_change,
        blocked=bool(why), reason=f"category {name} ({len(idx)} prompts): {' and '.join(why)}" if why else None,
    )


def _primary_sentence(improvement: Improvement, margin: float, passed: bool) -> str:
    name, est = METRIC_NAMES[improvement.metric], improvement.estimate
    change = (f"improved by {est:.3f}" if est > 0 else f"got worse by {-est:.3f}" if est < 0
              else "did not change" if est == 0 else "cannot be compared")
    interval = f"{improvement.confidence * 100:g}% interval {improvement.low:.3f} to {improvement.high:.3f}"
    if passed:
        return f"{name} {change} ({interval}), above the margin {margin:g}"
    return f"{name} {change} ({interval}): the interval's lower bound is not above the margin {margin:g}"


# --- what changed, prompt by prompt -------------------------------------------------------------------

def _flips(rows_a: list[dict], rows_b: list[dict], cfg: PromotionConfig) -> Iterable[Flip]:
    for i, (a, b) in enumerate(zip(rows_a, rows_b)):
        found = []
        tokens = float(a["response_tokens"])
        if tokens > 0:
            before, after = float(a["nll"]) / tokens, float(b["nll"]) / tokens
            if after - before > cfg.flip_loss_rise:
                found.append(("loss_rose", before, after))
        if float(a["rouge_l_f1"]) - float(b["rouge_l_f1"]) > cfg.flip_rouge_drop:
            found.append(("rouge_fell", float(a["rouge_l_f1"]), float(b["rouge_l_f1"])))
        ended_a, ended_b = bool(a["ended_with_eos"]), bool(b["ended_with_eos"])
        if ended_a != ended_b:
            found.append(("stopped_eos" if ended_a else "started_eos", ended_a, ended_b))
        for kind, before, after in found:
            yield Flip(i, str(a["category"]), truncate(a["instruction"], INSTRUCTION_CHARS), kind, before, after)


def _summary(rows: list[dict], nll: np.ndarray, rouge: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
    return {"completion_loss": float(nll.sum() / tokens.sum()), "rouge_l_f1": float(rouge.mean()), **ending_rates(rows)}
