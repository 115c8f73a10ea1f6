"""The promotion gate (gemma_core/gate.py) on synthetic evaluations, and the promotion config section."""

from __future__ import annotations

import doctest
import json
import re

import numpy as np
import pytest

from gemma_core import gate as gate_module
from gemma_core.config import ConfigError, PromotionConfig, load_config
from gemma_core.gate import gate

FLIP_LOSS_RISE, FLIP_ROUGE_DROP = PromotionConfig().flip_loss_rise, PromotionConfig().flip_rouge_drop

CATEGORIES = ["brainstorming", "classification", "closed_qa", "open_qa"]
PER_CATEGORY = 5


def evaluation(loss=None, rouge=None, eos=None, tokens=None) -> dict:
    """An eval.json as gemma_core.evaluation writes it: prompts interleaved across categories, per-prompt
    losses (nats per token) and ROUGE-L given as arrays (defaults: varied but fixed values)."""
    n = len(CATEGORIES) * PER_CATEGORY
    spread = np.random.default_rng(123)
    loss = spread.uniform(1.0, 3.0, n) if loss is None else np.asarray(loss, dtype=float)
    rouge = spread.uniform(0.1, 0.4, n) if rouge is None else np.asarray(rouge, dtype=float)
    eos = [False] * n if eos is None else eos
    tokens = [10 + 7 * (i % 6) for i in range(n)] if tokens is None else tokens
    rows = [{"category": CATEGORIES[i % len(CATEGORIES)], "instruction": f"Instruction number {i}?",
             "reference": f"Reference {i}.", "answer": f"Answer {i}.", "rouge_l_f1": float(rouge[i]),
             "ended_with_eos": bool(eos[i]), "new_tokens": 12, "nll": float(loss[i] * tokens[i]),
             "response_tokens": int(tokens[i])} for i in range(n)]
    return {"overall": {}, "per_category": {}, "rows": rows}


def per_prompt(ev: dict, key: str) -> np.ndarray:
    if key == "loss":
        return np.array([r["nll"] / r["response_tokens"] for r in ev["rows"]])
    return np.array([r[key] for r in ev["rows"]])


def noise(scale: float, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, scale, len(CATEGORIES) * PER_CATEGORY)


CHAMPION = evaluation()
N = len(CHAMPION["rows"])


def test_module_example_runs():
    assert doctest.testmod(gate_module).failed == 0


def test_a_clearly_better_challenger_is_promoted():
    challenger = evaluation(loss=per_prompt(CHAMPION, "loss") - 0.5 + noise(0.1),
                            rouge=per_prompt(CHAMPION, "rouge_l_f1") + 0.05)
    verdict = gate(CHAMPION, challenger, PromotionConfig())
    assert verdict.promote and verdict.metric == "completion_loss" and verdict.prompts == N
    imp = verdict.improvement
    assert 0 < imp.low < imp.estimate < imp.high and 0.4 < imp.estimate < 0.6 and imp.confidence == 0.95
    assert verdict.reasons[0] == (f"held-out loss improved by {imp.estimate:.3f} (95% interval {imp.low:.3f} to "
                                  f"{imp.high:.3f}), above the margin 0")
    assert verdict.reasons[1].startswith("no category got worse")
    assert verdict.intervals["rouge_l_f1"].estimate == pytest.approx(0.05)
    assert not verdict.blocked_categories and [c.category for c in verdict.categories] == CATEGORIES
    assert all(type(c.category) is str for c in verdict.categories)  # plain values, not numpy's
    assert all(c.n == PER_CATEGORY and c.loss_change < 0 for c in verdict.categories)


def test_the_held_out_loss_is_token_weighted_and_the_bootstrap_paired():
    challenger = evaluation(loss=per_prompt(CHAMPION, "loss") + noise(0.3))
    cfg = PromotionConfig(resamples=500, seed=3)
    verdict = gate(CHAMPION, challenger, cfg)
    nll_a, nll_b = per_prompt(CHAMPION, "nll"), per_prompt(challenger, "nll")
    tokens = per_prompt(CHAMPION, "response_tokens")
    assert verdict.improvement.estimate == pytest.approx((nll_a.sum() - nll_b.sum()) / tokens.sum())
    assert verdict.overall["champion"]["completion_loss"] == pytest.approx(nll_a.sum() / tokens.sum())
    # the same drawn prompts for both models: resample i's improvement is computed on one index set
    idx = np.random.default_rng(3).integers(0, N, size=(500, N))
    draws = (nll_a[idx].sum(1) - nll_b[idx].sum(1)) / tokens[idx].sum(1)
    expected = np.quantile(draws, [0.025, 0.975])
    assert (verdict.improvement.low, verdict.improvement.high) == pytest.approx(tuple(expected))


def test_identical_models_are_not_promoted():
    verdict = gate(CHAMPION, CHAMPION, PromotionConfig())
    assert not verdict.promote
    assert (verdict.improvement.estimate, verdict.improvement.low, verdict.improvement.high) == (0, 0, 0)
    assert "did not change" in verdict.reasons[0] and "not above the margin 0" in verdict.reasons[0]
    assert verdict.flips == ()


def test_an_equally_good_challenger_straddles_zero_and_is_not_promoted():
    challenger = evaluation(loss=per_prompt(CHAMPION, "loss") + noise(0.3, seed=11),
                            rouge=per_prompt(CHAMPION, "rouge_l_f1"))
    verdict = gate(CHAMPION, challenger, PromotionConfig())
    assert verdict.improvement.low < 0 < verdict.improvement.high
    assert not verdict.promote and "not above the margin" in verdict.reasons[0]


def test_a_better_challenger_that_ruins_one_category_is_blocked_naming_it():
    loss = per_prompt(CHAMPION, "loss") - 0.8
    closed = np.array([r["category"] == "closed_qa" for r in CHAMPION["rows"]])
    loss[closed] += 1.4  # 0.6 worse than the champion there
    verdict = gate(CHAMPION, evaluation(loss=loss, rouge=per_prompt(CHAMPION, "rouge_l_f1")), PromotionConfig())
    assert verdict.improvement.low > 0  # better overall ...
    assert not verdict.promote and verdict.blocked_categories == ["closed_qa"]  # ... but not everywhere
    (reason,) = [r for r in verdict.reasons if "closed_qa" in r]
    assert reason.startswith("category closed_qa (5 prompts): held-out loss rose by 0.600") and "margin 0.45" in reason
    (row,) = [c for c in verdict.categories if c.blocked]
    assert row.loss_change == pytest.approx(0.6) and row.reason == reason


def test_a_category_whose_rouge_l_falls_blocks_and_a_small_fall_does_not():
    open_qa = np.array([r["category"] == "open_qa" for r in CHAMPION["rows"]])
    better = per_prompt(CHAMPION, "loss") - 0.5

    def with_open_qa_rouge_falling_by(fall, **cfg):
        rouge = per_prompt(CHAMPION, "rouge_l_f1") - np.where(open_qa, fall, 0.0)
        return gate(CHAMPION, evaluation(loss=better, rouge=rouge), PromotionConfig(**cfg))

    verdict = with_open_qa_rouge_falling_by(0.25)
    assert not verdict.promote and verdict.blocked_categories == ["open_qa"]
    assert "category open_qa (5 prompts): ROUGE-L fell by 0.250" in verdict.reasons[1]
    assert "more than its margin 0.1" in verdict.reasons[1]
    assert with_open_qa_rouge_falling_by(0.05).promote
    assert with_open_qa_rouge_falling_by(0.25, category_rouge_margin=0.3).promote  # the margin is the config's


def test_rouge_l_as_the_primary_metric():
    rouge_better = evaluation(loss=per_prompt(CHAMPION, "loss"),
                              rouge=per_prompt(CHAMPION, "rouge_l_f1") + 0.2 + noise(0.02))
    by_rouge = gate(CHAMPION, rouge_better, PromotionConfig(primary_metric="rouge_l_f1"))
    assert by_rouge.promote and by_rouge.metric == "rouge_l_f1" and by_rouge.improvement.metric == "rouge_l_f1"
    assert by_rouge.improvement.estimate == pytest.approx(0.2, abs=0.02)
    assert by_rouge.reasons[0].startswith("ROUGE-L improved by 0.19")
    assert not gate(CHAMPION, rouge_better, PromotionConfig()).promote  # its loss did not improve
    # the margin is in the primary metric's units
    assert not gate(CHAMPION, rouge_better, PromotionConfig(primary_metric="rouge_l_f1", margin=0.25)).promote


def test_the_margin_must_be_cleared_by_the_lower_bound():
    challenger = evaluation(loss=per_prompt(CHAMPION, "loss") - 0.2 + noise(0.05))
    verdict = gate(CHAMPION, challenger, PromotionConfig())
    assert verdict.promote
    low = verdict.improvement.low
    assert not gate(CHAMPION, challenger, PromotionConfig(margin=low + 0.01)).promote
    assert gate(CHAMPION, challenger, PromotionConfig(margin=low - 0.01)).promote
    worse = evaluation(loss=per_prompt(CHAMPION, "loss") + 0.05 + noise(0.02))
    assert gate(CHAMPION, worse, PromotionConfig(margin=-0.2)).promote  # a negative margin tolerates a small loss


def test_the_same_seed_gives_the_same_verdict():
    challenger = evaluation(loss=per_prompt(CHAMPION, "loss") - 0.1 + noise(0.3))
    first = gate(CHAMPION, challenger, PromotionConfig(seed=5)).to_dict()
    assert gate(CHAMPION, challenger, PromotionConfig(seed=5)).to_dict() == first
    other = gate(CHAMPION, challenger, PromotionConfig(seed=6)).to_dict()
    assert other["improvement"]["estimate"] == first["improvement"]["estimate"]
    assert other["improvement"]["low"] != first["improvement"]["low"] and other["seed"] == 6


def test_prompts_that_differ_are_refused_naming_the_first():
    def changed(index, **fields):
        ev = evaluation(loss=per_prompt(CHAMPION, "loss"))
        ev["rows"][index].update(fields)
        return ev

    with pytest.raises(ValueError, match=r"prompt 3 differs: its instruction is 'Another\?' for the champion"):
        gate(changed(3, instruction="Another?"), changed(5, instruction="Else?"), PromotionConfig())
    with pytest.raises(ValueError, match="prompt 0 differs: its category"):
        gate(CHAMPION, changed(0, category="open_qa"), PromotionConfig())
    with pytest.raises(ValueError, match="prompt 2 differs: its reference"):
        gate(CHAMPION, changed(2, reference="Other."), PromotionConfig())
    reordered = evaluation()
    reordered["rows"][0], reordered["rows"][4] = reordered["rows"][4], reordered["rows"][0]
    with pytest.raises(ValueError, match="prompt 0 differs"):
        gate(CHAMPION, reordered, PromotionConfig())
    shorter = {"rows": CHAMPION["rows"][:-2]}
    with pytest.raises(ValueError, match=f"champion was evaluated on {N} prompts, the challenger on {N - 2}: "
                                         f"prompt {N - 2} .* is only the champion's"):
        gate(CHAMPION, shorter, PromotionConfig())
    with pytest.raises(ValueError, match=r"prompt 1 .* 99 reference tokens for the champion .*sequence_length"):
        gate(changed(1, response_tokens=99), CHAMPION, PromotionConfig())
    with pytest.raises(ValueError, match="no prompts"):
        gate({"rows": []}, {"rows": []}, PromotionConfig())
    with pytest.raises(ValueError, match="challenger's evaluation, prompt 0: missing nll"):
        gate(CHAMPION, {"rows": [{k: v for k, v in r.items() if k != "nll"} for r in CHAMPION["rows"]]},
             PromotionConfig())


def test_flips_list_the_prompts_that_got_worse_or_changed_how_they_end():
    loss, rouge = per_prompt(CHAMPION, "loss"), per_prompt(CHAMPION, "rouge_l_f1")
    eos = [True] * N
    new_loss, new_rouge, new_eos = loss - 0.05, rouge.copy(), list(eos)
    new_rouge[1] = rouge[1] - 0.3                    # fell by more than the threshold
    new_rouge[2] = rouge[2] - FLIP_ROUGE_DROP / 2     # a small fall is not a flip
    new_loss[3] = loss[3] + 0.5                      # loss rose
    new_loss[4] = loss[4] + FLIP_LOSS_RISE / 2       # a small rise is not a flip
    new_eos[5] = False                               # stopped ending with end-of-sequence
    eos[6], new_eos[6] = False, True                 # started
    new_loss[7], new_rouge[7], new_eos[7] = loss[7] + 1.0, rouge[7] - 0.2, False  # all at once
    before = evaluation(loss=loss, rouge=rouge, eos=eos)
    after = evaluation(loss=new_loss, rouge=new_rouge, eos=new_eos)
    flips = gate(before, after, PromotionConfig()).flips
    assert [(f.index, f.kind) for f in flips] == [
        (1, "rouge_fell"), (3, "loss_rose"), (5, "stopped_eos"), (6, "started_eos"),
        (7, "loss_rose"), (7, "rouge_fell"), (7, "stopped_eos")]
    by = {(f.index, f.kind): f for f in flips}
    assert (by[1, "rouge_fell"].before, by[1, "rouge_fell"].after) == pytest.approx((rouge[1], rouge[1] - 0.3))
    assert (by[3, "loss_rose"].before, by[3, "loss_rose"].after) == pytest.approx((loss[3], loss[3] + 0.5))
    assert (by[5, "stopped_eos"].before, by[5, "stopped_eos"].after) == (True, False)
    assert (by[6, "started_eos"].before, by[6, "started_eos"].after) == (False, True)
    assert by[1, "rouge_fell"].category == CATEGORIES[1] and by[1, "rouge_fell"].instruction == "Instruction number 1?"


def test_a_long_instruction_is_cut_in_a_flip():
    before, after = evaluation(), evaluation(eos=[True] * N)
    for ev in (before, after):
        ev["rows"][0]["instruction"] = "word " * 100
    (flip, *_) = gate(before, after, PromotionConfig()).flips
    assert len(flip.instruction) <= gate_module.INSTRUCTION_CHARS + 2 and flip.instruction.endswith("…")


def test_the_verdict_is_json_safe_even_without_tokens_in_a_category():
    tokens = [0 if i % len(CATEGORIES) == 0 else 20 for i in range(N)]  # brainstorming: no reference tokens
    before = evaluation(tokens=tokens)
    after = evaluation(tokens=tokens, loss=per_prompt(CHAMPION, "loss") - 0.3 + noise(0.05))
    verdict = gate(before, after, PromotionConfig())
    assert verdict.promote
    data = json.loads(json.dumps(verdict.to_dict(), allow_nan=False))
    (brainstorming,) = [c for c in data["categories"] if c["category"] == "brainstorming"]
    assert brainstorming["champion_loss"] is None and brainstorming["blocked"] is False
    assert data["promote"] is True and data["reasons"] == list(verdict.reasons)
    assert set(data["intervals"]) == {"completion_loss", "rouge_l_f1"}
    assert data["thresholds"] == {"category_loss_margin": 0.45, "category_rouge_margin": 0.1,
                                  "flip_rouge_drop": FLIP_ROUGE_DROP, "flip_loss_rise": FLIP_LOSS_RISE}


def test_a_challenger_with_a_non_finite_loss_is_not_promoted():
    after = evaluation(loss=per_prompt(CHAMPION, "loss") - 1.0)
    after["rows"][4]["nll"] = float("nan")
    verdict = gate(CHAMPION, after, PromotionConfig())
    assert not verdict.promote
    assert any("challenger's held-out loss on prompt 4" in r and "not a finite number" in r for r in verdict.reasons)
    assert "cannot be compared" in verdict.reasons[0]
    json.dumps(verdict.to_dict(), allow_nan=False)


def test_promotion_config_defaults_and_refusals():
    cfg = load_config().promotion
    assert (cfg.registry, cfg.primary_metric, cfg.margin, cfg.resamples, cfg.confidence, cfg.seed) == (
        "default", "completion_loss", 0.0, 2000, 0.95, 0)
    assert (cfg.require_approval, cfg.approval_timeout_s) == (False, 3600)
    assert load_config(overrides=["promotion.registry=nightly_2-b"]).promotion.registry == "nightly_2-b"
    for override, says in [("promotion.registry=Nightly", "promotion.registry"),
                           ("promotion.registry=-x", "promotion.registry"),
                           ("promotion.registry=a/b", "promotion.registry"),
                           ("promotion.primary_metric=bleu", "'completion_loss' or 'rouge_l_f1'"),
                           ("promotion.margin=.inf", "finite number"),
                           ("promotion.category_loss_margin=-0.1", "greater than or equal to 0"),
                           ("promotion.confidence=1", "less than 1"),
                           ("promotion.resamples=10", "greater than or equal to 100"),
                           ("promotion.approval_timeout_s=0", "greater than or equal to 1")]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_config(overrides=[override])
