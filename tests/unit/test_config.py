"""The configuration: SPEC §2 defaults in one place, and refusal of impossible limits."""

from __future__ import annotations

import pytest

from selsmtp.config import FORMATS, MAX_COMMAND_LINE, Config


def test_the_defaults_are_those_of_the_command_line() -> None:
    config = Config()
    assert (config.host, config.port, config.mailbox, config.format) == (
        "127.0.0.1",
        8765,
        "./mailbox",
        "cs4410",
    )
    assert (config.timeout, config.max_message_size) == (300.0, 33554432)
    assert (config.max_recipients, config.max_connections, config.rotate) == (1000, 1000, None)
    assert config.log_level == "info"


def test_the_fixed_limits_of_the_spec() -> None:
    config = Config()
    assert (config.max_errors, config.lock_wait, config.shutdown_lock_wait) == (20, 20.0, 5.0)
    assert MAX_COMMAND_LINE == 512
    assert FORMATS == ("cs4410", "mbox", "maildir")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("format", "mh"),
        ("max_message_size", 0),
        ("max_recipients", 0),
        ("max_connections", -1),
        ("timeout", 0.0),
        ("rotate", 0),
    ],
    ids=["format", "message-size", "recipients", "connections", "timeout", "rotate"],
)
def test_an_impossible_setting_is_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field.split("_")[0]):
        Config(**{field: value})  # type: ignore[arg-type]


def test_a_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Config().port = 25  # type: ignore[misc]
