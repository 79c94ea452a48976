"""Fixtures for the integration tests: a live server, clients for it, a mailbox reader.

Everything here is real: the server is :class:`selsmtp.server.Server` listening on
127.0.0.1 (port 0) and running its loop in a background thread, clients speak to it
over TCP, the mailbox is a file in ``tmp_path``. Nothing is mocked.

POSIX ``lockf`` locks belong to the process, so a lock taken in the test process
could never block the server running in one of its threads (and closing that
descriptor would even drop the server's own lock). :class:`LockHolder` therefore
takes the lock in a ``multiprocessing`` child.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import multiprocessing
import os
import random
import re
import select
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from selsmtp.config import Config
from selsmtp.server import Server

#: the server's name in every test (greeting, 421s, Received: line)
NAME = "mx.test"
#: the HELO name the test clients use
HELO = "client.test"
#: upper bound, in seconds, for anything that must happen "promptly"; generous so a
#: loaded machine does not fail a test, while a hang still ends quickly
WAIT = 10.0
REPO_ROOT = Path(__file__).resolve().parents[2]


# -- the server -----------------------------------------------------------------


class RunningServer:
    """A :class:`Server` running ``serve_forever`` in a background thread."""

    def __init__(self, config: Config, **server_options: Any) -> None:
        self.config = config
        self.server = Server(config, **server_options)
        host, _, port = self.server.address.rpartition(":")
        self.host = host
        self.port = int(port)
        self.mailbox = Path(config.mailbox)
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"selsmtp {self.server.address}", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self.server.serve_forever()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self, timeout: float = WAIT) -> None:
        """Stop gracefully (as SIGTERM would) and check that the loop really ended."""
        self.server.request_stop()
        self.join(timeout)

    def join(self, timeout: float = WAIT) -> None:
        """Wait for a stop already requested; fail if the loop crashed or hangs."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"server still running {timeout} s after stop"
        if self.error is not None:
            raise AssertionError(f"the server loop crashed: {self.error!r}") from self.error
        assert self.server.stopped


def make_config(mailbox: Path, **overrides: Any) -> Config:
    """The test configuration: 127.0.0.1, a free port, named ``mx.test``."""
    fields: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "mailbox": str(mailbox)}
    fields["name"] = NAME
    fields.update(overrides)
    return Config(**fields)


@pytest.fixture
def mailbox(tmp_path: Path) -> Path:
    return tmp_path / "mailbox"


@pytest.fixture
def start_server(mailbox: Path) -> Iterator[Callable[..., RunningServer]]:
    """``start_server(**config_overrides)``: a new running server on ``mailbox``;
    ``server_options`` go to :class:`Server` itself (its ``store``, ``selector``).

    Every server started is stopped (and checked to have stopped) at teardown.
    """
    started: list[RunningServer] = []

    def start(*, server_options: dict[str, Any] | None = None, **overrides: Any) -> RunningServer:
        config = make_config(overrides.pop("mailbox", mailbox), **overrides)
        running = RunningServer(config, **(server_options or {}))
        started.append(running)
        return running

    yield start
    failures: list[BaseException] = []
    for running in started:
        try:
            running.stop()
        except BaseException as exc:
            failures.append(exc)
    if failures:
        raise failures[0]


@pytest.fixture
def server(start_server: Callable[..., RunningServer]) -> RunningServer:
    """A server with the default configuration (named ``mx.test``)."""
    return start_server()


@pytest.fixture
def smtp(server: RunningServer) -> Iterator[smtplib.SMTP]:
    """A stdlib SMTP client connected to ``server`` (not greeted yet)."""
    client = smtplib.SMTP(server.host, server.port, timeout=WAIT)
    yield client
    with contextlib.suppress(smtplib.SMTPException, OSError):
        client.quit()
    client.close()


# -- raw-socket clients ---------------------------------------------------------


class ConnectionClosed(Exception):
    """The server closed the connection while a reply was expected."""


class WireClient:
    """A raw TCP client that reads whole SMTP replies (``250-`` lines included)."""

    def __init__(self, address: tuple[str, int], *, nodelay: bool = True) -> None:
        self.sock = socket.create_connection(address, timeout=WAIT)
        if nodelay:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: bytes | str, timeout: float = WAIT) -> bytes:
        """Send one command line (CRLF added) and return its whole reply."""
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.read_reply(timeout)

    def read_reply(self, timeout: float = WAIT) -> bytes:
        """The next complete reply, every line of it, as the raw bytes sent."""
        deadline = time.monotonic() + timeout
        lines = []
        while True:
            line = self._read_line(deadline)
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def read_replies(self, count: int, timeout: float = WAIT) -> list[bytes]:
        return [self.read_reply(timeout) for _ in range(count)]

    def read_until_closed(self, timeout: float = WAIT) -> bytes:
        """Everything the server sends until it closes the connection."""
        deadline = time.monotonic() + timeout
        while self._fill(deadline):
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def quiet_for(self, seconds: float) -> bool:
        """True if nothing at all arrives within ``seconds`` (and nothing is buffered)."""
        if self.buffer:
            return False
        readable, _, _ = select.select([self.sock], [], [], seconds)
        return not readable

    def handshake(self, helo: str = HELO) -> None:
        """Read the greeting and say EHLO."""
        assert self.read_reply() == f"220 {NAME} SMTP CS4410MP3\r\n".encode()
        assert self.command(f"EHLO {helo}").startswith(f"250-{NAME}\r\n".encode())

    def close(self) -> None:
        self.sock.close()

    def _read_line(self, deadline: float) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if not self._fill(deadline):
                raise ConnectionClosed(f"closed; unfinished reply {bytes(self.buffer)!r}")
        line = bytes(self.buffer[: end + 2])
        del self.buffer[: end + 2]
        return line

    def _fill(self, deadline: float) -> bool:
        """Read once more; False at end of stream (a reset counts as the end)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"nothing more from the server; have {bytes(self.buffer)!r}")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:
            return False
        self.buffer += data
        return bool(data)


@pytest.fixture
def connect() -> Iterator[Callable[[RunningServer], WireClient]]:
    """``connect(running_server)``: a new raw client; all are closed at teardown."""
    clients: list[WireClient] = []

    def open_client(target: RunningServer) -> WireClient:
        client = WireClient(target.address)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()


START_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"


def greeting() -> bytes:
    return f"220 {NAME} SMTP CS4410MP3\r\n".encode()


def ehlo_reply(max_size: int = 33_554_432) -> bytes:
    return (
        f"250-{NAME}\r\n250-PIPELINING\r\n250-SIZE {max_size}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
        "250-ENHANCEDSTATUSCODES\r\n250 HELP\r\n"
    ).encode()


def delivered(number: int) -> bytes:
    return f"250 2.0.0 Ok: delivered message {number}\r\n".encode()


def transaction(sender: str, recipients: list[str], data: bytes) -> bytes:
    """MAIL, RCPT..., DATA, the data (already CRLF and dot-stuffed) and its end line."""
    lines = [f"MAIL FROM:<{sender}>\r\n".encode()]
    lines += [f"RCPT TO:<{rcpt}>\r\n".encode() for rcpt in recipients]
    lines.append(b"DATA\r\n")
    return b"".join(lines) + data + b".\r\n"


def transaction_replies(recipients: int, number: int) -> bytes:
    """The replies to :func:`transaction`, the message stored as ``number``."""
    return b"250 2.1.0 Ok\r\n" + b"250 2.1.5 Ok\r\n" * recipients + START_DATA + delivered(number)


# -- the mailbox ----------------------------------------------------------------

RECORD_HEAD = re.compile(
    rb"Received: from (?P<helo>\S+) by (?P<name>\S+) \(CS4410MP3\)\nNumber: (?P<number>\d+)\n"
)


@dataclasses.dataclass(frozen=True)
class Record:
    """One cs4410 record (SPEC §5.1), parsed."""

    number: int
    helo: str
    name: str
    sender: str
    recipients: tuple[str, ...]
    body: bytes
    raw: bytes


def parse_record(raw: bytes) -> Record:
    match = RECORD_HEAD.match(raw)
    assert match, f"not a record: {raw[:200]!r}"
    head, blank, rest = raw.partition(b"\n\n")
    assert blank, f"record without its blank header line: {raw[:200]!r}"
    lines = head.decode("utf-8").split("\n")
    assert lines[2].startswith("From: "), lines
    assert all(line.startswith("To: ") for line in lines[3:]), lines
    assert rest.endswith(b"\n"), f"record does not end with a blank line: {raw[-200:]!r}"
    return Record(
        number=int(match["number"]),
        helo=match["helo"].decode(),
        name=match["name"].decode(),
        sender=lines[2][len("From: ") :],
        recipients=tuple(line[len("To: ") :] for line in lines[3:]),
        body=rest[:-1],
        raw=raw,
    )


def split_records(data: bytes) -> list[Record]:
    """Cut a cs4410 mailbox into records (bodies must not themselves look like a head)."""
    starts = [match.start() for match in RECORD_HEAD.finditer(data)]
    if not data:
        return []
    assert starts and starts[0] == 0, f"mailbox does not start with a record: {data[:200]!r}"
    return [
        parse_record(data[start:end])
        for start, end in zip(starts, [*starts[1:], len(data)], strict=True)
    ]


def read_mailbox(path: Path) -> list[Record]:
    """The records of the mailbox at ``path`` ([] if there is no file)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return split_records(data)


# -- message bodies that prove their own integrity --------------------------------

CHECK_PREFIX = b"X-Check: "


def checked_body(token: str, size: int) -> bytes:
    """A body (LF line ends, as stored) of about ``size`` bytes that names ``token``
    at the start of every line and ends with a SHA-256 of everything before that last
    line, so a record that was cut, mixed with another or altered is caught."""
    filler = random.Random(token).randbytes(size).translate(_ALPHANUMERIC)
    prefix = token.encode() + b" "
    text = b"".join(prefix + filler[i : i + 64] + b"\n" for i in range(0, len(filler), 64))
    return text + CHECK_PREFIX + hashlib.sha256(text).hexdigest().encode() + b"\n"


_ALPHABET = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_ALPHANUMERIC = bytes(_ALPHABET[i % len(_ALPHABET)] for i in range(256))


def verify_checked_body(body: bytes) -> str:
    """Check a body made by :func:`checked_body`; return its token."""
    text, _, last = body[:-1].rpartition(b"\n")
    assert last.startswith(CHECK_PREFIX), f"checksum line missing: {last[:80]!r}"
    text += b"\n"
    assert hashlib.sha256(text).hexdigest().encode() == last[len(CHECK_PREFIX) :], "corrupt body"
    token = text.split(b" ", 1)[0]
    assert all(line.startswith(token + b" ") for line in text.splitlines()), "mixed bodies"
    return token.decode()


def to_wire(body: bytes) -> bytes:
    """A stored-form body (LF) as message data on the wire: CRLF, dot-stuffed."""
    wire = body.replace(b"\n", b"\r\n")
    wire = re.sub(rb"(?m)^\.", b"..", wire)
    return wire


# -- locks held by another process ------------------------------------------------


def _hold_lock(path: str, mode: int, locked: Any, release: Any) -> None:
    """Child process: take ``lockf(mode)`` on ``path``, hold it until ``release``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, mode)
        locked.set()
        release.wait(120)
    finally:
        os.close(fd)


class LockHolder:
    """A ``multiprocessing`` child holding a ``lockf`` lock on a file until released."""

    def __init__(self, path: Path, mode: int = fcntl.LOCK_SH) -> None:
        context = multiprocessing.get_context("spawn")
        self._locked = context.Event()
        self._release = context.Event()
        self._process = context.Process(
            target=_hold_lock, args=(str(path), mode, self._locked, self._release), daemon=True
        )
        self._released = False
        self._process.start()
        if not self._locked.wait(WAIT):
            self._process.kill()
            self._process.join()
            raise AssertionError(f"the child could not lock {path}")

    def release(self) -> None:
        """Release the lock; when this returns, the child has exited. Idempotent."""
        if self._released:
            return
        self._released = True
        self._release.set()
        self._process.join(WAIT)
        exitcode = self._process.exitcode
        if exitcode is None:
            self._process.kill()
            self._process.join()
        self._process.close()
        assert exitcode == 0, f"lock holder exit code {exitcode}"


@pytest.fixture
def hold_lock() -> Iterator[Callable[..., LockHolder]]:
    """``hold_lock(path, mode=LOCK_SH)``: a child process holding a lock on ``path``."""
    holders: list[LockHolder] = []

    def take(path: Path, mode: int = fcntl.LOCK_SH) -> LockHolder:
        holder = LockHolder(path, mode)
        holders.append(holder)
        return holder

    yield take
    for holder in holders:
        holder.release()


def send_message(
    target: RunningServer,
    data: bytes = b"hello\r\n",
    sender: str = "sender@example.org",
    recipients: tuple[str, ...] = ("rcpt@example.org",),
) -> int:
    """Send one message in a session of its own; return the number it was stored as."""
    with smtplib.SMTP(target.host, target.port, timeout=WAIT) as client:
        client.ehlo(HELO)
        client.mail(sender)
        for recipient in recipients:
            client.rcpt(recipient)
        code, text = client.data(data)
    match = re.fullmatch(rb"2\.0\.0 Ok: delivered message (\d+)", text)
    assert code == 250 and match, (code, text)
    return int(match[1])
