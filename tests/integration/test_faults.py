"""Hostile clients and scarce resources (SPEC §4.4-4.6): the server stays up for everyone.

Each test creates its condition for real: a bug planted in one session, smuggling
attempts on the wire, a storm of clients sending garbage, a process out of file
descriptors, and tens of megabytes of hostile input against a measured RSS.
"""

from __future__ import annotations

import logging
import os
import random
import re
import select
import smtplib
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from selsmtp import server as server_module
from selsmtp.session import Action, Session

from .conftest import (
    NAME,
    REPO_ROOT,
    WAIT,
    ConnectionClosed,
    RunningServer,
    WireClient,
    delivered,
    greeting,
    read_mailbox,
    transaction,
)
from .processes import LISTENING, SelsmtpProcess, child_env

pytestmark = pytest.mark.timeout(90)

REPLY_LINE = re.compile(rb"[2-5]\d\d[ -][^\r\n]*\r\n")


# -- a bug in one session ------------------------------------------------------------


class BuggySession(Session):
    """A session with a planted bug: the word BOOM makes it raise."""

    __slots__ = ()

    def receive(self, data: bytes) -> list[Action]:
        if b"BOOM" in data:
            raise RuntimeError("planted bug")
        return super().receive(data)


def test_a_bug_in_one_session_closes_only_that_connection(
    start_server: Callable[..., RunningServer],
    connect: Callable[[RunningServer], WireClient],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(server_module, "Session", BuggySession)
    running = start_server()
    healthy, victim = connect(running), connect(running)
    healthy.handshake()
    victim.handshake()

    with caplog.at_level(logging.ERROR, logger="selsmtp.server"):
        victim.send(b"NOOP BOOM\r\n")
        assert victim.read_until_closed() == b""

    [report] = [r for r in caplog.records if "bug while serving" in r.getMessage()]
    assert report.exc_info is not None and "planted bug" in str(report.exc_info[1])
    healthy.send(transaction("a@example.org", ["b@example.org"], b"still here\r\n"))
    assert healthy.read_replies(4)[-1] == delivered(1)
    assert running.running


# -- SMTP smuggling over the wire ----------------------------------------------------

LOOKALIKES = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r\r\n", b"\r.\r\n", b"\n..\n"]


@pytest.mark.parametrize("fake_end", LOOKALIKES, ids=repr)
def test_a_smuggled_transaction_stays_inside_the_first_message(
    server: RunningServer, connect: Callable[[RunningServer], WireClient], fake_end: bytes
) -> None:
    smuggled = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nforged\r\n"
    client = connect(server)
    client.send(
        b"EHLO client.test\r\n"
        + transaction("a@example.org", ["b@example.org"], b"innocent" + fake_end + smuggled)
        + b"QUIT\r\n"
    )
    replies = client.read_until_closed()
    assert replies.startswith(greeting())
    assert replies.endswith(delivered(1) + b"221 2.0.0 Bye\r\n")
    assert replies.count(b"delivered message") == 1

    [record] = read_mailbox(server.mailbox)
    assert record.sender == "a@example.org"
    assert record.recipients == ("b@example.org",)
    assert b"innocent" in record.body
    assert b"MAIL FROM:<evil@example.org>" in record.body
    assert b"forged" in record.body


# -- a storm of garbage --------------------------------------------------------------

PREFIXES = [b"", b"EHLO storm\r\n", b"HELO storm\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"]


def _storm_client(address: tuple[str, int], seed: int, replies: list[bytes]) -> None:
    rng = random.Random(seed)
    sock = socket.create_connection(address, timeout=WAIT)
    received = bytearray()
    try:
        garbage = rng.choice(PREFIXES) + rng.randbytes(rng.randrange(1, 20_000))
        # Some garbage looks like SMTP: line ends, dots and NULs in bulk.
        garbage = garbage.replace(b"\x07", b"\r\n").replace(b"\x08", b".\r\n")
        position = 0
        while position < len(garbage):
            size = rng.choice([1, 7, 100, 1500, 8000])
            sock.sendall(garbage[position : position + size])
            position += size
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
        if rng.random() < 0.5:
            # Abort: a reset instead of a clean close.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(WAIT)
            while data := sock.recv(65536):
                received += data
    except OSError:
        pass  # resets and broken pipes are what a storm is made of
    finally:
        sock.close()
    replies.append(bytes(received))


def test_a_storm_of_garbage_clients_leaves_the_server_serving(server: RunningServer) -> None:
    replies: list[bytes] = []
    threads = [
        threading.Thread(target=_storm_client, args=(server.address, seed, replies))
        for seed in range(60)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 3)
    assert len(replies) == 60

    for received in replies:
        complete = received[: received.rfind(b"\r\n") + 2]
        assert REPLY_LINE.sub(b"", complete) == b"", f"malformed reply in {complete[-300:]!r}"
    with smtplib.SMTP(*server.address, timeout=WAIT) as smtp:
        assert smtp.noop()[0] == 250
        smtp.sendmail("a@example.org", ["b@example.org"], b"Subject: calm\r\n\r\nafter\r\n")
    assert server.running
    assert read_mailbox(server.mailbox)[-1].body == b"Subject: calm\n\nafter\n"


# -- out of file descriptors ---------------------------------------------------------

#: runs a Server with a low descriptor limit and no cap on --max-connections, so that
#: accept() really fails with EMFILE (the command line would lower the cap instead)
LOW_FD_SERVER = """\
import logging, resource, signal, sys
from selsmtp.config import Config
from selsmtp.server import Server
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
server = Server(Config(port=0, mailbox=sys.argv[1], name="mx.test", max_connections=1000))
signal.signal(signal.SIGTERM, lambda *args: server.request_stop())
signal.set_wakeup_fd(server.wakeup_fd)
print(f"selsmtp listening on {server.address}", flush=True)
server.serve_forever()
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def greeted_within(
    clients: list[socket.socket], seconds: float, *, settle: float = 0.5
) -> set[socket.socket]:
    """The clients whose greeting arrives within ``seconds``, returning early once some
    have been greeted and no more greetings came for ``settle`` seconds."""
    greeted: set[socket.socket] = set()
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0 and len(greeted) < len(clients):
        waiting = [c for c in clients if c not in greeted]
        readable, _, _ = select.select(waiting, [], [], min(remaining, settle))
        if not readable and greeted:
            break
        for sock in readable:
            assert sock.recv(4096) == greeting()
            greeted.add(sock)
    return greeted


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_out_of_descriptors_the_server_neither_spins_nor_stops_serving(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", LOW_FD_SERVER, str(tmp_path / "mailbox"), "40"],
        cwd=REPO_ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    clients: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        match = LISTENING.fullmatch(proc.stdout.readline().decode())
        assert match, "no readiness line"
        address = (match[1], int(match[2]))
        clients = [socket.create_connection(address, timeout=WAIT) for _ in range(60)]
        served = greeted_within(clients, 2.0)
        assert 10 <= len(served) < 60, f"{len(served)} of 60 greeted with 40 descriptors"

        # The backlog is full and the listener readable; a server that kept
        # watching it would burn a whole core here.
        before = cpu_seconds(proc.pid)
        time.sleep(1.0)  # measuring CPU over an interval: the wait is the measurement
        assert cpu_seconds(proc.pid) - before < 0.2

        # The connected clients are served meanwhile.
        talker = next(iter(served))
        talker.sendall(
            b"HELO c\r\n" + transaction("a@example.org", ["b@example.org"], b"hi\r\n") + b"QUIT\r\n"
        )
        answer = b""
        while chunk := talker.recv(4096):
            answer += chunk
        assert delivered(1) in answer

        # Closing connections frees descriptors: the waiting clients get in.
        for sock in list(served)[1:6]:
            sock.close()
        waiting = [c for c in clients if c not in served]
        assert greeted_within(waiting, WAIT), "no waiting client was accepted"
    finally:
        for sock in clients:
            sock.close()
        proc.terminate()
        _, stderr = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert "Too many open files" in stderr.decode()


# -- memory under hostile input ------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def send_in_chunks(client: WireClient, data: bytes, chunk: int = 1 << 16) -> None:
    for start in range(0, len(data), chunk):
        client.send(data[start : start + chunk])


def flood_without_reading(address: tuple[str, int], seconds: float) -> int:
    """Send NOOPs and never read a reply, until the server stops taking them."""
    sock = socket.create_connection(address, timeout=WAIT)
    sock.setblocking(False)
    chunk = b"NOOP\r\n" * 10_000
    sent = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            _, writable, _ = select.select([], [sock], [], 0.2)
            if not writable:
                break  # the server stopped reading: it is not buffering without bound
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                continue
    finally:
        sock.close()
    return sent


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_hostile_input_keeps_the_server_memory_bounded(tmp_path: Path) -> None:
    process = SelsmtpProcess(tmp_path / "mailbox", "--max-message-size", "1000000")
    clients: list[WireClient] = []

    def connect() -> WireClient:
        clients.append(process.connect())
        return clients[-1]

    try:
        # Warm up: a normal message and one near the size limit.
        warm = connect()
        warm.handshake()
        warm.send(transaction("a@b.c", ["d@e.f"], b"warm\r\n" + b"x" * 900_000 + b"\r\n"))
        assert warm.read_replies(4)[-1] == delivered(1)
        baseline = rss_bytes(process.pid)

        sent = 0
        endless = connect()  # a 24 MB command line
        endless.handshake()
        send_in_chunks(endless, b"NOOP " + b"y" * 24_000_000)
        endless.send(b"\r\n")
        assert endless.read_reply() == b"500 5.5.2 Error: line too long\r\n"
        sent += 24_000_000

        oversized = connect()  # a 24 MB message over a 1 MB limit
        oversized.handshake()
        oversized.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n")
        oversized.read_replies(3)
        send_in_chunks(oversized, (b"z" * 998 + b"\r\n") * 24_000 + b".\r\n")
        assert oversized.read_reply() == b"552 5.3.4 Error: message file too big\r\n"
        sent += 24_000_000

        sent += flood_without_reading(process.address, 3.0)  # replies nobody reads
        during = rss_bytes(process.pid)

        # The server still serves, and the attackers' memory is gone.
        endless.send(transaction("a@b.c", ["d@e.f"], b"after\r\n"))
        assert endless.read_replies(4)[-1] == delivered(2)
        growth = max(during, rss_bytes(process.pid)) - baseline
        print(
            f"RSS {baseline / 1e6:.1f} MB, growth {growth / 1e6:.2f} MB after {sent / 1e6:.0f} MB"
        )
        assert growth < 8_000_000, f"RSS grew {growth} bytes under {sent} bytes of hostile input"
    finally:
        for client in clients:
            client.close()
        process.signal(15)
        code, _, stderr = process.wait()
    assert code == 0, stderr[-2000:]


def test_closed_clients_do_not_get_replies_from_others(
    server: RunningServer, connect: Callable[[RunningServer], WireClient]
) -> None:
    """A client that vanishes mid-command leaves the next client's conversation clean."""
    gone = connect(server)
    gone.handshake()
    gone.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\npartial")
    gone.close()
    fresh = connect(server)
    fresh.handshake()
    assert fresh.command("NOOP") == b"250 2.0.0 Ok\r\n"
    with pytest.raises((ConnectionClosed, TimeoutError)):
        fresh.read_reply(timeout=0.2)
    assert read_mailbox(server.mailbox) == []


def test_max_connections_is_kept_below_the_descriptor_limit(tmp_path: Path) -> None:
    limit = 64
    process = SelsmtpProcess(
        tmp_path / "mailbox", "--max-connections", "1000", rlimits={"RLIMIT_NOFILE": limit}
    )
    clients: list[socket.socket] = []
    try:
        allowed = limit - 32  # FD_RESERVE descriptors stay for the mailbox, spools, logs
        clients = [socket.create_connection(process.address, timeout=WAIT) for _ in range(allowed)]
        assert len(greeted_within(clients, WAIT)) == allowed
        extra = socket.create_connection(process.address, timeout=WAIT)
        clients.append(extra)
        refused = extra.recv(4096)
        assert refused == f"421 4.7.0 {NAME} Error: too many connections\r\n".encode()
    finally:
        for sock in clients:
            sock.close()
        process.signal(15)
        code, _, stderr = process.wait()
    assert code == 0
    assert f"serving at most {allowed} connections" in stderr
