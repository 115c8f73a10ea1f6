"""The comparison report: base vs tuned model on the same held-out prompts, rendered three ways.

Pure rendering, no orchestration: :func:`build_report` computes every number (``metrics.json``) from
the two ``EvalReport.to_dict()`` results, the training log and a run manifest; :func:`sections` turns
the report into its sections as plain data (a title and blocks: tables, paragraphs, the curve image,
a collapsed JSON block); :func:`render_markdown` (the Prefect artifact and ``report.md``) and
:func:`render_html` (a standalone page, the curve embedded as a base64 PNG) only draw those blocks.

>>> report = build_report(base_eval, tuned_eval, training, manifest, num_side_by_side=6)  # doctest: +SKIP
>>> [s.title for s in sections(report)] == list(REPORT_SECTIONS)                        # doctest: +SKIP
True
>>> sorted(write_report(report, "runs/reports/report-abc"))                              # doctest: +SKIP
['html', 'markdown', 'metrics', 'training_curve']
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from gemma_core.atomic import atomic_write_bytes, atomic_write_text
from gemma_core.redact import redact
from gemma_core.endings import ended_by
from gemma_core.formatting import finite_or_none, format_metric, json_safe, truncate

# metric key -> (label, which direction is better: +1 higher, -1 lower, 0 neither)
METRICS: dict[str, tuple[str, int]] = {
    "completion_loss": ("held-out loss", -1),
    "perplexity": ("perplexity", -1),
    "rouge_l_f1": ("ROUGE-L F1", +1),
    "eos_rate": ("end-of-sequence rate (<eos>)", +1),
    "end_of_turn_rate": ("end-of-turn rate (<end_of_turn>)", +1),
    "mean_answer_tokens": ("answer length (tokens)", 0),
}
REPORT_SECTIONS = ("Overall metrics", "Per category", "Side-by-side answers", "Training curve", "Run manifest")
TITLE = "LoRA fine-tuning report: base vs tuned"
LIBRARIES = ("keras", "keras-hub", "jax", "tensorflow", "prefect", "numpy", "pandas")
ANSWER_CHARS = 600  # prompts, references and answers are cut to this in the report (metrics.json keeps all)
VALUE_CHARS = 300  # and manifest values to this


@dataclass(frozen=True)
class Report:
    """Everything the renderers need; ``metrics`` is exactly what ``metrics.json`` holds."""

    metrics: dict[str, Any]
    losses: list[float]
    side_by_side: list[dict[str, Any]]
    manifest: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    extra: tuple["Section", ...] = ()  # drawn after the overall metrics: the gate and the leaderboard


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def compare(base: dict[str, float], tuned: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """Per metric: base, tuned and the change (tuned - base)."""
    out = {}
    for key in METRICS:
        b, t = finite_or_none(base.get(key)), finite_or_none(tuned.get(key))
        out[key] = {"base": b, "tuned": t, "change": None if b is None or t is None else t - b}
    return out


def prompt_rows(base_eval: dict[str, Any], tuned_eval: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per held-out prompt: the reference, both answers and their scores."""
    if len(base_eval["rows"]) != len(tuned_eval["rows"]):
        raise ValueError(f"the base evaluation has {len(base_eval['rows'])} prompts and the tuned one "
                         f"{len(tuned_eval['rows'])}: they must use the same prompts")
    rows = []
    for i, (b, t) in enumerate(zip(base_eval["rows"], tuned_eval["rows"])):
        if b["instruction"] != t["instruction"]:
            raise ValueError(f"prompt {i} differs between the base and tuned evaluations: they must use the same prompts")
        rows.append({
            "index": i, "category": b["category"], "instruction": b["instruction"], "reference": b["reference"],
            "base_answer": b["answer"], "tuned_answer": t["answer"],
            "base_rouge_l": round(float(b["rouge_l_f1"]), 4), "tuned_rouge_l": round(float(t["rouge_l_f1"]), 4),
            "base_ended": bool(b["ended_with_eos"]), "tuned_ended": bool(t["ended_with_eos"]),
            "base_ended_by": ended_by(b), "tuned_ended_by": ended_by(t),
            "base_tokens": int(b["new_tokens"]), "tuned_tokens": int(t["new_tokens"]),
        })
    return rows


def build_report(base_eval: dict[str, Any], tuned_eval: dict[str, Any], training: dict[str, Any],
                 manifest: dict[str, Any], num_side_by_side: int, gate: dict[str, Any] | None = None,
                 leaderboard: list[dict[str, Any]] | None = None) -> Report:
    """Assemble the report from two ``EvalReport.to_dict()`` results, training facts and a manifest.

    ``training`` holds at least ``losses`` (one per step); ``manifest`` is rendered as given (model,
    data, config, versions, stage timings, throughput, peak memory). ``gate`` (the gate's verdict as
    data) and ``leaderboard`` (one entry per sweep point) add their sections and metrics.json keys.
    """
    from gemma_core.report_gate import decision_sections

    manifest = redact(manifest)  # its config, model spec and data source reach report.md, .html and metrics.json
    rows = prompt_rows(base_eval, tuned_eval)
    base_cat, tuned_cat = base_eval["per_category"], tuned_eval["per_category"]
    changed = sum(r["base_answer"] != r["tuned_answer"] for r in rows)
    metrics = {
        "overall": compare(base_eval["overall"], tuned_eval["overall"]),
        "per_category": {
            c: {"examples": int(base_cat.get(c, {}).get("examples", 0)),
                **compare(base_cat.get(c, {}), tuned_cat.get(c, {}))}
            for c in sorted(set(base_cat) | set(tuned_cat))
        },
        "answers_changed": changed,
        "num_prompts": len(rows),
        "generation": {
            "base_seconds": finite_or_none(base_eval.get("generation_seconds")),
            "tuned_seconds": finite_or_none(tuned_eval.get("generation_seconds")),
            "base_new_tokens_per_second": finite_or_none(base_eval.get("new_tokens_per_second")),
            "tuned_new_tokens_per_second": finite_or_none(tuned_eval.get("new_tokens_per_second")),
        },
        "training": {k: json_safe(v) for k, v in training.items()},
        "prompts": rows,
        "manifest": json_safe(manifest),
    }
    if gate is not None:
        metrics["gate"] = json_safe(gate)
    if leaderboard is not None:
        metrics["leaderboard"] = json_safe(leaderboard)
    notes = []
    if manifest.get("data", {}).get("is_sample"):
        notes.append(
            "Data: the offline sample shipped with gemma-lora-flow (written for this project, not Dolly-15k); "
            "numbers on it show the pipeline works, not how the model does on Dolly."
        )
    if not changed and rows:
        notes.append("The tuned model answered every prompt exactly as the base model did.")
    losses = [float(x) for x in training.get("losses", [])]
    return Report(metrics, losses, rows[:num_side_by_side], json_safe(manifest), notes,
                  decision_sections(gate, leaderboard))


# ----------------------------------------------------------------------------------------------
# Training curve; a diverged run logs NaN/inf losses, which the picture, sparkline and caption skip


def _finite_steps(losses: Sequence[float]) -> list[tuple[int, float]]:
    """(step, loss) of every step (counted from 1) whose loss is a finite number."""
    return [(step, float(loss)) for step, loss in enumerate(losses, 1) if math.isfinite(loss)]


def training_curve_png(losses: Sequence[float], dpi: int = 90) -> bytes:
    """The training loss per step as a small PNG (matplotlib's Agg backend, no display needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.0), dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    points = _finite_steps(losses)
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o", markersize=3, linewidth=1.2, color="#1f77b4", label="loss per step")
        window = max(1, len(values) // 8)
        if window > 1:
            parts = (values[max(0, i - window + 1):i + 1] for i in range(len(values)))
            smooth = [sum(part) / len(part) for part in parts]
            ax.plot(steps, smooth, linewidth=2.0, color="#d62728", label=f"mean of last {window}")
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finite loss" if losses else "no training steps", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title("LoRA fine-tuning", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})  # no version stamp: same input, same bytes
    return buffer.getvalue()


def curve_caption(losses: Sequence[float]) -> str:
    """First vs last quarter of the steps: one step's loss depends on its batch, a quarter's mean less so."""
    points = _finite_steps(losses)
    skipped = len(losses) - len(points)
    caption = f"{len(losses)} steps" + (f" ({skipped} not finite, left out)" if skipped else "")
    n = max(1, len(points) // 4)

    def mean_over(part: list[tuple[int, float]]) -> str:
        span = f"step {part[0][0]}" if len(part) == 1 else f"steps {part[0][0]}-{part[-1][0]}"
        return f"{format_metric(sum(loss for _, loss in part) / len(part))} over {span}"

    return f"{caption}; mean loss {mean_over(points[:n])} → {mean_over(points[-n:])}" if points else caption


def sparkline(values: Sequence[float], width: int = 48) -> str:
    """A one-line text picture of the curve's finite values, for places that cannot show images."""
    values = [v for _, v in _finite_steps(values)]
    if len(values) > width:
        values = [values[int(i * len(values) / width)] for i in range(width)]
    lo, hi, bars = min(values, default=0.0), max(values, default=0.0), "▁▂▃▄▅▆▇█"
    if hi == lo:  # a flat line (or none)
        return bars[3] * len(values)
    return "".join(bars[min(7, int((v - lo) / (hi - lo) * 8))] for v in values)


# ----------------------------------------------------------------------------------------------
# The sections as data: both renderers draw exactly these blocks


class Code(str):
    """Inline code in a paragraph; a paragraph is a tuple of ``str`` and ``Code`` parts."""


@dataclass(frozen=True)
class Cell:
    text: str  # as the reader sees it: the renderers escape it
    change: str | None = None  # a metric's change, after the text
    direction: str = ""  # the change is "better", "worse" or neither (""): the HTML colours it
    remarks: tuple[str, ...] = ()  # short asides after the text, in italics


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    numbers_from: float = math.inf  # the columns from this index on hold numbers: right-aligned


@dataclass(frozen=True)
class Image:
    alt: str  # the training curve; where it comes from is the renderer's argument


@dataclass(frozen=True)
class Details:
    summary: str
    text: str  # preformatted, collapsed under the summary


Block = Union[Table, Image, Details, tuple]  # a tuple: a paragraph


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple[Block, ...]


def intro(report: Report) -> tuple[str, ...]:
    """The paragraph under the title: model, data, prompt format, held-out set and how many answers changed."""
    m, manifest = report.metrics, report.manifest
    data = manifest.get("data", {})
    return (
        "Model ", Code(manifest.get("model", {}).get("spec", "?")),
        ", data ", Code(data.get("source", "?")),
        *((", prompt format ", Code(data["prompt_format"])) if "prompt_format" in data else ()),
        *((", held out: ", Code(data["eval_split"])) if "eval_split" in data else ()),
        f" ({m['num_prompts']} held-out prompts, same prompts and seeds for both models; "
        f"{m['answers_changed']} of {m['num_prompts']} answers changed).",
    )


def sections(report: Report) -> list[Section]:
    """The report's sections, in REPORT_SECTIONS order (the gate and leaderboard after the first), as data."""
    m, manifest, losses = report.metrics, report.manifest, report.losses
    overall = tuple(
        (Cell(label), *(Cell(format_metric(m["overall"][key][side])) for side in ("base", "tuned")),
         _change_cell("", m["overall"][key]["change"], better))
        for key, (label, better) in METRICS.items()
    )
    per_category = tuple(
        (Cell(cat), Cell(str(values["examples"])), *(
            _change_cell(f"{format_metric(values[key]['base'])} → {format_metric(values[key]['tuned'])}",
                         values[key]["change"], better) for key, (_, better) in METRICS.items()))
        for cat, values in m["per_category"].items()
    )
    answers = tuple(
        (Cell(str(r["index"] + 1)), Cell(r["category"]), _free_text(r["instruction"]), _free_text(r["reference"]),
         _free_text(r["base_answer"], ended=r["base_ended"]), _free_text(r["tuned_answer"], ended=r["tuned_ended"]))
        for r in report.side_by_side
    )
    spark = sparkline(losses)
    curve = (((Code(spark), " ") if spark else ()) + (curve_caption(losses),)) if losses else ("(no training steps)",)
    manifest_blocks: list[Block] = [Table(("item", "value"), tuple(
        (Cell(key), _free_text(_fmt_value(value), VALUE_CHARS)) for key, value in _flatten(manifest, skip=("config",))
    ))]
    if "config" in manifest:
        manifest_blocks.append(Details("config", json.dumps(manifest["config"], indent=2, sort_keys=True)))
    return [
        Section(REPORT_SECTIONS[0], (Table(("metric", "base", "tuned", "change"), overall, numbers_from=1),)),
        *report.extra,
        Section(REPORT_SECTIONS[1], (Table(
            ("category", "n", *(f"{label} (base → tuned)" for label, _ in METRICS.values())), per_category, 1),)),
        Section(REPORT_SECTIONS[2], (
            Table(("#", "category", "prompt", "reference", "base model", "tuned model"), answers) if answers
            else ("(none requested: evaluation.num_side_by_side = 0)",),)),
        Section(REPORT_SECTIONS[3], (Image("training loss per step"), curve)),
        Section(REPORT_SECTIONS[4], tuple(manifest_blocks)),
    ]


def _change_cell(text: str, change: float | None, better: int) -> Cell:
    """A metric's change, marked ✓/✗ (and coloured in the HTML) when it went the better/worse way:
    in parentheses after ``text``, alone when there is none."""
    gain = 0.0 if change is None else change * better
    direction = "better" if gain > 0 else "worse" if gain < 0 else ""
    shown = "n/a" if change is None else f"{'+' if change > 0 else ''}{format_metric(change)}"
    shown += {"better": " ✓", "worse": " ✗"}.get(direction, "")
    return Cell(text, change=f"({shown})" if text else shown, direction=direction)


def _free_text(text: str, limit: int = ANSWER_CHARS, ended: bool = True) -> Cell:
    """Text from the data, a model or the manifest: cut to ``limit``; said so when it is empty."""
    remarks = () if text else ("empty",)
    return Cell(truncate(text, limit), remarks=remarks if ended else (*remarks, "cut at max_new_tokens"))


# ----------------------------------------------------------------------------------------------
# Markdown


def render_markdown(report: Report, curve_src: str | None) -> str:
    """The report as Markdown; ``curve_src`` is the training-curve image's URL (a file name or a data: URI)."""
    head = [f"# {TITLE}", _md_text(intro(report)), *(f"> {note}" for note in report.notes)]
    return "\n\n".join(block for block in head if block) + "\n\n" + markdown_sections(sections(report), curve_src)


def markdown_sections(drawn: Iterable[Section], curve_src: str | None = None) -> str:
    """Sections as Markdown (a report's, or a few of them on their own, as the gate's artifact is)."""
    blocks = []
    for section in drawn:
        blocks += [f"## {section.title}", *(_md_block(block, curve_src) for block in section.blocks)]
    return "\n\n".join(block for block in blocks if block) + "\n"


def _md_block(block: Block, curve_src: str | None) -> str:
    if isinstance(block, Table):
        align = ("---:" if i >= block.numbers_from else "---" for i in range(len(block.columns)))
        rows = [block.columns, align, *(map(_md_cell, row) for row in block.rows)]
        return "\n".join("| " + " | ".join(row) + " |" for row in rows)
    if isinstance(block, Image):
        return f"![{block.alt}]({curve_src})" if curve_src else ""
    if isinstance(block, Details):
        return f"<details><summary>{block.summary}</summary>\n\n```json\n{block.text}\n```\n\n</details>"
    return _md_text(block)


def _md_cell(cell: Cell) -> str:
    parts = (_md_escape(cell.text), cell.change, *(f"*({remark})*" for remark in cell.remarks))
    return " ".join(part for part in parts if part)


def _md_escape(text: str) -> str:
    """Text inside a table cell: one line, no column breaks, no raw HTML."""
    text = html.escape(text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", ""), quote=False)
    return text.replace("\n", "<br>")


def _md_text(parts: tuple[str, ...]) -> str:
    return "".join(f"`{p}`" if isinstance(p, Code) else p for p in parts)


# ----------------------------------------------------------------------------------------------
# HTML


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;line-height:1.4;padding:0 1rem}
table{border-collapse:collapse;margin:0.5rem 0 1.5rem;font-size:0.9rem}
th,td{border:1px solid #ccc;padding:0.3rem 0.5rem;vertical-align:top;text-align:left}
th{background:#f3f3f3} td{white-space:pre-wrap;overflow-wrap:anywhere;max-width:22rem}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.better{color:#18794e} .worse{color:#b42318} .note{background:#fff8e1;border-left:4px solid #f5b400;
padding:0.5rem 1rem} pre{background:#f6f8fa;padding:0.75rem;overflow:auto;font-size:0.8rem}
"""
_e = html.escape


def render_html(report: Report, curve_png: bytes | None) -> str:
    """A standalone HTML page (no external files): the training curve is embedded as base64 PNG."""
    src = curve_data_uri(curve_png) if curve_png else None
    lines = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>LoRA fine-tuning report</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(TITLE)}</h1>", _html_block(intro(report), src),
        *(f'<p class="note">{_e(note)}</p>' for note in report.notes),
    ]
    for section in sections(report):
        lines += [f"<h2>{_e(section.title)}</h2>", *(_html_block(block, src) for block in section.blocks)]
    return "\n".join([*filter(None, lines), "</body></html>", ""])


def _html_block(block: Block, src: str | None) -> str:
    if isinstance(block, Table):
        rows = ["".join(f"<th>{_e(title)}</th>" for title in block.columns), *(
            "".join(f"<td{' class=num' if i >= block.numbers_from else ''}>{_html_cell(cell)}</td>"
                    for i, cell in enumerate(row)) for row in block.rows)]
        return "\n".join(["<table>", *(f"<tr>{row}</tr>" for row in rows), "</table>"])
    if isinstance(block, Image):
        return f'<img alt="{_e(block.alt)}" src="{src}">' if src else ""
    if isinstance(block, Details):
        return f"<details><summary>{_e(block.summary)}</summary><pre>{_e(block.text)}</pre></details>"
    return "<p>" + "".join(f"<code>{_e(p)}</code>" if isinstance(p, Code) else _e(p) for p in block) + "</p>"


def _html_cell(cell: Cell) -> str:
    change = cell.change and _e(cell.change)
    change = f'<span class="{cell.direction}">{change}</span>' if cell.direction else change
    parts = (_e(cell.text), change, *(f"<em>({_e(remark)})</em>" for remark in cell.remarks))
    return " ".join(part for part in parts if part)


# ----------------------------------------------------------------------------------------------
# Files


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write report.md (+ training_curve.png beside it), a standalone report.html and metrics.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = training_curve_png(report.losses)
    return {
        "training_curve": atomic_write_bytes(out_dir / "training_curve.png", png),
        "markdown": atomic_write_text(out_dir / "report.md", render_markdown(report, "training_curve.png")),
        "html": atomic_write_text(out_dir / "report.html", render_html(report, png)),
        "metrics": atomic_write_text(
            out_dir / "metrics.json", json.dumps(report.metrics, indent=2, sort_keys=True, allow_nan=False) + "\n"
        ),
    }


def curve_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ----------------------------------------------------------------------------------------------
# Values


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return format_metric(value)
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def _flatten(tree: dict[str, Any], prefix: str = "", skip: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """Nested dicts as dotted keys, two levels deep; a dict of more than 12 entries stays one value."""
    items = []
    for key, value in tree.items():
        if not prefix and key in skip:
            continue
        if isinstance(value, dict) and value and len(value) <= 12 and not prefix.count("."):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items
