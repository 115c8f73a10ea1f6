"""Retraining that decides, end to end on the tiny random Gemma (Prefect embedded): the first run promotes
over the base model, an unchanged rerun promotes nothing new, a worse challenger is rejected with the
reason and the prompts that flipped, a two-point sweep trains both points on one baseline and picks the
better one, and a rollback makes the next run promote again. Nothing of Prefect or Keras is mocked.

Each test has its own registry (``promotion.registry``) in one shared output root, so they share the
cached data, model and baseline but not each other's champions.
"""

import json
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.variables import Variable

from gemma_core.registry import Registry
from tests.helpers.in_process import run_pipeline
from tests.helpers.tiny_config import tiny_pipeline_config


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("promotion")


def pipeline(tiny_preset, root, **overrides):
    cfg = tiny_pipeline_config(tiny_preset, root / "runs", **overrides)
    state, api_states = run_pipeline(cfg, str(root / "results"))
    assert state.is_completed(), state.message
    return state.result(), api_states


def metrics_of(summary):
    return json.loads((Path(summary["report_dir"]) / "metrics.json").read_text())


def test_first_run_promotes_over_the_base_model_and_a_rerun_promotes_nothing(tiny_preset, root):
    first, _ = pipeline(tiny_preset, root, promotion__registry="first")
    assert first["gate"]["promote"] and first["promotion"]["promoted"] and first["promotion"]["sequence"] == 1
    champion = Registry(root / "runs", "first").champion()
    assert champion.adapter_sha256 == first["results"]["train"]["files"]["adapter"]["sha256"]
    assert champion.promoted_by == "gate" and champion.run_id == first["flow_run_id"]
    assert Path(champion.adapter).is_file() and "registry" in champion.adapter  # the registry's own copy
    mirrored = Variable.get("gemma-lora-champion-first")  # what a deployment or another flow reads
    assert mirrored["sequence"] == 1 and mirrored["adapter_sha256"] == champion.adapter_sha256
    with get_client(sync_client=True) as client:
        log = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["gemma-lora-champion-first"])))
    assert log and "record 1" in log[0].data  # the keyed artifact's history is the promotion log

    again, states = pipeline(tiny_preset, root, promotion__registry="first")
    assert set(states.values()) == {"Cached"}, states  # the gate too: it meets the same opponent again
    assert again["promotion"] == {"promoted": False, "sequence": 1,
                                  "why": "the challenger already is the champion (record 1)"}
    assert len(Registry(root / "runs", "first").history()) == 1


def test_a_worse_challenger_is_rejected_with_the_reason_and_the_flipped_prompts(tiny_preset, root):
    # The champion trained long enough to learn something; the challenger is the short default run.
    strong, _ = pipeline(tiny_preset, root, promotion__registry="worse", train__max_steps=40, train__epochs=10,
                         train__learning_rate=0.3, lora__rank=16,
                         lora__target_layer_names=["query", "key", "value", "attention_output"])
    assert strong["promotion"]["promoted"]
    # The tiny model's losses move by hundredths, not tenths: list a prompt as got worse at 0.02.
    worse, _ = pipeline(tiny_preset, root, promotion__registry="worse", promotion__flip_loss_rise=0.02)
    assert not worse["gate"]["promote"] and not worse["promotion"]["promoted"]
    assert worse["champion"]["sequence"] == 1 and len(Registry(root / "runs", "worse").history()) == 1
    gate = metrics_of(worse)["gate"]
    assert gate["improvement"]["high"] < 0, gate["improvement"]  # worse, and surely so
    assert any("held-out loss" in reason for reason in gate["reasons"])
    assert gate["flips"] and {f["kind"] for f in gate["flips"]} & {"loss_rose", "rouge_fell"}
    report = (Path(worse["report_dir"]) / "report.md").read_text()
    assert "## Promotion gate" in report and "Verdict: keep the champion" in report
    assert "got worse" in report  # the flipped prompts, listed


def test_a_two_point_sweep_trains_both_on_one_baseline_and_picks_the_better(tiny_preset, root):
    pipeline(tiny_preset, root, promotion__registry="sweep")  # the baseline is Cached below
    summary, api_states = pipeline(tiny_preset, root, promotion__registry="sweep",
                                   sweep__train={"learning_rate": [5e-4, 1e-2]})
    assert api_states["evaluate-base"] == "Cached" and api_states["prepare-data"] == "Cached"
    points = summary["leaderboard"]
    assert [p["label"] for p in points] == ["lr=0.0005", "lr=0.01"]
    assert summary["states"]["train-lora[lr=0.0005]"] == "Cached"  # the default point was trained before
    assert summary["states"]["train-lora[lr=0.01]"] == "Completed"
    losses = [p["overall"]["completion_loss"] for p in points]
    best = losses.index(min(losses))
    assert points[best]["role"].startswith("challenger") and not points[1 - best]["role"]
    assert summary["results"]["train"]["files"]["adapter"]["sha256"] == points[best]["adapter_sha256"]
    report = (Path(summary["report_dir"]) / "report.md").read_text()
    assert "## Leaderboard" in report and "lr=0.01" in report
    assert len(metrics_of(summary)["leaderboard"]) == 2


def test_rollback_restores_the_previous_champion_and_the_next_run_promotes_again(tiny_preset, root):
    from flows.cli import main

    first, _ = pipeline(tiny_preset, root, promotion__registry="rollback")
    registry = Registry(root / "runs", "rollback")
    assert registry.champion().sequence == 1
    assert main(["rollback", "--name", "rollback", "--set", f"output.root={root / 'runs'}"]) == 0
    assert registry.champion().is_base_model and registry.champion().sequence == 2
    again, _ = pipeline(tiny_preset, root, promotion__registry="rollback")
    assert again["promotion"]["promoted"] and again["promotion"]["sequence"] == 3
    assert registry.champion().adapter_sha256 == first["results"]["train"]["files"]["adapter"]["sha256"]


def test_an_approval_not_given_in_time_is_a_rejection(tiny_preset, root):
    summary, _ = pipeline(tiny_preset, root, promotion__registry="timeout", promotion__require_approval=True,
                          promotion__approval_timeout_s=2)
    assert summary["gate"]["promote"]
    assert summary["promotion"] == {"promoted": False, "sequence": None, "why": "no approval within 2 s: rejected"}
    assert Registry(root / "runs", "timeout").champion() is None


def test_a_promotion_whose_champion_changed_meanwhile_is_refused_with_the_reason(tiny_preset, root):
    """Two runs gated against the same champion: the second to promote finds the token moved."""
    from tasks.promotion import GateResult, promote_challenger, read_champion
    from tasks.results import DataResult, EvalResult, ModelResult, ReportResult, TrainOutput

    summary, _ = pipeline(tiny_preset, root, promotion__registry="race")
    found = read_champion(str(root / "runs"), "race", summary["results"]["model"]["model_hash"])
    stale = found.model_copy(update={"token": ""})  # as a run that read the champion before the promotion
    results = summary["results"]
    promotion = promote_challenger.fn(
        stale, GateResult(stage="gate", fingerprint="f", files={}, seconds=0, peak_rss_mb=0, promote=True,
                          reasons=["better"], champion_adapter_sha256=None, challenger_adapter_sha256="x"),
        TrainOutput.model_validate(results["train"]),
        EvalResult(stage="evaluate-tuned", fingerprint="f", files={}, seconds=0, peak_rss_mb=0, adapter_sha256="x",
                   overall=summary["tuned"], num_prompts=4),
        ModelResult.model_validate(results["model"]), DataResult.model_validate(results["data"]),
        ReportResult.model_validate(results["report"]), summary["config"], "another-run",
    )
    assert not promotion.promoted and "the champion changed while this run was gating" in promotion.why
    assert len(Registry(root / "runs", "race").history()) == 1
