"""What a user sees of the deployment stack (tests/helpers/stack.py) in the Prefect UI, in headless
Chromium: the finished run's page, its report artifact and the deployment's run form. Skipped
without chromium, except under CI (tests/helpers/browser.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.browser import chromium_cli as chromium
from tests.helpers.browser import chromium_or_skip

pytest_plugins = ["tests.helpers.stack"]  # the session's one stack, shared with test_deployment_stack.py


@pytest.fixture
def browser():
    """Checked before the stack starts: no chromium skips at once (fails under CI)."""
    return chromium_or_skip()


@pytest.mark.slow
def test_browser_the_ui_shows_the_finished_run_and_its_report(browser, stack, two_runs, tmp_path):
    """What a user sees: the run's page, the report artifact and the deployment's run form (every
    config field), in headless Chromium. Screenshots go
    to $GEMMA_LORA_SCREENSHOT_DIR (else this test's temporary directory); their paths are printed."""
    shots = Path(os.environ.get("GEMMA_LORA_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    ui = stack.api.removesuffix("/api")
    run = two_runs["runs"][0]
    (report,) = [a for a in stack.post("/artifacts/filter", {"artifacts": {"key": {"any_": ["gemma-lora-report"]}}})
                 if a["flow_run_id"] == run["id"]]
    from gemma_core.config import PipelineConfig

    form_titles = [field.title or name.replace("_", " ").title()
                   for section in PipelineConfig.model_fields.values()
                   for name, field in getattr(section.annotation, "model_fields", {}).items()]
    pages = {"flow-run": (f"{ui}/runs/flow-run/{run['id']}", [run["name"], "Completed", "render-report"]),
             "report": (f"{ui}/artifacts/artifact/{report['id']}", ["LoRA fine-tuning report", "Overall metrics"]),
             "run-form": (f"{ui}/deployments/deployment/{two_runs['pipeline']['id']}/run", form_titles)}
    for name, (url, expected) in pages.items():
        dom = chromium(url, shots / f"{name}.png", tmp_path, screenshot=False)
        for text in expected:
            assert text in dom, f"{name} page ({url}) does not show {text!r}"
        chromium(url, shots / f"{name}.png", tmp_path, screenshot=True)
        assert (shots / f"{name}.png").stat().st_size > 20_000
        print(f"\nscreenshot of the {name} page: {shots / f'{name}.png'}")
