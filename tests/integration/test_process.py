"""``python -m selsmtp`` as a real process: start-up line, exit codes, signals, logs."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import (
    HELO,
    NAME,
    WAIT,
    LockHolder,
    checked_body,
    delivered,
    greeting,
    read_mailbox,
    to_wire,
    transaction,
)
from .processes import SelsmtpProcess, run_selsmtp

pytestmark = pytest.mark.timeout(60)

SHUTTING_DOWN = f"421 4.3.2 {NAME} Service shutting down\r\n".encode()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[type[SelsmtpProcess]]:
    """``launch(mailbox, *args)``: start selsmtp; killed at teardown if still running."""
    started: list[SelsmtpProcess] = []

    class Launch(SelsmtpProcess):
        def __init__(self, mailbox: Path, *args: str, file_size_limit: int | None = None) -> None:
            limits = None if file_size_limit is None else {"RLIMIT_FSIZE": file_size_limit}
            super().__init__(mailbox, *args, rlimits=limits)
            started.append(self)

    yield Launch
    for process in started:
        process.kill()


def assert_one_clean_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {stderr!r}"
    assert "Traceback" not in stderr
    assert lines[0].startswith("selsmtp: ")
    return lines[0]


# -- start-up -------------------------------------------------------------------


def test_listening_line_comes_first_and_names_the_real_port(
    launch: type[SelsmtpProcess], tmp_path: Path
) -> None:
    process = launch(tmp_path / "mailbox")

    assert process.port != 0
    client = process.connect()
    try:
        assert client.read_reply() == greeting()
    finally:
        client.close()
    process.signal(signal.SIGTERM)
    code, rest, _ = process.wait()
    assert code == 0
    assert rest == ""  # nothing else on stdout; logs go to stderr


def test_listening_line_for_ipv6(launch: type[SelsmtpProcess], tmp_path: Path) -> None:
    try:
        socket.socket(socket.AF_INET6).close()
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    process = launch(tmp_path / "mailbox", "--host", "::1")

    assert process.first_line == f"selsmtp listening on [::1]:{process.port}\n"
    client = process.connect()
    try:
        assert client.read_reply() == greeting()
    finally:
        client.close()


@pytest.mark.parametrize(
    "args",
    [
        ["--port", "abc"],
        ["--port", "70000"],
        ["--max-connections", "0"],
        ["--max-message-size", "-1"],
        ["--timeout", "0"],
        ["--format", "bogus"],
        ["--log-level", "loud"],
        ["--no-such-option"],
        ["stray-argument"],
    ],
    ids=lambda args: " ".join(args),
)
def test_bad_arguments_exit_2_with_usage(args: list[str], tmp_path: Path) -> None:
    result = run_selsmtp("--mailbox", str(tmp_path / "mailbox"), *args)

    assert result.returncode == 2
    assert result.stderr.startswith("usage: selsmtp")
    assert "error:" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "mailbox").exists()


def test_port_in_use_exits_1_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = run_selsmtp("--port", str(port), "--mailbox", str(tmp_path / "mailbox"))

    assert result.returncode == 1
    line = assert_one_clean_line(result.stderr)
    assert str(port) in line
    assert "in use" in line
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("host", "shown"),
    [("192.0.2.1", "192.0.2.1:"), ("::2", "[::2]:")],  # addresses this machine does not have
    ids=["ipv4", "ipv6"],
)
def test_address_not_available_exits_1_with_one_line(host: str, shown: str, tmp_path: Path) -> None:
    result = run_selsmtp("--host", host, "--port", "0", "--mailbox", str(tmp_path / "mailbox"))

    assert result.returncode == 1
    line = assert_one_clean_line(result.stderr)
    assert f"cannot listen on {shown}0: " in line
    assert result.stdout == ""


@pytest.mark.parametrize(
    "where",
    ["under-a-file", "missing-directory", "is-a-directory"],
)
def test_unusable_mailbox_exits_1_with_one_line(where: str, tmp_path: Path) -> None:
    if where == "under-a-file":
        (tmp_path / "file").write_text("not a directory")
        path = tmp_path / "file" / "mailbox"
    elif where == "missing-directory":
        path = tmp_path / "missing" / "mailbox"
    else:
        path = tmp_path / "folder"
        path.mkdir()

    result = run_selsmtp("--port", "0", "--mailbox", str(path))

    assert result.returncode == 1
    line = assert_one_clean_line(result.stderr)
    assert "mailbox" in line
    assert str(path) in line
    assert result.stdout == ""


# -- signals --------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_exits_0(signum: int, launch: type[SelsmtpProcess], tmp_path: Path) -> None:
    process = launch(tmp_path / "mailbox")

    process.signal(signum)

    code, _, err = process.wait()
    assert code == 0
    assert "Traceback" not in err


def test_sigterm_sends_421_to_a_client_mid_session(
    launch: type[SelsmtpProcess], tmp_path: Path
) -> None:
    process = launch(tmp_path / "mailbox")
    idle, mid_data = process.connect(), process.connect()
    try:
        idle.handshake()
        mid_data.handshake()
        assert mid_data.command("MAIL FROM:<a@example.org>") == b"250 2.1.0 Ok\r\n"
        assert mid_data.command("RCPT TO:<b@example.org>") == b"250 2.1.5 Ok\r\n"
        assert mid_data.command("DATA").startswith(b"354 ")
        mid_data.send(b"an unfinished message\r\n")

        process.signal(signal.SIGTERM)

        assert idle.read_until_closed() == SHUTTING_DOWN
        assert mid_data.read_until_closed() == SHUTTING_DOWN
    finally:
        idle.close()
        mid_data.close()
    code, _, err = process.wait()
    assert code == 0
    assert "Traceback" not in err
    assert read_mailbox(tmp_path / "mailbox") == []  # the unfinished message is lost


def test_sigterm_drains_a_message_waiting_for_the_lock(
    launch: type[SelsmtpProcess], tmp_path: Path
) -> None:
    mailbox = tmp_path / "mailbox"
    process = launch(mailbox)
    holder = LockHolder(mailbox)
    finished, other = process.connect(), process.connect()
    try:
        finished.handshake()
        other.handshake()
        finished.send(transaction("a@example.org", ["b@example.org"], b"acknowledged\r\n"))
        assert finished.read_replies(3) == [
            b"250 2.1.0 Ok\r\n",
            b"250 2.1.5 Ok\r\n",
            b"354 End data with <CR><LF>.<CR><LF>\r\n",
        ]
        # The end of `finished`'s message reached the server before `other`'s NOOP,
        # and each turn of the loop reads every ready socket: once `other` has its
        # reply, the message has been read and is waiting for the lock.
        assert other.command("NOOP") == b"250 2.0.0 Ok\r\n"
        assert finished.quiet_for(0.2)

        process.signal(signal.SIGTERM)
        assert other.read_until_closed() == SHUTTING_DOWN
        assert finished.quiet_for(0.2)  # still waiting for the lock, not refused
        holder.release()

        assert finished.read_until_closed() == delivered(1) + SHUTTING_DOWN
    finally:
        holder.release()
        finished.close()
        other.close()
    code, _, _ = process.wait()
    assert code == 0
    assert [r.body for r in read_mailbox(mailbox)] == [b"acknowledged\n"]


def test_logs_go_to_stderr_one_line_per_delivery(
    launch: type[SelsmtpProcess], tmp_path: Path
) -> None:
    process = launch(tmp_path / "mailbox")
    client = process.connect()
    try:
        client.send(
            f"EHLO {HELO}\r\n".encode()
            + transaction("a@example.org", ["b@example.org"], b"one\r\n")
            + transaction("c@example.org", ["d@example.org", "e@example.org"], b"two\r\n")
            + b"QUIT\r\n"
        )
        transcript = client.read_until_closed()
    finally:
        client.close()
    assert transcript.endswith(delivered(2) + b"221 2.0.0 Bye\r\n")

    process.signal(signal.SIGTERM)
    code, rest, err = process.wait()

    assert code == 0
    assert rest == ""
    deliveries = [line for line in err.splitlines() if "delivered message" in line]
    assert len(deliveries) == 2
    assert "delivered message 1 from <a@example.org>" in deliveries[0]
    assert "delivered message 2 from <c@example.org>" in deliveries[1]
    assert err.splitlines()[-1].endswith("stopped; 2 messages delivered")


def test_a_second_instance_continues_the_numbers(
    launch: type[SelsmtpProcess], tmp_path: Path
) -> None:
    mailbox = tmp_path / "mailbox"
    for expected in (1, 2):
        process = launch(mailbox)
        client = process.connect()
        try:
            client.handshake()
            client.send(transaction("a@example.org", ["b@example.org"], b"m\r\n"))
            assert client.read_replies(4)[-1] == delivered(expected)
        finally:
            client.close()
        since = time.monotonic()
        process.signal(signal.SIGTERM)
        assert process.wait()[0] == 0
        assert time.monotonic() - since < WAIT / 2
    assert [r.number for r in read_mailbox(mailbox)] == [1, 2]


def test_disk_full_gives_451_and_leaves_no_partial_record(
    launch: type[SelsmtpProcess], tmp_path: Path
) -> None:
    mailbox = tmp_path / "mailbox"
    process = launch(mailbox, file_size_limit=20_000)
    client = process.connect()
    try:
        client.handshake()
        client.send(transaction("a@example.org", ["b@example.org"], b"fits\r\n"))
        assert client.read_replies(4)[-1] == delivered(1)
        length = mailbox.stat().st_size

        # This record would grow the file past the limit: the kernel takes part of
        # it (a short write), then refuses the rest. Nothing of it may remain.
        big = to_wire(checked_body("big", 50_000))
        client.send(transaction("a@example.org", ["b@example.org"], big))
        assert client.read_replies(4)[-1] == b"451 4.3.0 Error: queue file write error\r\n"
        assert mailbox.stat().st_size == length

        client.send(transaction("c@example.org", ["d@example.org"], b"fits too\r\n"))
        assert client.read_replies(4)[-1] == delivered(2)
    finally:
        client.close()
    process.signal(signal.SIGTERM)
    code, _, err = process.wait()
    assert code == 0
    assert "Traceback" not in err
    assert "queue file write error" not in err  # the log says it in its own words
    assert any("451" in line for line in err.splitlines())

    # A new instance, without the limit, picks up at number 3.
    again = launch(mailbox)
    client = again.connect()
    try:
        client.handshake()
        client.send(transaction("a@example.org", ["b@example.org"], b"later\r\n"))
        assert client.read_replies(4)[-1] == delivered(3)
    finally:
        client.close()
    records = read_mailbox(mailbox)
    assert [(r.number, r.body) for r in records] == [
        (1, b"fits\n"),
        (2, b"fits too\n"),
        (3, b"later\n"),
    ]
