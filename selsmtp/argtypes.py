"""Argument types for the command lines of selsmtp, selsmtp.inbox and tools/*.py.

Each takes the option's text and returns its value, or raises
``argparse.ArgumentTypeError`` with a message argparse shows after the option's name.
"""

from __future__ import annotations

import argparse
import math

from selsmtp.config import MAX_TIMEOUT, host_name_problem


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, not {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    # Why finite: "inf", and "1e400" which float() makes inf, would turn a bound off.
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def line_timeout(text: str) -> float:
    """selsmtp's ``--timeout``: seconds, above 0 and at most a day."""
    value = float(text)
    if not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"must be seconds above 0 and at most {MAX_TIMEOUT} (a day), not {text}"
        )
    return value


def host_name(text: str) -> str:
    """A server name for greetings, replies and ``Received:`` lines (see
    :func:`selsmtp.config.host_name_problem`)."""
    problem = host_name_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"not a host name: {text!r} {problem}")
    return text


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value
