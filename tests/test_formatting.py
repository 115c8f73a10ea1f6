"""gemma_core.formatting: the one truncation helper and the number formats of the report, artifacts and CLI."""

import pytest

from gemma_core.formatting import format_fixed, format_metric, truncate


def test_truncate_cuts_long_text_and_marks_it():
    assert truncate("short", 10) == "short"
    assert truncate("a" * 10, 10) == "a" * 10  # exactly the limit: untouched
    assert truncate("a" * 11, 10) == "a" * 10 + " …"
    assert truncate("word " * 10, 8) == "word wor …"
    assert truncate("ab   cd", 4) == "ab …"  # no trailing blanks before the mark
    assert truncate(12345, 3) == "123 …"  # anything printable


@pytest.mark.parametrize("value, text", [
    (None, "n/a"), (0.0, "0.000"), (0.12345, "0.123"), (-0.25, "-0.250"), (99.9996, "100.000"),
    (100.0, "100.0"), (150.25, "150.2"), (-123.45, "-123.5"), (1000.0, "1,000"), (1234567.8, "1,234,568"),
])
def test_format_metric_by_magnitude(value, text):
    assert format_metric(value) == text


@pytest.mark.parametrize("value, text", [
    (None, "n/a"), (0.0, "0.000"), (0.12345, "0.123"), (1234.5, "1234.500"), (-2.0, "-2.000"),
])
def test_format_fixed_three_decimals(value, text):
    assert format_fixed(value) == text
