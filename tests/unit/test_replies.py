"""Replies as values: rendering, and the golden wire bytes of every reply of SPEC §3."""

from __future__ import annotations

import pytest

from selsmtp import replies
from selsmtp.replies import Reply

FIXED = [
    (replies.OK, b"250 2.0.0 Ok\r\n"),
    (replies.MAIL_OK, b"250 2.1.0 Ok\r\n"),
    (replies.RCPT_OK, b"250 2.1.5 Ok\r\n"),
    (replies.START_DATA, b"354 End data with <CR><LF>.<CR><LF>\r\n"),
    (replies.CANNOT_VRFY, b"252 2.0.0 Cannot VRFY user, but will accept message\r\n"),
    (replies.BYE, b"221 2.0.0 Bye\r\n"),
    (replies.BAD_SYNTAX, b"500 5.5.2 Error: bad syntax\r\n"),
    (replies.LINE_TOO_LONG, b"500 5.5.2 Error: line too long\r\n"),
    (replies.UNKNOWN_COMMAND, b"502 5.5.2 Error: command not recognized\r\n"),
    (replies.HELO_SYNTAX, b"501 Syntax: HELO hostname\r\n"),
    (replies.NEED_HELO, b"503 5.5.1 Error: need HELO command\r\n"),
    (replies.NEED_MAIL, b"503 5.5.1 Error: need MAIL command\r\n"),
    (replies.NEED_RCPT, b"503 5.5.1 Error: need RCPT command\r\n"),
    (replies.NESTED_MAIL, b"503 5.5.1 Error: nested MAIL command\r\n"),
    (replies.DUPLICATE_HELO, b"503 5.5.1 Error: duplicate HELO\r\n"),
    (replies.BAD_SENDER, b"501 5.1.7 Bad sender address syntax\r\n"),
    (replies.BAD_RECIPIENT, b"501 5.1.3 Bad recipient address syntax\r\n"),
    (replies.DATA_SYNTAX, b"501 5.5.4 Syntax: DATA\r\n"),
    (replies.RSET_SYNTAX, b"501 5.5.4 Syntax: RSET\r\n"),
    (replies.VRFY_SYNTAX, b"501 5.5.4 Syntax: VRFY address\r\n"),
    (replies.BAD_SIZE, b"501 5.5.4 Bad message size syntax\r\n"),
    (replies.TOO_BIG, b"552 5.3.4 Error: message file too big\r\n"),
    (replies.TOO_MANY_RECIPIENTS, b"452 4.5.3 Error: too many recipients\r\n"),
    (replies.WRITE_ERROR, b"451 4.3.0 Error: queue file write error\r\n"),
    (replies.MAILBOX_BUSY, b"451 4.3.0 Error: mailbox busy, try again later\r\n"),
    (replies.HELP, b"214 2.0.0 See RFC 5321 and https://www.rfc-editor.org\r\n"),
    # SPEC §8
    (replies.READY_FOR_TLS, b"220 2.0.0 Ready to start TLS\r\n"),
    (replies.STARTTLS_SYNTAX, b"501 5.5.4 Syntax: STARTTLS\r\n"),
    (replies.TRANSACTION_IN_PROGRESS, b"503 5.5.1 Error: MAIL transaction in progress\r\n"),
    (replies.TLS_ALREADY_ACTIVE, b"503 5.5.1 Error: TLS already active\r\n"),
    (replies.MUST_STARTTLS, b"530 5.7.0 Must issue a STARTTLS command first\r\n"),
    (replies.AUTH_REQUIRED, b"530 5.7.0 Authentication required\r\n"),
    (
        replies.ENCRYPTION_REQUIRED,
        b"538 5.7.11 Encryption required for requested authentication mechanism\r\n",
    ),
    (replies.AUTH_OK, b"235 2.7.0 Authentication successful\r\n"),
    (replies.AUTH_FAILED, b"535 5.7.8 Error: authentication failed\r\n"),
    (replies.AUTH_ABORTED, b"501 5.7.0 Authentication aborted\r\n"),
    (replies.BAD_BASE64, b"501 5.5.2 Error: invalid base64\r\n"),
    (replies.AUTH_SYNTAX, b"501 5.5.4 Syntax: AUTH mechanism\r\n"),
    (replies.AUTH_MECHANISM, b"504 5.5.4 Error: unsupported authentication mechanism\r\n"),
    (replies.ALREADY_AUTHENTICATED, b"503 5.5.1 Error: already authenticated\r\n"),
    (replies.AUTH_NEEDS_EHLO, b"503 5.5.1 Error: send HELO/EHLO first\r\n"),
    (replies.AUTH_LINE_TOO_LONG, b"500 5.5.6 Authentication exchange line is too long\r\n"),
    (replies.AUTH_CONTINUE, b"334 \r\n"),
    (replies.ASK_USERNAME, b"334 VXNlcm5hbWU6\r\n"),
    (replies.ASK_PASSWORD, b"334 UGFzc3dvcmQ6\r\n"),
]


@pytest.mark.parametrize(
    ("reply", "wire"),
    FIXED,
    ids=[wire.decode()[:3] + "-" + wire.decode()[4:].strip() for _, wire in FIXED],
)
def test_every_fixed_reply_renders_its_golden_bytes(reply: Reply, wire: bytes) -> None:
    assert reply.wire == wire


def test_every_fixed_reply_constant_has_a_golden_test() -> None:
    constants = {name: value for name, value in vars(replies).items() if isinstance(value, Reply)}
    tested = {id(reply) for reply, _ in FIXED}
    assert sorted(name for name, value in constants.items() if id(value) not in tested) == []


NAMED = [
    ("greeting", b"220 test.example SMTP CS4410MP3\r\n"),
    ("helo", b"250 test.example\r\n"),
    (
        "ehlo",
        b"250-test.example\r\n250-PIPELINING\r\n250-SIZE 1024\r\n250-8BITMIME\r\n"
        b"250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250 HELP\r\n",
    ),
    ("too_many_connections", b"421 4.7.0 test.example Error: too many connections\r\n"),
    ("too_many_errors", b"421 4.7.0 test.example Error: too many errors\r\n"),
    ("timeout", b"421 4.4.2 test.example Error: timeout exceeded\r\n"),
    ("shutting_down", b"421 4.3.2 test.example Service shutting down\r\n"),
]


@pytest.mark.parametrize(("field", "wire"), NAMED, ids=[field for field, _ in NAMED])
def test_every_named_reply_renders_its_golden_bytes(field: str, wire: bytes) -> None:
    named = replies.named_replies("test.example", 1024)
    assert getattr(named, field).wire == wire


def test_named_replies_carry_the_server_name_and_size_given() -> None:
    named = replies.named_replies("mx.other.org", 33554432)
    assert named.greeting.wire == b"220 mx.other.org SMTP CS4410MP3\r\n"
    assert b"250-SIZE 33554432\r\n" in named.ehlo.wire


def test_delivered_names_the_message_number() -> None:
    assert replies.delivered(1).wire == b"250 2.0.0 Ok: delivered message 1\r\n"
    assert replies.delivered(123456).wire == b"250 2.0.0 Ok: delivered message 123456\r\n"


def test_unsupported_option_names_the_parameter_as_sent() -> None:
    assert (
        replies.unsupported_option("FOO=bar").wire == b"555 5.5.4 Unsupported option: FOO=bar\r\n"
    )


@pytest.mark.parametrize(
    ("param", "shown"),
    [
        ("X\x00Y", b"X?Y"),
        ("X\x7fY", b"X?Y"),
        ("\udcff\udcfe", b"??"),
        ("caf\u00e9", b"caf?"),
        ("A\x1bB", b"A?B"),
    ],
    ids=["nul", "del", "not-utf8", "non-ascii", "escape"],
)
def test_unsupported_option_echoes_only_printable_ascii(param: str, shown: bytes) -> None:
    assert (
        replies.unsupported_option(param).wire
        == b"555 5.5.4 Unsupported option: " + shown + b"\r\n"
    )


def test_a_multi_line_reply_uses_dash_continuations_and_a_space_on_the_last_line() -> None:
    assert Reply.of(250, "one", "two", "three").wire == b"250-one\r\n250-two\r\n250 three\r\n"


def test_a_one_line_reply_uses_a_space() -> None:
    assert Reply.of(554, "no").wire == b"554 no\r\n"


@pytest.mark.parametrize(
    ("code", "is_error"),
    [(221, False), (250, False), (354, False), (421, True), (451, True), (500, True), (555, True)],
    ids=["221", "250", "354", "421", "451", "500", "555"],
)
def test_is_error_is_true_for_4xx_and_5xx_only(code: int, is_error: bool) -> None:
    assert Reply.of(code, "text").is_error is is_error


@pytest.mark.parametrize(
    ("code", "lines"),
    [(199, ("x",)), (600, ("x",)), (250, ())],
    ids=["code-too-low", "code-too-high", "no-lines"],
)
def test_a_malformed_reply_cannot_be_built(code: int, lines: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="bad reply"):
        Reply(code, lines)


def test_replies_compare_by_code_and_text() -> None:
    assert Reply.of(250, "2.0.0 Ok") == replies.OK
    assert Reply.of(250, "2.0.0 OK") != replies.OK


def test_replies_are_frozen() -> None:
    with pytest.raises(AttributeError):
        replies.OK.code = 200  # type: ignore[misc]
