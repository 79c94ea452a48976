"""Every acknowledged message can be found (SPEC §7), with a real ``python -m selsmtp``:
the offsets index lists exactly the records the server wrote, and each record
begins at a record boundary whatever another program left in the file."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from selsmtp import formats, mailindex

from .conftest import HELO, REPO_ROOT, WAIT
from .processes import SelsmtpProcess, child_env

pytestmark = pytest.mark.timeout(120)

#: issue 9 item 3, exactly: the attacker learns the next number from its own 250
FORGED_BODY = (
    b"Hi,\r\n\r\nReceived: from bank.example by mx (CS4410MP3)\r\nNumber: 2\r\n"
    b"From: ceo@corp\r\nTo: victim@corp\r\n\r\nPlease wire the money.\r\n"
)


@pytest.fixture
def processes() -> Iterator[list[SelsmtpProcess]]:
    started: list[SelsmtpProcess] = []
    yield started
    for process in started:
        process.kill()


def start(processes: list[SelsmtpProcess], mailbox: Path, *args: str) -> SelsmtpProcess:
    processes.append(SelsmtpProcess(mailbox, *args))
    return processes[-1]


def stop(process: SelsmtpProcess) -> str:
    """SIGTERM; return stderr (the log)."""
    process.signal(signal.SIGTERM)
    code, _, err = process.wait()
    assert code == 0, err
    return err


def send(process: SelsmtpProcess, body: bytes, recipient: str = "rcpt@example.org") -> int:
    with smtplib.SMTP(process.host, process.port, timeout=WAIT) as client:
        client.ehlo(HELO)
        client.mail("sender@example.org")
        client.rcpt(recipient)
        code, text = client.data(body)
    match = re.fullmatch(rb"2\.0\.0 Ok: delivered message (\d+)", text)
    assert code == 250 and match, (code, text)
    return int(match[1])


def inbox(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "selsmtp.inbox", *map(str, args)],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        check=False,
    )


def index_of(path: Path) -> list[mailindex.IndexEntry] | None:
    with path.open("rb") as held:
        fcntl.lockf(held, fcntl.LOCK_SH)
        return mailindex.load(str(path), os.fstat(held.fileno()))


def test_a_forged_record_head_is_not_in_the_index(
    processes: list[SelsmtpProcess], mailbox: Path
) -> None:
    server = start(processes, mailbox)
    assert send(server, FORGED_BODY) == 1
    assert send(server, b"the real message 2\r\n", "victim@corp") == 2
    stop(server)

    data = mailbox.read_bytes()
    assert [int(n) for n in formats.CS4410_NUMBER.findall(data)] == [1, 2, 2]
    entries = index_of(mailbox)
    assert entries is not None
    assert [entry.number for entry in entries] == [1, 2]
    first, second = entries
    assert (first.offset, second.offset) == (0, first.length)
    assert second.offset + second.length == len(data)
    assert data[second.offset :].startswith(
        b"Received: from client.test by mx.test (CS4410MP3)\nNumber: 2\n"
        b"From: sender@example.org\nTo: victim@corp\n\nthe real message 2\n"
    )


# -- record boundaries (issue 9 item 1) --------------------------------------------

#: what another writer that died mid-append left: a record cut inside its last line
#: (issue 9 item 1: "...To: c@Received: from ...")
TORN = {
    "cs4410": b"Received: from other.test by other (CS4410MP3)\nNumber: 50\nFrom: a@b\nTo: c@",
    "mbox": b"From other@example.org Thu Jan  1 00:00:00 1970\nSubject: torn\n\npartial bo",
}
#: a cs4410 record cut before its header is whole
TORN_EARLY = b"Received: from other.test by other (CS4410MP3)\nNumb"


def append_foreign(path: Path, data: bytes) -> None:
    """Another program appends ``data`` under the lock."""
    with path.open("ab") as other:
        fcntl.lockf(other, fcntl.LOCK_EX)
        other.write(data)


def movemail(path: Path) -> None:
    with path.open("r+b") as consumer:
        fcntl.lockf(consumer, fcntl.LOCK_EX)
        consumer.truncate(0)


def listed(path: Path, fmt: str) -> list[dict[str, object]]:
    done = inbox("list", "--json", "--format", fmt, path)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize("fmt", ["cs4410", "mbox"])
@pytest.mark.parametrize("consumer", [False, True], ids=["kept", "after-movemail"])
def test_the_message_after_a_torn_record_another_writer_left_begins_after_a_blank_line(
    processes: list[SelsmtpProcess], mailbox: Path, fmt: str, consumer: bool
) -> None:
    # Issue 9 item 1, exactly: a torn tail another writer left while selsmtp was
    # down, then a restart and a message.
    first = start(processes, mailbox, "--format", fmt)
    assert [send(first, b"Subject: one\r\n\r\n1\r\n"), send(first, b"2\r\n")] == [1, 2]
    stop(first)
    if consumer:
        movemail(mailbox)
    before = mailbox.read_bytes()
    append_foreign(mailbox, TORN[fmt])

    second = start(processes, mailbox, "--format", fmt)
    assert send(second, b"Subject: mine\r\n\r\nfound\r\n") == 3
    log = stop(second)

    data = mailbox.read_bytes()
    mine = len(before) + len(TORN[fmt]) + 2
    assert data[:mine] == before + TORN[fmt] + b"\n\n"  # theirs kept, then a blank line
    head = b"Received: from client.test by mx.test" if fmt == "cs4410" else b"From sender@"
    assert data[mine:].startswith(head)
    assert data.endswith(b"Subject: mine\n\nfound\n\n")
    assert f"offset {len(before)}, length {len(TORN[fmt])}" in log
    entries = index_of(mailbox)
    assert entries is not None
    assert entries[-1] == (mine, len(data) - mine, 3)


@pytest.mark.parametrize(
    ("fmt", "torn"),
    [
        ("mbox", TORN["mbox"]),
        ("cs4410", TORN_EARLY),
        ("cs4410", TORN["cs4410"]),
    ],
    ids=["mbox", "cs4410-cut-in-its-header", "cs4410-cut-in-its-last-header-line"],
)
@pytest.mark.parametrize("consumer", [False, True], ids=["kept", "after-movemail"])
def test_inbox_finds_the_message_after_a_torn_record_another_writer_left(
    processes: list[SelsmtpProcess], mailbox: Path, fmt: str, torn: bytes, consumer: bool
) -> None:
    first = start(processes, mailbox, "--format", fmt)
    assert [send(first, b"Subject: one\r\n\r\n1\r\n"), send(first, b"2\r\n")] == [1, 2]
    stop(first)
    if consumer:
        movemail(mailbox)
    append_foreign(mailbox, torn)

    second = start(processes, mailbox, "--format", fmt)
    assert send(second, b"Subject: mine\r\n\r\nfound\r\n") == 3
    stop(second)

    summaries = listed(mailbox, fmt)
    assert [s["subject"] for s in summaries if s["number"] == 3] == ["mine"]
    shown = inbox("show", "--format", fmt, mailbox, "3")
    assert (shown.returncode, shown.stdout) == (0, "Subject: mine\n\nfound\n")


def test_check_reports_the_torn_record_another_writer_left(
    processes: list[SelsmtpProcess], mailbox: Path
) -> None:
    server = start(processes, mailbox)
    send(server, b"1\r\n")
    damaged = mailbox.stat().st_size
    append_foreign(mailbox, TORN["cs4410"])
    send(server, b"2\r\n")
    stop(server)

    checked = inbox("check", mailbox)
    assert checked.returncode == 1, checked.stdout
    assert f"offset {damaged}: torn-record" in checked.stdout
    assert checked.stdout.endswith("1 problem in cs4410 mailbox, 2 messages, numbers 1-2\n")


@pytest.mark.parametrize("fmt", ["cs4410", "mbox"])
def test_a_torn_record_written_while_the_server_runs(
    processes: list[SelsmtpProcess], mailbox: Path, fmt: str
) -> None:
    torn = TORN_EARLY if fmt == "cs4410" else TORN[fmt]
    server = start(processes, mailbox, "--format", fmt, "--rotate", "3")
    assert send(server, b"1\r\n") == 1
    append_foreign(mailbox, torn)
    assert send(server, b"Subject: two\r\n\r\n2\r\n") == 2
    assert send(server, b"3\r\n") == 3  # and the file rotates
    append_foreign(mailbox, torn)  # into the new file
    assert send(server, b"Subject: four\r\n\r\n4\r\n") == 4
    stop(server)

    rotated = mailbox.with_name("mailbox.1-3")
    numbers = [s["number"] for s in listed(rotated, fmt)]
    assert [n for n in numbers if n in (1, 2, 3)] == [1, 2, 3]
    assert [s["subject"] for s in listed(mailbox, fmt) if s["number"] == 4] == ["four"]
    assert [e.number for e in index_of(rotated) or []] == [1, 2, 3]
    assert [e.number for e in index_of(mailbox) or []] == [4]
