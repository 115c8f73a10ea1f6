"""The comparison report: base vs tuned model on the same held-out prompts, rendered three ways.

Pure rendering, no orchestration: the pipeline hands in the two evaluation reports (as produced by
``EvalReport.to_dict()``), the training log and a run manifest, and gets back Markdown (for the
Prefect artifact and ``report.md``), a standalone HTML page with the training curve embedded as a
base64 PNG, and a JSON document of every number (``metrics.json``).

>>> report = build_report(base_eval, tuned_eval, training, manifest, num_side_by_side=6)  # doctest: +SKIP
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

# metric key -> (label, which direction is better: +1 higher, -1 lower, 0 neither)
METRICS: dict[str, tuple[str, int]] = {
    "completion_loss": ("held-out loss", -1),
    "perplexity": ("perplexity", -1),
    "rouge_l_f1": ("ROUGE-L F1", +1),
    "eos_rate": ("end-of-sequence rate", +1),
    "mean_answer_tokens": ("answer length (tokens)", 0),
}
REPORT_SECTIONS = (
    "Overall metrics",
    "Per category",
    "Side-by-side answers",
    "Training curve",
    "Run manifest",
)
LIBRARIES = ("keras", "keras-hub", "jax", "tensorflow", "prefect", "numpy", "pandas")
ANSWER_CHARS = 600  # answers are cut to this length in the Markdown and HTML (metrics.json keeps all)


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
            "index": i,
            "category": b["category"],
            "instruction": b["instruction"],
            "reference": b["reference"],
            "base_answer": b["answer"],
            "tuned_answer": t["answer"],
            "base_rouge_l": round(float(b["rouge_l_f1"]), 4),
            "tuned_rouge_l": round(float(t["rouge_l_f1"]), 4),
            "base_ended": bool(b["ended_with_eos"]),
            "tuned_ended": bool(t["ended_with_eos"]),
            "base_tokens": int(b["new_tokens"]),
            "tuned_tokens": int(t["new_tokens"]),
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
    return f"{len(losses)} steps; mean loss {_fmt(first)} over {span} → {_fmt(last)} over {end}"


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
# Markdown


def render_markdown(report: Report, curve_src: str | None) -> str:
    """The report as Markdown; ``curve_src`` is the training-curve image's URL (a file name or a data: URI)."""
    m = report.metrics
    out = ["# LoRA fine-tuning report: base vs tuned", ""]
    manifest = report.manifest
    model = manifest.get("model", {})
    data = manifest.get("data", {})
    out.append(
        f"Model `{model.get('spec', '?')}`, data `{data.get('source', '?')}` "
        f"({m['num_prompts']} held-out prompts, same prompts and seeds for both models; "
        f"{m['answers_changed']} of {m['num_prompts']} answers changed)."
    )
    out.append("")
    for note in report.notes:
        out += [f"> {note}", ""]

    out += [f"## {REPORT_SECTIONS[0]}", "", *_md_metric_table(m["overall"]), ""]

    out += [f"## {REPORT_SECTIONS[1]}", ""]
    header = ["category", "n"] + [f"{METRICS[k][0]} (base → tuned)" for k in METRICS]
    out += [_md_row(header), _md_row(["---"] * len(header))]
    for cat, values in m["per_category"].items():
        cells = [cat, str(values["examples"])]
        for key in METRICS:
            v = values[key]
            cells.append(f"{_fmt(v['base'])} → {_fmt(v['tuned'])} ({_fmt_change(v['change'], METRICS[key][1])})")
        out.append(_md_row(cells))
    out.append("")

    out += [f"## {REPORT_SECTIONS[2]}", ""]
    if not report.side_by_side:
        out += ["(none requested: evaluation.num_side_by_side = 0)", ""]
    else:
        out += [_md_row(["#", "category", "prompt", "reference", "base model", "tuned model"]),
                _md_row(["---"] * 6)]
        for row in report.side_by_side:
            out.append(_md_row([
                str(row["index"] + 1), row["category"], _md_cell(row["instruction"]), _md_cell(row["reference"]),
                _md_cell(row["base_answer"]) + _md_ended(row["base_ended"]),
                _md_cell(row["tuned_answer"]) + _md_ended(row["tuned_ended"]),
            ]))
        out.append("")

    out += [f"## {REPORT_SECTIONS[3]}", ""]
    losses = report.losses
    if curve_src:
        out += [f"![training loss per step]({curve_src})", ""]
    if losses:
        out += [f"`{sparkline(losses)}` {curve_caption(losses)}", ""]
    else:
        out += ["(no training steps)", ""]

    out += [f"## {REPORT_SECTIONS[4]}", "", *_md_manifest(manifest), ""]
    return "\n".join(out)


def _md_metric_table(comparison: dict[str, dict[str, float | None]]) -> list[str]:
    lines = [_md_row(["metric", "base", "tuned", "change"]), _md_row(["---", "---:", "---:", "---:"])]
    for key, (label, better) in METRICS.items():
        v = comparison[key]
        lines.append(_md_row([label, _fmt(v["base"]), _fmt(v["tuned"]), _fmt_change(v["change"], better)]))
    return lines


def _md_manifest(manifest: dict[str, Any]) -> list[str]:
    lines = [_md_row(["item", "value"]), _md_row(["---", "---"])]
    for key, value in _flatten(manifest, skip=("config",)):
        lines.append(_md_row([key, _md_cell(_fmt_value(value), limit=300)]))
    if "config" in manifest:
        lines += ["", "<details><summary>config</summary>", "", "```json",
                  json.dumps(manifest["config"], indent=2, sort_keys=True), "```", "", "</details>"]
    return lines


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_cell(text: str, limit: int = ANSWER_CHARS) -> str:
    text = str(text)
    if len(text) > limit:
        text = text[:limit].rstrip() + " …"
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "")
    text = html.escape(text, quote=False)
    return text.replace("\n", "<br>") or "*(empty)*"


def _md_ended(ended: bool) -> str:
    return "" if ended else " *(cut at max_new_tokens)*"


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


def render_html(report: Report, curve_png: bytes | None) -> str:
    """A standalone HTML page (no external files): the training curve is embedded as base64 PNG."""
    m = report.metrics
    e = html.escape
    manifest = report.manifest
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>LoRA fine-tuning report</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>LoRA fine-tuning report: base vs tuned</h1>",
        f"<p>Model <code>{e(str(manifest.get('model', {}).get('spec', '?')))}</code>, data "
        f"<code>{e(str(manifest.get('data', {}).get('source', '?')))}</code> ({m['num_prompts']} held-out "
        f"prompts, same prompts and seeds for both models; {m['answers_changed']} of {m['num_prompts']} "
        "answers changed).</p>",
    ]
    for note in report.notes:
        parts.append(f'<p class="note">{e(note)}</p>')

    parts.append(f"<h2>{REPORT_SECTIONS[0]}</h2><table><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr>")
    for key, (label, better) in METRICS.items():
        v = m["overall"][key]
        parts.append(
            f"<tr><td>{e(label)}</td><td class=num>{_fmt(v['base'])}</td><td class=num>{_fmt(v['tuned'])}</td>"
            f"<td class=\"num {_direction(v['change'], better)}\">{e(_fmt_change(v['change'], better))}</td></tr>"
        )
    parts.append("</table>")

    parts.append(f"<h2>{REPORT_SECTIONS[1]}</h2><table><tr><th>category</th><th>n</th>")
    parts += [f"<th>{e(METRICS[k][0])}<br>base → tuned</th>" for k in METRICS]
    parts.append("</tr>")
    for cat, values in m["per_category"].items():
        parts.append(f"<tr><td>{e(cat)}</td><td class=num>{values['examples']}</td>")
        for key in METRICS:
            v = values[key]
            parts.append(
                f"<td class=num>{_fmt(v['base'])} → {_fmt(v['tuned'])} "
                f"<span class=\"{_direction(v['change'], METRICS[key][1])}\">"
                f"({e(_fmt_change(v['change'], METRICS[key][1]))})</span></td>"
            )
        parts.append("</tr>")
    parts.append("</table>")

    parts.append(f"<h2>{REPORT_SECTIONS[2]}</h2>")
    if report.side_by_side:
        parts.append("<table><tr><th>#</th><th>category</th><th>prompt</th><th>reference</th>"
                     "<th>base model</th><th>tuned model</th></tr>")
        for row in report.side_by_side:
            parts.append(
                f"<tr><td>{row['index'] + 1}</td><td>{e(row['category'])}</td>"
                f"<td class=answer>{e(_cut(row['instruction']))}</td><td class=answer>{e(_cut(row['reference']))}</td>"
                f"<td class=answer>{e(_cut(row['base_answer']))}{_html_ended(row['base_ended'])}</td>"
                f"<td class=answer>{e(_cut(row['tuned_answer']))}{_html_ended(row['tuned_ended'])}</td></tr>"
            )
        parts.append("</table>")
    else:
        parts.append("<p>(none requested: evaluation.num_side_by_side = 0)</p>")

    parts.append(f"<h2>{REPORT_SECTIONS[3]}</h2>")
    if curve_png:
        encoded = base64.b64encode(curve_png).decode("ascii")
        parts.append(f'<img alt="training loss per step" src="data:image/png;base64,{encoded}">')
    if report.losses:
        parts.append(f"<p>{e(curve_caption(report.losses))}</p>")

    parts.append(f"<h2>{REPORT_SECTIONS[4]}</h2><table>")
    for key, value in _flatten(manifest, skip=("config",)):
        parts.append(f"<tr><th>{e(key)}</th><td>{e(_fmt_value(value))}</td></tr>")
    parts.append("</table>")
    if "config" in manifest:
        parts.append("<details><summary>config</summary><pre>"
                     f"{e(json.dumps(manifest['config'], indent=2, sort_keys=True))}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_ended(ended: bool) -> str:
    return "" if ended else "<br><em>(cut at max_new_tokens)</em>"


def _direction(change: float | None, better: int) -> str:
    if change is None or better == 0 or change == 0:
        return ""
    return "better" if change * better > 0 else "worse"


# ----------------------------------------------------------------------------------------------
# Files


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write report.md (+ training_curve.png beside it), a standalone report.html and metrics.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = training_curve_png(report.losses)
    paths = {
        "training_curve": atomic_write_bytes(out_dir / "training_curve.png", png),
        "markdown": atomic_write_text(out_dir / "report.md", render_markdown(report, "training_curve.png")),
        "html": atomic_write_text(out_dir / "report.html", render_html(report, png)),
        "metrics": atomic_write_text(
            out_dir / "metrics.json", json.dumps(report.metrics, indent=2, sort_keys=True, allow_nan=False) + "\n"
        ),
    }
    return paths


def curve_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ----------------------------------------------------------------------------------------------
# Formatting helpers


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


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.3f}"


def _fmt_change(change: float | None, better: int) -> str:
    if change is None:
        return "n/a"
    sign = "+" if change > 0 else ""
    mark = ""
    if better and change:
        mark = " ✓" if change * better > 0 else " ✗"
    return f"{sign}{_fmt(change)}{mark}"


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return _fmt(value)
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


def _cut(text: str, limit: int = ANSWER_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit].rstrip() + " …"
