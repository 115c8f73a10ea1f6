"""The one place that shortens text and writes numbers for people (report, artifacts, CLI summary),
and that makes values strict JSON (metrics.json, the gate's verdict).

>>> truncate("a long answer", 6)
'a long …'
>>> format_metric(1234.5), format_metric(150.25), format_metric(0.12345), format_metric(None)
('1,234', '150.2', '0.123', 'n/a')
>>> format_fixed(1234.5), format_fixed(None)
('1234.500', 'n/a')
"""

from __future__ import annotations

import math
from typing import Any


def truncate(text: object, limit: int) -> str:
    """``text`` as a string of at most ``limit`` characters, plus " …" when it was cut."""
    text = str(text)
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def format_metric(value: float | None) -> str:
    """A number as the report shows it: digits by magnitude (1,234 / 123.4 / 0.123), "n/a" for None."""
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.3f}"


def format_fixed(value: float | None) -> str:
    """A number with exactly three decimals (lines up in a column), "n/a" for None."""
    return "n/a" if value is None else f"{value:.3f}"


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float, or None when it is not a finite number (None, text, NaN, inf)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def json_safe(value: Any) -> Any:
    """Strict JSON: NaN/inf become None, numpy scalars Python numbers, anything else JSON has no type
    for (paths) a string."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return finite_or_none(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return json_safe(value.item())
    return str(value)
