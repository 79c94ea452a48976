"""End to end with the standard library's SMTP client."""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import (
    HELO,
    NAME,
    WAIT,
    RunningServer,
    read_mailbox,
)

pytestmark = pytest.mark.timeout(60)


def test_ehlo_advertises_the_extensions(smtp: smtplib.SMTP) -> None:
    code, text = smtp.ehlo(HELO)

    assert code == 250
    assert text.split(b"\n") == [
        NAME.encode(),
        b"PIPELINING",
        b"SIZE 33554432",
        b"8BITMIME",
        b"SMTPUTF8",
        b"ENHANCEDSTATUSCODES",
        b"HELP",
    ]
    assert smtp.has_extn("pipelining")
    assert smtp.esmtp_features["size"] == "33554432"


def test_ehlo_size_is_the_configured_limit(start_server: Callable[..., RunningServer]) -> None:
    running = start_server(max_message_size=1000)
    with smtplib.SMTP(running.host, running.port, timeout=WAIT) as client:
        client.ehlo(HELO)
        assert client.esmtp_features["size"] == "1000"


def test_helo_and_noop_and_vrfy(smtp: smtplib.SMTP) -> None:
    assert smtp.helo(HELO) == (250, NAME.encode())
    assert smtp.noop() == (250, b"2.0.0 Ok")
    assert smtp.verify("someone") == (252, b"2.0.0 Cannot VRFY user, but will accept message")
    assert smtp.rset() == (250, b"2.0.0 Ok")


def test_many_recipients_make_one_record_with_to_lines_in_order(
    smtp: smtplib.SMTP, mailbox: Path
) -> None:
    recipients = ["zed@example.org", "amy@example.org", "zed@example.org", "bob@example.net"]
    smtp.ehlo(HELO)

    refused = smtp.sendmail("ann@example.org", recipients, b"Subject: many\r\n\r\nhi\r\n")

    assert refused == {}
    [record] = read_mailbox(mailbox)
    assert record.number == 1
    assert record.sender == "ann@example.org"
    assert record.recipients == tuple(recipients)  # in order, the duplicate kept
    assert record.body == b"Subject: many\n\nhi\n"


def test_two_messages_in_one_session_get_numbers_1_and_2(smtp: smtplib.SMTP, mailbox: Path) -> None:
    smtp.ehlo(HELO)
    smtp.sendmail("a@example.org", ["b@example.org"], b"first\r\n")
    smtp.mail("c@example.org")
    smtp.rcpt("d@example.org")
    code, text = smtp.data(b"second\r\n")

    assert (code, text) == (250, b"2.0.0 Ok: delivered message 2")
    records = read_mailbox(mailbox)
    assert [r.number for r in records] == [1, 2]
    assert [r.body for r in records] == [b"first\n", b"second\n"]
    assert all(r.helo == HELO for r in records)  # the HELO name carries over


def test_numbers_go_on_across_sessions(server: RunningServer, mailbox: Path) -> None:
    for expected in (1, 2, 3):
        with smtplib.SMTP(server.host, server.port, timeout=WAIT) as client:
            client.ehlo(HELO)
            client.mail("a@example.org")
            client.rcpt("b@example.org")
            assert client.data(b"x\r\n") == (
                250,
                f"2.0.0 Ok: delivered message {expected}".encode(),
            )
    assert [r.number for r in read_mailbox(mailbox)] == [1, 2, 3]


def test_8bit_body_bytes_survive(smtp: smtplib.SMTP, mailbox: Path) -> None:
    body = b"caf\xc3\xa9 \xff\xfe\x80 not utf-8\r\n\x00nul and \x1b esc\r\nlast\r\n"
    smtp.ehlo(HELO)

    smtp.sendmail("a@example.org", ["b@example.org"], body, mail_options=["BODY=8BITMIME"])

    [record] = read_mailbox(mailbox)
    assert record.body == body.replace(b"\r\n", b"\n")


def test_smtputf8_addresses_are_stored_as_utf8(smtp: smtplib.SMTP, mailbox: Path) -> None:
    sender = "jöran@exämple.org"
    recipients = ["ünï@例え.jp", "plain@example.org"]
    smtp.ehlo(HELO)

    smtp.sendmail(sender, recipients, "Subject: ☃\r\n\r\nsnow ☃\r\n".encode(), ["SMTPUTF8"])

    [record] = read_mailbox(mailbox)
    assert record.sender == sender
    assert record.recipients == tuple(recipients)
    assert record.body == "Subject: ☃\n\nsnow ☃\n".encode()


def test_declared_size_over_the_limit_is_refused(
    start_server: Callable[..., RunningServer], mailbox: Path
) -> None:
    running = start_server(max_message_size=1000)
    with smtplib.SMTP(running.host, running.port, timeout=WAIT) as client:
        client.ehlo(HELO)
        # sendmail declares SIZE=n because the server advertises SIZE
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("a@example.org", ["b@example.org"], b"x" * 2000 + b"\r\n")
        assert refused.value.smtp_code == 552
        assert refused.value.smtp_error == b"5.3.4 Error: message file too big"

        # the session goes on: a message within the limit is stored as number 1
        assert client.sendmail("a@example.org", ["b@example.org"], b"small\r\n") == {}
    assert [r.body for r in read_mailbox(mailbox)] == [b"small\n"]


def test_undeclared_body_over_the_limit_is_refused_at_the_end(
    start_server: Callable[..., RunningServer], mailbox: Path
) -> None:
    running = start_server(max_message_size=1000)
    with smtplib.SMTP(running.host, running.port, timeout=WAIT) as client:
        client.ehlo(HELO)
        client.mail("a@example.org")  # no SIZE=
        client.rcpt("b@example.org")
        assert client.data(b"y" * 5000 + b"\r\n") == (552, b"5.3.4 Error: message file too big")

        client.mail("a@example.org")
        client.rcpt("b@example.org")
        assert client.data(b"fits\r\n") == (250, b"2.0.0 Ok: delivered message 1")
    assert [r.body for r in read_mailbox(mailbox)] == [b"fits\n"]


def test_large_message_is_stored_whole(smtp: smtplib.SMTP, mailbox: Path) -> None:
    # bigger than the 1 MiB spool threshold, so it goes through a temporary file
    body = b"".join(b"%07d " % i + b"z" * 60 + b"\r\n" for i in range(40_000))
    smtp.ehlo(HELO)

    smtp.sendmail("a@example.org", ["b@example.org"], body)

    [record] = read_mailbox(mailbox)
    assert record.body == body.replace(b"\r\n", b"\n")


def test_mailbox_bytes_are_exactly_the_cs4410_format(smtp: smtplib.SMTP, mailbox: Path) -> None:
    smtp.ehlo(HELO)
    smtp.sendmail(
        "<alice@example.org>",
        ["bob@example.org", "<carol@example.net>"],
        b"From: mallory@example.com\r\n"
        b"To: eve@example.com\r\n"
        b"Subject: hello\r\n"
        b"\r\n"
        b"Hi Bob,\r\n"
        b".a line that starts with a dot\r\n"
        b"\r\n"
        b"bye\r\n",
    )
    smtp.sendmail("", ["postmaster@example.org"], b"bounce\r\n")  # the null sender

    assert mailbox.read_bytes() == (
        b"Received: from client.test by mx.test (CS4410MP3)\n"
        b"Number: 1\n"
        b"From: alice@example.org\n"
        b"To: bob@example.org\n"
        b"To: carol@example.net\n"
        b"\n"
        b"From: mallory@example.com\n"
        b"To: eve@example.com\n"
        b"Subject: hello\n"
        b"\n"
        b"Hi Bob,\n"
        b".a line that starts with a dot\n"
        b"\n"
        b"bye\n"
        b"\n"
        b"Received: from client.test by mx.test (CS4410MP3)\n"
        b"Number: 2\n"
        b"From: <>\n"
        b"To: postmaster@example.org\n"
        b"\n"
        b"bounce\n"
        b"\n"
    )
