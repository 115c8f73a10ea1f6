"""The report this project renders (gemma_core/report.py's report.html), opened in headless Chromium as
a user opens it (`gemma-lora report --open`): from a real tiny pipeline run, it renders with no
console error, the training-curve image loaded with a non-zero natural size, every table with its
rows, and a screenshot written under the test's temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.browser import DevToolsPage, chromium_or_skip, png_size
from tests.helpers.in_process import run_pipeline
from tests.helpers.tiny_config import tiny_pipeline_config


@pytest.mark.slow
def test_browser_report_html_renders_with_its_curve_and_tables(tiny_preset, tmp_path):
    chromium_or_skip()
    state, _ = run_pipeline(tiny_pipeline_config(tiny_preset, tmp_path / "runs"), str(tmp_path / "results"))
    assert state.is_completed(), state.message
    report = Path(state.result()["report_dir"]) / "report.html"
    with DevToolsPage(tmp_path / "browser") as page:
        page.open(report.resolve().as_uri())
        images = page.evaluate("[...document.images].map(i => ({alt: i.alt, complete: i.complete, "
                               "w: i.naturalWidth, h: i.naturalHeight}))")
        tables = page.evaluate("[...document.querySelectorAll('table')].map(t => ({rows: t.rows.length, "
                               "cells: [...t.rows].slice(1).map(r => r.cells.length), "
                               "caption: (t.previousElementSibling || {}).textContent || ''}))")
        title = page.evaluate("document.querySelector('h1') && document.querySelector('h1').textContent")
        shot = page.screenshot(tmp_path / "report.png")
        errors = page.errors()
    assert not errors, errors
    assert title and "report" in title.lower(), title
    curves = [i for i in images if "curve" in i["alt"].lower() or "loss" in i["alt"].lower()]
    assert curves, f"no training-curve image among {images}"
    for image in curves:
        assert image["complete"] and image["w"] > 0 and image["h"] > 0, image
    assert len(tables) >= 3, tables  # overall metrics, per category, side by side at least
    for table in tables:
        assert table["rows"] >= 2 and all(n > 0 for n in table["cells"]), table  # a header and rows
    width, height = png_size(shot)
    assert width == 1400 and height > 600 and shot.stat().st_size > 20_000, (width, height)
    print(f"\nscreenshot of report.html: {shot} ({width}x{height}); {len(tables)} tables, curve "
          f"{curves[0]['w']}x{curves[0]['h']}")
