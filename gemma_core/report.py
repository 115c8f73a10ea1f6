"""The comparison report: base vs tuned model on the same held-out prompts, rendered three ways.

Pure rendering, no orchestration: the pipeline hands in the two evaluation reports (as produced by
``EvalReport.to_dict()``), the training log and a run manifest. :func:`build_report` computes every
number (``metrics.json``); :func:`sections` turns the report into its sections as plain data (title,
table of cells, training curve, collapsed details); :func:`render_markdown` (for the Prefect artifact and
``report.md``) and :func:`render_html` (a standalone page, the training curve embedded as a base64
PNG) only draw those sections, so the two always show the same tables.

>>> report = build_report(base_eval, tuned_eval, training, manifest, num_side_by_side=6)  # doctest: +SKIP
>>> [s.title for s in sections(report)] == list(REPORT_SECTIONS)                        # doctest: +SKIP
True
>>> paths = write_report(report, "runs/reports/report-abc")                              # doctest: +SKIP
>>> sorted(paths)                                                                       # doctest: +SKIP
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
from typing import Any, Iterable, Sequence

from gemma_core.atomic import atomic_write_bytes, atomic_write_text
from gemma_core.formatting import format_metric, truncate

# metric key -> (label, which direction is better: +1 higher, -1 lower, 0 neither)
METRICS: dict[str, tuple[str, int]] = {
    "completion_loss": ("held-out loss", -1),
    "perplexity": ("perplexity", -1),
    "rouge_l_f1": ("ROUGE-L F1", +1),
    "eos_rate": ("end-of-sequence rate", +1),
    "mean_answer_tokens": ("answer length (tokens)", 0),
}
REPORT_SECTIONS = ("Overall metrics", "Per category", "Side-by-side answers", "Training curve", "Run manifest")
TITLE = "LoRA fine-tuning report: base vs tuned"
LIBRARIES = ("keras", "keras-hub", "jax", "tensorflow", "prefect", "numpy", "pandas")
ANSWER_CHARS = 600  # answers are cut to this length in the Markdown and HTML (metrics.json keeps all)
VALUE_CHARS = 300  # manifest values are cut to this length in the Markdown (the HTML shows them whole)


@dataclass(frozen=True)
class Report:
    """Everything the renderers need; ``metrics`` is exactly what ``metrics.json`` holds."""

    metrics: dict[str, Any]
    losses: list[float]
    side_by_side: list[dict[str, Any]]
    manifest: dict[str, Any]
    notes: list[str] = field(default_factory=list)


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
        b, t = _num(base.get(key)), _num(tuned.get(key))
        out[key] = {"base": b, "tuned": t, "change": None if b is None or t is None else t - b}
    return out


def prompt_rows(base_eval: dict[str, Any], tuned_eval: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per held-out prompt: the reference, both answers and their scores."""
    rows = []
    for i, (b, t) in enumerate(zip(base_eval["rows"], tuned_eval["rows"])):
        if b["instruction"] != t["instruction"]:
            raise ValueError(f"prompt {i} differs between the base and tuned evaluations: they must use the same prompts")
        rows.append({
            "index": i, "category": b["category"], "instruction": b["instruction"], "reference": b["reference"],
            "base_answer": b["answer"], "tuned_answer": t["answer"],
            "base_rouge_l": round(float(b["rouge_l_f1"]), 4), "tuned_rouge_l": round(float(t["rouge_l_f1"]), 4),
            "base_ended": bool(b["ended_with_eos"]), "tuned_ended": bool(t["ended_with_eos"]),
            "base_tokens": int(b["new_tokens"]), "tuned_tokens": int(t["new_tokens"]),
        })
    if len(base_eval["rows"]) != len(tuned_eval["rows"]):
        raise ValueError(
            f"the base evaluation has {len(base_eval['rows'])} prompts and the tuned one "
            f"{len(tuned_eval['rows'])}: they must use the same prompts"
        )
    return rows


def build_report(
    base_eval: dict[str, Any],
    tuned_eval: dict[str, Any],
    training: dict[str, Any],
    manifest: dict[str, Any],
    num_side_by_side: int,
) -> Report:
    """Assemble the report from two ``EvalReport.to_dict()`` results, training facts and a manifest.

    ``training`` holds at least ``losses`` (one per step); ``manifest`` is rendered as given (model,
    data, config, versions, stage timings, throughput, peak memory).
    """
    rows = prompt_rows(base_eval, tuned_eval)
    categories = sorted(set(base_eval["per_category"]) | set(tuned_eval["per_category"]))
    losses = [float(x) for x in training.get("losses", [])]
    changed = sum(r["base_answer"] != r["tuned_answer"] for r in rows)
    metrics = {
        "overall": compare(base_eval["overall"], tuned_eval["overall"]),
        "per_category": {
            c: {
                "examples": int(base_eval["per_category"].get(c, {}).get("examples", 0)),
                **compare(base_eval["per_category"].get(c, {}), tuned_eval["per_category"].get(c, {})),
            }
            for c in categories
        },
        "answers_changed": changed,
        "num_prompts": len(rows),
        "generation": {
            "base_seconds": _num(base_eval.get("generation_seconds")),
            "tuned_seconds": _num(tuned_eval.get("generation_seconds")),
            "base_new_tokens_per_second": _num(base_eval.get("new_tokens_per_second")),
            "tuned_new_tokens_per_second": _num(tuned_eval.get("new_tokens_per_second")),
        },
        "training": {k: _jsonable(v) for k, v in training.items()},
        "prompts": rows,
        "manifest": _jsonable(manifest),
    }
    notes = []
    if manifest.get("data", {}).get("is_sample"):
        notes.append(
            "Data: the offline sample shipped with gemma-lora-flow (written for this project, not Dolly-15k); "
            "numbers on it show the pipeline works, not how the model does on Dolly."
        )
    if not changed and rows:
        notes.append("The tuned model answered every prompt exactly as the base model did.")
    return Report(metrics, losses, rows[:num_side_by_side], _jsonable(manifest), notes)


# ----------------------------------------------------------------------------------------------
# Training curve


def training_curve_png(losses: Sequence[float], dpi: int = 90) -> bytes:
    """The training loss per step as a small PNG (matplotlib's Agg backend, no display needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.0), dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    steps = list(range(1, len(losses) + 1))
    if losses:
        ax.plot(steps, losses, marker="o", markersize=3, linewidth=1.2, color="#1f77b4", label="loss per step")
        window = max(1, len(losses) // 8)
        if window > 1:
            smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, linewidth=2.0, color="#d62728", label=f"mean of last {window}")
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no training steps", ha="center", va="center", transform=ax.transAxes)
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
    n = max(1, len(losses) // 4)
    first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
    span = "step 1" if n == 1 else f"steps 1-{n}"
    end = f"step {len(losses)}" if n == 1 else f"steps {len(losses) - n + 1}-{len(losses)}"
    return f"{len(losses)} steps; mean loss {format_metric(first)} over {span} → {format_metric(last)} over {end}"


def sparkline(values: Sequence[float], width: int = 48) -> str:
    """A one-line text picture of the curve, for places that cannot show images."""
    if not values:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [values[int(i * step)] for i in range(width)]
    lo, hi = min(values), max(values)
    bars = "▁▂▃▄▅▆▇█"
    if hi == lo:
        return bars[3] * len(values)
    return "".join(bars[min(7, int((v - lo) / (hi - lo) * 8))] for v in values)


# ----------------------------------------------------------------------------------------------
# The sections as data: both renderers draw exactly these


@dataclass(frozen=True)
class Column:
    title: str
    sub: str | None = None  # a second line under the title
    right: bool = False  # right-aligned in the Markdown


@dataclass(frozen=True)
class Cell:
    text: str
    kind: str = "label"  # label, num, answer (free text, cut to ANSWER_CHARS), value (free text the Markdown cuts)
    change: str | None = None  # a metric's change: after the text, or alone when the text is empty
    direction: str = ""  # the change is "better", "worse" or neither (""): the HTML colours it
    remark: str | None = None  # a short aside after the text


@dataclass(frozen=True)
class Table:
    columns: tuple[Column, ...]
    rows: tuple[tuple[Cell, ...], ...]
    key_column: bool = False  # each row starts with its key: a list of key/value pairs
    empty: str | None = None  # said instead of the table when it has no rows


@dataclass(frozen=True)
class Curve:
    alt: str
    caption: str | None  # None: there were no training steps
    sparkline: str  # the curve as text, for viewers that show no image


@dataclass(frozen=True)
class Section:
    title: str
    table: Table | None = None
    curve: Curve | None = None
    details: tuple[str, str] | None = None  # (summary, JSON text): a collapsed block


class Code(str):
    """Inline code in a paragraph; a paragraph is a tuple of ``str`` and ``Code`` parts."""


def intro(report: Report) -> tuple[str, ...]:
    """The paragraph under the title: model, data and how many answers changed."""
    m, manifest = report.metrics, report.manifest
    return (
        "Model ", Code(manifest.get("model", {}).get("spec", "?")),
        ", data ", Code(manifest.get("data", {}).get("source", "?")),
        f" ({m['num_prompts']} held-out prompts, same prompts and seeds for both models; "
        f"{m['answers_changed']} of {m['num_prompts']} answers changed).",
    )


def sections(report: Report) -> list[Section]:
    """The report's sections, in REPORT_SECTIONS order, as data."""
    m, manifest, losses = report.metrics, report.manifest, report.losses
    config = ("config", json.dumps(manifest["config"], indent=2, sort_keys=True)) if "config" in manifest else None
    curve = Curve("training loss per step", curve_caption(losses) if losses else None, sparkline(losses))
    return [
        Section(REPORT_SECTIONS[0], table=_overall_table(m["overall"])),
        Section(REPORT_SECTIONS[1], table=_category_table(m["per_category"])),
        Section(REPORT_SECTIONS[2], table=_side_by_side_table(report.side_by_side)),
        Section(REPORT_SECTIONS[3], curve=curve),
        Section(REPORT_SECTIONS[4], table=_manifest_table(manifest), details=config),
    ]


def _overall_table(overall: dict[str, dict[str, float | None]]) -> Table:
    rows = tuple(
        (Cell(label), *(Cell(format_metric(overall[key][side]), "num") for side in ("base", "tuned")),
         _change_cell("", overall[key]["change"], better))
        for key, (label, better) in METRICS.items()
    )
    return Table((Column("metric"), *(Column(t, right=True) for t in ("base", "tuned", "change"))), rows)


def _category_table(per_category: dict[str, dict[str, Any]]) -> Table:
    columns = (Column("category"), Column("n"), *(Column(label, sub="base → tuned") for label, _ in METRICS.values()))
    rows = tuple(
        (Cell(cat), Cell(str(values["examples"]), "num"), *(
            _change_cell(f"{format_metric(values[key]['base'])} → {format_metric(values[key]['tuned'])}",
                         values[key]["change"], better) for key, (_, better) in METRICS.items()))
        for cat, values in per_category.items()
    )
    return Table(columns, rows)


def _change_cell(text: str, change: float | None, better: int) -> Cell:
    """A metric's change, marked ✓/✗ (and coloured in the HTML) when it went the better/worse way."""
    if change is None:
        return Cell(text, "num", change="n/a")
    mark, direction = ((" ✓", "better") if change * better > 0 else (" ✗", "worse")) if better and change else ("", "")
    return Cell(text, "num", change=f"{'+' if change > 0 else ''}{format_metric(change)}{mark}", direction=direction)


def _side_by_side_table(prompts: list[dict[str, Any]]) -> Table:
    columns = tuple(Column(t) for t in ("#", "category", "prompt", "reference", "base model", "tuned model"))
    rows = tuple(
        (Cell(str(r["index"] + 1)), Cell(r["category"]), _answer(r["instruction"]), _answer(r["reference"]),
         _answer(r["base_answer"], r["base_ended"]), _answer(r["tuned_answer"], r["tuned_ended"]))
        for r in prompts
    )
    return Table(columns, rows, empty="(none requested: evaluation.num_side_by_side = 0)")


def _answer(text: str, ended: bool = True) -> Cell:
    return Cell(truncate(text, ANSWER_CHARS), "answer", remark=None if ended else "cut at max_new_tokens")


def _manifest_table(manifest: dict[str, Any]) -> Table:
    rows = tuple((Cell(key), Cell(_fmt_value(value), "value")) for key, value in _flatten(manifest, skip=("config",)))
    return Table((Column("item"), Column("value")), rows, key_column=True)


# ----------------------------------------------------------------------------------------------
# Markdown


def render_markdown(report: Report, curve_src: str | None) -> str:
    """The report as Markdown; ``curve_src`` is the training-curve image's URL (a file name or a data: URI)."""
    blocks = [[f"# {TITLE}"], [_md_text(intro(report))], *([f"> {note}"] for note in report.notes)]
    for section in sections(report):
        blocks += _md_section(section, curve_src)
    return "\n".join(line for block in blocks for line in (*block, ""))  # a blank line after each block


def _md_section(section: Section, curve_src: str | None) -> list[list[str]]:
    table, curve, blocks = section.table, section.curve, [[f"## {section.title}"]]
    if table is not None:
        blocks.append(_md_table(table) if table.rows or table.empty is None else [table.empty])
    if curve is not None:
        blocks += [[f"![{curve.alt}]({curve_src})"]] if curve_src else []
        blocks.append([f"`{curve.sparkline}` {curve.caption}" if curve.caption else "(no training steps)"])
    if section.details is not None:
        summary, text = section.details
        blocks.append([f"<details><summary>{summary}</summary>", "", "```json", text, "```", "", "</details>"])
    return blocks


def _md_table(table: Table) -> list[str]:
    return [
        _md_row(f"{c.title} ({c.sub})" if c.sub else c.title for c in table.columns),
        _md_row("---:" if c.right else "---" for c in table.columns),
        *(_md_row(_md_cell(cell) for cell in row) for row in table.rows),
    ]


def _md_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_cell(cell: Cell) -> str:
    if cell.kind in ("answer", "value"):  # free text; an answer is already cut to ANSWER_CHARS
        text = _md_escape(cell.text if cell.kind == "answer" else truncate(cell.text, VALUE_CHARS))
    else:
        text = cell.text
    if cell.change is not None:
        text = f"{text} ({cell.change})" if text else cell.change
    return text + (f" *({cell.remark})*" if cell.remark else "")


def _md_escape(text: str) -> str:
    """Free text inside a table cell: one line, no column breaks, no raw HTML."""
    text = html.escape(text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", ""), quote=False)
    return text.replace("\n", "<br>") or "*(empty)*"


def _md_text(parts: Sequence[str]) -> str:
    return "".join(f"`{p}`" if isinstance(p, Code) else p for p in parts)


# ----------------------------------------------------------------------------------------------
# HTML


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;line-height:1.4;padding:0 1rem}
table{border-collapse:collapse;margin:0.5rem 0 1.5rem;font-size:0.9rem}
th,td{border:1px solid #ccc;padding:0.3rem 0.5rem;vertical-align:top;text-align:left}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
.better{color:#18794e} .worse{color:#b42318} .note{background:#fff8e1;border-left:4px solid #f5b400;
padding:0.5rem 1rem} pre{background:#f6f8fa;padding:0.75rem;overflow:auto;font-size:0.8rem}
td.answer{white-space:pre-wrap;max-width:22rem}
"""
_e = html.escape


def render_html(report: Report, curve_png: bytes | None) -> str:
    """A standalone HTML page (no external files): the training curve is embedded as base64 PNG."""
    lines = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>LoRA fine-tuning report</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(TITLE)}</h1>", f"<p>{_html_text(intro(report))}</p>",
        *(f'<p class="note">{_e(note)}</p>' for note in report.notes),
    ]
    for section in sections(report):
        lines += _html_section(section, curve_png)
    return "\n".join([*lines, "</body></html>"])


def _html_section(section: Section, curve_png: bytes | None) -> list[str]:
    table, curve, lines = section.table, section.curve, [f"<h2>{_e(section.title)}</h2>"]
    if table is not None and table.empty is None:  # a table that is always there opens on the heading's line
        lines[0] += _html_table(table)
    elif table is not None:
        lines.append(_html_table(table) if table.rows else f"<p>{_e(table.empty)}</p>")
    if curve is not None and curve_png:
        lines.append(f'<img alt="{_e(curve.alt)}" src="{curve_data_uri(curve_png)}">')
    if curve is not None and curve.caption:
        lines.append(f"<p>{_e(curve.caption)}</p>")
    if section.details is not None:
        lines.append("<details><summary>{}</summary><pre>{}</pre></details>".format(*map(_e, section.details)))
    return lines


def _html_table(table: Table) -> str:
    """A key/value table marks each row's key as a header instead of having a header row."""
    head = "" if table.key_column else _html_row([(_html_column(c), bool(c.sub)) for c in table.columns])
    rows = [
        _html_row([(_html_cell(cell, "th" if table.key_column and not i else "td"), bool(cell.text and cell.change))
                   for i, cell in enumerate(row)])
        for row in table.rows
    ]
    return "\n".join([f"<table>{head}", *rows, "</table>"])


def _html_row(cells: Sequence[tuple[str, bool]]) -> str:
    """A <tr> of (html, paired) cells; a cell pairing two things starts a line of its own (as the page always had)."""
    row = "<tr>" + "".join("\n" + cell if paired else cell for cell, paired in cells)
    return row + ("\n</tr>" if any(paired for _, paired in cells) else "</tr>")


def _html_column(column: Column) -> str:
    return f"<th>{_e(column.title)}<br>{_e(column.sub)}</th>" if column.sub else f"<th>{_e(column.title)}</th>"


def _html_cell(cell: Cell, tag: str) -> str:
    if cell.change is not None and not cell.text:
        return f'<{tag} class="num {cell.direction}">{_e(cell.change)}</{tag}>'
    body = _e(cell.text) + (f' <span class="{cell.direction}">({_e(cell.change)})</span>' if cell.change else "")
    body += f"<br><em>({_e(cell.remark)})</em>" if cell.remark else ""
    attr = {"num": " class=num", "answer": " class=answer"}.get(cell.kind, "")
    return f"<{tag}{attr}>{body}</{tag}>"


def _html_text(parts: Sequence[str]) -> str:
    return "".join(f"<code>{_e(p)}</code>" if isinstance(p, Code) else _e(p) for p in parts)


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


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) or math.isinf(value) else value


def _jsonable(value: Any) -> Any:
    """NaN/inf become None and paths strings, so metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return str(value)


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return format_metric(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _flatten(tree: dict[str, Any], prefix: str = "", skip: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    items = []
    for key, value in tree.items():
        if not prefix and key in skip:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and len(value) <= 12 and not prefix.count("."):
            items += _flatten(value, name + ".")
        else:
            items.append((name, value))
    return items
