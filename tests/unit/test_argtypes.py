"""The shared argument types (selsmtp.argtypes), and Config's own checks of the same."""

from __future__ import annotations

import argparse
import math

import pytest

from selsmtp.argtypes import host_name, line_timeout, positive_float
from selsmtp.config import MAX_TIMEOUT, Config

# -- --timeout ---------------------------------------------------------------------


@pytest.mark.parametrize("text", ["300", "0.5", "1e-3", "86400", " 42 "])
def test_a_line_timeout_is_a_number_of_seconds(text: str) -> None:
    assert line_timeout(text) == float(text)


@pytest.mark.parametrize("text", ["inf", "-inf", "Infinity", "nan", "1e400", "-1e400"])
def test_a_line_timeout_is_finite(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"not {text}$"):
        line_timeout(text)


@pytest.mark.parametrize("text", ["0", "-0", "-5", "86400.5", "1e9"])
def test_a_line_timeout_is_above_zero_and_at_most_a_day(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="at most 86400"):
        line_timeout(text)
    assert MAX_TIMEOUT == 86400


def test_a_line_timeout_that_is_no_number_is_left_to_argparse() -> None:
    with pytest.raises(ValueError):
        line_timeout("soon")


@pytest.mark.parametrize("text", ["inf", "1e400", "nan", "0", "-1"])
def test_a_positive_float_is_finite_and_above_zero(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        positive_float(text)


# -- --name --------------------------------------------------------------------------

GOOD_NAMES = ["mx.test", "localhost", "MX-1_a", "[127.0.0.1]", "bücher.example", "a" * 255]
BAD_NAMES = {
    "empty": "",
    "space": "mx test",
    "only a space": " ",
    "LF": "mx.test\n",
    "CRLF": "mx\r\ntest",
    "tab": "mx\ttest",
    "NUL": "mx\x00",
    "DEL": "mx\x7f",
    "C1 NEL": "mx\x85test",
    "no-break space": "mx\xa0test",
    "line separator": "mx\u2028test",
    "zero-width space": "mx\u200btest",
    "right-to-left override": "\u202emx",
    "undecodable byte": "mx\udcff",
    "256 bytes": "a" * 256,
    "256 bytes in UTF-8": "é" * 128,
}


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_a_host_name_is_taken_as_it_is(name: str) -> None:
    assert host_name(name) == name
    assert Config(name=name).name == name


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_a_host_name_has_no_whitespace_control_or_invisible_characters(name: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="host name"):
        host_name(name)
    with pytest.raises(ValueError, match="name"):
        Config(name=name)


@pytest.mark.parametrize("timeout", [math.inf, math.nan, -math.inf, 0.0, MAX_TIMEOUT + 1])
def test_config_refuses_an_infinite_or_absurd_timeout(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        Config(timeout=timeout)
