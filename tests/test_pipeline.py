"""The Prefect pipeline on a tiny random Gemma: caching across runs, exactly the right stages rerun
after a config change, resume at a failed stage, the report and its artifacts.

Every state asserted here is read back from the Prefect API, not from the flow's own summary.
The module's warm run (one output root and result storage) is shared by the tests that change
one config field each; each such change is unique, and a change that trains another challenger
records its promotion in a registry of its own, so the tests do not depend on their order.
"""

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tasks.stages import PIPELINE_STAGES as STAGES
from tests.helpers.in_process import run_pipeline
from tests.helpers.tiny_config import tiny_pipeline_config as tiny_config

ALL_CACHED = dict.fromkeys(STAGES, "Cached")


def expect(**states):
    """Stage -> expected state; stages not named are expected Cached."""
    out = dict(ALL_CACHED)
    out.update({k.replace("_", "-"): v for k, v in states.items()})
    return out


@pytest.fixture(scope="module")
def warm(tiny_preset, tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    storage = str(root / "results")
    cfg = tiny_config(tiny_preset, root / "runs")
    state, states = run_pipeline(cfg, storage)
    assert state.is_completed(), state.message
    return {"cfg": cfg, "storage": storage, "root": root, "first": states, "summary": state.result(),
            "preset": tiny_preset}


def test_flow_completes_and_writes_the_report(warm):
    assert warm["first"] == dict.fromkeys(STAGES, "Completed")
    summary = warm["summary"]
    # the flow's own record agrees with the API; the first run's challenger beats the base model
    assert {k: v for k, v in summary["states"].items() if k in STAGES} == warm["first"]
    assert summary["states"]["promote"] == "Completed" and summary["promotion"]["promoted"] is True
    report_dir = Path(summary["report_dir"])
    for name in ("report.md", "report.html", "metrics.json", "training_curve.png"):
        assert (report_dir / name).is_file()
    latest = json.loads((Path(warm["cfg"]["output"]["root"]) / "reports" / "latest.json").read_text())
    assert latest["report_dir"] == summary["report_dir"] and latest["flow_run_id"] == summary["flow_run_id"]
    train = summary["results"]["train"]
    assert train["steps"] == 4 and Path(train["out_dir"], "adapter.lora.h5").is_file()
    # outputs live in directories named by their content/input hash
    assert Path(train["out_dir"]).name.startswith("train-") and report_dir.name.startswith("report-")


def test_rerun_with_nothing_changed_is_all_cached(warm):
    state, states = run_pipeline(warm["cfg"], warm["storage"])
    assert state.is_completed() and states == ALL_CACHED
    assert state.result()["report_dir"] == warm["summary"]["report_dir"]


def test_learning_rate_reruns_training_and_what_follows(warm):
    cfg = tiny_config(warm["preset"], warm["cfg"]["output"]["root"], train__learning_rate=1e-3,
                      promotion__registry="lr")
    state, states = run_pipeline(cfg, warm["storage"])
    assert states == expect(train_lora="Completed", evaluate_tuned="Completed", gate="Completed", render_report="Completed")
    assert state.result()["results"]["train"]["out_dir"] != warm["summary"]["results"]["train"]["out_dir"]


def test_num_prompts_reruns_generation_evaluation_and_report(warm):
    cfg = tiny_config(warm["preset"], warm["cfg"]["output"]["root"], evaluation__num_prompts=3,
                      promotion__registry="prompts")
    state, states = run_pipeline(cfg, warm["storage"])
    assert states == expect(evaluate_base="Completed", evaluate_tuned="Completed", gate="Completed", render_report="Completed")
    assert state.result()["num_prompts"] == 3


def test_side_by_side_count_reruns_only_the_report(warm):
    cfg = tiny_config(warm["preset"], warm["cfg"]["output"]["root"], evaluation__num_side_by_side=1)
    _, states = run_pipeline(cfg, warm["storage"])
    assert states == expect(render_report="Completed")


def test_checkpoint_frequency_is_not_part_of_the_training_key(warm):
    cfg = tiny_config(warm["preset"], warm["cfg"]["output"]["root"], train__checkpoint_every=3)
    _, states = run_pipeline(cfg, warm["storage"])
    assert states["train-lora"] == "Cached"


def test_data_change_reruns_every_stage_that_reads_the_data(warm):
    cfg = tiny_config(warm["preset"], warm["cfg"]["output"]["root"], data__seed=7, promotion__registry="data")
    _, states = run_pipeline(cfg, warm["storage"])
    # everything reruns; the model does not depend on the data, so its stage stays Cached
    assert states == expect(prepare_data="Completed", evaluate_base="Completed", train_lora="Completed",
                            evaluate_tuned="Completed", gate="Completed", render_report="Completed")


def test_report_holds_every_section_and_artifacts_are_published(warm):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from gemma_core.report import REPORT_SECTIONS

    report_dir = Path(warm["summary"]["report_dir"])
    markdown = (report_dir / "report.md").read_text()
    html = (report_dir / "report.html").read_text()
    for section in REPORT_SECTIONS:
        assert f"## {section}" in markdown and f"<h2>{section}</h2>" in html
    assert "data:image/png;base64," in html and "training_curve.png" in markdown
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert len(metrics["prompts"]) == 4 and set(metrics["overall"]) >= {"completion_loss", "rouge_l_f1", "eos_rate"}
    manifest = metrics["manifest"]
    assert manifest["model"]["spec"] == str(warm["preset"]) and manifest["data"]["is_sample"] is True
    assert set(manifest["stage_seconds"]) == set(STAGES) - {"gate", "render-report"} and manifest["peak_memory_mb"] > 0
    assert "## Promotion gate" in markdown and metrics["gate"]["promote"] is True
    assert manifest["versions"]["keras"] and manifest["config"]["train"]["max_steps"] == 4
    assert manifest["training_tokens_per_second"] is None or manifest["training_tokens_per_second"] > 0

    with get_client(sync_client=True) as client:
        def by_key(key):
            return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

        reports = by_key("gemma-lora-report")
        table = by_key("gemma-lora-prompts")
        gate = by_key("gemma-lora-gate")
        progress = by_key("lora-training") + by_key("generation-base") + by_key("generation-tuned")
    assert reports and all(a.type == "markdown" for a in reports)
    assert any("data:image/png;base64," in a.data for a in reports)  # the curve travels inside the artifact
    assert table and len(json.loads(table[0].data)) >= 3  # one row per prompt
    assert gate and "Verdict: promote the challenger" in gate[-1].data
    assert progress and all(a.type == "progress" for a in progress)
    assert any(a.data == 100.0 for a in progress)


def test_cli_report_and_export_use_the_last_run(warm, capsys):
    from flows.cli import main

    root = warm["cfg"]["output"]["root"]
    assert main(["report", "--set", f"output.root={root}"]) == 0
    assert "## Overall metrics" in capsys.readouterr().out
    assert main(["report", "--format", "json", "--set", f"output.root={root}"]) == 0
    assert json.loads(capsys.readouterr().out)["num_prompts"] >= 1
    assert main(["export", "--set", f"output.root={root}"]) == 0
    lines = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines() if line.strip())
    assert set(lines) == {"adapter", "keras_preset", "transformers"}
    assert Path(lines["adapter"]).is_file() and (Path(lines["transformers"]) / "config.json").is_file()


def test_failure_at_each_stage_resumes_there(tiny_preset, tmp_path, monkeypatch):
    """A failure injected at each stage in turn: each rerun starts at the stage that failed (earlier
    ones Cached) and fails at the next; training fails mid-run and continues from its checkpoint.
    Results persist to an fsspec URL (memory://) here, to show any fsspec storage works."""
    cfg = tiny_config(tiny_preset, tmp_path / "runs")
    storage = f"memory://gemma-lora-test-{uuid.uuid4().hex}"
    plan = [*STAGES[:3], "train-lora:3", *STAGES[4:], None]
    for i, fail_at in enumerate(plan):
        state, states = run_pipeline(cfg, storage, monkeypatch, fail_at)
        failed_stage = fail_at.split(":")[0] if fail_at else None
        previous = plan[i - 1].split(":")[0] if i else None
        for stage in STAGES:
            position, fail_pos = STAGES.index(stage), STAGES.index(failed_stage) if failed_stage else len(STAGES)
            if position > fail_pos:
                assert stage not in states, f"{stage} ran after the failure at {failed_stage}"
            elif stage == failed_stage:
                assert states[stage] == "Failed", (fail_at, states)
            elif stage == previous:
                assert states[stage] == "Completed", (fail_at, stage, states)
            else:
                assert states[stage] == "Cached", (fail_at, stage, states)
        assert state.is_failed() == bool(fail_at)
    summary = state.result()
    log = [json.loads(line) for line in Path(summary["results"]["train"]["out_dir"], "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert summary["results"]["train"]["resumed_from_step"] == 2  # checkpoint of step 2; step 3 had failed
    state, states = run_pipeline(cfg, storage, monkeypatch)
    assert states == ALL_CACHED


def test_changed_or_missing_outputs_are_rebuilt_not_trusted(warm):
    root = Path(warm["cfg"]["output"]["root"])
    results = warm["summary"]["results"]
    # a corrupted data file: the data stage rebuilds the same bytes, so nothing downstream reruns
    train_parquet = Path(results["data"]["files"]["train"]["path"])
    train_parquet.write_bytes(train_parquet.read_bytes()[:-10] + b"corrupted!")
    _, states = run_pipeline(warm["cfg"], warm["storage"])
    assert states == expect(prepare_data="Completed")
    # a deleted adapter: training reruns (from its final checkpoint, without new steps)
    adapter = Path(results["train"]["out_dir"]) / "adapter.lora.h5"
    adapter.unlink()
    state, states = run_pipeline(warm["cfg"], warm["storage"])
    assert states["train-lora"] == "Completed" and adapter.is_file()
    assert state.result()["results"]["train"]["resumed_from_step"] == 4
    assert all(states[s] == "Cached" for s in ("prepare-data", "resolve-model", "evaluate-base"))
    assert (root / "reports" / "latest.json").is_file()


def test_cache_keys_include_the_gemma_core_sources(tmp_path):
    """TASK_SOURCE alone misses an edited gemma_core helper: the key's code hash must not."""
    import gemma_core
    import tasks

    repo = Path(gemma_core.__file__).parent.parent
    for package in (gemma_core, tasks):
        shutil_copy(Path(package.__file__).parent, tmp_path / package.__name__)
    probe = "from tasks.caching import code_hash; print(code_hash())"

    def hash_of(root):
        return subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True,
                              check=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin",
                                               "PREFECT_HOME": str(tmp_path / "home")}).stdout.strip()

    before = hash_of(tmp_path)
    assert before == hash_of(repo)
    helper = tmp_path / "gemma_core" / "encoding.py"
    helper.write_text(helper.read_text() + "\n# an edited helper\n")
    assert hash_of(tmp_path) != before


def shutil_copy(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
