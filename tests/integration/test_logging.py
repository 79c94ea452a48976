"""Logging never stops or stalls the server, and its lines come on time (SPEC §7, §12).

Each test runs ``python -m selsmtp`` with standard error on something real: a pipe
whose reader is gone, ``/dev/full``, a pipe nobody reads, a pseudo-terminal, and the
same pipe as standard output (``2>&1 | head``).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from .conftest import HELO, NAME, WAIT, read_mailbox
from .processes import LISTENING, REPO_ROOT, child_env, selsmtp_command

pytestmark = pytest.mark.timeout(90)

STARTUP = re.compile(r" INFO selsmtp: selsmtp \S+ listening on \S+, mailbox (\S+) \(cs4410")
DROPPED = re.compile(r" WARNING selsmtp\.logs: (\d+) log lines? dropped")
DELIVERED = re.compile(r" INFO selsmtp\.server: delivered message (\d+) from ")


class Child:
    """``python -m selsmtp --port 0`` with standard error wherever the test says."""

    def __init__(self, mailbox: Path, *args: str, stderr: Any, stdout: Any = None) -> None:
        command = selsmtp_command("--port", "0", "--mailbox", str(mailbox), "--name", NAME, *args)
        self.proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout is None else stdout,
            stderr=stderr,
        )
        self.port = 0

    def read_port(self, lines: Lines) -> None:
        """Read ``lines`` until the listening line."""
        line, _ = lines.wait_for(LISTENING)
        self.port = int(LISTENING.fullmatch(line)[2])  # type: ignore[index]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(WAIT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()


class Lines:
    """The lines of a pipe or terminal as they come; what was read and not yet asked
    for stays for the next call."""

    def __init__(self, stream: IO[bytes] | int) -> None:
        self.fd = stream if isinstance(stream, int) else stream.fileno()
        self._partial = b""
        self._ready: list[str] = []

    def read(self, timeout: float = WAIT) -> Iterator[str]:
        """Lines until ``timeout`` seconds pass or the stream ends."""
        deadline = time.monotonic() + timeout
        while True:
            while self._ready:
                yield self._ready.pop(0)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # a terminal whose other side closed
                return
            if not chunk:
                return
            self._partial += chunk.replace(b"\r\n", b"\n")  # a terminal writes \r\n
            *complete, self._partial = self._partial.split(b"\n")
            self._ready += [line.decode("utf-8", "replace") + "\n" for line in complete]

    def wait_for(self, pattern: re.Pattern[str]) -> tuple[str, list[str]]:
        """The first line matching ``pattern`` within WAIT seconds, and those before it."""
        seen = []
        for line in self.read():
            if pattern.search(line):
                return line, seen
            seen.append(line)
        raise AssertionError(f"no line matching {pattern.pattern!r} in {WAIT} s; got {seen!r}")


def deliver(port: int, count: int, tag: str) -> None:
    """``count`` messages over one connection; each must get its 250."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=HELO, timeout=WAIT) as client:
        for number in range(count):
            message = f"Subject: {tag} {number}\r\n\r\n{tag} {number}\r\n"
            assert client.sendmail("a@example.org", ["b@example.org"], message) == {}


def assert_responsive(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=HELO, timeout=WAIT) as client:
        assert client.noop()[0] == 250


def description_flags(pid: int, fd: int) -> int:
    """The flags of a child's descriptor, from ``/proc/PID/fdinfo``."""
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError("no flags line")


@pytest.mark.parametrize("target", ["closed pipe", "/dev/full"])
def test_a_closed_or_failing_stderr_does_not_stop_the_server(
    target: str, tmp_path: Path, children: list[Child]
) -> None:
    if target == "closed pipe":
        r, w = os.pipe()
        os.close(r)  # nobody will ever read: every write fails with EPIPE
    else:
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full here")
        w = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC
    try:
        child = Child(tmp_path / "mailbox", stderr=w)
    finally:
        os.close(w)
    children.append(child)
    assert child.proc.stdout is not None
    child.read_port(Lines(child.proc.stdout))

    for round_ in range(3):  # several turns, connections and log lines
        deliver(child.port, 5, f"round {round_}")
    assert_responsive(child.port)
    assert child.stop() == 0
    assert len(read_mailbox(tmp_path / "mailbox")) == 15


def test_an_unread_stderr_never_stalls_the_server(tmp_path: Path, children: list[Child]) -> None:
    r, w = os.pipe()
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)  # the pipe fills after a few lines
    try:
        child = Child(tmp_path / "mailbox", "--no-fsync", stderr=w)
    finally:
        os.close(w)
    children.append(child)
    assert child.proc.stdout is not None
    child.read_port(Lines(child.proc.stdout))
    total = 3000  # ~330 KiB of log lines: more than the pipe and the 256 KiB buffer hold
    try:
        deliver(child.port, total, "unread")  # nobody reads standard error meanwhile
        assert_responsive(child.port)

        # Now a reader comes: what was held is written, then the count of what was not,
        # with no client doing anything (the loop retries while bytes are pending).
        line, before = Lines(r).wait_for(DROPPED)
        dropped = int(DROPPED.search(line)[1])  # type: ignore[index]
        numbers = [int(m[1]) for m in map(DELIVERED.search, before) if m]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
        lost = total - len(numbers)
        assert lost > 0
        # the lost delivery lines, plus at most the connection and start-up lines
        assert lost <= dropped <= lost + 5

        assert child.stop() == 0
    finally:
        os.close(r)
    assert len(read_mailbox(tmp_path / "mailbox")) == total


def test_the_startup_line_comes_before_any_client_on_a_pipe(
    tmp_path: Path, children: list[Child]
) -> None:
    r, w = os.pipe()
    try:
        child = Child(tmp_path / "mailbox", stderr=w)
        children.append(child)
        assert child.proc.stdout is not None
        child.read_port(Lines(child.proc.stdout))
        errors = Lines(r)
        line, _ = errors.wait_for(STARTUP)  # no client has connected
        assert STARTUP.search(line)[1] == str(tmp_path / "mailbox")  # type: ignore[index]
        assert os.get_blocking(w), "O_NONBLOCK was set on the description others share"
        os.close(w)
        w = -1
        assert child.stop() == 0
        assert "stopped; 0 messages delivered" in "".join(errors.read())  # to the end
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_the_startup_line_comes_before_any_client_on_a_terminal(
    tmp_path: Path, children: list[Child]
) -> None:
    master, slave = pty.openpty()
    try:
        child = Child(tmp_path / "mailbox", stderr=slave)
        children.append(child)
        assert child.proc.stdout is not None
        child.read_port(Lines(child.proc.stdout))
        Lines(master).wait_for(STARTUP)
        # The terminal is the shell's too: its description must stay blocking.
        assert os.get_blocking(slave)
        assert child.stop() == 0
    finally:
        os.close(master)
        os.close(slave)


def test_with_stdout_and_stderr_on_one_pipe_like_2_to_1_pipe_head(
    tmp_path: Path, children: list[Child]
) -> None:
    child = Child(tmp_path / "mailbox", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    children.append(child)
    assert child.proc.stdout is not None
    both = Lines(child.proc.stdout)
    child.read_port(both)  # the readiness line still arrives
    both.wait_for(STARTUP)  # and the start-up log line, unprompted
    # stdout's writes (the readiness line) share this description: never O_NONBLOCK
    assert not description_flags(child.proc.pid, 1) & os.O_NONBLOCK
    deliver(child.port, 3, "seen")

    child.proc.stdout.close()  # `head` has read its lines and exits
    for round_ in range(3):
        deliver(child.port, 5, f"unseen {round_}")
    assert_responsive(child.port)
    assert child.stop() == 0
    assert len(read_mailbox(tmp_path / "mailbox")) == 18
