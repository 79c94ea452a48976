"""Logging: the per-second time cache must not change a byte, and the writer to
standard error never blocks, never raises, and counts what it drops (on real pipes)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from selsmtp import logs

# around second boundaries, and moments far apart
MOMENTS = [1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.0005, 1_700_000_001.5, 1.8e9 + 0.25]


@pytest.mark.parametrize("order", [MOMENTS, MOMENTS[::-1]], ids=["forward", "backward"])
def test_a_line_is_formatted_as_the_standard_formatter_formats_it(order: list[float]) -> None:
    standard = logging.Formatter(logs.FORMAT)
    cached = logs.Formatter(logs.FORMAT)
    for moment in order:
        record = logging.LogRecord("selsmtp.server", logging.INFO, "f", 1, "hello %d", (7,), None)
        record.created = moment
        record.msecs = (moment - int(moment)) * 1000
        assert cached.format(record) == standard.format(record)


# -- the writer: non-blocking, bounded, counting what it drops ---------------------

LINE = "x" * 99 + "\n"  # 100 bytes
NOTE = re.compile(
    r"(\n?)\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING selsmtp\.logs: "
    r"(\d+) log lines? dropped \(standard error did not take them\)\n"
)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A real pipe whose capacity is one page, so that it fills after 4 KiB."""
    r, w = os.pipe()
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


def pipe_size(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) if hasattr(fcntl, "F_GETPIPE_SZ") else 65536


def read_all(fd: int) -> bytes:
    """What the pipe holds now (the read end is made non-blocking)."""
    os.set_blocking(fd, False)
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    return b"".join(chunks)


def notes(text: str) -> list[int]:
    return [int(match[2]) for match in NOTE.finditer(text)]


def test_lines_wait_for_flush_then_reach_the_pipe(pipe: tuple[int, int]) -> None:
    r, w = pipe
    writer = logs.Writer(w)
    writer.write("one\n")
    writer.write("two\n")
    assert select.select([r], [], [], 0)[0] == []  # nothing is written before flush
    assert writer.flush() is False  # nothing left pending
    assert read_all(r) == b"one\ntwo\n"
    assert writer.dropped == 0


def test_the_shared_description_is_left_blocking(pipe: tuple[int, int]) -> None:
    # Descriptor 2 shares its open file description with the shell (a terminal) or
    # with stdout (2>&1): O_NONBLOCK set there would change their writes too.
    r, w = pipe
    writer = logs.Writer(w)
    writer.write("line\n")
    writer.flush()
    assert os.get_blocking(w)
    assert read_all(r) == b"line\n"


def test_a_full_pipe_keeps_bytes_pending_bounds_the_buffer_and_reports_the_gap(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    limit = 8 * 1024
    writer = logs.Writer(w, limit=limit)
    capacity = pipe_size(w)
    written = (capacity + limit) // len(LINE) + 30  # more than the pipe and buffer hold
    for number in range(written):
        writer.write(f"{number:>99}\n")
        assert writer.flush() is (number >= capacity // len(LINE))
    assert writer.pending <= limit
    assert writer.dropped > 0
    writer.write("after the gap\n")  # dropped too: the gap stays in one piece

    received = b""
    while True:  # the reader catches up; each flush hands over what fits
        received += read_all(r)
        if not writer.flush():
            break
    received += read_all(r)
    text = received.decode()
    [note] = notes(text)
    before, after = NOTE.split(text)[0], NOTE.split(text)[-1]
    numbers = [int(line) for line in before.splitlines()]
    assert numbers == list(range(len(numbers)))  # in order, none lost before the gap
    assert note == written + 1 - len(numbers)  # every other line is counted
    assert after == ""

    writer.write("flows again\n")
    assert writer.flush() is False
    assert read_all(r) == b"flows again\n"
    assert writer.dropped == 0


def test_a_socket_is_written_without_blocking_and_stays_blocking() -> None:
    # journald hands services a stream socket as standard error
    ours, theirs = socket.socketpair()
    with ours, theirs:
        writer = logs.Writer(ours.fileno(), limit=4 * 1024 * 1024)
        for _ in range(40_000):  # ~4 MB: more than the socket buffers hold
            writer.write(LINE)
        assert writer.flush() is True  # pending, not blocked
        assert ours.getblocking()
        theirs.setblocking(False)
        received = 0
        while True:
            with contextlib.suppress(BlockingIOError):
                while chunk := theirs.recv(1 << 20):
                    received += len(chunk)
            if not writer.flush():
                break
        with contextlib.suppress(BlockingIOError):
            while chunk := theirs.recv(1 << 20):
                received += len(chunk)
        assert received == 40_000 * len(LINE)
        writer.close()


def test_a_closed_reader_drops_and_counts_without_raising_or_pending(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    writer = logs.Writer(w)
    os.close(r)
    for _ in range(5):
        writer.write(LINE)
    assert writer.flush() is False  # nothing pending: the loop need not wake up for it
    assert writer.pending == 0
    assert writer.dropped == 5
    writer.write(LINE)
    assert writer.flush() is False
    assert writer.dropped == 6


def test_a_failing_device_drops_and_counts(tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        writer = logs.Writer(fd)
        writer.write(LINE + LINE)
        assert writer.flush() is False
        assert writer.dropped == 2
    finally:
        os.close(fd)


def test_after_a_failure_the_count_comes_first_once_writes_work_again(tmp_path: Path) -> None:
    # A FIFO: its reader goes away (EPIPE) and another one comes.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(fifo, os.O_WRONLY)
    try:
        writer = logs.Writer(w)
        writer.write("seen\n")
        writer.flush()
        assert read_all(r) == b"seen\n"
        os.close(r)
        writer.write("lost 1\n")
        writer.write("lost 2\n")
        assert writer.flush() is False
        writer.write("lost 3\n")
        assert writer.flush() is False
        assert writer.dropped == 3

        r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer.write("back\n")  # a line after the gap is part of it; then the count
        assert writer.flush() is False
        assert notes(read_all(r).decode()) == [4]
        writer.write("back again\n")
        writer.flush()
        assert read_all(r) == b"back again\n"
    finally:
        os.close(r)
        os.close(w)


def test_a_line_cut_by_a_failure_is_ended_before_the_count(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(fifo, os.O_WRONLY)
    try:
        if hasattr(fcntl, "F_SETPIPE_SZ"):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
        writer = logs.Writer(w, limit=64 * 1024)
        writer.write("y" * (pipe_size(w) + 50) + "\n")
        assert writer.flush() is True  # the pipe took only a part of the line
        assert set(read_all(r)) == {ord("y")}
        os.close(r)
        assert writer.flush() is False  # EPIPE: the rest is dropped
        assert writer.dropped == 1

        r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer.write("back\n")
        writer.flush()
        text = read_all(r).decode()
        assert text.startswith("\n")  # the cut line is ended first
        assert notes(text) == [2]
    finally:
        os.close(r)
        os.close(w)


def test_warnings_are_written_at_once_info_at_flush(pipe: tuple[int, int]) -> None:
    r, w = pipe
    handler = logs.Handler(logs.Writer(w))
    handler.setFormatter(logs.Formatter(logs.FORMAT))
    logger = logging.getLogger("selsmtp.test-handler")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("quiet %d", 1)
        assert read_all(r) == b""
        logger.warning("loud %d", 2)
        assert read_all(r).decode().endswith(" WARNING selsmtp.test-handler: loud 2\n")
    finally:
        logger.removeHandler(handler)


def test_the_direct_line_matches_the_formatter(pipe: tuple[int, int]) -> None:
    r, w = pipe
    handler = logs.Handler(logs.Writer(w))
    handler.setFormatter(logs.Formatter(logs.FORMAT))
    before = time.time()
    handler.line("selsmtp.server", "delivered message 7 from <a%b@example.org>")
    handler.flush()
    line = read_all(r).decode()
    record = logging.LogRecord("selsmtp.server", logging.INFO, "f", 1, "x", None, None)
    expected = logging.Formatter(logs.FORMAT).format(record)
    assert line[:17] == expected[:17]  # the same minute (unless the test straddles one)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO selsmtp\.server: "
        r"delivered message 7 from <a%b@example\.org>\n",
        line,
    )
    stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
    assert int(before) <= stamp <= time.time()


def test_a_count_of_one_takes_the_singular() -> None:
    assert logs.counted(1, "message") == "1 message"
    assert [logs.counted(n, "connection") for n in (0, 2, 1000)] == [
        "0 connections",
        "2 connections",
        "1000 connections",
    ]
