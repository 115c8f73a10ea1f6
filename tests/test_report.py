"""The comparison report's pure rendering: every section, in Markdown, standalone HTML and metrics.json."""

import base64
import html
import json
import math
import re
from html.parser import HTMLParser

import pytest

from gemma_core.report import (
    METRICS,
    REPORT_SECTIONS,
    VALUE_CHARS,
    Details,
    Image,
    Table,
    build_report,
    curve_caption,
    library_versions,
    render_html,
    render_markdown,
    sections,
    sparkline,
    training_curve_png,
    write_report,
)


def _row(category, instruction, answer, rouge, ended=True):
    return {"category": category, "instruction": instruction, "reference": "ref | with pipe\nand newline",
            "answer": answer, "rouge_l_f1": rouge, "ended_with_eos": ended, "new_tokens": len(answer.split()) + 1,
            "nll": 10.0, "response_tokens": 5}


def _eval(answers, rouge, loss):
    rows = [_row("open_qa", "What is <b>red</b>?", answers[0], rouge), _row("closed_qa", "Who wrote it?", answers[1], rouge, False)]
    summary = {"examples": 2, "completion_loss": loss, "perplexity": math.exp(loss), "rouge_l_f1": rouge,
               "eos_rate": 0.5, "mean_answer_tokens": 3.0}
    return {"overall": summary, "per_category": {"open_qa": {**summary, "examples": 1}, "closed_qa": {**summary, "examples": 1}},
            "rows": rows, "generation_seconds": 2.0, "new_tokens_per_second": 3.0}


MANIFEST = {
    "model": {"spec": "embedded:gemma3-270m", "content_hash": "abc"},
    "data": {"source": "sample", "content_hash": "d1", "is_sample": True, "counts": {"train": 96, "eval": 20}},
    "config": {"train": {"learning_rate": 3e-4}},
    "versions": {"keras": "3"},
    "stage_seconds": {"prepare_data": 0.5, "train": 100.0},
    "training_tokens_per_second": 123.4,
    "peak_memory_mb": 2048.0,
}


@pytest.fixture
def report():
    base = _eval(["It is a colour.", "Ann"], 0.2, 3.0)
    tuned = _eval(["Red is a colour.", "Ann wrote it."], 0.4, float("nan"))
    training = {"losses": [3.0, 2.5, 2.0, 1.8, 1.7, 1.6, 1.5, 1.5, 1.4], "steps": 9, "learning_rate": 3e-4}
    return build_report(base, tuned, training, MANIFEST, num_side_by_side=1)


def test_metrics_compare_base_and_tuned(report):
    m = report.metrics
    assert set(m["overall"]) == set(METRICS)
    rouge = m["overall"]["rouge_l_f1"]
    assert (rouge["base"], rouge["tuned"]) == (0.2, 0.4) and rouge["change"] == pytest.approx(0.2)
    assert m["overall"]["completion_loss"]["tuned"] is None  # NaN is not valid JSON: it becomes null
    assert set(m["per_category"]) == {"open_qa", "closed_qa"} and m["per_category"]["open_qa"]["examples"] == 1
    assert m["answers_changed"] == 2 and m["num_prompts"] == 2 and len(m["prompts"]) == 2
    assert len(report.side_by_side) == 1  # num_side_by_side


def test_markdown_holds_every_section(report):
    md = render_markdown(report, "training_curve.png")
    for section in REPORT_SECTIONS:
        assert f"## {section}" in md
    assert "![training loss per step](training_curve.png)" in md
    assert "held-out loss" in md and "ROUGE-L F1" in md and "end-of-sequence rate" in md
    assert "It is a colour." in md and "Red is a colour." in md  # side by side
    assert "Ann wrote it." not in md  # only num_side_by_side prompts are shown
    assert "ref \\| with pipe<br>and newline" in md  # table cells stay one row
    assert "embedded:gemma3-270m" in md and "stage_seconds.train" in md and "peak_memory_mb" in md
    assert "offline sample" in md  # the report says when the sample was used
    assert "+0.200 ✓" in md


def test_html_is_standalone_with_the_curve_embedded(report):
    png = training_curve_png(report.losses)
    page = render_html(report, png)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for section in REPORT_SECTIONS:
        assert f"<h2>{section}</h2>" in page
    assert base64.b64encode(png).decode() in page
    assert "What is &lt;b&gt;red&lt;/b&gt;?" in page  # escaped, not interpreted
    assert "http://" not in page and "https://" not in page and 'src="' in page


def _drawn(md, page):
    """Each section's title with its Markdown and HTML text, in page order."""
    md_parts = [part.split("\n", 1) for part in md.split("\n## ")[1:]]
    html_parts = [part.split("</h2>", 1) for part in page.split("<h2>")[1:]]
    return [(t1, m, t2, h) for (t1, m), (t2, h) in zip(md_parts, html_parts, strict=True)]


def _shown(text):
    """The start of a cell's text up to the first character a renderer escapes."""
    return re.split(r"[|<>&\\\n]", text)[0]


@pytest.mark.parametrize("num_side_by_side", [0, 2])
def test_markdown_and_html_draw_the_same_sections_and_rows(num_side_by_side):
    base, tuned = _eval(["It is a colour.", "Ann"], 0.2, 3.0), _eval(["Red | <i>x</i>\nok", ""], 0.4, 2.0)
    report = build_report(base, tuned, {"losses": [3.0, 2.0]}, MANIFEST, num_side_by_side)
    drawn = sections(report)
    parts = _drawn(render_markdown(report, "c.png"), render_html(report, b"png"))
    assert [s.title for s in drawn] == [t for t, _, _, _ in parts] == [t for _, _, t, _ in parts] == list(REPORT_SECTIONS)
    for section, (_, md, _, page) in zip(drawn, parts):
        tables = [block for block in section.blocks if isinstance(block, Table)]
        assert sum(line.startswith("| ---") for line in md.splitlines()) == page.count("<table>") == len(tables)
        md_rows = [line for line in md.splitlines() if line.startswith("| ")]
        html_rows = page.split("<tr>")[1:]
        assert len(md_rows) == sum(len(t.rows) + 2 for t in tables)  # header and alignment rows
        assert len(html_rows) == sum(len(t.rows) + 1 for t in tables)  # header row
        for table in tables:
            assert [c for c in md_rows[0][2:-2].split(" | ")] == list(table.columns)
            assert all(f"<th>{html.escape(c)}</th>" in html_rows[0] for c in table.columns)
            for row, md_row, html_row in zip(table.rows, md_rows[2:], html_rows[1:], strict=True):
                for cell in row:
                    assert _shown(cell.text) in md_row and html.escape(_shown(cell.text)) in html_row, (section.title, cell)
                    for extra in (cell.change, *cell.remarks):
                        assert extra is None or (extra in md_row and html.escape(extra) in html_row)
                    if cell.direction:
                        assert f'<span class="{cell.direction}">{html.escape(cell.change)}</span>' in html_row
        for block in section.blocks:
            if isinstance(block, tuple):  # a paragraph
                assert all(part in md and html.escape(part) in page for part in block)
            elif isinstance(block, Image):
                assert f"![{block.alt}](c.png)" in md and f'<img alt="{block.alt}" src="data:image/png;base64,' in page
            elif isinstance(block, Details):
                assert block.text in md and f"<pre>{html.escape(block.text)}</pre>" in page
    answers = drawn[2].blocks
    if num_side_by_side == 0:
        assert answers == (("(none requested: evaluation.num_side_by_side = 0)",),)
    else:
        assert len(answers[0].rows) == 2 and answers[0].rows[1][5].remarks == ("empty", "cut at max_new_tokens")


def test_both_renderers_escape_and_cut_the_same():
    base = _eval(["a", "b"], 0.2, 3.0)
    base["per_category"]["<b>qa|x</b>"] = base["per_category"].pop("open_qa")
    manifest = {**MANIFEST, "notes<i>": "v" * 1000}
    report = build_report(base, _eval(["a", "b"], 0.4, 2.0), {"losses": [1.0]}, manifest, 2)
    md, page = render_markdown(report, None), render_html(report, None)
    assert "| &lt;b&gt;qa\\|x&lt;/b&gt; |" in md and "<td>&lt;b&gt;qa|x&lt;/b&gt;</td>" in page
    assert "| notes&lt;i&gt; |" in md and "<td>notes&lt;i&gt;</td>" in page
    cut = "v" * VALUE_CHARS + " …"
    assert f"| {cut} |" in md and f"<td>{cut}</td>" in page and "v" * (VALUE_CHARS + 1) not in md + page
    assert f"`{sparkline([1.0])}` 1 steps" in md and f"<code>{sparkline([1.0])}</code> 1 steps" in page
    assert "<img" not in page and "![" not in md  # no curve given: no image


def test_a_diverged_training_log_is_drawn_without_its_nan():
    losses = [3.0, 2.0, float("nan"), 1.5, float("inf"), 1.0]
    assert sparkline(losses) == sparkline([3.0, 2.0, 1.5, 1.0]) and len(sparkline(losses)) == 4
    assert sparkline([float("nan")]) == ""
    caption = curve_caption(losses)
    assert "nan" not in caption and "inf" not in caption
    assert caption == "6 steps (2 not finite, left out); mean loss 3.000 over step 1 → 1.000 over step 6"
    assert curve_caption([float("nan")] * 3) == "3 steps (3 not finite, left out)"
    assert curve_caption([3.0, 2.0, 1.0, 1.0]) == "4 steps; mean loss 3.000 over step 1 → 1.000 over step 4"
    assert training_curve_png(losses)[:8] == b"\x89PNG\r\n\x1a\n"
    assert training_curve_png([float("nan")])[:8] == b"\x89PNG\r\n\x1a\n"
    report = build_report(_eval(["a", "b"], 0.2, 3.0), _eval(["a", "c"], 0.4, 2.0), {"losses": losses}, MANIFEST, 1)
    md, page = render_markdown(report, "c.png"), render_html(report, training_curve_png(report.losses))
    assert caption in md and caption in page and "nan" not in md.lower()


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.open, self.rows = [], []

    def handle_starttag(self, tag, attrs):
        if tag in ("html", "head", "body", "table", "tr", "td", "th", "p", "h1", "h2", "code", "span", "em",
                   "details", "summary", "pre", "style", "title"):
            self.open.append(tag)
        if tag == "table":
            self.rows.append(0)
        if tag == "tr":
            self.rows[-1] += 1

    def handle_endtag(self, tag):
        assert self.open and self.open.pop() == tag, (tag, self.open)


def test_html_parses_with_balanced_tags_and_every_table_has_rows(report):
    parser = _Tables()
    parser.feed(render_html(report, training_curve_png(report.losses)))
    parser.close()
    assert parser.open == [] and len(parser.rows) == 4 and all(n >= 2 for n in parser.rows)


def test_write_report_files(report, tmp_path):
    paths = write_report(report, tmp_path / "r")
    assert {p.name for p in paths.values()} == {"report.md", "report.html", "metrics.json", "training_curve.png"}
    metrics = json.loads(paths["metrics"].read_text())  # strict JSON: NaN became null
    assert metrics["training"]["losses"][0] == 3.0 and metrics["manifest"]["model"]["spec"] == "embedded:gemma3-270m"
    assert paths["training_curve"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # same input, same bytes: a rerun does not churn the files
    assert training_curve_png(report.losses) == training_curve_png(report.losses)


def test_mismatched_prompts_are_refused():
    base = _eval(["a", "b"], 0.1, 1.0)
    tuned = _eval(["a", "b"], 0.1, 1.0)
    tuned["rows"][1]["instruction"] = "something else"
    with pytest.raises(ValueError, match="same prompts"):
        build_report(base, tuned, {"losses": []}, MANIFEST, 2)


def test_small_helpers():
    assert sparkline([]) == "" and len(sparkline(list(range(100)), width=20)) == 20
    assert sparkline([1, 1]) == "▄▄" and sparkline([3, 2, 1]) == "█▅▁"
    versions = library_versions()
    assert versions["keras"] != "not installed" and "python" in versions
    empty = build_report(_eval(["a", "b"], 0.1, 1.0), _eval(["a", "b"], 0.1, 1.0), {"losses": []}, {}, 0)
    md = render_markdown(empty, None)
    assert "no training steps" in md and "none requested" in md and "exactly as the base model" in md
