"""One server per mailbox, whatever its format (SPEC §12, issue 10 item 4).

Real ``python -m selsmtp`` processes on one mailbox: started together, exactly one
serves and the other exits 1 naming the mailbox and the first one's pid; started
while the first drains (it was asked to stop but still waits to store a message),
the second waits, and serves once the first has exited, continuing its numbers.
"""

from __future__ import annotations

import select
import signal
import subprocess
from pathlib import Path

import pytest

from .conftest import NAME, WAIT, LockHolder, WireClient, delivered, read_mailbox, transaction
from .processes import LISTENING, SelsmtpProcess, child_env, selsmtp_command

pytestmark = pytest.mark.timeout(90)

#: selsmtp.instance.WAIT, and some slack for a loaded machine
GIVES_UP_WITHIN = 8.0 + WAIT


def start(mailbox: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        selsmtp_command(
            "--port", "0", "--mailbox", str(mailbox), "--name", NAME, "--log-level", "error", *args
        ),
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def listening_port(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The port ``proc`` announced within ``timeout`` s; ``None`` if it printed nothing
    (or exited)."""
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    if not readable:
        return None
    line = proc.stdout.readline().decode()
    match = LISTENING.fullmatch(line)
    return int(match[2]) if match else None


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("fmt", ["cs4410", "mbox", "maildir"])
def test_two_started_together_exactly_one_serves(fmt: str, tmp_path: Path) -> None:
    mailbox = tmp_path / "mailbox"
    started = [start(mailbox, "--format", fmt), start(mailbox, "--format", fmt)]
    try:
        outputs = {proc.stdout: proc for proc in started}
        readable, _, _ = select.select(list(outputs), [], [], WAIT)
        assert readable, "neither announced itself"
        winner = outputs[readable[0]]
        [loser] = [proc for proc in started if proc is not winner]
        assert listening_port(winner, WAIT) is not None

        out, err = loser.communicate(timeout=GIVES_UP_WITHIN)
        assert loser.returncode == 1
        assert out == b""
        lines = err.decode().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("selsmtp: ")
        assert str(mailbox) in lines[0]
        assert f"pid {winner.pid}" in lines[0]
        assert winner.poll() is None
    finally:
        for proc in started:
            stop(proc)


def test_a_replacement_started_during_a_drain_serves_once_the_first_exits(
    tmp_path: Path,
) -> None:
    mailbox = tmp_path / "mailbox"
    first = SelsmtpProcess(mailbox)
    holder: LockHolder | None = None
    client = first.connect()
    replacement: subprocess.Popen[bytes] | None = None
    try:
        client.handshake()
        client.send(transaction("a@example.org", ["b@example.org"], b"one\r\n"))
        assert client.read_replies(4)[-1] == delivered(1)
        holder = LockHolder(mailbox)  # a reader holds the mailbox: the next one waits
        client.send(transaction("a@example.org", ["b@example.org"], b"two\r\n"))
        assert client.read_replies(3)[-1].startswith(b"354 ")
        assert client.quiet_for(0.3)  # waiting for the reader's lock

        first.signal(signal.SIGTERM)  # it drains: the listener closes, "two" waits
        replacement = start(mailbox)
        # While the first one is still storing, the replacement must not serve.
        assert listening_port(replacement, 1.0) is None
        assert replacement.poll() is None
        holder.release()
        assert client.read_until_closed().startswith(delivered(2))
        code, _, err = first.wait()
        assert code == 0, err

        port = listening_port(replacement, WAIT)
        assert port is not None, "the replacement did not start after the first exited"
        late = WireClient(("127.0.0.1", port))
        try:
            late.handshake()
            late.send(transaction("a@example.org", ["b@example.org"], b"three\r\n"))
            assert late.read_replies(4)[-1] == delivered(3)
        finally:
            late.close()
    finally:
        if holder is not None:
            holder.release()
        client.close()
        first.kill()
        if replacement is not None:
            stop(replacement)
    assert [r.number for r in read_mailbox(mailbox)] == [1, 2, 3]
