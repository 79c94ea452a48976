"""The value classes (Config, Reply, Envelope, ...) behave as frozen dataclasses did."""

from __future__ import annotations

import copy
import pickle

import pytest

from selsmtp import replies
from selsmtp.config import Config
from selsmtp.frozen import Frozen
from selsmtp.replies import Reply
from selsmtp.session import CLOSE, Close, Deliver, Envelope
from selsmtp.syntax import MailFrom

ENVELOPE = Envelope("client.test", "a@example.org", ("b@example.org",))

VALUES: list[Frozen] = [
    Config(name="mx.test", rotate=5),
    replies.OK,
    replies.named_replies("mx.test", 1024),
    ENVELOPE,
    Deliver(ENVELOPE, b"body\r\n"),
    CLOSE,
    MailFrom("a@example.org", 10, True),
]
IDS = [type(value).__name__ for value in VALUES]


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_a_value_equals_its_copies_and_hashes_alike(value: Frozen) -> None:
    for same in (copy.copy(value), copy.deepcopy(value), pickle.loads(pickle.dumps(value))):
        assert same == value
        assert hash(same) == hash(value)
        assert type(same) is type(value)


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_a_value_refuses_assignment_and_deletion(value: Frozen) -> None:
    name = value.__match_args__[0] if value.__match_args__ else "anything"
    with pytest.raises(AttributeError, match="cannot assign"):
        setattr(value, name, None)
    with pytest.raises(AttributeError, match="cannot delete"):
        delattr(value, name)


def test_values_compare_by_their_fields_and_class() -> None:
    assert Envelope("c", "a@b", ("x@y",)) == Envelope("c", "a@b", ("x@y",))
    assert Envelope("c", "a@b", ("x@y",)) != Envelope("c", "a@b", ("z@y",))
    assert Close() == CLOSE
    assert MailFrom("a@b") == MailFrom("a@b", None, False)
    assert MailFrom("a@b") != ("a@b", None, False)
    assert replies.OK != replies.BYE


def test_a_reply_compares_by_code_and_lines_and_renders_its_wire_bytes() -> None:
    reply = Reply.of(250, "first", "last")
    assert reply == Reply(250, ("first", "last"))
    assert reply.wire == b"250-first\r\n250 last\r\n"


def test_the_repr_names_every_field() -> None:
    shown = "MailFrom(reverse_path='', declared_size=5, smtputf8=True)"
    assert repr(MailFrom("", 5, True)) == shown
    assert repr(replies.OK) == "Reply(code=250, lines=('2.0.0 Ok',))"
    assert repr(CLOSE) == "Close()"
    assert repr(Config()).startswith("Config(host='127.0.0.1', port=8765, mailbox='./mailbox', ")


def test_config_replace_changes_the_named_fields_only() -> None:
    config = Config(name="mx.test")
    changed = config.replace(port=25, format="mbox")
    assert (changed.port, changed.format, changed.name) == (25, "mbox", "mx.test")
    assert config.port == 8765
    assert config.replace() == config


def test_config_replace_validates_and_refuses_unknown_fields() -> None:
    with pytest.raises(ValueError, match="max_recipients"):
        Config().replace(max_recipients=0)
    with pytest.raises(TypeError):
        Config().replace(prot=25)
