"""The log line format: the per-second time cache must not change a byte."""

from __future__ import annotations

import logging

import pytest

from selsmtp import logs

# around second boundaries, and moments far apart
MOMENTS = [1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.0005, 1_700_000_001.5, 1.8e9 + 0.25]


@pytest.mark.parametrize("order", [MOMENTS, MOMENTS[::-1]], ids=["forward", "backward"])
def test_a_line_is_formatted_as_the_standard_formatter_formats_it(order: list[float]) -> None:
    standard = logging.Formatter(logs.FORMAT)
    cached = logs.Formatter(logs.FORMAT)
    for moment in order:
        record = logging.LogRecord("selsmtp.server", logging.INFO, "f", 1, "hello %d", (7,), None)
        record.created = moment
        record.msecs = (moment - int(moment)) * 1000
        assert cached.format(record) == standard.format(record)
