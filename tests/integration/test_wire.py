"""The server over raw sockets: pipelining, odd splits, disconnects, timeouts, limits."""

from __future__ import annotations

import errno
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from selsmtp.deadlines import COMPACT_MIN

from .conftest import (
    HELO,
    NAME,
    START_DATA,
    WAIT,
    RunningServer,
    WireClient,
    delivered,
    ehlo_reply,
    greeting,
    read_mailbox,
    send_message,
    transaction,
    transaction_replies,
)

pytestmark = pytest.mark.timeout(60)

Connect = Callable[[RunningServer], WireClient]

BYE = b"221 2.0.0 Bye\r\n"
OK = b"250 2.0.0 Ok\r\n"

#: a whole session: two messages (the second to two recipients), then QUIT
SESSION = (
    f"EHLO {HELO}\r\n".encode()
    + transaction("a@example.org", ["b@example.org"], b"first message\r\n..dot\r\n")
    + transaction("c@example.org", ["d@example.org", "e@example.org"], b"second\r\n")
    + b"QUIT\r\n"
)
SESSION_REPLIES = (
    greeting() + ehlo_reply() + transaction_replies(1, 1) + transaction_replies(2, 2) + BYE
)


def check_session_stored(mailbox: Path) -> None:
    records = read_mailbox(mailbox)
    assert [(r.number, r.sender, r.recipients, r.body) for r in records] == [
        (1, "a@example.org", ("b@example.org",), b"first message\n.dot\n"),
        (2, "c@example.org", ("d@example.org", "e@example.org"), b"second\n"),
    ]


# -- pipelining and splits ------------------------------------------------------


def test_whole_pipelined_session_in_one_packet(
    server: RunningServer, connect: Connect, mailbox: Path
) -> None:
    client = connect(server)

    client.send(SESSION)

    assert client.read_until_closed() == SESSION_REPLIES
    check_session_stored(mailbox)


def test_whole_session_one_byte_per_send(
    server: RunningServer, connect: Connect, mailbox: Path
) -> None:
    client = connect(server)

    for i in range(len(SESSION)):
        client.send(SESSION[i : i + 1])

    assert client.read_until_closed() == SESSION_REPLIES
    check_session_stored(mailbox)


def test_pipelined_errors_are_answered_in_order(server: RunningServer, connect: Connect) -> None:
    client = connect(server)

    client.send(
        b"MAIL FROM:<a@b>\r\n"
        b"EHLO c\r\n"
        b"RCPT TO:<a@b>\r\n"
        b"MAIL FROM:<bad address>\r\n"
        b"MAIL FROM:<a@b> FOO=1\r\n"
        b"MAIL FROM:<a@b> SIZE=99999999999\r\n"
        b"MAIL FROM:<a@b>\r\n"
        b"DATA\r\n"
        b"RCPT TO:<>\r\n"
        b"RCPT TO:<x@y>\r\n"
        b"DATA now\r\n"
        b"RSET\r\n"
        b"QUIT\r\n"
    )

    assert client.read_until_closed() == (
        greeting()
        + b"503 5.5.1 Error: need HELO command\r\n"
        + ehlo_reply()
        + b"503 5.5.1 Error: need MAIL command\r\n"
        + b"501 5.1.7 Bad sender address syntax\r\n"
        + b"555 5.5.4 Unsupported option: FOO=1\r\n"
        + b"552 5.3.4 Error: message file too big\r\n"
        + b"250 2.1.0 Ok\r\n"
        + b"503 5.5.1 Error: need RCPT command\r\n"
        + b"501 5.1.3 Bad recipient address syntax\r\n"
        + b"250 2.1.5 Ok\r\n"
        + b"501 5.5.4 Syntax: DATA\r\n"
        + OK
        + BYE
    )


# -- the FAQ, over the wire -----------------------------------------------------


def test_faq_transcript(server: RunningServer, connect: Connect, mailbox: Path) -> None:
    client = connect(server)
    assert client.read_reply() == greeting()
    need_helo = b"503 5.5.1 Error: need HELO command\r\n"
    need_mail = b"503 5.5.1 Error: need MAIL command\r\n"
    duplicate = b"503 5.5.1 Error: duplicate HELO\r\n"
    transcript = [
        # order: nothing before HELO
        (b"MAIL FROM:<a@example.org>", need_helo),
        (b"RCPT TO:<b@example.org>", need_helo),
        (b"DATA", need_helo),
        (b"HELO", b"501 Syntax: HELO hostname\r\n"),
        (b"HELO bad host", b"501 Syntax: HELO hostname\r\n"),
        # commands are case-insensitive; whitespace around tokens is fine
        (b"hElO   client.test  ", f"250 {NAME}\r\n".encode()),
        # a second HELO/EHLO is refused and changes nothing
        (b"EHLO other.test", duplicate),
        (b"helo other.test", duplicate),
        (b"RCPT TO:<b@example.org>", need_mail),
        (b"DATA", need_mail),
        (b"noop", OK),
        (b"NOOP with an argument", OK),
        (b"", b"500 5.5.2 Error: bad syntax\r\n"),
        (b"   ", b"500 5.5.2 Error: bad syntax\r\n"),
        (b"FROB x", b"502 5.5.2 Error: command not recognized\r\n"),
        (b"NOOP " + b"x" * 600, b"500 5.5.2 Error: line too long\r\n"),
        (b"vrfy postmaster", b"252 2.0.0 Cannot VRFY user, but will accept message\r\n"),
        (b"mail from:    <a@example.org>   ", b"250 2.1.0 Ok\r\n"),
        (b"MAIL FROM:<c@example.org>", b"503 5.5.1 Error: nested MAIL command\r\n"),
        (b"HELO again.test", duplicate),
        (b"DATA", b"503 5.5.1 Error: need RCPT command\r\n"),
        (b"RcPt To : b@example.org", b"250 2.1.5 Ok\r\n"),  # space before ':', no brackets
        (b"rcpt to:<@relay.test,@other.test:c@example.org>", b"250 2.1.5 Ok\r\n"),
    ]
    for line, expected in transcript:
        assert client.command(line) == expected, line

    client.send(b"NOOP\n")  # a bare LF ends a command line too
    assert client.read_reply() == OK
    client.send(b"data\r\n")
    assert client.read_reply() == START_DATA
    client.send(b"body\r\n.\r\n")
    assert client.read_reply() == delivered(1)
    # after the message, a new transaction may start; HELO is still in force
    assert client.command(b"MAIL FROM:<>") == b"250 2.1.0 Ok\r\n"
    assert client.command(b"RSET") == OK
    assert client.command(b"RCPT TO:<b@example.org>") == need_mail
    assert client.command(b"QUIT") == BYE
    assert client.read_until_closed() == b""

    [record] = read_mailbox(mailbox)
    assert record.helo == "client.test"  # the duplicate HELOs did not change it
    assert record.sender == "a@example.org"
    assert record.recipients == ("b@example.org", "c@example.org")
    assert record.body == b"body\n"


def test_too_many_errors_closes_the_session(server: RunningServer, connect: Connect) -> None:
    client = connect(server)

    client.send(b"FROB\r\n" * 25)

    unknown = b"502 5.5.2 Error: command not recognized\r\n"
    assert client.read_until_closed() == (
        greeting() + unknown * 20 + f"421 4.7.0 {NAME} Error: too many errors\r\n".encode()
    )


# -- disconnects ----------------------------------------------------------------


@pytest.mark.parametrize("quit_first", [True, False], ids=["with-quit", "without-quit"])
def test_message_is_stored_when_the_client_closes_right_after(
    server: RunningServer, connect: Connect, mailbox: Path, quit_first: bool
) -> None:
    client = connect(server)
    assert client.read_reply() == greeting()

    client.send(
        f"EHLO {HELO}\r\n".encode()
        + transaction("a@example.org", ["b@example.org"], b"sent and gone\r\n")
        + (b"QUIT\r\n" if quit_first else b"")
    )
    client.close()  # at once, without reading a single reply

    # The server handles a connection's input in the order it arrived, so once a
    # later client's message is number 2, the first one was stored as number 1.
    assert send_message(server, b"probe\r\n") == 2
    assert [r.body for r in read_mailbox(mailbox)] == [b"sent and gone\n", b"probe\n"]


@pytest.mark.parametrize("quit_first", [True, False], ids=["with-quit", "without-quit"])
def test_half_closed_client_still_gets_its_250(
    server: RunningServer, connect: Connect, mailbox: Path, quit_first: bool
) -> None:
    client = connect(server)

    client.send(
        f"EHLO {HELO}\r\n".encode()
        + transaction("a@example.org", ["b@example.org"], b"half closed\r\n")
        + (b"QUIT\r\n" if quit_first else b"")
    )
    client.sock.shutdown(socket.SHUT_WR)

    assert client.read_until_closed() == (
        greeting() + ehlo_reply() + transaction_replies(1, 1) + (BYE if quit_first else b"")
    )
    assert [r.body for r in read_mailbox(mailbox)] == [b"half closed\n"]


@pytest.mark.parametrize(
    "unfinished",
    [
        b"MAIL FROM:<a@example.org>\r\n",
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n",
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n",
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nhalf a mess",
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nnearly\r\n.\r",
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nsmuggled\n.\n",
    ],
    ids=["after-mail", "after-rcpt", "after-data", "mid-data", "partial-end", "bare-lf-end"],
)
@pytest.mark.parametrize("how", ["close", "shutdown"])
def test_disconnect_before_the_end_stores_nothing(
    server: RunningServer, connect: Connect, mailbox: Path, unfinished: bytes, how: str
) -> None:
    client = connect(server)
    client.handshake()
    client.send(unfinished)
    if how == "close":
        client.close()
    else:
        client.sock.shutdown(socket.SHUT_WR)
        client.read_until_closed()  # the server closes its side too

    assert send_message(server, b"next\r\n") == 1  # and the server goes on serving
    assert [r.body for r in read_mailbox(mailbox)] == [b"next\n"]


# -- the line timeout -----------------------------------------------------------

TIMEOUT = 0.3
TIMEOUT_REPLY = f"421 4.4.2 {NAME} Error: timeout exceeded\r\n".encode()


def test_idle_client_times_out(
    start_server: Callable[..., RunningServer], connect: Connect
) -> None:
    client = connect(start_server(timeout=TIMEOUT))
    assert client.read_reply() == greeting()
    since = time.monotonic()

    assert client.read_reply() == TIMEOUT_REPLY
    waited = time.monotonic() - since
    assert client.read_until_closed() == b""
    assert TIMEOUT * 0.5 <= waited < TIMEOUT + 3


def test_idle_client_times_out_after_its_last_complete_line(
    start_server: Callable[..., RunningServer], connect: Connect
) -> None:
    client = connect(start_server(timeout=TIMEOUT))
    client.handshake()
    assert client.command(b"NOOP") == OK
    since = time.monotonic()

    assert client.read_reply() == TIMEOUT_REPLY
    assert time.monotonic() - since >= TIMEOUT * 0.5
    assert client.read_until_closed() == b""


def trickle(client: WireClient, data: bytes, interval: float) -> int:
    """Send ``data`` one byte per ``interval`` until the server says something.

    Returns how many bytes were sent by then.
    """
    for sent in range(len(data)):
        try:
            client.send(data[sent : sent + 1])
        except (BrokenPipeError, ConnectionResetError):
            return sent
        readable, _, _ = select.select([client.sock], [], [], interval)
        if readable:
            return sent + 1
    return len(data)


def test_client_trickling_one_line_is_cut_off(
    start_server: Callable[..., RunningServer], connect: Connect
) -> None:
    client = connect(start_server(timeout=TIMEOUT))
    client.handshake()
    line = b"NOOP " + b"x" * 40 + b"\r\n"

    sent = trickle(client, line, interval=TIMEOUT / 3)

    assert sent < len(line)  # the line never got finished
    assert client.read_reply() == TIMEOUT_REPLY
    assert client.read_until_closed() == b""


def test_client_trickling_message_data_is_cut_off(
    start_server: Callable[..., RunningServer], connect: Connect, mailbox: Path
) -> None:
    running = start_server(timeout=TIMEOUT)
    client = connect(running)
    client.handshake()
    assert client.command(b"MAIL FROM:<a@example.org>") == b"250 2.1.0 Ok\r\n"
    assert client.command(b"RCPT TO:<b@example.org>") == b"250 2.1.5 Ok\r\n"
    assert client.command(b"DATA") == START_DATA
    line = b"a line of message data sent very slowly\r\n.\r\n"

    sent = trickle(client, line, interval=TIMEOUT / 3)

    assert sent < len(line)
    assert client.read_reply() == TIMEOUT_REPLY
    assert client.read_until_closed() == b""
    assert send_message(running) == 1
    assert len(read_mailbox(mailbox)) == 1


def test_timeout_is_per_line_not_per_session(
    start_server: Callable[..., RunningServer], connect: Connect, mailbox: Path
) -> None:
    timeout = 0.5
    interval = 0.15  # each line well within the timeout, four of them well beyond it
    client = connect(start_server(timeout=timeout))
    client.handshake()
    for _ in range(4):
        assert client.quiet_for(interval)
        assert client.command(b"NOOP") == OK
    assert client.command(b"MAIL FROM:<a@example.org>") == b"250 2.1.0 Ok\r\n"
    assert client.command(b"RCPT TO:<b@example.org>") == b"250 2.1.5 Ok\r\n"
    assert client.command(b"DATA") == START_DATA
    for i in range(4):  # and lines of message data, the same
        assert client.quiet_for(interval)
        client.send(b"line %d\r\n" % i)
    client.send(b".\r\n")

    assert client.read_reply() == delivered(1)
    [record] = read_mailbox(mailbox)
    assert record.body == b"line 0\nline 1\nline 2\nline 3\n"


# -- connection limit -----------------------------------------------------------


def test_connections_over_the_limit_get_421(
    start_server: Callable[..., RunningServer], connect: Connect
) -> None:
    running = start_server(max_connections=2)
    first, second = connect(running), connect(running)
    first.handshake()
    second.handshake()

    too_many = f"421 4.7.0 {NAME} Error: too many connections\r\n".encode()
    third = connect(running)
    assert third.read_until_closed() == too_many
    early_talker = connect(running)  # sends before reading: still gets its 421
    early_talker.send(b"EHLO early.test\r\n")
    assert early_talker.read_until_closed() == too_many

    assert second.command(b"NOOP") == OK  # the others are unaffected
    assert first.command(b"QUIT") == BYE
    assert first.read_until_closed() == b""

    fourth = connect(running)  # a slot is free again
    fourth.handshake()
    assert fourth.command(b"NOOP") == OK
    assert second.command(b"NOOP") == OK


# -- restarts -------------------------------------------------------------------


def test_numbers_continue_across_restarts(
    start_server: Callable[..., RunningServer], mailbox: Path
) -> None:
    first = start_server()
    assert [send_message(first, b"%d\r\n" % i) for i in (1, 2)] == [1, 2]
    first.stop()

    second = start_server()
    assert send_message(second, b"3\r\n") == 3
    second.stop()

    state = mailbox.with_name(mailbox.name + ".selsmtp")
    assert state.exists()
    state.unlink()  # without its state file the server finds the number in the mailbox
    third = start_server()
    assert send_message(third, b"4\r\n") == 4
    third.stop()

    records = read_mailbox(mailbox)
    assert [(r.number, r.body) for r in records] == [(n, b"%d\n" % n) for n in (1, 2, 3, 4)]


# -- one client does not hold up another ----------------------------------------


def flood_until_stalled(sock: socket.socket, line: bytes, limit: int) -> int:
    """Send ``line`` over and over without reading, until the server stops taking it
    (nothing more fits for a while) or ``limit`` bytes were sent. Returns bytes sent."""
    chunk = line * (65536 // len(line))
    sock.setblocking(False)
    sent = 0
    while sent < limit:
        try:
            sent += sock.send(chunk[sent % len(line) :])  # a partial send goes on mid-line
        except BlockingIOError:
            _, writable, _ = select.select([], [sock], [], 0.5)
            if not writable:
                break
    sock.settimeout(WAIT)
    return sent


def test_client_that_never_reads_does_not_block_others(
    server: RunningServer, mailbox: Path
) -> None:
    flooder = socket.socket()
    flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up soon
    flooder.settimeout(WAIT)
    with flooder:
        flooder.connect(server.address)
        noop = b"NOOP\r\n"
        sent = flood_until_stalled(flooder, noop, limit=64 << 20)
        assert sent > 0

        since = time.monotonic()
        for expected in (1, 2, 3):  # others are served while the flooder is stuck
            assert send_message(server, b"meanwhile\r\n") == expected
        assert time.monotonic() - since < WAIT / 2

        # The flooder is not forgotten either: read every reply while finishing its
        # last NOOP and quitting (both at once, or each side waits for the other).
        replies = bytearray()

        def drain() -> None:
            while data := flooder.recv(1 << 20):
                replies.extend(data)

        reader = threading.Thread(target=drain)
        reader.start()
        unfinished = sent % len(noop)
        flooder.sendall((noop[unfinished:] if unfinished else b"") + b"QUIT\r\n")
        reader.join(WAIT * 2)
        assert not reader.is_alive()
    noops = -(-sent // len(noop))
    assert replies == greeting() + OK * noops + BYE
    assert len(read_mailbox(mailbox)) == 3


def test_closed_connections_are_not_kept_in_the_loop(server: RunningServer) -> None:
    # Regression: every closed connection used to stay referenced by the deadline heap
    # until its timeout (300 s), about 1 KB each: a gigabyte at a few thousand
    # connections a second. White-box: the loop's heap is inspected directly.
    count = COMPACT_MIN * 2 + 100
    for _ in range(count):
        with socket.create_connection(server.address, timeout=WAIT) as client:
            client.sendall(b"QUIT\r\n")
            while client.recv(4096):
                pass
    assert send_message(server) == 1  # one more turn of the loop after the last close

    assert len(server.server._deadlines) <= COMPACT_MIN + 10


def test_stopped_server_no_longer_listens(start_server: Callable[..., RunningServer]) -> None:
    running = start_server()
    address = running.address
    running.stop()
    with pytest.raises(OSError) as refused:
        socket.create_connection(address, timeout=WAIT).close()
    assert refused.value.errno == errno.ECONNREFUSED
