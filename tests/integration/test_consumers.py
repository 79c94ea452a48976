"""Other programs at the mailbox while selsmtp delivers (SPEC §5.4, §5.3).

A consumer runs in a ``multiprocessing`` child and works the classic ways, always
under ``lockf(LOCK_EX)``: movemail (read the file whole, keep the bytes, truncate it
to zero), renaming the file away, or appending records of its own. Meanwhile ten
clients deliver two hundred messages of mixed sizes to ``python -m selsmtp``. At the
end, every acknowledged message is found exactly once, intact, with its number, in
the union of everything the consumer took and what is left; numbers only grow.
"""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import os
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    WAIT,
    Record,
    WireClient,
    checked_body,
    read_mailbox,
    split_records,
    verify_checked_body,
)
from .processes import SelsmtpProcess
from .test_durability import DELIVERED, QUIET_LOG, check_records, send_body, stop

pytestmark = pytest.mark.timeout(90)

CLIENTS = 10
PER_CLIENT = 20
#: mostly small bodies, some large enough to be spooled and written in pieces
SIZES = (500, 2_000, 2_000, 8_000, 8_000, 30_000, 100_000, 300_000, 1_200_000)
#: a consumer's pause between two passes, in seconds
PAUSE = (0.01, 0.03)
#: a consumer that worked fewer times than this proved nothing
MIN_PASSES = 3


def deliver_concurrently(address: tuple[str, int], seed: int) -> dict[str, int]:
    """:data:`CLIENTS` clients, each sending :data:`PER_CLIENT` checked bodies one after
    the other in one session; returns token → the number its 250 gave."""
    numbers: dict[str, int] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        rng = random.Random(seed + index)
        try:
            connection = WireClient(address)
            try:
                connection.handshake()
                for i in range(PER_CLIENT):
                    token = f"c{index}m{i}"
                    reply = send_body(connection, checked_body(token, rng.choice(SIZES)))
                    match = DELIVERED.fullmatch(reply)
                    assert match, reply
                    with lock:
                        numbers[token] = int(match[1])
                assert connection.command(b"QUIT") == b"221 2.0.0 Bye\r\n"
            finally:
                connection.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(4 * WAIT)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    if errors:
        raise errors[0]
    assert len(numbers) == CLIENTS * PER_CLIENT
    return numbers


def check_union(records: list[Record], acknowledged: dict[str, int]) -> None:
    """Every message exactly once, intact, with its number; 1..N in order."""
    stored = check_records(records, acknowledged)
    assert stored == acknowledged
    assert [r.number for r in records] == list(range(1, len(acknowledged) + 1))


class Consumer:
    """A ``multiprocessing`` (spawn) child running ``target(*args, stop, passes)``
    until :meth:`finish`; ``passes`` counts the times it took or added something.
    The constructor returns once the child is running."""

    def __init__(self, target: Any, *args: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._passes = context.Value("i", -1)  # the child sets 0 when it starts
        self._process = context.Process(
            target=target, args=(*args, self._stop, self._passes), daemon=True
        )
        self._process.start()
        deadline = time.monotonic() + WAIT
        while self._passes.value < 0:
            assert self._process.is_alive(), "the consumer died at start"
            assert time.monotonic() < deadline, "the consumer did not start"
            time.sleep(0.005)

    def finish(self) -> int:
        """Stop the child, check it ended well, return its pass count."""
        self._stop.set()
        self._process.join(WAIT)
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join()
        assert self._process.exitcode == 0, f"consumer exit code {self._process.exitcode}"
        return int(self._passes.value)


@pytest.fixture
def selsmtp(tmp_path: Path) -> Iterator[SelsmtpProcess]:
    """``python -m selsmtp`` on ``tmp_path / "mailbox"``; killed at teardown."""
    process = SelsmtpProcess(tmp_path / "mailbox", *QUIET_LOG)
    yield process
    process.kill()


def read_whole(fd: int) -> bytes:
    pieces = []
    offset = 0
    while piece := os.pread(fd, 1 << 20, offset):
        pieces.append(piece)
        offset += len(piece)
    return b"".join(pieces)


def open_locked(path: str, flags: int = os.O_RDWR) -> int | None:
    """The file at ``path``, opened and locked with ``lockf(LOCK_EX)``, and still at the
    path once locked; ``None`` if there is no file there."""
    while True:
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            return None
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            here = os.stat(path)
        except FileNotFoundError:
            here = None
        held = os.fstat(fd)
        if here is not None and (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)  # renamed away while we waited for the lock: try again


# -- 5. movemail ------------------------------------------------------------------


def _movemail_loop(path: str, collected: str, seed: int, stop: Any, passes: Any) -> None:
    """Child: read the mailbox whole under the lock, append it to ``collected`` (and its
    length to ``collected.lengths``), truncate the mailbox to zero; again and again."""
    rng = random.Random(seed)
    passes.value = 0
    with open(collected, "ab") as out, open(collected + ".lengths", "a") as lengths:
        while not stop.is_set():
            fd = open_locked(path)
            if fd is not None:
                try:
                    data = read_whole(fd)
                    if data:
                        out.write(data)
                        out.flush()
                        lengths.write(f"{len(data)}\n")
                        lengths.flush()
                        os.ftruncate(fd, 0)
                        passes.value += 1
                finally:
                    os.close(fd)  # and the lock with it
            stop.wait(rng.uniform(*PAUSE))


def test_movemail_consumer_while_clients_deliver(selsmtp: SelsmtpProcess, tmp_path: Path) -> None:
    collected = tmp_path / "collected"
    consumer = Consumer(_movemail_loop, str(selsmtp.mailbox), str(collected), 5)
    try:
        acknowledged = deliver_concurrently(selsmtp.address, seed=500)
    finally:
        passes = consumer.finish()
    remainder = selsmtp.mailbox.read_bytes()
    stop(selsmtp)

    taken = collected.read_bytes()
    lengths = [int(line) for line in Path(f"{collected}.lengths").read_text().split()]
    assert len(lengths) == passes >= MIN_PASSES, passes
    assert sum(lengths) == len(taken)
    # each pass, under the lock, saw whole records only
    offset = 0
    for length in lengths:
        check_records(split_records(taken[offset : offset + length]), {})
        offset += length
    check_records(split_records(remainder), {})
    check_union(split_records(taken + remainder), acknowledged)
    print(f"\nmovemail took mail {passes} times; {len(remainder)} bytes were left")


# -- 6. renaming the mailbox away ---------------------------------------------------


def _rename_loop(path: str, seed: int, stop: Any, passes: Any) -> None:
    """Child: under the lock, rename the mailbox to PATH.1, PATH.2, ..."""
    rng = random.Random(seed)
    passes.value = 0
    while not stop.is_set():
        fd = open_locked(path)
        if fd is not None:
            try:
                os.rename(path, f"{path}.{passes.value + 1}")
                passes.value += 1
            finally:
                os.close(fd)
        stop.wait(rng.uniform(*PAUSE))


def test_mailbox_renamed_away_while_clients_deliver(
    selsmtp: SelsmtpProcess, tmp_path: Path
) -> None:
    consumer = Consumer(_rename_loop, str(selsmtp.mailbox), 6)
    try:
        acknowledged = deliver_concurrently(selsmtp.address, seed=600)
    finally:
        passes = consumer.finish()
    remainder = read_mailbox(selsmtp.mailbox)  # [] if the last rename left no file
    stop(selsmtp)

    moved = {
        int(match[1]): path
        for path in tmp_path.iterdir()
        if (match := re.fullmatch(r"mailbox\.(\d+)", path.name))
    }
    assert sorted(moved) == list(range(1, passes + 1))
    assert passes >= MIN_PASSES, passes
    records = [record for k in sorted(moved) for record in read_mailbox(moved[k])]
    check_union(records + remainder, acknowledged)
    print(f"\nthe mailbox was renamed away {passes} times")


# -- 7. another program appending its own records -------------------------------------

FOREIGN = re.compile(rb"=====FOREIGN (\d+) BEGIN (\d+)=====\n")


def foreign_block(k: int, rng: random.Random) -> bytes:
    """Block ``k``: a begin line with its payload's length, the payload, an end line
    with the payload's SHA-256. The payload never looks like a cs4410 record head."""
    size = rng.choice((100, 2_000, 20_000, 200_000))
    letters = rng.randbytes(size).translate(bytes(97 + i % 26 for i in range(256)))
    payload = b"".join(b"foreign " + letters[i : i + 60] + b"\n" for i in range(0, size, 60))
    digest = hashlib.sha256(payload).hexdigest().encode()
    return (
        b"=====FOREIGN %d BEGIN %d=====\n" % (k, len(payload))
        + payload
        + b"=====FOREIGN %d END %s=====\n" % (k, digest)
    )


def _foreign_loop(path: str, seed: int, stop: Any, passes: Any) -> None:
    """Child: under the lock, append foreign block 1, 2, ... to the mailbox."""
    rng = random.Random(seed)
    passes.value = 0
    while not stop.is_set():
        fd = open_locked(path, os.O_WRONLY | os.O_APPEND)
        if fd is not None:
            try:
                view = memoryview(foreign_block(passes.value + 1, rng))
                while view:
                    view = view[os.write(fd, view) :]
                passes.value += 1
            finally:
                os.close(fd)
        stop.wait(rng.uniform(*PAUSE))


def split_foreign(data: bytes) -> tuple[list[int], list[bytes]]:
    """Cut out the foreign blocks, checking each; return their numbers, in file order,
    and the stretches of mailbox between them."""
    numbers: list[int] = []
    stretches: list[bytes] = []
    position = 0
    while match := FOREIGN.search(data, position):
        k, length = int(match[1]), int(match[2])
        payload = data[match.end() : match.end() + length]
        end = b"=====FOREIGN %d END %s=====\n" % (k, hashlib.sha256(payload).hexdigest().encode())
        assert data.startswith(end, match.end() + length), f"foreign block {k} damaged"
        stretches.append(data[position : match.start()])
        numbers.append(k)
        position = match.end() + length + len(end)
    stretches.append(data[position:])
    return numbers, stretches


def test_foreign_records_appended_under_the_lock_are_kept_whole(
    selsmtp: SelsmtpProcess,
) -> None:
    consumer = Consumer(_foreign_loop, str(selsmtp.mailbox), 7)
    try:
        acknowledged = deliver_concurrently(selsmtp.address, seed=700)
    finally:
        passes = consumer.finish()
    data = selsmtp.mailbox.read_bytes()
    stop(selsmtp)

    blocks, stretches = split_foreign(data)
    assert blocks == list(range(1, passes + 1)), "a foreign block is missing or repeated"
    assert passes >= MIN_PASSES, passes
    # between two foreign blocks, selsmtp's records only, each whole; a block ends with
    # a line, not a blank line, so selsmtp's next record begins after one more LF
    # (SPEC §7)
    assert all(stretch.startswith(b"\n") for stretch in stretches[1:] if stretch)
    stretches[1:] = [stretch[1:] for stretch in stretches[1:]]
    records = [record for stretch in stretches for record in split_records(stretch)]
    check_union(records, acknowledged)
    print(f"\n{passes} foreign blocks among {len(records)} records")


# -- 8. restart after the mail was taken away ---------------------------------------------


def _take_mail(path: str, destination: str, how: str) -> None:
    """Child: take the mail away once, under the lock (movemail or rename)."""
    fd = open_locked(path)
    assert fd is not None
    try:
        if how == "rename":
            os.rename(path, destination)
        else:
            with open(destination, "wb") as out:
                out.write(read_whole(fd))
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def take_mail(mailbox: Path, destination: Path, how: str) -> None:
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=_take_mail, args=(str(mailbox), str(destination), how))
    child.start()
    child.join(WAIT)
    assert child.exitcode == 0


def deliver_one(process: SelsmtpProcess, token: str) -> int:
    client = process.connect()
    try:
        client.handshake()
        match = DELIVERED.fullmatch(send_body(client, checked_body(token, 1_000)))
    finally:
        client.close()
    assert match
    return int(match[1])


@pytest.mark.parametrize("how", ["movemail", "rename"])
def test_numbers_continue_after_a_restart_on_an_emptied_mailbox(
    selsmtp: SelsmtpProcess, tmp_path: Path, how: str
) -> None:
    mailbox = selsmtp.mailbox
    assert [deliver_one(selsmtp, f"m{n}") for n in (1, 2, 3)] == [1, 2, 3]
    take_mail(mailbox, tmp_path / "taken-1", how)  # while the server runs
    assert deliver_one(selsmtp, "m4") == 4
    stop(selsmtp)
    take_mail(mailbox, tmp_path / "taken-2", how)  # while it is stopped
    assert not mailbox.exists() or mailbox.stat().st_size == 0

    again = SelsmtpProcess(mailbox, *QUIET_LOG)
    try:
        assert deliver_one(again, "m5") == 5
        assert deliver_one(again, "m6") == 6
        stop(again)
    finally:
        again.kill()
    for path, numbers in (("taken-1", [1, 2, 3]), ("taken-2", [4]), ("mailbox", [5, 6])):
        records = read_mailbox(tmp_path / path)
        assert [r.number for r in records] == numbers, path
        assert [verify_checked_body(r.body) for r in records] == [f"m{n}" for n in numbers]
