"""Memory per connection is bounded in real bytes, whatever the packet sizes (SPEC §12).

A real ``python -m selsmtp`` process; many clients in DATA each send their message two
bytes per ``send``. The server's RSS (``VmRSS``) may grow by a small multiple of the
data it holds, not by the per-piece bookkeeping of tens of thousands of tiny reads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import NAME, REPO_ROOT, START_DATA, WAIT, WireClient, delivered, read_mailbox
from .processes import SelsmtpProcess

#: connections in DATA at once, and the 2-byte pieces each sends
CLIENTS = 200
ROUNDS = 1000
#: a line of message data every LINE_EVERY rounds (the rest is "xy" pieces)
LINE_EVERY = 40


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def piece(round_number: int) -> bytes:
    return b"\r\n" if round_number % LINE_EVERY == LINE_EVERY - 1 else b"xy"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_tiny_pieces_of_message_data_cost_about_their_own_size(tmp_path: Path) -> None:
    process = SelsmtpProcess(tmp_path / "mailbox", "--log-level", "warning")
    clients: list[WireClient] = []
    try:
        for _ in range(CLIENTS):
            client = process.connect()
            clients.append(client)
            client.send(b"HELO client.test\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n")
        for client in clients:
            assert client.read_replies(5)[-1] == START_DATA
        # Why a probe: its NOOP is answered once the server has polled past the pieces
        # sent before it, so each round reaches the server as reads of about 2 bytes
        # rather than piling up in the socket into larger ones.
        probe = process.connect()
        clients.append(probe)
        assert probe.read_reply() == f"220 {NAME} SMTP CS4410MP3\r\n".encode()
        baseline = rss_bytes(process.pid)

        socks = [client.sock for client in clients[:CLIENTS]]
        for round_number in range(ROUNDS):
            data = piece(round_number)
            for sock in socks:
                sock.send(data)  # blocking, and 2 bytes always fit: all are sent
            assert probe.command(b"NOOP") == b"250 2.0.0 Ok\r\n"
        held = rss_bytes(process.pid) - baseline

        for sock in socks:
            sock.sendall(b"\r\n.\r\n")
        replies = sorted(client.read_reply() for client in clients[:CLIENTS])
        assert replies == sorted(delivered(n) for n in range(1, CLIENTS + 1))
    finally:
        for client in clients:
            client.close()
        process.signal(15)
        code, _, stderr = process.wait()
    assert code == 0, stderr[-2000:]

    body = b"".join(piece(r) for r in range(ROUNDS)) + b"\r\n"
    records = read_mailbox(process.mailbox)
    assert len(records) == CLIENTS
    assert {record.body for record in records} == {body.replace(b"\r\n", b"\n")}
    data = CLIENTS * ROUNDS * 2
    print(f"{data} bytes in 2-byte pieces over {CLIENTS} connections: RSS grew {held} bytes")
    # Gathered into one buffer per message, the data costs about its own size; kept as
    # an object per piece, it cost 26 times that (10.5 MB here). The slack is for the
    # allocator's arenas.
    assert held < 3 * data + (1 << 20), f"RSS grew {held} bytes holding {data} bytes"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_the_pieces_tool_reports_what_the_server_held() -> None:
    """tools/pieces.py, the README's measure, on a small scale."""
    options = ["--connections", "20", "--bytes", "400", "--json"]
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "pieces.py"), *options],
        capture_output=True,
        text=True,
        timeout=WAIT * 3,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["delivered"] == 20
    assert result["data_bytes"] == 20 * 400
    assert result["growth_bytes"] == result["rss_held_bytes"] - result["rss_baseline_bytes"]
