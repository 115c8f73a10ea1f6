"""The one place that shortens text and writes numbers for people (report, artifacts, CLI summary).

>>> truncate("a long answer", 6)
'a long …'
>>> format_metric(1234.5), format_metric(150.25), format_metric(0.12345), format_metric(None)
('1,234', '150.2', '0.123', 'n/a')
>>> format_fixed(1234.5), format_fixed(None)
('1234.500', 'n/a')
"""

from __future__ import annotations


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
