"""Every acknowledged message can be found (SPEC §7), with a real ``python -m selsmtp``:
the offsets index lists exactly the records the server wrote, and each record
begins at a record boundary whatever another program left in the file."""

from __future__ import annotations

import fcntl
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
