"""Long load tests: tools/flood.py against ``python -m selsmtp`` (run with ``-m stress``).

Each test starts its own server process and drives it with flood.py: hundreds of
clients, thousands of messages of mixed sizes, slow clients that must be timed out,
invalid commands, and a reader that keeps reading the mailbox under a shared lock
while the server appends and must only ever see whole records. flood then checks
every acknowledged message in the mailbox. Each test is bounded to about a minute.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from selsmtp import reader

pytestmark = pytest.mark.stress

REPO_ROOT = Path(__file__).resolve().parents[2]
FLOOD = REPO_ROOT / "tools" / "flood.py"
RUN_TIMEOUT = 90

#: Reads the mailbox under a shared lock in a loop until told to stop (a line on
#: stdin), checking each snapshot; prints {"reads": N, "problems": [...]}.
LOCKED_READER = textwrap.dedent(
    """
    import json, os, select, sys
    from selsmtp import reader
    path = sys.argv[1]
    reads, problems = 0, []
    while not select.select([sys.stdin], [], [], 0.02)[0]:
        try:
            box = reader.read_mailbox(path, lock_timeout=10)
        except FileNotFoundError:
            continue
        reads += 1
        problems += [f"read {reads} ({len(box.data)} bytes): {p}" for p in box.problems]
    print(json.dumps({"reads": reads, "problems": problems[:20]}))
    """
)


class Server:
    def __init__(self, mailbox: Path, *args: str) -> None:
        self.mailbox = mailbox
        self.process = subprocess.Popen(
            [sys.executable, "-m", "selsmtp", "--port", "0", "--mailbox", str(mailbox),
             "--name", "stress.test", "--log-level", "warning", "--max-connections", "2000",
             *args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        assert line.startswith("selsmtp listening on "), line
        self.port = int(line.rsplit(":", 1)[1])

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=30)
        assert self.process.returncode == 0, err.decode()[-2000:]
        return err.decode()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path / "mailbox", "--timeout", "3")
    yield running
    running.stop()
    assert reader.read_mailbox(running.mailbox, lock_timeout=10).problems == ()


def flood(server: Server, *args: str) -> dict[str, Any]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(FLOOD), "--port", str(server.port), "--mailbox",
         str(server.mailbox), "--json", *args],
        capture_output=True,
        timeout=RUN_TIMEOUT,
    )  # fmt: skip
    report: dict[str, Any] = json.loads(done.stdout)
    report["wall_s"] = time.monotonic() - started
    print(json.dumps({k: v for k, v in report.items() if k != "verification"}, indent=1))
    assert report["failures"] == []
    assert report["verification"]["problems"] == []
    assert done.returncode == 0
    assert report["ok"] is True
    assert report["failed"] == 0
    assert report["verification"]["found"] == report["acknowledged"]
    return report


def test_many_clients_mixed_sizes_slow_clients_and_errors(server: Server) -> None:
    """200 clients and 5000 messages, one per connection, from two processes, while 10
    slow clients wait for their timeout and a reader keeps locking the mailbox."""
    watcher = subprocess.Popen(
        [sys.executable, "-c", LOCKED_READER, str(server.mailbox)],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        report = flood(
            server, "--clients", "200", "--messages", "25", "--processes", "2",
            "--size", "100:20000", "--seed", "11", "--bad-rate", "0.1", "--slow", "10",
            "--recipients", "2", "--timeout", "30", "--duration", "60",
        )  # fmt: skip
    finally:
        out, _ = watcher.communicate(b"stop\n", timeout=30)
    assert report["acknowledged"] == 5000
    assert report["slow_clients"] == {"got_421": 10, "failed": 0}
    assert report["bad_commands"]["wrong"] == 0
    seen = json.loads(out)
    assert seen["problems"] == []
    assert seen["reads"] > 0


def test_long_sessions_pipelining_and_split_writes(server: Server) -> None:
    report = flood(
        server, "--clients", "200", "--messages", "100", "--keep-open", "--pipelining",
        "--size", "200:5000", "--seed", "12", "--split", "random", "--split-clients", "5",
        "--bad-rate", "0.05", "--duration", "45",
    )  # fmt: skip
    assert report["acknowledged"] == 20000
    assert report["connections"] == 200


def test_large_messages_are_stored_whole(server: Server) -> None:
    """Messages past the 1 MiB spool threshold, several at once."""
    report = flood(
        server, "--clients", "8", "--messages", "3", "--keep-open", "--size",
        "1000000:3000000", "--seed", "13",
    )  # fmt: skip
    assert report["acknowledged"] == 24
