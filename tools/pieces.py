#!/usr/bin/env python3
"""pieces: what message data sent in tiny pieces costs selsmtp in memory.

Usage (from the repository; only the standard library is needed)::

    python tools/pieces.py --connections 1000 --bytes 2000 --piece 2

It starts ``python -m selsmtp`` on a free loopback port with a mailbox in a temporary
folder, opens ``--connections`` connections and takes each into DATA, then reads the
server's ``VmRSS`` (the baseline: every connection open and in DATA). Then, in rounds,
it sends ``--piece`` bytes of message data on every connection, until each has sent
``--bytes``, and reads ``VmRSS`` again: the growth is what the server holds for that
data. Finally every message is ended, every client must get its ``250``, and the
server is stopped.

Pacing: after each round a probe connection sends ``NOOP`` and waits for the reply.
The server answers it only once it has polled past the pieces sent before it, so the
pieces reach the server as reads of about ``--piece`` bytes instead of piling up in
the socket buffers into larger ones.

Bounded: at most 5,000 connections and 1 MiB per connection, every wait at most
``--timeout`` seconds, loopback only. The descriptor limit (``ulimit -n``) is raised
as far as the hard limit allows; if that is not enough, exit 2.

Exit status: 0 if every message got its 250, 1 if not, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The repository root (the parent of tools/) holds the selsmtp package.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from selsmtp.argtypes import positive_float, positive_int  # noqa: E402

MAX_CONNECTIONS = 5000
MAX_BYTES = 1 << 20
#: descriptors this process needs besides its connections
SPARE_FDS = 64
#: a line of message data ends every LINE bytes (the rest is "x")
LINE = 80


class Failed(Exception):
    """The run could not go on; the message says why."""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise Failed(f"no VmRSS for process {pid}")


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            raise Failed(f"need {need} descriptors, the hard limit is {hard}: raise ulimit -n")


def read_reply(sock: socket.socket, buffer: bytearray) -> bytes:
    """The next whole reply on ``sock`` (multi-line ones included)."""
    while True:
        start = 0
        while (end := buffer.find(b"\r\n", start)) >= 0:
            if buffer[start + 3 : start + 4] != b"-":
                reply = bytes(buffer[: end + 2])
                del buffer[: end + 2]
                return reply
            start = end + 2
        data = sock.recv(65536)
        if not data:
            raise Failed(f"the server closed a connection; had {bytes(buffer)!r}")
        buffer += data


def message_data(size: int) -> bytes:
    line = b"x" * (LINE - 2) + b"\r\n"
    return (line * (size // LINE + 1))[:size]


def run(connections: int, size: int, piece: int, timeout: float) -> dict[str, Any]:
    raise_fd_limit(connections + SPARE_FDS)
    with tempfile.TemporaryDirectory(prefix="pieces-") as folder:
        mailbox = Path(folder) / "mailbox"
        with open(Path(folder) / "stderr", "w+b") as log:
            command = [sys.executable, "-m", "selsmtp", "--port", "0", "--mailbox", str(mailbox)]
            command += ["--max-connections", str(connections + 8), "--log-level", "warning"]
            server = subprocess.Popen(
                command,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
            )
            try:
                return drive(server, connections, size, piece, timeout)
            except (OSError, Failed) as exc:
                log.seek(0)
                raise Failed(f"{exc}\nserver's stderr: {log.read()[-2000:].decode()}") from exc
            finally:
                server.terminate()
                server.wait(timeout)


def drive(
    server: subprocess.Popen[bytes], connections: int, size: int, piece: int, timeout: float
) -> dict[str, Any]:
    assert server.stdout is not None
    first = server.stdout.readline().decode()
    if not first.startswith("selsmtp listening on 127.0.0.1:"):
        raise Failed(f"the server did not start: {first!r}")
    address = ("127.0.0.1", int(first.rsplit(":", 1)[1]))
    socks: list[socket.socket] = []
    buffers: list[bytearray] = []
    try:
        for _ in range(connections + 1):  # the last one is the probe
            sock = socket.create_connection(address, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
            buffers.append(bytearray())
            if not read_reply(sock, buffers[-1]).startswith(b"220 "):
                raise Failed("no greeting")
        probe, probe_buffer = socks.pop(), buffers.pop()
        for sock in socks:
            sock.sendall(b"HELO pieces.test\r\nMAIL FROM:<a@pieces.test>\r\n")
            sock.sendall(b"RCPT TO:<b@pieces.test>\r\nDATA\r\n")
        for sock, buffer in zip(socks, buffers, strict=True):
            replies = [read_reply(sock, buffer) for _ in range(4)]
            if not replies[-1].startswith(b"354 "):
                raise Failed(f"not in DATA: {replies!r}")
        baseline = rss_bytes(server.pid)
        data = message_data(size)
        started = time.monotonic()
        for start in range(0, size, piece):
            chunk = data[start : start + piece]
            for sock in socks:
                sock.sendall(chunk)
            probe.sendall(b"NOOP\r\n")
            if not read_reply(probe, probe_buffer).startswith(b"250 "):
                raise Failed("the probe's NOOP was refused")
        elapsed = time.monotonic() - started
        held = rss_bytes(server.pid)
        for sock in socks:
            sock.sendall(b"\r\n.\r\n")
        delivered = sum(
            read_reply(sock, buffer).startswith(b"250 ")
            for sock, buffer in zip(socks, buffers, strict=True)
        )
    finally:
        for sock in socks:
            sock.close()
    total = connections * size
    return {
        "connections": connections,
        "bytes_per_connection": size,
        "piece": piece,
        "data_bytes": total,
        "rss_baseline_bytes": baseline,
        "rss_held_bytes": held,
        "growth_bytes": held - baseline,
        "growth_per_data_byte": round((held - baseline) / total, 2),
        "seconds_sending": round(elapsed, 1),
        "delivered": delivered,
    }


def parse_options(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pieces.py", description="selsmtp's memory for message data sent in tiny pieces"
    )
    parser.add_argument("--connections", type=positive_int, default=1000)
    parser.add_argument("--bytes", type=positive_int, default=2000, help="per connection")
    parser.add_argument("--piece", type=positive_int, default=2, help="bytes per send")
    parser.add_argument("--timeout", type=positive_float, default=30.0, help="longest wait")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    opts = parser.parse_args(argv)
    if opts.connections > MAX_CONNECTIONS:
        parser.error(f"--connections: at most {MAX_CONNECTIONS}")
    if opts.bytes > MAX_BYTES:
        parser.error(f"--bytes: at most {MAX_BYTES}")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_options(argv)
    if not Path(f"/proc/{os.getpid()}/status").exists():
        print("pieces.py: needs /proc to read the server's VmRSS", file=sys.stderr)
        return 2
    try:
        result = run(opts.connections, opts.bytes, opts.piece, opts.timeout)
    except Failed as exc:
        print(f"pieces.py: {exc}", file=sys.stderr)
        return 2 if "ulimit" in str(exc) else 1
    if opts.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['connections']} connections in DATA, {result['bytes_per_connection']} "
            f"bytes each in {result['piece']}-byte sends ({result['data_bytes'] / 1e6:.1f} MB "
            f"in {result['seconds_sending']} s): server RSS "
            f"{result['rss_baseline_bytes'] / 2**20:.1f} -> "
            f"{result['rss_held_bytes'] / 2**20:.1f} MiB, "
            f"+{result['growth_bytes'] / 1e6:.2f} MB ({result['growth_per_data_byte']}x the "
            f"data); {result['delivered']} of {result['connections']} got their 250"
        )
    return 0 if result["delivered"] == opts.connections else 1


if __name__ == "__main__":
    raise SystemExit(main())
