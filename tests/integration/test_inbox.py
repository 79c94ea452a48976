"""``python -m selsmtp.inbox`` against mailboxes that a real ``python -m selsmtp`` writes.

The server and the reader are both child processes, as a user runs them, so the test
process is free to play the consumers of SPEC §5.4 itself: it takes the ``lockf``
lock and empties the mailbox (movemail) or renames it away while ``follow`` runs.
``follow`` is run with ``--json`` and read line by line; it must print every message
that reaches the file, once, whole, in order, through emptying, renaming and rotation,
and while many clients deliver at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from .conftest import HELO, REPO_ROOT, WAIT
from .processes import SelsmtpProcess, child_env

pytestmark = pytest.mark.timeout(60)

FLOOD = REPO_ROOT / "tools" / "flood.py"
#: bodies as a client hands them to smtplib, which adds the final CRLF if missing
BODIES = [
    b"Subject: =?utf-8?q?caf=C3=A9?= one\r\n\r\nFrom the start\r\n>From quoted\r\n.\r\n..\r\n",
    b"Subject: two\r\nX-Other: y\r\n\r\n8-bit \xc3\xa9\xff\r\n\r\nFrom after a blank\r\n",
    b"no header at all\r\n",
]
SUBJECTS = ["café one", "two", None]
RECIPIENTS = ["bob@example.org", "carol@example.org"]


def as_stored(body: bytes) -> bytes:
    """What the client sent, as every format gives it back: LF line ends."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body.replace(b"\r\n", b"\n")


def inbox(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "selsmtp.inbox", *map(str, args)],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        timeout=WAIT * 2,
        check=False,
    )


class Server:
    """``python -m selsmtp`` in a child process, stopped with SIGTERM at teardown."""

    def __init__(self, mailbox: Path, *args: str) -> None:
        self.mailbox = mailbox
        self.process = SelsmtpProcess(mailbox, "--log-level", "warning", *args)

    def send(
        self, body: bytes = b"Subject: x\r\n\r\nhello\r\n", sender: str = "a@example.org"
    ) -> int:
        with smtplib.SMTP(self.process.host, self.process.port, timeout=WAIT) as client:
            client.ehlo(HELO)
            client.mail(sender)
            for recipient in RECIPIENTS:
                client.rcpt(recipient)
            code, text = client.data(body)
        found = re.fullmatch(rb"2\.0\.0 Ok: delivered message (\d+)", text)
        assert code == 250 and found, (code, text)
        return int(found[1])

    def stop(self) -> None:
        self.process.signal(signal.SIGTERM)
        status, _, err = self.process.wait()
        assert status == 0, err


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``serve(*args)``: a server on ``tmp_path/mailbox`` with those arguments."""
    started: list[Server] = []

    def start(*args: str) -> Server:
        server = Server(tmp_path / "mailbox", *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class Follow:
    """``python -m selsmtp.inbox follow --json ...`` in a child process."""

    def __init__(self, *args: str | Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "selsmtp.inbox", "follow", "--json", "--interval", "0.05",
             *map(str, args)],
            cwd=REPO_ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        self._buffer = b""

    def read(self, count: int, timeout: float = WAIT) -> list[dict[str, Any]]:
        """The next ``count`` summaries; fails if they do not come in time."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while self._buffer.count(b"\n") < count:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(remaining, 0))
            assert ready, f"follow printed {self._buffer!r}, not {count} lines, in {timeout} s"
            piece = os.read(fd, 65536)
            assert piece, f"follow ended after {self._buffer!r}: {self.finish()[1]!r}"
            self._buffer += piece
        lines = self._buffer.split(b"\n")
        self._buffer = b"\n".join(lines[count:])
        return [json.loads(line) for line in lines[:count]]

    def numbers(self, count: int) -> list[int]:
        return [summary["number"] for summary in self.read(count)]

    def finish(self, timeout: float = WAIT) -> tuple[int, str]:
        """Wait for the exit: its status and stderr. Nothing more may have been printed."""
        out, err = self.process.communicate(timeout=timeout)
        assert self._buffer + out == b"", self._buffer + out
        return self.process.returncode, err.decode()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


@pytest.fixture
def follow() -> Iterator[Callable[..., Follow]]:
    started: list[Follow] = []

    def start(*args: str | Path) -> Follow:
        started.append(Follow(*args))
        return started[-1]

    yield start
    for process in started:
        process.kill()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[int]:
    """The mailbox open and under the exclusive lock, as a consumer holds it."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def movemail(path: Path) -> None:
    with locked(path) as fd:
        os.ftruncate(fd, 0)


def rename_away(path: Path, to: Path) -> None:
    with locked(path):
        os.rename(path, to)


# -- list, show, check: every format -----------------------------------------------


@pytest.mark.parametrize("fmt", ["cs4410", "mbox", "maildir"])
def test_list_show_and_check(serve: Callable[..., Server], fmt: str) -> None:
    server = serve("--format", fmt)
    started = time.time()
    senders = ["", "alice@example.org", "bob@example.org"]
    numbers = [server.send(body, sender) for body, sender in zip(BODIES, senders, strict=True)]
    assert numbers == [1, 2, 3]
    path = server.mailbox

    listed = inbox("list", "--json", path)
    assert (listed.returncode, listed.stderr) == (0, b"")
    summaries = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [s["number"] for s in summaries] == [1, 2, 3]
    assert [s["subject"] for s in summaries] == SUBJECTS
    assert [s["sender"] for s in summaries] == senders
    assert [s["size"] for s in summaries] == [len(as_stored(body)) for body in BODIES]
    assert {s["format"] for s in summaries} == {fmt}
    assert all(s["recipients"] == RECIPIENTS for s in summaries)
    if fmt == "cs4410":
        assert all(s["date"] is None for s in summaries)
    else:
        for s in summaries:
            assert int(started) <= datetime.fromisoformat(s["date"]).timestamp() <= time.time()

    text = inbox("list", path).stdout.decode().splitlines()
    assert [line.split("\t")[0] for line in text] == ["1", "2", "3"]
    assert text[0].split("\t")[2] == "<>"

    for number, body in enumerate(BODIES[:2], 1):
        shown = inbox("show", path, str(number))
        assert (shown.returncode, shown.stdout, shown.stderr) == (0, as_stored(body), b"")
    raw = inbox("show", "--raw", path, "2").stdout
    if fmt == "maildir":
        assert raw in [(path / "new" / name).read_bytes() for name in os.listdir(path / "new")]
        assert raw.endswith(as_stored(BODIES[1]))
    else:
        assert raw in path.read_bytes()
        assert raw.startswith(b"Received: from " if fmt == "cs4410" else b"From alice@example.org ")

    checked = inbox("check", path)
    kind = {"cs4410": "cs4410 mailbox", "mbox": "mbox", "maildir": "Maildir"}[fmt]
    assert (checked.returncode, checked.stderr) == (0, b"")
    assert checked.stdout.decode() == f"{path}: ok: {kind}, 3 messages, numbers 1-3\n"


def test_check_names_what_is_wrong(serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve("--format", "mbox")
    for _ in range(4):
        server.send()
    data = server.mailbox.read_bytes()
    starts = [m.start() for m in re.finditer(rb"(?m)^From ", data)]
    copy = tmp_path / "copy"
    copy.write_bytes(data[: starts[2]] + data[starts[3] : -3])  # 3 gone, 4 cut short
    checked = inbox("check", copy)
    assert checked.returncode == 1
    assert checked.stdout.decode().splitlines() == [
        f"{copy}: offset {starts[2]}: torn-tail: the file ends inside a record "
        f"({len(data) - starts[3] - 3} bytes)",
        f"{copy}: 1 problem in mbox, 2 messages, numbers 1-2",
    ]
    copy.write_bytes(data[: starts[2]] + data[starts[3] :])
    assert inbox("check", copy).returncode == 0  # a gap is no problem by default
    strict = inbox("check", "--strict", copy)
    assert strict.returncode == 1
    assert (
        f"{copy}: offset {starts[2]}: gap: record number 4 after 2: 3 missing"
        in strict.stdout.decode()
    )


def test_what_is_not_a_mailbox_gets_one_clear_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00\x01 binary\n")
    # tests/unit/test_inbox.py runs every command on each case; here, the real process
    for args in (["check", junk], ["follow", junk], ["list", tmp_path]):
        done = inbox(*args)
        assert (done.returncode, done.stdout) == (1, b""), args
        assert done.stderr.count(b"\n") == 1 and b"Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith(b"python -m selsmtp.inbox: ")
    assert inbox("list", junk, "--format", "other").returncode == 2


# -- follow ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["cs4410", "mbox"])
def test_follow_through_movemail_and_renames(
    serve: Callable[..., Server], follow: Callable[..., Follow], tmp_path: Path, fmt: str
) -> None:
    server = serve("--format", fmt)
    path = server.mailbox
    tail = follow("--all", "--count", "8", path)
    server.send()
    server.send()
    assert tail.numbers(2) == [1, 2]
    movemail(path)
    server.send()
    assert tail.numbers(1) == [3]
    rename_away(path, tmp_path / "taken")
    server.send()
    server.send()
    assert tail.numbers(2) == [4, 5]
    movemail(path)
    server.send()  # at once: maybe before follow saw the file shrink
    assert tail.numbers(1) == [6]
    rename_away(path, tmp_path / "taken2")
    server.send()  # at once: maybe before follow saw the new file
    server.send()
    assert tail.numbers(2) == [7, 8]
    assert tail.finish() == (0, "")


@pytest.mark.parametrize("fmt", ["cs4410", "mbox"])
def test_follow_through_rotation(
    serve: Callable[..., Server], follow: Callable[..., Follow], fmt: str
) -> None:
    server = serve("--format", fmt, "--rotate", "2")
    tail = follow("--all", "--count", "9", server.mailbox)
    time.sleep(0.2)  # let it start, so that everything below comes after
    for _ in range(9):
        server.send()  # several rotations between two looks
    assert tail.numbers(9) == list(range(1, 10))
    assert tail.finish() == (0, "")
    names = sorted(p.name for p in server.mailbox.parent.glob("mailbox.*-*"))
    rotated = ["mailbox.1-2", "mailbox.3-4", "mailbox.5-6", "mailbox.7-8"]
    # each rotated file takes its offsets index along
    indexes = [name + ".selsmtp-index" for name in [*rotated, "mailbox"]]
    assert names == sorted(rotated + indexes)
    shown = inbox("show", server.mailbox, "4")
    assert shown.returncode == 0
    assert shown.stderr.endswith(
        b"message 4 is in the rotated file " + bytes(server.mailbox) + b".3-4\n"
    )


def test_follow_a_maildir_that_a_reader_works_in(
    serve: Callable[..., Server], follow: Callable[..., Follow]
) -> None:
    server = serve("--format", "maildir")
    path = server.mailbox
    tail = follow("--all", "--count", "4", path)
    server.send()
    server.send()
    assert tail.numbers(2) == [1, 2]
    for name in os.listdir(path / "new"):  # a mail reader has seen them
        os.rename(path / "new" / name, path / "cur" / f"{name}:2,S")
    server.send()
    server.send()
    assert tail.numbers(2) == [3, 4]
    assert tail.finish() == (0, "")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_follow_stops_cleanly_on_signals(
    follow: Callable[..., Follow], tmp_path: Path, signum: int
) -> None:
    path = tmp_path / "mailbox"
    path.write_bytes(b"From a@b Thu Jan  1 00:00:00 1970\n\nhi\n\n")
    tail = follow("--all", path)
    assert tail.read(1)[0]["number"] is None  # it runs
    started = time.monotonic()
    tail.process.send_signal(signum)
    assert tail.finish() == (0, "")
    assert time.monotonic() - started < 2


def test_follow_timeout_and_count(follow: Callable[..., Follow], tmp_path: Path) -> None:
    path = tmp_path / "mailbox"
    path.write_bytes(b"")
    tail = follow("--count", "1", "--timeout", "0.3", path)
    status, err = tail.finish()
    assert status == 1
    assert err == f"python -m selsmtp.inbox: {path}: 0 of 1 messages within 0.3 s\n"


# -- a mailbox being written to ------------------------------------------------------


@pytest.mark.parametrize("fmt", ["cs4410", "mbox"])
def test_reading_while_clients_deliver(
    serve: Callable[..., Server], follow: Callable[..., Follow], fmt: str
) -> None:
    server = serve("--format", fmt)
    clients, each = 4, 25
    tail = follow("--all", "--count", str(clients * each), server.mailbox)
    errors: list[BaseException] = []

    def deliver(client: int) -> None:
        try:
            for index in range(each):
                body = (
                    f"Subject: c{client} m{index}\r\n\r\n".encode()
                    + os.urandom(3000).hex().encode()
                )
                server.send(body + b"\r\n")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deliver, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    runs = 0
    while any(thread.is_alive() for thread in threads) or runs < 2:
        checked = inbox("check", "--strict", server.mailbox)
        assert checked.returncode == 0, checked.stdout
        listed = inbox("list", server.mailbox).stdout.decode().splitlines()
        assert [int(line.split("\t")[0]) for line in listed] == list(range(1, len(listed) + 1))
        # size: "Subject: SUBJECT", a blank line, 6000 hex digits and a line end
        assert all(int(f[4]) == len(f[5]) + 6012 for f in (line.split("\t") for line in listed))
        runs += 1
    for thread in threads:
        thread.join(WAIT)
    assert not errors, errors
    summaries = tail.read(clients * each)
    assert [s["number"] for s in summaries] == list(range(1, clients * each + 1))
    assert all(s["size"] == len(s["subject"]) + 6012 for s in summaries)
    assert tail.finish() == (0, "")


# -- flood's verification is the reader's --------------------------------------------


@pytest.mark.parametrize("fmt", ["mbox", "maildir"])
def test_flood_verifies_mbox_and_maildir(
    serve: Callable[..., Server], tmp_path: Path, fmt: str
) -> None:
    server = serve("--format", fmt)
    saved = tmp_path / "run.json"
    done = subprocess.run(
        [sys.executable, str(FLOOD), "--port", str(server.process.port), "--mailbox",
         str(server.mailbox), "--format", fmt, "--clients", "3", "--messages", "4",
         "--save", str(saved), "--json"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert report["verification"]["problems"] == []
    assert (done.returncode, report["verification"]["found"]) == (0, 12)
    # Take one message away: flood --verify-only names it, and the gap.
    if fmt == "maildir":
        victim = sorted((server.mailbox / "new").iterdir())[5]
        number = int(re.search(rb"X-Selsmtp-Number: (\d+)", victim.read_bytes())[1])  # type: ignore[index]
        victim.unlink()
    else:
        data = server.mailbox.read_bytes()
        starts = [m.start() for m in re.finditer(rb"(?m)^From ", data)]
        server.mailbox.write_bytes(data[: starts[5]] + data[starts[6] :])
        number = 6
    done = subprocess.run(
        [sys.executable, str(FLOOD), "--verify-only", str(saved), "--json"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert done.returncode == 1
    problems = "\n".join(report["problems"])
    assert f"(acknowledged as number {number}) is not in the mailbox" in problems
    assert ": gap: " in problems
