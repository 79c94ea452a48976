"""Byte-level transcripts for SPEC §8 against the sans-IO session: STARTTLS, AUTH, HELP
and what EHLO advertises.

The session never does TLS itself: STARTTLS ends in a ``StartTLS`` action (shown as
:data:`~tests.scripts.STARTTLS_MARK`) and the transport calls
:meth:`Session.tls_started` once its handshake is done. Every transcript runs whole,
one byte at a time and split at random points (:func:`tests.scripts.transcript`).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest

from selsmtp.auth import Credentials
from selsmtp.session import Envelope, Session, State
from tests.scripts import (
    CLOSE_MARK,
    GO_AHEAD,
    STARTTLS_MARK,
    MakeSession,
    converse,
    delivered,
    message,
    transcript,
)

HELO_OK = b"250 test.example\r\n"
MAIL_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
NEED_HELO = b"503 5.5.1 Error: need HELO command\r\n"
UNKNOWN = b"502 5.5.2 Error: command not recognized\r\n"
READY_FOR_TLS = b"220 2.0.0 Ready to start TLS\r\n"
AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
AUTH_FAILED = b"535 5.7.8 Error: authentication failed\r\n"
AUTH_ABORTED = b"501 5.7.0 Authentication aborted\r\n"
BAD_BASE64 = b"501 5.5.2 Error: invalid base64\r\n"
MUST_STARTTLS = b"530 5.7.0 Must issue a STARTTLS command first\r\n"
AUTH_NEEDED = b"530 5.7.0 Authentication required\r\n"
ENCRYPTION_NEEDED = b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
TOO_MANY_ERRORS = b"421 4.7.0 test.example Error: too many errors\r\n"
ASK_USERNAME = b"334 VXNlcm5hbWU6\r\n"
ASK_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"

EHLO = b"EHLO client.example\r\n"
TLS_VERSION, TLS_CIPHER = "TLSv1.3", "TLS_AES_256_GCM_SHA384"

#: a configuration with STARTTLS (the files are not read by a session)
TLS: dict[str, Any] = {"tls_cert": "cert.pem", "tls_key": "key.pem"}
USERS = Credentials({"alice": "s3cret", "bob": "hunter2"})
AUTH_FILE: dict[str, Any] = {"auth": "file", "auth_users": USERS}


def ehlo_lines(*extra: bytes) -> bytes:
    lines = [b"test.example", b"PIPELINING", b"SIZE 1024", b"8BITMIME", b"SMTPUTF8"]
    lines += [*extra, b"ENHANCEDSTATUSCODES", b"HELP"]
    return b"".join(
        b"250%s%s\r\n" % (b" " if i == len(lines) - 1 else b"-", line)
        for i, line in enumerate(lines)
    )


def b64(text: bytes) -> bytes:
    return base64.b64encode(text)


def plain(user: bytes, password: bytes, authzid: bytes = b"") -> bytes:
    return b64(authzid + b"\0" + user + b"\0" + password)


def under_tls(make_session: MakeSession, **overrides: Any) -> Callable[[], Session]:
    """A factory of sessions that said STARTTLS and finished the handshake."""

    def make() -> Session:
        session = make_session(**{**TLS, **overrides})
        session.receive(EHLO + b"STARTTLS\r\n")
        assert session.state is State.STARTTLS
        assert session.tls_started(TLS_VERSION, TLS_CIPHER) == []
        return session

    return make


def with_config(make_session: MakeSession, **overrides: Any) -> Callable[[], Session]:
    return lambda: make_session(**overrides)


# -- EHLO and HELP ---------------------------------------------------------------


def test_ehlo_always_lists_enhancedstatuscodes_and_help(make_session: MakeSession) -> None:
    assert transcript(make_session, EHLO).output == ehlo_lines()


def test_ehlo_lists_starttls_before_tls_when_configured(make_session: MakeSession) -> None:
    assert transcript(with_config(make_session, **TLS), EHLO).output == ehlo_lines(b"STARTTLS")


def test_ehlo_under_tls_lists_auth_and_no_starttls(make_session: MakeSession) -> None:
    outcome = transcript(under_tls(make_session, auth="any"), EHLO)
    assert outcome.output == ehlo_lines(b"AUTH PLAIN LOGIN")


def test_ehlo_before_tls_hides_auth_unless_insecure_auth_is_allowed(
    make_session: MakeSession,
) -> None:
    hidden = with_config(make_session, **TLS, auth="any")
    assert transcript(hidden, EHLO).output == ehlo_lines(b"STARTTLS")
    shown = with_config(make_session, **TLS, auth="any", auth_allow_insecure=True)
    assert transcript(shown, EHLO).output == ehlo_lines(b"STARTTLS", b"AUTH PLAIN LOGIN")


def test_help_is_214_at_any_time(make_session: MakeSession) -> None:
    help_reply = b"214 2.0.0 See RFC 5321 and https://www.rfc-editor.org\r\n"
    outcome = transcript(
        make_session, b"HELP\r\n" + EHLO + b"HELP me\r\nMAIL FROM:<a@b>\r\nHELP\r\n"
    )
    assert outcome.output == help_reply + ehlo_lines() + help_reply + MAIL_OK + help_reply


# -- STARTTLS ----------------------------------------------------------------------


def test_starttls_is_220_then_the_transport_takes_over(make_session: MakeSession) -> None:
    outcome = transcript(with_config(make_session, **TLS), EHLO + b"STARTTLS\r\n")
    assert outcome.output == ehlo_lines(b"STARTTLS") + READY_FOR_TLS + STARTTLS_MARK
    assert outcome.state is State.STARTTLS


def test_commands_pipelined_behind_starttls_are_discarded(make_session: MakeSession) -> None:
    # The STARTTLS command-injection flaw (CVE-2011-0411 and kin): plaintext sent
    # behind STARTTLS must never be read as a command after the handshake.
    attack = EHLO + b"STARTTLS\r\nMAIL FROM:<x>\r\n"
    outcome = transcript(with_config(make_session, **TLS), attack)
    assert outcome.output == ehlo_lines(b"STARTTLS") + READY_FOR_TLS + STARTTLS_MARK
    session = outcome.session
    assert session.tls_started(TLS_VERSION, TLS_CIPHER) == []
    assert session.state is State.FRESH
    # nothing of the MAIL line was kept: the first command after the handshake is new
    assert converse(session, b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"


def test_after_the_handshake_the_session_is_new(make_session: MakeSession) -> None:
    outcome = transcript(
        under_tls(make_session),
        b"MAIL FROM:<alice@example.org>\r\n" + EHLO + message(b"x\r\n"),
    )
    assert outcome.output == NEED_HELO + ehlo_lines() + MAIL_OK + RCPT_OK + GO_AHEAD + delivered(1)
    envelope = outcome.messages[0][0]
    assert envelope.tls == f"{TLS_VERSION} with cipher {TLS_CIPHER}"
    assert envelope.auth_user is None


@pytest.mark.parametrize(
    ("before", "line", "reply"),
    [
        (EHLO, b"STARTTLS now\r\n", b"501 5.5.4 Syntax: STARTTLS\r\n"),
        (
            EHLO + b"MAIL FROM:<a@b>\r\n",
            b"STARTTLS\r\n",
            b"503 5.5.1 Error: MAIL transaction in progress\r\n",
        ),
    ],
    ids=["argument", "in-transaction"],
)
def test_starttls_refusals(
    make_session: MakeSession, before: bytes, line: bytes, reply: bytes
) -> None:
    outcome = transcript(with_config(make_session, **TLS), before + line)
    assert outcome.output.endswith(reply)
    assert outcome.state is not State.STARTTLS


def test_starttls_under_tls_already_is_503(make_session: MakeSession) -> None:
    outcome = transcript(under_tls(make_session), EHLO + b"STARTTLS\r\n")
    assert outcome.output == ehlo_lines() + b"503 5.5.1 Error: TLS already active\r\n"


def test_starttls_without_a_certificate_is_not_recognized(make_session: MakeSession) -> None:
    assert transcript(make_session, EHLO + b"STARTTLS\r\n").output == ehlo_lines() + UNKNOWN


def test_require_tls_refuses_mail_before_tls(make_session: MakeSession) -> None:
    outcome = transcript(
        with_config(make_session, **TLS, require_tls=True), EHLO + b"MAIL FROM:<a@b>\r\n"
    )
    assert outcome.output == ehlo_lines(b"STARTTLS") + MUST_STARTTLS
    after = transcript(under_tls(make_session, require_tls=True), EHLO + b"MAIL FROM:<a@b>\r\n")
    assert after.output == ehlo_lines() + MAIL_OK


# -- AUTH --------------------------------------------------------------------------


def authed(make_session: MakeSession, data: bytes, **overrides: Any) -> Any:
    """A transcript after STARTTLS and EHLO, with ``--auth`` from ``overrides``."""
    outcome = transcript(under_tls(make_session, **{**AUTH_FILE, **overrides}), EHLO + data)
    assert outcome.output.startswith(ehlo_lines(b"AUTH PLAIN LOGIN"))
    outcome.output = outcome.output[len(ehlo_lines(b"AUTH PLAIN LOGIN")) :]
    return outcome


@pytest.mark.parametrize(
    "exchange",
    [
        b"AUTH PLAIN " + plain(b"alice", b"s3cret") + b"\r\n",
        b"AUTH plain\r\n" + plain(b"alice", b"s3cret") + b"\r\n",
        b"AUTH PLAIN " + plain(b"alice", b"s3cret", authzid=b"alice") + b"\r\n",
        b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(b"s3cret") + b"\r\n",
        b"AUTH LOGIN " + b64(b"alice") + b"\r\n" + b64(b"s3cret") + b"\r\n",
    ],
    ids=["plain-initial", "plain-challenge", "plain-authzid", "login", "login-initial"],
)
def test_auth_succeeds_and_the_user_is_noted(make_session: MakeSession, exchange: bytes) -> None:
    outcome = authed(make_session, exchange + message(b"x\r\n"))
    prompts = {
        b"AUTH plain\r\n": b"334 \r\n",
        b"AUTH LOGIN\r\n": ASK_USERNAME + ASK_PASSWORD,
        b"AUTH LOGIN ": ASK_PASSWORD,
    }
    prompt = next((p for start, p in prompts.items() if exchange.startswith(start)), b"")
    assert outcome.output == prompt + AUTH_OK + MAIL_OK + RCPT_OK + GO_AHEAD + delivered(1)
    envelope: Envelope = outcome.messages[0][0]
    assert envelope.auth_user == "alice"
    assert outcome.session.auth_user == "alice"


@pytest.mark.parametrize(
    ("exchange", "reply"),
    [
        (b"AUTH PLAIN " + plain(b"alice", b"wrong") + b"\r\n", AUTH_FAILED),
        (b"AUTH PLAIN " + plain(b"nobody", b"s3cret") + b"\r\n", AUTH_FAILED),
        (b"AUTH PLAIN " + plain(b"", b"s3cret") + b"\r\n", AUTH_FAILED),
        (b"AUTH PLAIN " + b64(b"alice\0s3cret") + b"\r\n", AUTH_FAILED),
        (b"AUTH PLAIN " + plain(b"alice", b"s3cret", authzid=b"bob") + b"\r\n", AUTH_FAILED),
        (b"AUTH PLAIN =\r\n", AUTH_FAILED),
        (b"AUTH PLAIN !!!!\r\n", BAD_BASE64),
        (b"AUTH PLAIN\r\n*\r\n", b"334 \r\n" + AUTH_ABORTED),
        (b"AUTH LOGIN\r\n*\r\n", ASK_USERNAME + AUTH_ABORTED),
        (b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n*\r\n",
         ASK_USERNAME + ASK_PASSWORD + AUTH_ABORTED),
        (b"AUTH LOGIN\r\nnot base64\r\n", ASK_USERNAME + BAD_BASE64),
        (b"AUTH LOGIN\r\n" + b64(b"bob") + b"\r\n" + b64(b"s3cret") + b"\r\n",
         ASK_USERNAME + ASK_PASSWORD + AUTH_FAILED),
        (b"AUTH CRAM-MD5\r\n", b"504 5.5.4 Error: unsupported authentication mechanism\r\n"),
        (b"AUTH\r\n", b"501 5.5.4 Syntax: AUTH mechanism\r\n"),
    ],
    ids=["wrong-password", "unknown-user", "empty-user", "two-parts", "other-authzid", "empty",
         "bad-base64", "plain-cancel", "login-cancel-user", "login-cancel-password",
         "login-bad-base64", "login-wrong", "unknown-mechanism", "no-mechanism"],
)  # fmt: skip
def test_auth_failures(make_session: MakeSession, exchange: bytes, reply: bytes) -> None:
    outcome = authed(make_session, exchange + b"MAIL FROM:<a@b>\r\n", auth_required=True)
    assert outcome.output == reply + AUTH_NEEDED
    assert outcome.session.auth_user is None


def test_any_mode_accepts_every_user_and_password(make_session: MakeSession) -> None:
    outcome = authed(
        make_session, b"AUTH PLAIN " + plain(b"x", b"y") + b"\r\n", auth="any", auth_users=None
    )
    assert outcome.output == AUTH_OK
    assert outcome.session.auth_user == "x"


@pytest.mark.parametrize(
    ("before", "reply"),
    [
        (b"AUTH PLAIN " + plain(b"alice", b"s3cret") + b"\r\n",
         AUTH_OK + b"503 5.5.1 Error: already authenticated\r\n"),
        (b"MAIL FROM:<a@b>\r\n", MAIL_OK + b"503 5.5.1 Error: MAIL transaction in progress\r\n"),
    ],
    ids=["second-auth", "in-transaction"],
)  # fmt: skip
def test_auth_out_of_order_is_503(make_session: MakeSession, before: bytes, reply: bytes) -> None:
    outcome = authed(make_session, before + b"AUTH PLAIN " + plain(b"bob", b"hunter2") + b"\r\n")
    assert outcome.output == reply


def test_auth_before_ehlo_is_503(make_session: MakeSession) -> None:
    outcome = transcript(
        under_tls(make_session, auth="any"), b"AUTH PLAIN " + plain(b"a", b"b") + b"\r\n"
    )
    assert outcome.output == b"503 5.5.1 Error: send HELO/EHLO first\r\n"


def test_auth_off_is_not_recognized(make_session: MakeSession) -> None:
    outcome = transcript(
        under_tls(make_session), EHLO + b"AUTH PLAIN " + plain(b"a", b"b") + b"\r\n"
    )
    assert outcome.output == ehlo_lines() + UNKNOWN


def test_auth_before_tls_needs_encryption_or_starttls(make_session: MakeSession) -> None:
    line = b"AUTH PLAIN " + plain(b"alice", b"s3cret") + b"\r\n"
    insecure = transcript(with_config(make_session, **TLS, auth="any"), EHLO + line)
    assert insecure.output == ehlo_lines(b"STARTTLS") + ENCRYPTION_NEEDED
    required = transcript(
        with_config(make_session, **TLS, auth="any", require_tls=True), EHLO + line
    )
    assert required.output == ehlo_lines(b"STARTTLS") + MUST_STARTTLS
    allowed = transcript(
        with_config(make_session, **TLS, auth="any", auth_allow_insecure=True), EHLO + line
    )
    assert allowed.output == ehlo_lines(b"STARTTLS", b"AUTH PLAIN LOGIN") + AUTH_OK


def test_starttls_forgets_an_insecure_auth(make_session: MakeSession) -> None:
    session = make_session(**TLS, auth="any", auth_allow_insecure=True)
    session.receive(EHLO + b"AUTH PLAIN " + plain(b"alice", b"x") + b"\r\nSTARTTLS\r\n")
    assert session.auth_user == "alice"
    session.tls_started(TLS_VERSION, TLS_CIPHER)
    assert session.auth_user is None


def test_auth_required_refuses_mail_until_authenticated(make_session: MakeSession) -> None:
    outcome = authed(
        make_session,
        b"MAIL FROM:<a@b>\r\nAUTH PLAIN " + plain(b"alice", b"s3cret") + b"\r\nMAIL FROM:<a@b>\r\n",
        auth_required=True,
    )
    assert outcome.output == AUTH_NEEDED + AUTH_OK + MAIL_OK


def test_auth_lines_may_be_long_and_other_lines_may_not(make_session: MakeSession) -> None:
    long_password = b"p" * 9000
    line = b"AUTH PLAIN " + plain(b"alice", long_password) + b"\r\n"
    assert 12000 < len(line) <= 12288
    outcome = transcript(under_tls(make_session, **AUTH_FILE), EHLO + line)
    assert outcome.output == ehlo_lines(b"AUTH PLAIN LOGIN") + AUTH_FAILED
    noop = b"NOOP " + b"x" * 600 + b"\r\n"
    assert authed(make_session, noop).output == b"500 5.5.2 Error: line too long\r\n"


def test_an_auth_response_over_the_limit_is_500_5_5_6(make_session: MakeSession) -> None:
    response = b"A" * 12300 + b"\r\n"
    outcome = authed(make_session, b"AUTH PLAIN\r\n" + response + b"NOOP\r\n")
    assert outcome.output == (
        b"334 \r\n500 5.5.6 Authentication exchange line is too long\r\n250 2.0.0 Ok\r\n"
    )


def test_failed_auth_counts_toward_the_error_cap(make_session: MakeSession) -> None:
    wrong = b"AUTH PLAIN " + plain(b"alice", b"wrong") + b"\r\n"
    outcome = authed(make_session, wrong * 3, max_errors=3)
    assert outcome.output == AUTH_FAILED * 3 + TOO_MANY_ERRORS + CLOSE_MARK


# -- review of issue 11: boundaries and attacks the tests above leave open -------------


def auth_line(length: int, ending: bytes = b"\r\n") -> bytes:
    """``AUTH PLAIN <base64>`` of exactly ``length`` bytes, line ending included, whose
    base64 is valid (alice with a wrong password: its reply is 535, not 501)."""
    head = b"AUTH PLAIN "
    room = length - len(head) - len(ending)
    # base64 comes in blocks of 4; the password's own length picks the block count,
    # and spaces (stripped by the session) pad the line to the exact length.
    raw = (room // 4) * 3
    encoded = plain(b"alice", b"p" * (raw - len(b"\0alice\0")))
    assert len(encoded) <= room
    return head + encoded + b" " * (room - len(encoded)) + ending


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_an_auth_command_line_of_exactly_12288_bytes_is_read_and_one_more_is_too_long(
    make_session: MakeSession, ending: bytes
) -> None:
    line = auth_line(12288, ending)
    assert len(line) == 12288
    outcome = authed(make_session, line + b"NOOP\r\n")
    assert outcome.output == AUTH_FAILED + b"250 2.0.0 Ok\r\n"
    longer = auth_line(12289, ending)
    assert len(longer) == 12289
    outcome = authed(make_session, longer + b"NOOP\r\n")
    assert outcome.output == b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_an_auth_response_of_exactly_12288_bytes_is_read_and_one_more_is_too_long(
    make_session: MakeSession, ending: bytes
) -> None:
    response = auth_line(12288, ending)[len(b"AUTH PLAIN ") - 1 :]
    response = b" " * (12288 - len(response)) + response  # spaces are stripped
    assert len(response) == 12288
    outcome = authed(make_session, b"AUTH PLAIN\r\n" + response + b"NOOP\r\n")
    assert outcome.output == b"334 \r\n" + AUTH_FAILED + b"250 2.0.0 Ok\r\n"
    outcome = authed(make_session, b"AUTH PLAIN\r\n" + b" " + response + b"NOOP\r\n")
    assert outcome.output == (
        b"334 \r\n500 5.5.6 Authentication exchange line is too long\r\n250 2.0.0 Ok\r\n"
    )


def noop_of(length: int) -> bytes:
    return b"NOOP " + b"x" * (length - len(b"NOOP \r\n")) + b"\r\n"


def test_other_lines_keep_512_bytes_with_auth_on_and_after_an_auth_exchange(
    make_session: MakeSession,
) -> None:
    exchange = b"AUTH PLAIN\r\n" + plain(b"alice", b"s3cret") + b"\r\n"
    outcome = authed(
        make_session, noop_of(512) + noop_of(513) + exchange + noop_of(512) + noop_of(513)
    )
    ok, too_long = b"250 2.0.0 Ok\r\n", b"500 5.5.2 Error: line too long\r\n"
    assert outcome.output == ok + too_long + b"334 \r\n" + AUTH_OK + ok + too_long


@pytest.mark.parametrize("overrides", [{}, TLS], ids=["auth-off", "auth-off-with-starttls"])
def test_with_auth_off_an_auth_line_is_a_command_line_like_any_other(
    make_session: MakeSession, overrides: dict[str, Any]
) -> None:
    # SPEC §3: a command line over 512 bytes is 500. With --auth off AUTH is not a
    # command at all (502), so its line gets no more room than any other.
    line = b"AUTH PLAIN " + b"A" * 600 + b"\r\n"
    outcome = transcript(with_config(make_session, **overrides), line + b"NOOP\r\n")
    assert outcome.output == b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"


def test_auth_login_with_an_empty_initial_response_asks_for_the_password(
    make_session: MakeSession,
) -> None:
    # RFC 4954 §4: "=" is an initial response of zero length (here: no user name),
    # not bad base64.
    outcome = authed(make_session, b"AUTH LOGIN =\r\n" + b64(b"s3cret") + b"\r\n")
    assert outcome.output == ASK_PASSWORD + AUTH_FAILED


def test_auth_login_with_a_bad_base64_initial_response_is_501(make_session: MakeSession) -> None:
    outcome = authed(make_session, b"AUTH LOGIN !!!!\r\nNOOP\r\n")
    assert outcome.output == BAD_BASE64 + b"250 2.0.0 Ok\r\n"
    assert outcome.state is State.READY


def test_a_user_with_an_empty_password_takes_only_the_empty_password(
    make_session: MakeSession,
) -> None:
    users = Credentials({"carol": ""})
    login = b"AUTH LOGIN\r\n" + b64(b"carol") + b"\r\n"
    for password, reply in ((b"", AUTH_OK), (b"\0", AUTH_FAILED), (b"\0\0\0", AUTH_FAILED)):
        outcome = authed(make_session, login + b64(password) + b"\r\n", auth_users=users)
        assert outcome.output == ASK_USERNAME + ASK_PASSWORD + reply, password


@pytest.mark.parametrize(
    "attack",
    [
        EHLO + b"STARTTLS\r\nMAIL FROM:<x>\r\n",
        EHLO + b"STARTTLS\r\nNOOP\r\n",
        EHLO + b"STARTTLS\nMAIL FROM:<x>\n",
        EHLO + b"STARTTLS\r\nAUTH PLAIN\r\n",
        EHLO + b"STARTTLS\r\n" + b"x" * 700,  # a line too long, half-read
        EHLO + message(b"x\r\n") + b"STARTTLS\r\nMAIL FROM:<x>\r\n",  # behind a message
    ],
    ids=["mail", "noop", "bare-lf", "auth", "too-long", "behind-data"],
)
def test_nothing_pipelined_behind_starttls_survives_the_handshake_in_any_split(
    make_session: MakeSession, attack: bytes
) -> None:
    # Each split of the attack, then the handshake, then one command: only its reply.
    expected = READY_FOR_TLS + STARTTLS_MARK
    for chunks in [[attack], [attack[i : i + 1] for i in range(len(attack))]] + [
        [attack[:at], attack[at:]] for at in range(1, len(attack))
    ]:
        session = make_session(**TLS, auth="any")
        output = converse(session, *chunks)
        assert output.endswith(expected), chunks
        assert session.tls_started(TLS_VERSION, TLS_CIPHER) == []
        assert converse(session, b"NOOP\r\n") == b"250 2.0.0 Ok\r\n", chunks
        assert converse(session, EHLO) == ehlo_lines(b"AUTH PLAIN LOGIN"), chunks


def test_on_the_implicit_tls_port_ehlo_lists_auth_and_never_starttls(
    make_session: MakeSession,
) -> None:
    def implicit() -> Session:
        session = make_session(**TLS, auth="any")
        assert session.tls_started(TLS_VERSION, TLS_CIPHER) == []
        return session

    outcome = transcript(implicit, EHLO + b"STARTTLS\r\n")
    assert outcome.output == ehlo_lines(b"AUTH PLAIN LOGIN") + (
        b"503 5.5.1 Error: TLS already active\r\n"
    )


def test_with_require_tls_ehlo_never_lists_auth_before_tls(make_session: MakeSession) -> None:
    # AUTH cannot succeed there (530), even with --auth-allow-insecure.
    config = with_config(
        make_session, **TLS, auth="any", auth_allow_insecure=True, require_tls=True
    )
    assert transcript(config, EHLO).output == ehlo_lines(b"STARTTLS")


@pytest.mark.parametrize("verb", [b"STARTTLS", b"AUTH PLAIN " + plain(b"alice", b"s3cret")])
@pytest.mark.parametrize(
    "transaction",
    [b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"],
    ids=["after-mail", "after-rcpt"],
)
def test_starttls_and_auth_inside_a_transaction_are_503_in_every_state_of_it(
    make_session: MakeSession, verb: bytes, transaction: bytes
) -> None:
    config = with_config(make_session, **TLS, **AUTH_FILE, auth_allow_insecure=True)
    outcome = transcript(config, EHLO + transaction + verb + b"\r\nDATA\r\n")
    in_progress = b"503 5.5.1 Error: MAIL transaction in progress\r\n"
    assert outcome.output.endswith(
        in_progress
        + (GO_AHEAD if b"RCPT" in transaction else b"503 5.5.1 Error: need RCPT command\r\n")
    )
    assert outcome.session.auth_user is None
