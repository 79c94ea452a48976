"""Issue 9: what a client writes in a body never passes for a record, and every record
after a damaged region is still found; the README's recipes work on such mail.

A real ``python -m selsmtp`` stores the mail, and ``python -m selsmtp.inbox`` (a child
process too) reads it.
"""

from __future__ import annotations

import json
import re
import signal
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import HELO, REPO_ROOT, WAIT
from .processes import SelsmtpProcess, child_env

pytestmark = pytest.mark.timeout(60)

#: issue 9, item 3, as written there: the attacker learnt the next number (2) from the
#: 250 of its own message (1)
FORGED = (
    b"Subject: invoice\r\n\r\nsee below\r\n"
    b"\r\n\r\nReceived: from bank.example by mx (CS4410MP3)\r\nNumber: 2\r\n"
    b"From: ceo@corp\r\nTo: victim@corp\r\n\r\nPlease wire the money to the attacker.\r\n"
)
REAL = b"Subject: the real message 2\r\n\r\nfrom the real sender\r\n"


def inbox(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "selsmtp.inbox", *map(str, args)],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        timeout=WAIT * 2,
        check=False,
    )


def send(server: SelsmtpProcess, sender: str, recipients: list[str], body: bytes) -> int:
    with smtplib.SMTP(server.host, server.port, timeout=WAIT) as client:
        client.ehlo(HELO)
        client.mail(sender, ["SMTPUTF8"] if not sender.isascii() else [])
        for recipient in recipients:
            client.rcpt(recipient)
        code, text = client.data(body)
    found = re.fullmatch(rb"2\.0\.0 Ok: delivered message (\d+)", text)
    assert code == 250 and found, (code, text)
    return int(found[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SelsmtpProcess]:
    process = SelsmtpProcess(tmp_path / "mailbox", "--name", "mx", "--log-level", "warning")
    yield process
    process.signal(signal.SIGTERM)
    assert process.wait()[0] == 0


def test_a_forged_record_in_a_body_is_never_listed_and_check_warns(
    server: SelsmtpProcess, tmp_path: Path
) -> None:
    mailbox = tmp_path / "mailbox"
    assert send(server, "attacker@evil", ["victim@corp"], FORGED) == 1
    before = inbox("list", "--json", mailbox)
    assert send(server, "real@sender", ["victim@corp"], REAL) == 2

    listed = inbox("list", "--json", mailbox)
    shown = inbox("show", mailbox, "2")
    checked = inbox("check", mailbox)

    assert [json.loads(line)["number"] for line in before.stdout.splitlines()] == [1]
    summaries = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(s["number"], s["sender"]) for s in summaries] == [
        (1, "attacker@evil"),
        (2, "real@sender"),
    ]
    assert shown.returncode == 0
    assert shown.stdout == REAL.replace(b"\r\n", b"\n")
    assert checked.returncode == 0, checked.stdout
    assert b"warning" in checked.stdout
    assert b"look-alike" in checked.stdout


def test_check_reports_a_torn_record_in_the_middle_and_list_finds_what_follows(
    tmp_path: Path,
) -> None:
    mailbox = tmp_path / "mailbox"
    first = SelsmtpProcess(mailbox, "--log-level", "warning")
    send(first, "a@ex.org", ["b@ex.org"], b"Subject: one\r\n\r\n1\r\n")
    first.signal(signal.SIGTERM)
    assert first.wait()[0] == 0
    offset = mailbox.stat().st_size
    torn = b"Received: from other.writer by mx (CS4410MP3)\nNumber: 9\nFrom: x@y\nTo: c@"
    with open(mailbox, "ab") as other:  # another writer died mid-append (issue 9, item 1)
        other.write(torn)
    second = SelsmtpProcess(mailbox, "--log-level", "error")
    try:
        assert send(second, "a@ex.org", ["b@ex.org"], b"Subject: two\r\n\r\n2\r\n") == 2
        assert send(second, "a@ex.org", ["b@ex.org"], b"Subject: three\r\n\r\n3\r\n") == 3
    finally:
        second.signal(signal.SIGTERM)
        assert second.wait()[0] == 0

    checked = inbox("check", mailbox)
    listed = inbox("list", "--json", mailbox)

    assert checked.returncode == 1, checked.stdout
    # The region runs to the next record: the torn bytes and the blank line selsmtp
    # wrote after them so that its own record begins at a boundary (SPEC §7).
    region = f"offset {offset}: torn-record: a record cut short, or damaged ({len(torn) + 2} bytes)"
    assert region.encode() in checked.stdout
    assert [json.loads(line)["number"] for line in listed.stdout.splitlines()] == [1, 2, 3]


README = REPO_ROOT / "README.md"


def readme_recipe() -> str:
    """The Python block of the README's "Opening the mail" section, as written."""
    text = README.read_text()
    section = text[text.index("### Opening the mail") :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL)[1]  # type: ignore[index]


def test_the_readme_recipe_opens_mail_from_an_8bit_sender(tmp_path: Path) -> None:
    mbox = SelsmtpProcess(tmp_path / "mailbox", "--format", "mbox", "--log-level", "warning")
    maildir = SelsmtpProcess(tmp_path / "Maildir", "--format", "maildir", "--log-level", "warning")
    for server in (mbox, maildir):
        try:
            send(
                server,
                "ålice@ex.org",
                ["bob@ex.org", "bcc@ex.org"],
                b"Subject: caf\xc3\xa9\r\n\r\nhi\r\n",
            )
        finally:
            server.signal(signal.SIGTERM)
            assert server.wait()[0] == 0

    ran = subprocess.run(
        [sys.executable, "-c", readme_recipe()],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        check=False,
    )

    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.count("café") == 2, ran.stdout
    assert ran.stdout.count("bcc@ex.org") == 2, ran.stdout
