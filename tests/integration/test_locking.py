"""The mailbox lock against other processes: readers, writers and mail consumers.

The lock is held by a ``multiprocessing`` child (see ``LockHolder`` in conftest):
a ``lockf`` lock taken in the test process could not block the server, which runs
in a thread of that same process.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    NAME,
    START_DATA,
    WAIT,
    LockHolder,
    RunningServer,
    WireClient,
    checked_body,
    delivered,
    read_mailbox,
    send_message,
    split_records,
    to_wire,
    transaction,
    verify_checked_body,
)

pytestmark = pytest.mark.timeout(60)

Connect = Callable[[RunningServer], WireClient]
HoldLock = Callable[..., LockHolder]

MAILBOX_BUSY = b"451 4.3.0 Error: mailbox busy, try again later\r\n"
#: how long a waiting client is watched to make sure no reply comes
QUIET = 0.3


def finish_message(client: WireClient, body: bytes, then: bytes = b"") -> None:
    """Send a whole transaction and read every reply up to (not including) the 250."""
    client.send(transaction("a@example.org", ["b@example.org"], body) + then)
    assert client.read_replies(3) == [b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n", START_DATA]


def timed(action: Callable[[], bytes]) -> tuple[bytes, float]:
    since = time.monotonic()
    reply = action()
    return reply, time.monotonic() - since


@pytest.mark.parametrize("mode", [fcntl.LOCK_SH, fcntl.LOCK_EX], ids=["reader", "writer"])
def test_message_waits_for_the_lock_while_others_are_served(
    server: RunningServer, connect: Connect, hold_lock: HoldLock, mailbox: Path, mode: int
) -> None:
    holder = hold_lock(mailbox, mode)
    waiting, other = connect(server), connect(server)
    waiting.handshake()
    finish_message(waiting, b"waited for the lock\r\n", then=b"NOOP\r\n")

    # The other client is served promptly all the while.
    other.handshake()
    for command, expected in [
        (b"NOOP", b"250 2.0.0 Ok\r\n"),
        (b"MAIL FROM:<c@example.org>", b"250 2.1.0 Ok\r\n"),
        (b"RCPT TO:<d@example.org>", b"250 2.1.5 Ok\r\n"),
        (b"DATA", START_DATA),
    ]:
        reply, seconds = timed(lambda command=command: other.command(command))
        assert reply == expected
        assert seconds < 2.0
    other.send(b"second\r\n.\r\n")

    assert waiting.quiet_for(QUIET)  # no 250 while the lock is held
    assert read_mailbox(mailbox) == []
    holder.release()

    assert waiting.read_reply() == delivered(1)
    assert waiting.read_reply() == b"250 2.0.0 Ok\r\n"  # the pipelined NOOP, after it
    assert other.read_reply() == delivered(2)
    records = read_mailbox(mailbox)
    assert [(r.number, r.body) for r in records] == [
        (1, b"waited for the lock\n"),
        (2, b"second\n"),
    ]


def test_messages_finished_while_locked_are_all_stored_once(
    server: RunningServer, connect: Connect, hold_lock: HoldLock, mailbox: Path
) -> None:
    holder = hold_lock(mailbox)
    clients = [connect(server) for _ in range(6)]
    for i, client in enumerate(clients):
        client.handshake()
        finish_message(client, b"message %d\r\n" % i)
    assert all(client.quiet_for(0.05) for client in clients)

    holder.release()

    numbers = []
    for client in clients:
        reply = client.read_reply()
        assert reply.startswith(b"250 2.0.0 Ok: delivered message ")
        numbers.append(int(reply.split()[-1]))
    assert sorted(numbers) == [1, 2, 3, 4, 5, 6]
    records = read_mailbox(mailbox)
    assert [r.number for r in records] == [1, 2, 3, 4, 5, 6]
    by_body = {r.body: r.number for r in records}
    assert by_body == {b"message %d\n" % i: n for i, n in enumerate(numbers)}


def test_lock_busy_too_long_gets_451_and_nothing_is_stored(
    start_server: Callable[..., RunningServer],
    connect: Connect,
    hold_lock: HoldLock,
    mailbox: Path,
) -> None:
    running = start_server(lock_wait=0.5)
    holder = hold_lock(mailbox)
    client = connect(running)
    client.handshake()
    finish_message(client, b"refused\r\n")
    since = time.monotonic()

    assert client.read_reply() == MAILBOX_BUSY
    assert time.monotonic() - since >= 0.25  # lock_wait, less the latency of the 354
    assert mailbox.read_bytes() == b""

    holder.release()
    finish_message(client, b"accepted\r\n")  # same session, next transaction
    assert client.read_reply() == delivered(1)  # the refused one used no number
    assert [(r.number, r.body) for r in read_mailbox(mailbox)] == [(1, b"accepted\n")]


def test_shutdown_refuses_what_still_waits_for_the_lock(
    start_server: Callable[..., RunningServer],
    connect: Connect,
    hold_lock: HoldLock,
    mailbox: Path,
) -> None:
    running = start_server(shutdown_lock_wait=0.3)
    hold_lock(mailbox)
    waiting, idle = connect(running), connect(running)
    waiting.handshake()
    idle.handshake()
    finish_message(waiting, b"never stored\r\n")
    assert idle.command(b"NOOP") == b"250 2.0.0 Ok\r\n"  # so the message has been read

    running.server.request_stop()

    assert idle.read_until_closed() == f"421 4.3.2 {NAME} Service shutting down\r\n".encode()
    assert waiting.read_until_closed() == (
        MAILBOX_BUSY + f"421 4.3.2 {NAME} Service shutting down\r\n".encode()
    )
    running.join()
    assert mailbox.read_bytes() == b""


# -- what a reader under a shared lock sees --------------------------------------


def _read_under_shared_lock(path: str, ready: Any, stop: Any, snapshots: Any, results: Any) -> None:
    """Child process: snapshot the mailbox under LOCK_SH until ``stop``; check each."""
    try:
        most = 0
        ready.set()
        while not stop.is_set():
            with open(path, "rb") as mailbox:
                fcntl.lockf(mailbox, fcntl.LOCK_SH)
                data = mailbox.read()
                fcntl.lockf(mailbox, fcntl.LOCK_UN)
            records = split_records(data)
            for record in records:
                verify_checked_body(record.body)
            numbers = [record.number for record in records]
            assert numbers == list(range(1, len(records) + 1)), numbers
            most = max(most, len(records))
            with snapshots.get_lock():
                snapshots.value += 1
        results.put(("ok", most))
    except BaseException as exc:
        results.put(("failed", repr(exc)))


def test_reader_with_a_shared_lock_sees_whole_records_only(
    server: RunningServer, mailbox: Path
) -> None:
    context = multiprocessing.get_context("spawn")
    ready, stop, results = context.Event(), context.Event(), context.Queue()
    snapshots = context.Value("i", 0)
    reader = context.Process(
        target=_read_under_shared_lock,
        args=(str(mailbox), ready, stop, snapshots, results),
        daemon=True,
    )
    reader.start()
    assert ready.wait(WAIT)
    sizes = [100, 5_000, 80_000, 300_000]
    sent: list[str] = []
    errors: list[BaseException] = []

    def write(writer: int) -> None:
        # Go on until the reader has looked at the mailbox a few times meanwhile.
        try:
            for i in range(100):
                token = f"w{writer}m{i}"
                send_message(server, to_wire(checked_body(token, sizes[(writer + i) % 4])))
                sent.append(token)
                if i >= 5 and snapshots.value >= 10:
                    break
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join(WAIT * 3)
    stop.set()
    try:
        outcome = results.get(timeout=WAIT)
    finally:
        reader.join(WAIT)
        results.close()
        results.join_thread()

    assert not errors, errors
    assert outcome[0] == "ok", outcome[1]
    assert snapshots.value >= 10
    assert outcome[1] > 0
    records = read_mailbox(mailbox)
    assert sorted(verify_checked_body(r.body) for r in records) == sorted(sent)
    assert reader.exitcode == 0


# -- consumers that take the mail away --------------------------------------------


def _movemail(path: str, destination: str) -> None:
    """Child process: what movemail does. Under the lock, copy the mail and empty the file."""
    with open(path, "r+b") as mailbox:
        fcntl.lockf(mailbox, fcntl.LOCK_EX)
        data = mailbox.read()
        with open(destination, "wb") as out:
            out.write(data)
        mailbox.truncate(0)
        mailbox.flush()
        os.fsync(mailbox.fileno())


def run_movemail(mailbox: Path, destination: Path) -> None:
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=_movemail, args=(str(mailbox), str(destination)))
    child.start()
    child.join(WAIT)
    assert child.exitcode == 0


@pytest.mark.parametrize("how", ["movemail", "rename", "unlink"])
def test_mail_taken_away_while_running_numbers_go_on(
    server: RunningServer, mailbox: Path, tmp_path: Path, how: str
) -> None:
    assert [send_message(server, b"%d\r\n" % n) for n in (1, 2)] == [1, 2]
    taken = tmp_path / "taken"
    if how == "movemail":
        run_movemail(mailbox, taken)
    elif how == "rename":
        mailbox.rename(taken)
    else:
        taken.write_bytes(mailbox.read_bytes())
        mailbox.unlink()

    assert send_message(server, b"3\r\n") == 3
    assert send_message(server, b"4\r\n") == 4

    assert [(r.number, r.body) for r in read_mailbox(taken)] == [(1, b"1\n"), (2, b"2\n")]
    assert [(r.number, r.body) for r in read_mailbox(mailbox)] == [(3, b"3\n"), (4, b"4\n")]


def test_mailbox_folder_gone_gives_451_then_recovers(
    start_server: Callable[..., RunningServer], connect: Connect, tmp_path: Path
) -> None:
    folder = tmp_path / "spool"
    folder.mkdir()
    mailbox = folder / "mailbox"
    running = start_server(mailbox=str(mailbox))
    assert send_message(running) == 1
    # A consumer takes the whole folder away (the state file goes with it).
    moved = tmp_path / "moved"
    folder.rename(moved)

    client = connect(running)
    client.handshake()
    finish_message(client, b"nowhere to go\r\n")
    assert client.read_reply() == b"451 4.3.0 Error: queue file write error\r\n"
    assert client.command(b"NOOP") == b"250 2.0.0 Ok\r\n"  # the server keeps serving

    folder.mkdir()
    finish_message(client, b"back again\r\n")
    assert client.read_reply() == delivered(2)
    assert [(r.number, r.body) for r in read_mailbox(mailbox)] == [(2, b"back again\n")]
    assert [r.number for r in read_mailbox(moved / "mailbox")] == [1]


def test_helo_is_kept_while_waiting(
    server: RunningServer, connect: Connect, hold_lock: HoldLock, mailbox: Path
) -> None:
    holder = hold_lock(mailbox)
    client = connect(server)
    client.handshake(helo="waiter.test")
    finish_message(client, b"one\r\n", then=transaction("a@example.org", ["c@x.test"], b"two\r\n"))
    assert client.quiet_for(QUIET)

    holder.release()

    assert client.read_reply() == delivered(1)
    assert client.read_replies(4)[-1] == delivered(2)
    assert [(r.helo, r.body) for r in read_mailbox(mailbox)] == [
        ("waiter.test", b"one\n"),
        ("waiter.test", b"two\n"),
    ]
