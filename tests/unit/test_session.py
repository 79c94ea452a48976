"""Byte-level transcripts against the sans-IO session: every reply of SPEC §3 it makes,
and every protocol rule of SPEC §4.

Every transcript goes through :func:`tests.scripts.transcript`, which runs it whole, one
byte at a time and split at seeded random points, and fails if the replies, the stored
messages or the final state depend on the split.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import BinaryIO

import pytest

from selsmtp import replies
from selsmtp.session import Close, Deliver, Envelope, Session, State
from tests.scripts import (
    CLOSE_MARK,
    ENVELOPE,
    ENVELOPE_REPLIES,
    GO_AHEAD,
    FakeStore,
    MakeSession,
    converse,
    delivered,
    message,
    play,
    render,
    session_in,
    transcript,
    two_piece_splits,
)

HELO = b"HELO client.example\r\n"
HELO_OK = b"250 test.example\r\n"
MAIL_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
OK = b"250 2.0.0 Ok\r\n"
BYE = b"221 2.0.0 Bye\r\n"
NEED_HELO = b"503 5.5.1 Error: need HELO command\r\n"
NEED_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"
NEED_RCPT = b"503 5.5.1 Error: need RCPT command\r\n"
NESTED_MAIL = b"503 5.5.1 Error: nested MAIL command\r\n"
DUPLICATE_HELO = b"503 5.5.1 Error: duplicate HELO\r\n"
BAD_SENDER = b"501 5.1.7 Bad sender address syntax\r\n"
BAD_RECIPIENT = b"501 5.1.3 Bad recipient address syntax\r\n"
HELO_SYNTAX = b"501 Syntax: HELO hostname\r\n"
UNKNOWN = b"502 5.5.2 Error: command not recognized\r\n"
BAD_SYNTAX = b"500 5.5.2 Error: bad syntax\r\n"
TOO_LONG = b"500 5.5.2 Error: line too long\r\n"
TOO_BIG = b"552 5.3.4 Error: message file too big\r\n"
TOO_MANY_ERRORS = b"421 4.7.0 test.example Error: too many errors\r\n"
TIMEOUT = b"421 4.4.2 test.example Error: timeout exceeded\r\n"
SHUTTING_DOWN = b"421 4.3.2 test.example Service shutting down\r\n"

ALICE_TO_BOB = Envelope("client.example", "alice@example.org", ("bob@example.net",))


# -- greeting, HELO, EHLO --------------------------------------------------------


def test_the_greeting_names_the_server(make_session: MakeSession) -> None:
    session = make_session()
    assert render(session.start()) == b"220 test.example SMTP CS4410MP3\r\n"
    assert session.state is State.FRESH


def test_helo_is_answered_with_the_server_name(make_session: MakeSession) -> None:
    outcome = transcript(make_session, b"HELO client.example\r\n")
    assert outcome.output == b"250 test.example\r\n"
    assert outcome.state is State.READY
    assert outcome.session.helo_name == "client.example"


def test_ehlo_lists_pipelining_size_8bitmime_and_smtputf8(make_session: MakeSession) -> None:
    assert transcript(make_session, b"EHLO client.example\r\n").output == (
        b"250-test.example\r\n250-PIPELINING\r\n250-SIZE 1024\r\n250-8BITMIME\r\n"
        b"250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250 HELP\r\n"
    )


@pytest.mark.parametrize(
    "line",
    [b"HELO\r\n", b"EHLO\r\n", b"HELO   \r\n", b"HELO a b\r\n", b"EHLO a\tb\r\n",
     b"HELO a\x00b\r\n", b"EHLO \x01\r\n", b"HELO a\x7f\r\n", b"HELO a\rb\r\n",
     b"HELO caf\xe9\r\n"],
    ids=["helo-no-host", "ehlo-no-host", "only-spaces", "inner-space", "inner-tab", "nul",
         "control", "del", "inner-cr", "not-utf8"],
)  # fmt: skip
def test_helo_without_a_single_clean_host_is_501(make_session: MakeSession, line: bytes) -> None:
    outcome = transcript(make_session, line + b"MAIL FROM:<a@b>\r\n")
    assert outcome.output == HELO_SYNTAX + NEED_HELO
    assert outcome.state is State.FRESH


@pytest.mark.parametrize(
    ("before", "before_replies"),
    [
        (b"", b""),
        (b"MAIL FROM:<alice@example.org>\r\n", MAIL_OK),
        (b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\n", MAIL_OK + RCPT_OK),
    ],
    ids=["ready", "in-mail", "in-rcpt"],
)
@pytest.mark.parametrize("second", [b"HELO other\r\n", b"EHLO other\r\n"], ids=["helo", "ehlo"])
def test_a_second_helo_is_503_and_changes_nothing(
    make_session: MakeSession, before: bytes, before_replies: bytes, second: bytes
) -> None:
    rest = (
        b"MAIL FROM:<alice@example.org>\r\n" if not before else b""
    ) + b"RCPT TO:<bob@example.net>\r\nDATA\r\nx\r\n.\r\n"
    rest_replies = (MAIL_OK if not before else b"") + RCPT_OK + GO_AHEAD + delivered(1)
    if before.count(b"RCPT"):
        rest = b"DATA\r\nx\r\n.\r\n"
        rest_replies = GO_AHEAD + delivered(1)
    outcome = transcript(make_session, HELO + before + second + rest)
    assert outcome.output == HELO_OK + before_replies + DUPLICATE_HELO + rest_replies
    assert outcome.messages == [(ALICE_TO_BOB, b"x\r\n")]


# -- a message -------------------------------------------------------------------


def test_a_message_is_accepted_step_by_step_and_delivered(make_session: MakeSession) -> None:
    outcome = transcript(
        make_session,
        b"HELO client.example\r\n"
        b"MAIL FROM:<alice@example.org>\r\n"
        b"RCPT TO:<bob@example.net>\r\n"
        b"DATA\r\n"
        b"Subject: hi\r\n\r\nHello, Bob.\r\n.\r\n",
    )
    assert outcome.output == (
        b"250 test.example\r\n"
        b"250 2.1.0 Ok\r\n"
        b"250 2.1.5 Ok\r\n"
        b"354 End data with <CR><LF>.<CR><LF>\r\n"
        b"250 2.0.0 Ok: delivered message 1\r\n"
    )
    assert outcome.messages == [(ALICE_TO_BOB, b"Subject: hi\r\n\r\nHello, Bob.\r\n")]
    assert outcome.state is State.READY


def test_messages_get_the_store_numbers_in_order(make_session: MakeSession) -> None:
    session = make_session()
    store = FakeStore(first_number=41)
    output = converse(session, HELO + message(b"one\r\n") + message(b"two\r\n"), store=store)
    assert output == (
        HELO_OK
        + MAIL_OK
        + RCPT_OK
        + GO_AHEAD
        + b"250 2.0.0 Ok: delivered message 41\r\n"
        + MAIL_OK
        + RCPT_OK
        + GO_AHEAD
        + b"250 2.0.0 Ok: delivered message 42\r\n"
    )
    assert [body for _, body in store.messages] == [b"one\r\n", b"two\r\n"]


def test_an_empty_message_is_delivered(make_session: MakeSession) -> None:
    outcome = transcript(make_session, ENVELOPE + b"DATA\r\n.\r\n")
    assert outcome.output == ENVELOPE_REPLIES + GO_AHEAD + delivered(1)
    assert outcome.messages == [(ALICE_TO_BOB, b"")]


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"RSET\r\n", OK),
        (b"NOOP\r\n", OK),
        (b"NOOP anything at all\r\n", OK),
        (b"VRFY bob\r\n", b"252 2.0.0 Cannot VRFY user, but will accept message\r\n"),
        (b"VRFY\r\n", b"501 5.5.4 Syntax: VRFY address\r\n"),
        (b"RSET now\r\n", b"501 5.5.4 Syntax: RSET\r\n"),
    ],
    ids=["rset", "noop", "noop-argument", "vrfy", "vrfy-no-argument", "rset-argument"],
)
def test_rset_noop_and_vrfy_answer_at_any_time(
    make_session: MakeSession, line: bytes, reply: bytes
) -> None:
    assert transcript(make_session, line).output == reply
    assert transcript(make_session, ENVELOPE + line).output == ENVELOPE_REPLIES + reply


def test_rset_ends_the_transaction_but_keeps_the_helo_name(make_session: MakeSession) -> None:
    outcome = transcript(
        make_session,
        ENVELOPE + b"RSET\r\nRCPT TO:<bob@example.net>\r\n" + message(b"after\r\n"),
    )
    assert outcome.output == (
        ENVELOPE_REPLIES + OK + NEED_MAIL + MAIL_OK + RCPT_OK + GO_AHEAD + delivered(1)
    )
    assert outcome.messages == [(ALICE_TO_BOB, b"after\r\n")]


def test_rset_before_helo_still_needs_helo(make_session: MakeSession) -> None:
    assert transcript(make_session, b"RSET\r\nMAIL FROM:<a@b>\r\n").output == OK + NEED_HELO


def test_quit_says_bye_and_closes(make_session: MakeSession) -> None:
    outcome = transcript(make_session, b"QUIT\r\n")
    assert outcome.output == b"221 2.0.0 Bye\r\n" + CLOSE_MARK
    assert outcome.state is State.CLOSED


def test_nothing_after_quit_is_read(make_session: MakeSession) -> None:
    outcome = transcript(make_session, HELO + b"QUIT\r\nNOOP\r\n" + message(b"x\r\n"))
    assert outcome.output == HELO_OK + BYE + CLOSE_MARK
    assert outcome.messages == []
    session = outcome.session
    assert session.receive(b"NOOP\r\n") == []


def test_quit_in_the_middle_of_a_transaction_drops_it(make_session: MakeSession) -> None:
    outcome = transcript(make_session, ENVELOPE + b"QUIT\r\n")
    assert outcome.output == ENVELOPE_REPLIES + BYE + CLOSE_MARK
    assert outcome.messages == []


@pytest.mark.parametrize(
    "line",
    [b"\r\n", b"\n", b"   \r\n", b"\t\r\n", b" \t \n"],
    ids=["crlf", "lf", "spaces", "tab", "mixed-lf"],
)
def test_an_empty_or_blank_line_is_500_bad_syntax(make_session: MakeSession, line: bytes) -> None:
    assert transcript(make_session, line + b"NOOP\r\n").output == BAD_SYNTAX + OK


@pytest.mark.parametrize(
    "line",
    [b"FOO\r\n", b"STARTTLS\r\n", b"AUTH PLAIN x\r\n", b"HELOX x\r\n", b"MAILFROM:<a@b>\r\n",
     b"\x00\r\n", b"\xff\xfe\r\n", b"ma\xc4\xb1l FROM:<a@b>\r\n", b"NOOP\r\r\n"],
    ids=["foo", "starttls", "auth", "glued", "mailfrom", "nul", "not-utf8", "dotless-i",
         "cr-cr-lf"],
)  # fmt: skip
def test_an_unknown_command_is_502(make_session: MakeSession, line: bytes) -> None:
    assert transcript(make_session, HELO + line + b"NOOP\r\n").output == HELO_OK + UNKNOWN + OK


# -- the 512-byte line limit -------------------------------------------------------


def noop_line(length: int, ending: bytes = b"\r\n") -> bytes:
    """A NOOP command line of exactly ``length`` bytes, its line ending included."""
    line = b"NOOP " + b"x" * (length - 5 - len(ending)) + ending
    assert len(line) == length
    return line


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_a_command_line_of_exactly_512_bytes_is_accepted(
    make_session: MakeSession, ending: bytes
) -> None:
    assert transcript(make_session, noop_line(512, ending)).output == OK


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_a_command_line_of_513_bytes_is_500_line_too_long_and_the_session_goes_on(
    make_session: MakeSession, ending: bytes
) -> None:
    outcome = transcript(make_session, HELO + noop_line(513, ending) + b"MAIL FROM:<a@b>\r\n")
    assert outcome.output == HELO_OK + TOO_LONG + MAIL_OK
    assert outcome.state is State.MAIL


def test_a_very_long_line_is_one_line_too_long(make_session: MakeSession) -> None:
    outcome = transcript(make_session, b"HELO " + b"h" * 5000 + b"\r\n" + HELO)
    assert outcome.output == TOO_LONG + HELO_OK
    assert outcome.session.errors == 1


def test_a_too_long_mail_line_does_not_start_a_transaction(make_session: MakeSession) -> None:
    long_mail = b"MAIL FROM:<" + b"a" * 600 + b"@b>\r\n"
    outcome = transcript(make_session, HELO + long_mail + b"RCPT TO:<c@d>\r\n")
    assert outcome.output == HELO_OK + TOO_LONG + NEED_MAIL


# -- order: every 503 ------------------------------------------------------------

MAIL = b"MAIL FROM:<alice@example.org>\r\n"
RCPT = b"RCPT TO:<bob@example.net>\r\n"


@pytest.mark.parametrize(
    ("before", "before_replies", "command", "reply"),
    [
        (b"", b"", MAIL, NEED_HELO),
        (b"", b"", RCPT, NEED_HELO),
        (b"", b"", b"DATA\r\n", NEED_HELO),
        (HELO, HELO_OK, RCPT, NEED_MAIL),
        (HELO, HELO_OK, b"DATA\r\n", NEED_MAIL),
        (HELO + MAIL, HELO_OK + MAIL_OK, b"DATA\r\n", NEED_RCPT),
        (HELO + MAIL + b"RCPT TO:<>\r\n", HELO_OK + MAIL_OK + BAD_RECIPIENT, b"DATA\r\n",
         NEED_RCPT),
        (HELO + MAIL, HELO_OK + MAIL_OK, MAIL, NESTED_MAIL),
        (ENVELOPE, ENVELOPE_REPLIES, MAIL, NESTED_MAIL),
        (HELO, HELO_OK, HELO, DUPLICATE_HELO),
        (HELO, HELO_OK, b"EHLO client.example\r\n", DUPLICATE_HELO),
        (b"EHLO c\r\n", replies.named_replies("test.example", 1024).ehlo.wire, HELO,
         DUPLICATE_HELO),
        (HELO + message(b"x\r\n"), HELO_OK + MAIL_OK + RCPT_OK + GO_AHEAD + delivered(1), RCPT,
         NEED_MAIL),
        (HELO + message(b"x\r\n"), HELO_OK + MAIL_OK + RCPT_OK + GO_AHEAD + delivered(1),
         b"DATA\r\n", NEED_MAIL),
        (ENVELOPE + b"RSET\r\n", ENVELOPE_REPLIES + OK, b"DATA\r\n", NEED_MAIL),
        (b"HELO\r\n", HELO_SYNTAX, MAIL, NEED_HELO),
        (HELO + b"MAIL FROM:<a b>\r\n", HELO_OK + BAD_SENDER, RCPT, NEED_MAIL),
    ],
    ids=["mail-before-helo", "rcpt-before-helo", "data-before-helo", "rcpt-before-mail",
         "data-before-mail", "data-before-rcpt", "data-after-refused-rcpt", "nested-mail",
         "nested-mail-after-rcpt", "helo-twice", "ehlo-after-helo", "helo-after-ehlo",
         "rcpt-after-delivery", "data-after-delivery", "data-after-rset",
         "mail-after-bad-helo", "rcpt-after-bad-mail"],
)  # fmt: skip
def test_a_command_out_of_order_is_503(
    make_session: MakeSession, before: bytes, before_replies: bytes, command: bytes, reply: bytes
) -> None:
    outcome = transcript(make_session, before + command)
    assert outcome.output == before_replies + reply


def test_rcpt_before_mail_is_503_need_mail(make_session: MakeSession) -> None:
    assert transcript(make_session, HELO + RCPT).output == (
        b"250 test.example\r\n503 5.5.1 Error: need MAIL command\r\n"
    )


def test_an_order_error_changes_nothing(make_session: MakeSession) -> None:
    outcome = transcript(make_session, HELO + MAIL + MAIL.replace(b"alice", b"eve") + RCPT)
    assert outcome.output == HELO_OK + MAIL_OK + NESTED_MAIL + RCPT_OK
    assert outcome.session.reverse_path == "alice@example.org"


# -- MAIL and RCPT arguments -----------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [b"MAIL\r\n", b"MAIL FROM\r\n", b"MAIL FROM:\r\n", b"MAIL FROM:<\r\n", b"MAIL TO:<a@b>\r\n",
     b"MAIL FROM:<a@b\r\n", b"MAIL FROM:a@b>\r\n", b"MAIL FROM:<<a@b>>\r\n",
     b"MAIL FROM:<a b@c>\r\n", b"MAIL FROM:<a@b>junk\r\n", b"MAIL FROM:<a\x00@b>\r\n",
     b"MAIL FROM:<a\xff@b>\r\n", b"MAIL FROM:<" + b"l" * 65 + b"@b>\r\n"],
    ids=["no-argument", "no-colon", "no-address", "lone-bracket", "to", "unclosed",
         "unopened", "doubled", "space", "glued-junk", "nul", "not-utf8", "local-65"],
)  # fmt: skip
def test_mail_from_with_no_or_a_malformed_address_is_501(
    make_session: MakeSession, line: bytes
) -> None:
    outcome = transcript(make_session, HELO + line + MAIL)
    assert outcome.output == HELO_OK + BAD_SENDER + MAIL_OK


@pytest.mark.parametrize(
    "line",
    [b"RCPT\r\n", b"RCPT TO\r\n", b"RCPT TO:\r\n", b"RCPT TO:<>\r\n", b"RCPT FROM:<a@b>\r\n",
     b"RCPT TO:<a@b\r\n", b"RCPT TO:a@b>\r\n", b"RCPT TO:<a b@c>\r\n",
     b"RCPT TO:<a\x01@b>\r\n", b"RCPT TO:<@route>\r\n", b"RCPT TO:<" + b"l" * 65 + b"@b>\r\n"],
    ids=["no-argument", "no-colon", "no-address", "null", "from", "unclosed", "unopened",
         "space", "control", "route-only", "local-65"],
)  # fmt: skip
def test_rcpt_to_with_no_or_a_malformed_address_is_501(
    make_session: MakeSession, line: bytes
) -> None:
    outcome = transcript(make_session, HELO + MAIL + line + RCPT)
    assert outcome.output == HELO_OK + MAIL_OK + BAD_RECIPIENT + RCPT_OK


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL FROM:<a@b> FOO=BAR\r\n", b"555 5.5.4 Unsupported option: FOO=BAR\r\n"),
        (b"MAIL FROM:<a@b> SIZE=10 AUTH=<>\r\n", b"555 5.5.4 Unsupported option: AUTH=<>\r\n"),
        (b"MAIL FROM:<a@b> BODY=BINARYMIME\r\n",
         b"555 5.5.4 Unsupported option: BODY=BINARYMIME\r\n"),
        (b"MAIL FROM:<a@b> X\x00Y\r\n", b"555 5.5.4 Unsupported option: X?Y\r\n"),
        (b"MAIL FROM:<a@b> \xff\r\n", b"555 5.5.4 Unsupported option: ?\r\n"),
        (b"RCPT TO:<a@b> NOTIFY=NEVER\r\n", b"555 5.5.4 Unsupported option: NOTIFY=NEVER\r\n"),
    ],
    ids=["mail-foo", "mail-auth", "mail-binarymime", "nul", "not-utf8", "rcpt-notify"],
)  # fmt: skip
def test_an_unknown_parameter_is_555_naming_it(
    make_session: MakeSession, line: bytes, reply: bytes
) -> None:
    before, before_replies = (
        (HELO + MAIL, HELO_OK + MAIL_OK) if line[:4] == b"RCPT" else (HELO, HELO_OK)
    )
    assert transcript(make_session, before + line).output == before_replies + reply


@pytest.mark.parametrize(
    "params",
    [b"SIZE=1024", b"size=0", b"BODY=7BIT", b"BODY=8BITMIME", b"SMTPUTF8",
     b"SIZE=100 BODY=8BITMIME SMTPUTF8"],
    ids=["size-at-limit", "size-zero", "body-7bit", "body-8bitmime", "smtputf8", "all"],
)  # fmt: skip
def test_supported_mail_parameters_are_accepted(make_session: MakeSession, params: bytes) -> None:
    outcome = transcript(make_session, HELO + b"MAIL FROM:<a@b> " + params + b"\r\n")
    assert outcome.output == HELO_OK + MAIL_OK


def test_a_declared_size_over_the_limit_is_552(make_session: MakeSession) -> None:
    outcome = transcript(make_session, HELO + b"MAIL FROM:<a@b> SIZE=1025\r\n" + MAIL)
    assert outcome.output == HELO_OK + TOO_BIG + MAIL_OK


def test_a_bad_size_value_is_501(make_session: MakeSession) -> None:
    outcome = transcript(make_session, HELO + b"MAIL FROM:<a@b> SIZE=ten\r\n")
    assert outcome.output == HELO_OK + b"501 5.5.4 Bad message size syntax\r\n"


@pytest.mark.parametrize(
    "line", [b"DATA now\r\n", b"DATA x y\r\n", b"data  .\r\n"], ids=["word", "words", "dot"]
)
def test_data_with_an_argument_is_501(make_session: MakeSession, line: bytes) -> None:
    outcome = transcript(make_session, ENVELOPE + line + b"DATA\r\n.\r\n")
    assert outcome.output == ENVELOPE_REPLIES + b"501 5.5.4 Syntax: DATA\r\n" + GO_AHEAD + (
        delivered(1)
    )


# -- limits ----------------------------------------------------------------------


def test_a_body_of_exactly_the_limit_is_delivered(make_session: MakeSession) -> None:
    body = b"x" * 1022 + b"\r\n"
    outcome = transcript(make_session, ENVELOPE + b"DATA\r\n" + body + b".\r\n")
    assert outcome.output == ENVELOPE_REPLIES + GO_AHEAD + delivered(1)
    assert outcome.bodies == [body]


def test_a_body_over_the_limit_is_read_to_its_end_refused_with_552_and_the_session_goes_on(
    make_session: MakeSession,
) -> None:
    big = b"".join(b"line %04d of a big message\r\n" % i for i in range(200))
    outcome = transcript(
        make_session,
        ENVELOPE + b"DATA\r\n" + big + b".\r\nRCPT TO:<c@d>\r\n" + message(b"small\r\n"),
    )
    assert outcome.output == (
        ENVELOPE_REPLIES + GO_AHEAD + TOO_BIG + NEED_MAIL + MAIL_OK + RCPT_OK + GO_AHEAD
    ) + delivered(1)
    assert outcome.bodies == [b"small\r\n"]


def test_a_fourth_recipient_is_452_and_the_message_keeps_three(make_session: MakeSession) -> None:
    outcome = transcript(
        make_session,
        HELO
        + MAIL
        + b"".join(b"RCPT TO:<r%d@x>\r\n" % i for i in range(1, 6))
        + b"DATA\r\nx\r\n.\r\n",
    )
    too_many = b"452 4.5.3 Error: too many recipients\r\n"
    assert outcome.output == (
        HELO_OK + MAIL_OK + RCPT_OK * 3 + too_many * 2 + GO_AHEAD + delivered(1)
    )
    assert outcome.messages[0][0].forward_paths == ("r1@x", "r2@x", "r3@x")


def test_the_twentieth_error_reply_is_followed_by_421_and_close(make_session: MakeSession) -> None:
    outcome = transcript(make_session, b"FOO\r\n" * 19 + b"NOOP\r\n" + b"FOO\r\nNOOP\r\n")
    assert outcome.output == UNKNOWN * 19 + OK + UNKNOWN + TOO_MANY_ERRORS + CLOSE_MARK
    assert outcome.state is State.CLOSED


def test_every_kind_of_error_reply_counts_toward_the_limit(make_session: MakeSession) -> None:
    errors = [
        b"\r\n",
        b"FOO\r\n",
        b"HELO\r\n",
        MAIL,
        noop_line(600),
        HELO,
        HELO,
        b"MAIL FROM:<a b>\r\n",
        b"MAIL FROM:<a@b> X=1\r\n",
        b"MAIL FROM:<a@b> SIZE=5000\r\n",
        MAIL,
        MAIL,
        b"RCPT TO:<>\r\n",
        b"DATA\r\n",
        b"VRFY\r\n",
        b"RSET x\r\n",
    ]
    # Two of those lines succeed (the first HELO and the first MAIL): 14 error replies.
    outcome = transcript(make_session, b"".join(errors) + b"FOO\r\n" * 5 + b"NOOP\r\n")
    assert outcome.session.errors == 19
    assert outcome.state is State.MAIL
    closing = transcript(make_session, b"".join(errors) + b"FOO\r\n" * 6 + b"NOOP\r\n")
    assert closing.output.endswith(UNKNOWN + TOO_MANY_ERRORS + CLOSE_MARK)


def test_the_error_limit_comes_from_the_config(make_session: MakeSession) -> None:
    outcome = transcript(lambda: make_session(max_errors=2), b"FOO\r\nFOO\r\nNOOP\r\n")
    assert outcome.output == UNKNOWN * 2 + TOO_MANY_ERRORS + CLOSE_MARK


# -- timeout and shutdown ----------------------------------------------------------

LIVE_STATES = [State.FRESH, State.READY, State.MAIL, State.RCPT, State.DATA]


@pytest.mark.parametrize("state", LIVE_STATES, ids=[s.name.lower() for s in LIVE_STATES])
def test_timed_out_is_421_timeout_and_close(make_session: MakeSession, state: State) -> None:
    session, _ = session_in(make_session, state)
    assert render(session.timed_out()) == TIMEOUT + CLOSE_MARK
    assert session.state is State.CLOSED
    assert session.receive(b".\r\nNOOP\r\n") == []
    assert session.timed_out() == []


@pytest.mark.parametrize("state", LIVE_STATES, ids=[s.name.lower() for s in LIVE_STATES])
def test_shut_down_is_421_shutting_down_and_close(make_session: MakeSession, state: State) -> None:
    session, _ = session_in(make_session, state)
    assert render(session.shut_down()) == SHUTTING_DOWN + CLOSE_MARK
    assert session.state is State.CLOSED
    assert session.shut_down() == []
    assert session.receive(b".\r\nQUIT\r\n") == []


def test_a_delivering_session_does_not_time_out(make_session: MakeSession) -> None:
    session, _ = session_in(make_session, State.DELIVERING)
    assert session.timed_out() == []
    assert render(session.delivered(1)) == delivered(1)


def test_shut_down_while_delivering_waits_for_the_store_then_250_then_421(
    make_session: MakeSession,
) -> None:
    session, actions = session_in(make_session, State.DELIVERING)
    assert isinstance(actions[-1], Deliver)
    assert session.receive(b"MAIL FROM:<a@b>\r\n") == []
    assert session.shut_down() == []
    assert session.paused
    assert render(session.delivered(7)) == delivered(7) + SHUTTING_DOWN + CLOSE_MARK
    assert session.closed


def test_shut_down_while_delivering_then_a_store_failure_is_451_then_421(
    make_session: MakeSession,
) -> None:
    session, _ = session_in(make_session, State.DELIVERING)
    assert session.shut_down() == []
    assert render(session.delivery_failed(replies.MAILBOX_BUSY)) == (
        b"451 4.3.0 Error: mailbox busy, try again later\r\n" + SHUTTING_DOWN + CLOSE_MARK
    )


@pytest.mark.parametrize("end", ["timed_out", "shut_down"])
def test_ending_a_session_mid_message_closes_its_spool(make_session: MakeSession, end: str) -> None:
    spools: list[io.BytesIO] = []

    def new_spool() -> BinaryIO:
        spools.append(io.BytesIO())
        return spools[-1]

    session = make_session(new_spool=new_spool, spool_threshold=16)
    converse(session, ENVELOPE + b"DATA\r\n" + b"spooled line\r\n" * 10)
    assert [spool.closed for spool in spools] == [False]
    getattr(session, end)()
    assert [spool.closed for spool in spools] == [True]


class FailingSpool(io.BytesIO):
    """A spool file on a full disk: every write fails."""

    def write(self, data: object) -> int:
        raise OSError(28, "No space left on device")


def _no_descriptors() -> BinaryIO:
    raise OSError(24, "Too many open files")


@pytest.mark.parametrize(
    "new_spool", [FailingSpool, _no_descriptors], ids=["disk-full", "no-descriptors"]
)
def test_a_spool_that_fails_is_451_and_the_session_goes_on(
    make_session: MakeSession, new_spool: Callable[[], BinaryIO]
) -> None:
    outcome = transcript(
        lambda: make_session(new_spool=new_spool, spool_threshold=16),
        ENVELOPE + b"DATA\r\n" + b"spooled line\r\n" * 10 + b".\r\nNOOP\r\n",
    )
    assert outcome.output.endswith(
        GO_AHEAD + b"451 4.3.0 Error: queue file write error\r\n250 2.0.0 Ok\r\n"
    )
    assert outcome.messages == []


# -- pausing while a message is stored ----------------------------------------------


def test_commands_pipelined_after_the_data_wait_for_the_store(make_session: MakeSession) -> None:
    session = make_session()
    actions = session.receive(
        ENVELOPE + b"DATA\r\nbody\r\n.\r\nMAIL FROM:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n"
    )
    assert render(actions[:-1]) == ENVELOPE_REPLIES + GO_AHEAD
    assert actions[-1] == Deliver(ALICE_TO_BOB, b"body\r\n")
    assert session.paused
    assert session.receive(b"second\r\n.\r\nQUIT\r\n") == []
    resumed = session.delivered(1)
    assert render(resumed[:-1]) == delivered(1) + MAIL_OK + b"250 2.1.5 Ok\r\n" + GO_AHEAD
    second = resumed[-1]
    assert isinstance(second, Deliver)
    assert second.body == b"second\r\n"
    assert second.envelope == Envelope("client.example", "c@d", ("e@f",))
    assert render(session.delivered(2)) == delivered(2) + BYE + CLOSE_MARK


def test_a_store_failure_is_451_and_the_pipelined_commands_follow(
    make_session: MakeSession,
) -> None:
    outcome = transcript(
        make_session,
        ENVELOPE + b"DATA\r\nfirst\r\n.\r\nNOOP\r\n" + message(b"second\r\n") + b"QUIT\r\n",
        answers=["failed"],
    )
    assert (
        outcome.output
        == ENVELOPE_REPLIES
        + GO_AHEAD
        + (b"451 4.3.0 Error: queue file write error\r\n")
        + OK
        + MAIL_OK
        + RCPT_OK
        + GO_AHEAD
        + delivered(1)
        + BYE
        + CLOSE_MARK
    )
    assert outcome.bodies == [b"second\r\n"]
    assert [body for _, body in outcome.refused] == [b"first\r\n"]


def test_a_busy_mailbox_is_451_busy_and_the_client_may_try_again(
    make_session: MakeSession,
) -> None:
    outcome = transcript(
        make_session, HELO + message(b"m\r\n") + message(b"m\r\n"), answers=["busy"]
    )
    assert outcome.output == HELO_OK + MAIL_OK + RCPT_OK + GO_AHEAD + (
        b"451 4.3.0 Error: mailbox busy, try again later\r\n"
    ) + MAIL_OK + RCPT_OK + GO_AHEAD + delivered(1)
    assert outcome.bodies == [b"m\r\n"]


def test_delivered_without_a_pending_message_is_a_bug(make_session: MakeSession) -> None:
    session = make_session()
    with pytest.raises(RuntimeError, match="no message is being delivered"):
        session.delivered(1)
    with pytest.raises(RuntimeError, match="no message is being delivered"):
        session.delivery_failed()


# -- §4 rules ----------------------------------------------------------------------


def test_a_whole_session_in_lower_case_works(make_session: MakeSession) -> None:
    outcome = transcript(
        make_session,
        b"ehlo client.example\r\nmail from:<a@b>\r\nrcpt to:<c@d>\r\ndata\r\nx\r\n.\r\n"
        b"rset\r\nnoop\r\nvrfy c\r\nquit\r\n",
    )
    assert outcome.output.endswith(
        GO_AHEAD + delivered(1) + OK + OK + b"252 2.0.0 Cannot VRFY user, but will accept"
        b" message\r\n" + BYE + CLOSE_MARK
    )


def test_mixed_case_verbs_are_recognised(make_session: MakeSession) -> None:
    outcome = transcript(
        make_session, b"hElO c\r\nMaIl FrOm:<a@b>\r\nrCpT tO:<c@d>\r\ndAtA\r\nx\r\n.\r\nQuIt\r\n"
    )
    assert outcome.output == HELO_OK + MAIL_OK + RCPT_OK + GO_AHEAD + delivered(1) + BYE + (
        CLOSE_MARK
    )


def test_extra_whitespace_around_tokens_is_fine(make_session: MakeSession) -> None:
    outcome = transcript(
        make_session,
        b"HELO   client.example  \r\n"
        b"MAIL FROM:    <a@b>   \r\n"
        b"RCPT TO : c@d\r\n"
        b"RCPT\tTO:\t<e@f>\t\r\n"
        b"  DATA  \r\nx\r\n.\r\n"
        b"MAIL FROM : a@b\r\n",
    )
    assert outcome.output == (
        HELO_OK + MAIL_OK + RCPT_OK + RCPT_OK + GO_AHEAD + delivered(1) + MAIL_OK
    )
    assert outcome.messages == [(Envelope("client.example", "a@b", ("c@d", "e@f")), b"x\r\n")]


def test_command_lines_may_end_in_a_bare_lf(make_session: MakeSession) -> None:
    outcome = transcript(
        make_session, b"HELO c\nMAIL FROM:<a@b>\nRCPT TO:<c@d>\nDATA\nx\r\n.\r\nQUIT\n"
    )
    assert outcome.output == HELO_OK + MAIL_OK + RCPT_OK + GO_AHEAD + delivered(1) + BYE + (
        CLOSE_MARK
    )
    assert outcome.bodies == [b"x\r\n"]


def test_a_bare_lf_dot_bare_lf_does_not_end_data_after_an_lf_data_command(
    make_session: MakeSession,
) -> None:
    outcome = transcript(make_session, ENVELOPE + b"DATA\nx\n.\nstill\r\n.\r\n")
    assert outcome.bodies == [b"x\n.\nstill\r\n"]


@pytest.mark.parametrize(
    ("mail", "rcpt", "envelope"),
    [
        (b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", ("a@b", ("c@d",))),
        (b"MAIL FROM:a@b", b"RCPT TO:c@d", ("a@b", ("c@d",))),
        (b"MAIL FROM:<>", b"RCPT TO:postmaster", ("", ("postmaster",))),
        (b"MAIL FROM:<@x,@y:a@b>", b"RCPT TO:<@relay.example:c@d>", ("a@b", ("c@d",))),
        (b"MAIL FROM:<" + b"l" * 64 + b"@b>", b"RCPT TO:<" + b"l" * 64 + b"@" + b"d" * 189 + b">",
         ("l" * 64 + "@b", ("l" * 64 + "@" + "d" * 189,))),
        (b"MAIL FROM:<j\xc3\xbcrgen@b\xc3\xbccher.example> SMTPUTF8", b"RCPT TO:<c@d>",
         ("j\u00fcrgen@b\u00fccher.example", ("c@d",))),
    ],
    ids=["brackets", "no-brackets", "null-sender", "source-routes", "at-length-limits", "utf8"],
)  # fmt: skip
def test_addresses_reach_the_envelope_without_brackets_or_routes(
    make_session: MakeSession, mail: bytes, rcpt: bytes, envelope: tuple[str, tuple[str, ...]]
) -> None:
    outcome = transcript(make_session, HELO + mail + b"\r\n" + rcpt + b"\r\nDATA\r\n.\r\n")
    assert outcome.output == HELO_OK + MAIL_OK + RCPT_OK + GO_AHEAD + delivered(1)
    assert outcome.messages == [(Envelope("client.example", *envelope), b"")]


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"MAIL FROM:<" + b"l" * 65 + b"@b>", BAD_SENDER),
        (b"MAIL FROM:<" + b"l" * 64 + b"@" + b"d" * 190 + b">", BAD_SENDER),
        (b"MAIL FROM:<a@b", BAD_SENDER),
        (b"MAIL FROM:a@b>", BAD_SENDER),
        (b"MAIL FROM:<<a@b>", BAD_SENDER),
    ],
    ids=["local-65", "path-257", "unclosed", "unopened", "doubled-open"],
)
def test_a_too_long_or_unbalanced_sender_is_501(
    make_session: MakeSession, command: bytes, reply: bytes
) -> None:
    assert transcript(make_session, HELO + command + b"\r\n").output == HELO_OK + reply


def test_the_null_sender_is_only_for_mail(make_session: MakeSession) -> None:
    outcome = transcript(make_session, HELO + b"MAIL FROM:<>\r\nRCPT TO:<>\r\n")
    assert outcome.output == HELO_OK + MAIL_OK + BAD_RECIPIENT
    assert outcome.session.reverse_path == ""


def test_several_recipients_get_one_delivery_in_order_with_duplicates(
    make_session: MakeSession,
) -> None:
    outcome = transcript(
        make_session,
        HELO + MAIL + b"RCPT TO:<b@x>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nhello\r\n.\r\n",
    )
    assert outcome.output == HELO_OK + MAIL_OK + RCPT_OK * 3 + GO_AHEAD + delivered(1)
    assert outcome.messages == [
        (Envelope("client.example", "alice@example.org", ("b@x", "a@x", "b@x")), b"hello\r\n")
    ]


def test_the_helo_name_carries_over_to_the_next_message_and_nothing_else_does(
    make_session: MakeSession,
) -> None:
    outcome = transcript(
        make_session,
        HELO
        + message(b"one\r\n", rcpt=b"r1@x")
        + b"RSET\r\n"
        + message(b"two\r\n", sender=b"s2@y", rcpt=b"r2@x"),
    )
    assert outcome.messages == [
        (Envelope("client.example", "alice@example.org", ("r1@x",)), b"one\r\n"),
        (Envelope("client.example", "s2@y", ("r2@x",)), b"two\r\n"),
    ]


WHOLE_SESSION = [
    b"EHLO client.example\r\n",
    b"MAIL FROM:<alice@example.org> SIZE=20\r\n",
    b"RCPT TO:<bob@example.net>\r\n",
    b"RCPT TO:<carol@example.net>\r\n",
    b"DATA\r\n",
    b"Subject: one\r\n\r\nfirst\r\n.\r\n",
    b"MAIL FROM:<>\r\n",
    b"RCPT TO:<alice@example.org>\r\n",
    b"DATA\r\n",
    b"Subject: two\r\n\r\n..second\r\n.\r\n",
    b"QUIT\r\n",
]


def test_a_pipelined_session_in_one_chunk_answers_as_one_command_at_a_time(
    make_session: MakeSession,
) -> None:
    one_by_one = converse(make_session(), *WHOLE_SESSION)
    outcome = transcript(make_session, b"".join(WHOLE_SESSION))
    assert outcome.output == one_by_one
    assert one_by_one == (
        replies.named_replies("test.example", 1024).ehlo.wire
        + MAIL_OK
        + RCPT_OK * 2
        + GO_AHEAD
        + delivered(1)
        + MAIL_OK
        + RCPT_OK
        + GO_AHEAD
        + delivered(2)
        + BYE
        + CLOSE_MARK
    )
    assert outcome.bodies == [b"Subject: one\r\n\r\nfirst\r\n", b"Subject: two\r\n\r\n.second\r\n"]


def test_every_line_is_answered_once_in_order_when_pipelined(make_session: MakeSession) -> None:
    lines = [HELO, b"NOOP\r\n", b"FOO\r\n", MAIL, b"\r\n", RCPT, b"VRFY x\r\n", b"RSET\r\n"]
    session = make_session()
    one_at_a_time = b"".join(converse(session, line) for line in lines)
    assert one_at_a_time == (
        HELO_OK
        + OK
        + UNKNOWN
        + MAIL_OK
        + BAD_SYNTAX
        + RCPT_OK
        + b"252 2.0.0 Cannot VRFY user, but will accept message\r\n"
        + OK
    )
    assert transcript(make_session, b"".join(lines)).output == one_at_a_time


# -- message data --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "body"),
    [
        (b"..x\r\n", b".x\r\n"),
        (b"a\r\n..b\r\n", b"a\r\n.b\r\n"),
        (b".leading dot on the first line\r\n", b"leading dot on the first line\r\n"),
        (b"..\r\n", b".\r\n"),
        (b"a . b\r\n", b"a . b\r\n"),
    ],
    ids=["first-line", "later-line", "single-leading-dot", "dot-line", "inner-dot"],
)
def test_dots_are_unstuffed(make_session: MakeSession, data: bytes, body: bytes) -> None:
    outcome = transcript(make_session, ENVELOPE + b"DATA\r\n" + data + b".\r\n")
    assert outcome.bodies == [body]


def test_eight_bit_and_invalid_utf8_bytes_are_stored_untouched(make_session: MakeSession) -> None:
    body = b"caf\xc3\xa9 \xff\xfe\x80\x00\x1b[0m \xed\xa0\x80 \xc3(\r\nbare\rcr\nbare lf\r\n"
    outcome = transcript(make_session, ENVELOPE + b"DATA\r\n" + body + b".\r\n")
    assert outcome.bodies == [body]


SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nsmuggled\r\n"


@pytest.mark.parametrize(
    ("fake_end", "stored"),
    [
        (b"\n.\n", b"\n.\n"),
        (b"\r.\r", b"\r.\r"),
        (b"\n.\r\n", b"\n.\r\n"),
        (b"\r\n.\n", b"\r\n\n"),  # the CRLF line ".\nMAIL ..." loses its leading dot
        (b"\r\n.\r\r\n", b"\r\n\r\r\n"),  # the CRLF line ".\r" loses its leading dot
    ],
    ids=["lf-dot-lf", "cr-dot-cr", "lf-dot-crlf", "crlf-dot-lf", "crlf-dot-cr-crlf"],
)
def test_a_smuggled_message_is_content_of_the_one_message(
    make_session: MakeSession, fake_end: bytes, stored: bytes
) -> None:
    outcome = transcript(
        make_session,
        ENVELOPE + b"DATA\r\nlegit" + fake_end + SMUGGLED + b".\r\nQUIT\r\n",
    )
    assert outcome.output == ENVELOPE_REPLIES + GO_AHEAD + delivered(1) + BYE + CLOSE_MARK
    assert outcome.messages == [(ALICE_TO_BOB, b"legit" + stored + SMUGGLED)]


def test_the_end_of_data_line_is_found_at_every_split(make_session: MakeSession) -> None:
    outcome = transcript(
        make_session,
        ENVELOPE + b"DATA\r\nx\r\n..y\r\n.\r\nNOOP\r\n",
        splittings=two_piece_splits,
    )
    assert outcome.output == ENVELOPE_REPLIES + GO_AHEAD + delivered(1) + OK
    assert outcome.bodies == [b"x\r\n.y\r\n"]


def test_a_client_leaving_mid_data_loses_only_that_message(make_session: MakeSession) -> None:
    outcome = transcript(
        make_session, HELO + message(b"kept\r\n") + message(b"lost\r\n")[:-3], eof=True
    )
    assert outcome.output == HELO_OK + (MAIL_OK + RCPT_OK + GO_AHEAD) + delivered(1) + (
        MAIL_OK + RCPT_OK + GO_AHEAD
    )
    assert outcome.bodies == [b"kept\r\n"]
    assert outcome.session.peer_closed
    assert outcome.session.receive(b".\r\n") == []


def test_a_message_whose_end_arrived_is_delivered_even_if_the_client_leaves(
    make_session: MakeSession,
) -> None:
    session = make_session()
    actions = session.receive(ENVELOPE + b"DATA\r\nlast words\r\n.\r\n")
    assert session.receive(b"") == []
    assert isinstance(actions[-1], Deliver)
    assert actions[-1].body == b"last words\r\n"
    assert render(session.delivered(1)) == delivered(1)


def test_a_spooled_body_has_the_same_bytes(make_session: MakeSession) -> None:
    body = b"".join(b"..line %03d \xff\r\n" % i for i in range(60))
    data = ENVELOPE + b"DATA\r\n" + body + b".\r\n"
    in_memory = transcript(make_session, data)
    spooled = transcript(lambda: make_session(new_spool=io.BytesIO, spool_threshold=32), data)
    assert spooled == in_memory
    assert len(in_memory.bodies[0]) < 1024
    session = make_session(new_spool=io.BytesIO, spool_threshold=32)
    deliver = session.receive(data)[-1]
    assert isinstance(deliver, Deliver)
    assert isinstance(deliver.body, io.BytesIO)


def test_progress_moves_when_a_command_or_data_line_completes(make_session: MakeSession) -> None:
    session = make_session()
    converse(session, ENVELOPE + b"DATA\r\none\r\ntwo")
    seen = session.progress
    assert seen > 0
    for data, moves in [
        (b" still the line two", False),
        (b"\r", False),
        (b"\n", True),  # data line "two ..." ended
        (b"thr", False),
        (b"ee\r\n.\r\n", True),
        (b"NO", False),
        (b"OP\r\n", True),  # a command line ended
    ]:
        converse(session, data)
        assert (session.progress != seen) is moves, data
        seen = session.progress


def test_play_answers_every_deliver_before_the_replies_behind_it(
    make_session: MakeSession,
) -> None:
    session = make_session()
    store = FakeStore()
    actions = session.receive(HELO + message(b"a\r\n") + b"NOOP\r\n")
    assert isinstance(actions[-1], Deliver)
    assert play(session, actions, store) == (
        HELO_OK + MAIL_OK + RCPT_OK + GO_AHEAD + delivered(1) + OK
    )


def test_close_is_an_action_after_the_last_reply(make_session: MakeSession) -> None:
    actions = make_session().receive(b"QUIT\r\n")
    assert actions == [replies.BYE, Close()]


def test_sessions_share_nothing(make_session: MakeSession) -> None:
    first, second = make_session(), make_session()
    converse(first, HELO + MAIL)
    assert isinstance(second, Session)
    assert converse(second, RCPT) == NEED_HELO


def test_a_store_failure_that_reaches_the_error_limit_closes_without_reading_on(
    make_session: MakeSession,
) -> None:
    outcome = transcript(
        lambda: make_session(max_errors=2),
        b"FOO\r\n" + ENVELOPE + b"DATA\r\nx\r\n.\r\nNOOP\r\n",
        answers=["failed"],
    )
    assert (
        outcome.output
        == UNKNOWN
        + ENVELOPE_REPLIES
        + GO_AHEAD
        + (b"451 4.3.0 Error: queue file write error\r\n")
        + TOO_MANY_ERRORS
        + CLOSE_MARK
    )
