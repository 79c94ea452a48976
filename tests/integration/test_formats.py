"""Every mailbox format end to end: a live server, real clients, the stdlib's readers.

Messages go in through ``smtplib`` (and, for the concurrency tests, raw pipelining
clients, which make big group-committed batches). They come back out through
``mailbox.mbox`` and ``mailbox.Maildir`` and must equal what the client sent, byte
for byte (CRLF as LF), under the header lines the server adds. Rotation is checked
with many clients at once: every rotated file ``mailbox.A-B`` holds exactly the
records A..B, and every message is stored once, whole.
"""

from __future__ import annotations

import email.utils
import mailbox
import re
import signal
import smtplib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import (
    HELO,
    NAME,
    WAIT,
    LockHolder,
    RunningServer,
    WireClient,
    checked_body,
    read_mailbox,
    send_message,
    to_wire,
    transaction,
    verify_checked_body,
)
from .processes import SelsmtpProcess, run_selsmtp

pytestmark = pytest.mark.timeout(90)

#: bodies as a client hands them to smtplib (which dot-stuffs them and adds a final
#: CRLF if there is none)
BODIES = {
    "plain": b"Subject: hello\r\n\r\nHi.\r\n",
    "from-lines": b"Subject: f\r\n\r\nFrom the start\r\nFrom: x\r\nFrom\r\nFromage\r\n",
    "quoted-from": b"Subject: q\r\n\r\n>From one\r\n>>From two\r\n> From not\r\n",
    "dots": b"Subject: d\r\n\r\n.\r\n..\r\n.x\r\n...\r\nend.\r\n",
    "eight-bit": b"Subject: \xc3\xa9\r\n\r\ncaf\xc3\xa9 \xff\xfe\x80\r\n",
    "no-trailing-newline": b"Subject: n\r\n\r\nno newline at the end",
    "blank-lines": b"Subject: b\r\n\r\n\r\n\r\nFrom after blanks\r\n\r\n",
    "headers-only": b"Subject: only\r\nFrom: someone@x\r\n",
}
SENDER = "alice@example.org"
TRACE = re.compile(
    rb"Return-Path: <(?P<sender>[^>]*)>\n"
    rb"Received: from (?P<helo>\S+) by (?P<name>\S+) \(CS4410MP3\);\n"
    rb"\t(?P<date>[^\n]+)\n"
    rb"X-Selsmtp-Number: (?P<number>\d+)\n"
    rb"(?P<recipients>(?:X-Original-To: [^\n]*\n)+)"
)
ROTATED = re.compile(r"mailbox\.(\d+)-(\d+)")

Start = Callable[..., RunningServer]


def as_stored(body: bytes) -> bytes:
    """What the server stores of a body sent with smtplib: a final CRLF, LF ends."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body.replace(b"\r\n", b"\n")


def unquote(message: bytes) -> bytes:
    """Undo mboxrd quoting, which Python's mailbox.mbox leaves in place."""
    return re.sub(rb"(?m)^>(>*From )", rb"\1", message)


def split_trace(message: bytes, since: float, sender: str = SENDER) -> tuple[int, bytes]:
    """Check the header lines the server added; return the number and the rest."""
    match = TRACE.match(message)
    assert match, message[:300]
    assert match["sender"] == sender.encode()
    assert (match["helo"], match["name"]) == (HELO.encode(), NAME.encode())
    date = email.utils.parsedate_to_datetime(match["date"].decode())
    assert date.utcoffset() is not None and date.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert since - 1 <= date.timestamp() <= time.time() + 1
    return int(match["number"]), message[match.end() :]


def read_mbox(path: Path) -> list[tuple[str, bytes]]:
    """(From_ line, message bytes) of each message of the mbox at ``path``."""
    box = mailbox.mbox(str(path), create=False)
    try:
        return [(box.get_message(key).get_from(), box.get_bytes(key)) for key in box.iterkeys()]
    finally:
        box.close()


def read_maildir(path: Path) -> list[tuple[str, bytes]]:
    """(subfolder, message bytes) of each message of the Maildir at ``path``."""
    box = mailbox.Maildir(str(path), create=False)
    return [(box.get_message(key).get_subdir(), box.get_bytes(key)) for key in box.iterkeys()]


def send_all(running: RunningServer, bodies: list[bytes], sender: str = SENDER) -> list[int]:
    """Send ``bodies`` in one smtplib session; return the numbers they were given."""
    numbers = []
    with smtplib.SMTP(running.host, running.port, timeout=WAIT) as client:
        client.ehlo(HELO)
        for body in bodies:
            client.mail(sender)
            client.rcpt("bob@example.net")
            code, text = client.data(body)
            match = re.fullmatch(rb"2\.0\.0 Ok: delivered message (\d+)", text)
            assert code == 250 and match, (code, text)
            numbers.append(int(match[1]))
    return numbers


# -- each format, read back with the stdlib ----------------------------------------------


def test_mbox_reads_back_exactly_with_mailbox_mbox(start_server: Start, mailbox: Path) -> None:
    since = time.time()
    running = start_server(format="mbox")
    bodies = list(BODIES.values())

    assert send_all(running, bodies) == list(range(1, len(bodies) + 1))
    assert send_all(running, [b"bounce\r\n"], sender="") == [len(bodies) + 1]
    running.stop()

    messages = read_mbox(mailbox)
    assert len(messages) == len(bodies) + 1
    for expected_number, body, (from_line, message) in zip(
        range(1, len(bodies) + 1), bodies, messages, strict=False
    ):
        sender, _, date = from_line.partition(" ")
        assert sender == SENDER
        assert time.strptime(date, "%a %b %d %H:%M:%S %Y")
        number, rest = split_trace(message, since)
        assert number == expected_number
        assert unquote(rest) == as_stored(body), number
    from_line, message = messages[-1]
    assert from_line.startswith("MAILER-DAEMON ")
    assert split_trace(message, since, sender="") == (len(bodies) + 1, b"bounce\n")


def test_maildir_reads_back_exactly_with_mailbox_maildir(
    start_server: Start, tmp_path: Path
) -> None:
    since = time.time()
    folder = tmp_path / "Maildir"
    running = start_server(format="maildir", mailbox=folder)
    bodies = list(BODIES.values())

    numbers = send_all(running, bodies)
    # No lock is needed to read a Maildir while the server runs.
    assert len(read_maildir(folder)) == len(bodies)
    running.stop()

    stored = {}
    for subdir, message in read_maildir(folder):
        assert subdir == "new"
        number, rest = split_trace(message, since)
        stored[number] = rest
    assert stored == {n: as_stored(body) for n, body in zip(numbers, bodies, strict=True)}
    assert sorted(p.name for p in folder.iterdir()) == [
        ".selsmtp",
        ".selsmtp.lock",
        "cur",
        "new",
        "tmp",
    ]
    assert list((folder / "tmp").iterdir()) == []


def test_cs4410_bodies_are_stored_exactly(start_server: Start, mailbox: Path) -> None:
    running = start_server()
    bodies = list(BODIES.values())

    send_all(running, bodies)
    running.stop()

    assert [r.body for r in read_mailbox(mailbox)] == [as_stored(b) for b in bodies]


@pytest.mark.parametrize("format", ["cs4410", "mbox", "maildir"])
def test_numbers_continue_after_a_restart(start_server: Start, mailbox: Path, format: str) -> None:
    first = start_server(format=format)
    assert send_all(first, [b"one\r\n", b"two\r\n"]) == [1, 2]
    first.stop()

    second = start_server(format=format)
    assert send_all(second, [b"three\r\n"]) == [3]


def test_an_mbox_message_waits_for_a_readers_lock(
    start_server: Start, mailbox: Path, hold_lock: Callable[..., LockHolder]
) -> None:
    running = start_server(format="mbox")
    send_message(running)
    holder = hold_lock(mailbox)
    result: list[int] = []
    sender = threading.Thread(target=lambda: result.append(send_message(running)))
    sender.start()
    time.sleep(0.3)
    assert not result  # no 250 while the reader holds its lock
    assert len(read_mbox(mailbox)) == 1
    holder.release()
    sender.join(WAIT)

    assert result == [2]


# -- rotation with many clients -----------------------------------------------------------


def pipelining_clients(running: RunningServer, plans: list[list[bytes]]) -> dict[str, int]:
    """One thread per plan, all starting together; each pipelines its messages
    (stored-form bodies) in one send. Returns the number each body's token got."""
    start = threading.Barrier(len(plans), timeout=WAIT)
    numbers: dict[str, int] = {}
    errors: list[BaseException] = []

    def client(bodies: list[bytes]) -> None:
        try:
            connection = WireClient(running.address)
            try:
                start.wait()
                connection.send(
                    f"EHLO {HELO}\r\n".encode()
                    + b"".join(
                        transaction(SENDER, ["b@example.org"], to_wire(body)) for body in bodies
                    )
                    + b"QUIT\r\n"
                )
                transcript = connection.read_until_closed(WAIT * 3)
            finally:
                connection.close()
            got = re.findall(rb"250 2\.0\.0 Ok: delivered message (\d+)\r\n", transcript)
            assert len(got) == len(bodies), transcript[-300:]
            for body, number in zip(bodies, got, strict=True):
                numbers[verify_checked_body(body)] = int(number)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(plan,)) for plan in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 4)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    if errors:
        raise errors[0]
    return numbers


def mailbox_files(folder: Path) -> Iterator[tuple[Path, int, int]]:
    """Each rotated file with its A and B, then the current file with A=0, B=0."""
    rotated = []
    for entry in folder.iterdir():
        match = ROTATED.fullmatch(entry.name)
        if match:
            rotated.append((int(match[1]), int(match[2]), entry))
    for first, last, entry in sorted(rotated):
        yield entry, first, last
    yield folder / "mailbox", 0, 0


@pytest.mark.parametrize("format", ["cs4410", "mbox"])
def test_concurrent_clients_with_rotation_split_nothing_and_lose_nothing(
    start_server: Start, mailbox: Path, format: str
) -> None:
    every = 7
    running = start_server(format=format, rotate=every, spool_threshold=2048)
    plans = [
        [checked_body(f"c{client:02d}m{message:02d}", 200 + 997 * message) for message in range(6)]
        for client in range(16)
    ]

    told = pipelining_clients(running, plans)
    running.stop()

    total = 16 * 6
    assert sorted(told.values()) == list(range(1, total + 1))
    stored: dict[str, int] = {}
    rotated_up_to = 0
    for path, first, last in mailbox_files(mailbox.parent):
        if format == "cs4410":
            found = [(r.number, r.body) for r in read_mailbox(path)]
        else:
            found = []
            for _, message in read_mbox(path):
                number, rest = split_trace(message, 0.0)
                found.append((number, unquote(rest)))
        numbers = [number for number, _ in found]
        if first:  # a rotated file: exactly A..B, N of them, ending at a multiple of N
            assert numbers == list(range(first, last + 1)), path.name
            assert (last % every, last - first + 1) == (0, every), path.name
            assert first == rotated_up_to + 1
            rotated_up_to = last
        else:
            assert numbers == list(range(rotated_up_to + 1, total + 1))
        for number, body in found:
            token = verify_checked_body(body)
            assert token not in stored, f"{token} stored twice"
            stored[token] = number
    assert rotated_up_to == total - total % every
    assert stored == told


def test_concurrent_clients_into_a_maildir(start_server: Start, tmp_path: Path) -> None:
    folder = tmp_path / "Maildir"
    running = start_server(format="maildir", mailbox=folder)
    plans = [
        [checked_body(f"c{client:02d}m{m}", 300 + 500 * m) for m in range(5)]
        for client in range(12)
    ]

    told = pipelining_clients(running, plans)
    running.stop()

    stored = {}
    for _, message in read_maildir(folder):
        number, rest = split_trace(message, 0.0)
        token = verify_checked_body(rest)
        assert token not in stored
        stored[token] = number
    assert stored == told
    assert sorted(told.values()) == list(range(1, 61))


# -- the command line ---------------------------------------------------------------------------


def test_rotate_with_maildir_is_a_usage_error(tmp_path: Path) -> None:
    result = run_selsmtp("--format", "maildir", "--rotate", "3", "--mailbox", str(tmp_path / "m"))

    assert result.returncode == 2
    assert "--rotate applies to the cs4410 and mbox formats only" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("format", ["mbox", "maildir"])
def test_the_formats_are_accepted_on_the_command_line(tmp_path: Path, format: str) -> None:
    path = tmp_path / ("Maildir" if format == "maildir" else "mailbox")
    extra = ["--rotate", "2"] if format == "mbox" else []
    process = SelsmtpProcess(path, "--format", format, *extra)
    try:
        for expected in (1, 2, 3):
            with smtplib.SMTP(process.host, process.port, timeout=WAIT) as client:
                client.sendmail(SENDER, ["b@example.org"], b"Subject: %d\r\n\r\nx\r\n" % expected)
        process.signal(signal.SIGTERM)
        code, _, stderr = process.wait()
    finally:
        process.kill()

    assert code == 0, stderr
    if format == "mbox":
        assert [len(read_mbox(p)) for p, _, _ in mailbox_files(tmp_path)] == [2, 1]
        assert (tmp_path / "mailbox.1-2").exists()
        assert "rotated" in stderr
    else:
        assert len(read_maildir(path)) == 3
