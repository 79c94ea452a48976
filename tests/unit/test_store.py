"""FileStore on real files in tmp_path: numbering, recovery, consumers, failures, the lock.

Failures are injected at the system-call boundary (a renderer that fails part-way,
``os.fsync`` / ``os.writev`` replaced for one test) and crashes are real: a child
process dies with ``os._exit`` in the middle of an append. Lock conflicts need a
second process, because ``lockf`` locks belong to the process.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import multiprocessing
import os
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from selsmtp import formats, instance, reader, store
from selsmtp.durable import State
from selsmtp.session import Deliver
from selsmtp.store import FileStore, StartupError, StoreError, cs4410_renderer
from tests.stores import (
    NAME,
    WAIT,
    deliver,
    die_in_the_middle_of_the_next_write,
    hold_shared_lock,
    numbers_in,
    record,
)

pytestmark = pytest.mark.timeout(60)


OpenStore = Callable[..., FileStore]


def state_path(mailbox: Path) -> Path:
    return mailbox.with_name(mailbox.name + store.STATE_SUFFIX)


def lock_path(mailbox: Path) -> Path:
    return mailbox.with_name(mailbox.name + instance.LOCK_SUFFIX)


@pytest.fixture
def mailbox(tmp_path: Path) -> Path:
    return tmp_path / "mailbox"


@pytest.fixture
def open_store(mailbox: Path) -> Iterator[OpenStore]:
    """``open_store(path=mailbox, render=cs4410)``; every store is closed at teardown."""
    opened: list[FileStore] = []

    def open_one(
        path: Path = mailbox, render: store.Renderer | None = None, **options: Any
    ) -> FileStore:
        opened.append(FileStore(str(path), render or cs4410_renderer(NAME), **options))
        return opened[-1]

    yield open_one
    for one in opened:
        one.close()


# -- numbering ------------------------------------------------------------------


def test_first_append_creates_the_file_with_record_1(open_store: OpenStore, mailbox: Path) -> None:
    assert not mailbox.exists()
    mailbox_store = open_store()
    assert mailbox.exists()
    assert mailbox_store.last_number == 0

    assert mailbox_store.try_append([deliver()]) == [1]

    assert mailbox.read_bytes() == record(1)
    assert mailbox_store.last_number == 1
    assert state_path(mailbox).exists()


def test_a_batch_gets_consecutive_numbers_in_order(open_store: OpenStore, mailbox: Path) -> None:
    mailbox_store = open_store()

    assert mailbox_store.try_append([deliver(b"x\r\n"), deliver(b"y\r\n"), deliver(b"z\r\n")]) == [
        1,
        2,
        3,
    ]
    assert mailbox_store.try_append([deliver(b"w\r\n")]) == [4]

    assert mailbox.read_bytes() == (
        record(1, b"x\n") + record(2, b"y\n") + record(3, b"z\n") + record(4, b"w\n")
    )


def test_numbers_continue_across_reopen(open_store: OpenStore, mailbox: Path) -> None:
    first = open_store()
    first.try_append([deliver(), deliver()])
    first.close()

    second = open_store()

    assert second.last_number == 2
    assert second.try_append([deliver()]) == [3]
    assert numbers_in(mailbox) == [1, 2, 3]


@pytest.mark.parametrize("damage", ["deleted", "empty", "zeros"])
def test_without_a_usable_state_file_the_mailbox_is_scanned(
    open_store: OpenStore, mailbox: Path, damage: str
) -> None:
    first = open_store()
    first.try_append([deliver(), deliver(), deliver()])
    first.close()
    lock_path(mailbox).unlink()  # the mailbox's own numbers are all that is left
    if damage == "deleted":
        state_path(mailbox).unlink()
    elif damage == "zeros":  # a file created just before a power cut
        state_path(mailbox).write_bytes(bytes(256))
    else:
        state_path(mailbox).write_bytes(b"")

    second = open_store()

    assert second.last_number == 3
    assert second.try_append([deliver()]) == [4]


def test_scan_finds_the_number_of_a_last_record_bigger_than_a_chunk(
    open_store: OpenStore, mailbox: Path
) -> None:
    first = open_store()
    first.try_append([deliver(), deliver(b"z" * (formats.CHUNK * 5 // 2) + b"\r\n")])
    first.close()
    state_path(mailbox).unlink()

    assert open_store().last_number == 2


def test_scan_of_an_empty_or_foreign_mailbox_starts_at_1(
    open_store: OpenStore, mailbox: Path
) -> None:
    mailbox.write_bytes(b"Subject: someone in another format\nNumber: 7\n")

    mailbox_store = open_store()

    assert mailbox_store.try_append([deliver()]) == [1]


def test_scan_takes_the_highest_number_anywhere_so_numbers_never_repeat(
    open_store: OpenStore, mailbox: Path
) -> None:
    # The last real head sits far back, behind a big body that quotes a lower one.
    first = open_store()
    quoted = b"Received: from x by y (CS4410MP3)\r\nNumber: 1\r\nFrom: q\r\n"
    first.try_append([deliver(), deliver(), deliver(b"z" * (3 * formats.CHUNK) + quoted)])
    first.close()
    state_path(mailbox).unlink()

    assert open_store().last_number == 3


def test_scan_ignores_absurdly_long_numbers(open_store: OpenStore, mailbox: Path) -> None:
    first = open_store()
    first.try_append([deliver(b"(CS4410MP3)\r\nNumber: " + b"9" * 5000 + b"\r\n")])
    first.close()
    state_path(mailbox).unlink()

    assert open_store().last_number == 1


# -- crash recovery -------------------------------------------------------------


def _crash_in_the_middle_of_an_append(path: str) -> None:
    """Child process: store one message, then die while the second is half written."""
    crashing = FileStore(path, cs4410_renderer(NAME))
    crashing.try_append([deliver()])
    die_in_the_middle_of_the_next_write()
    crashing.try_append([deliver()])


def _crash_before_the_commit(path: str) -> None:
    """Child process: store one message, then die after writing a whole second record
    but before its fsync: the record looks complete, yet it was never acknowledged."""
    armed = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if armed and is_file(fd, Path(path)):
            os._exit(3)
        real_fsync(fd)

    os.fsync = fsync  # the store takes os.fsync when it is made
    crashing = FileStore(path, cs4410_renderer(NAME))
    crashing.try_append([deliver()])
    armed.append(True)
    crashing.try_append([deliver(b"whole but never acknowledged\r\n")])


@pytest.mark.parametrize(
    "crash",
    [_crash_in_the_middle_of_an_append, _crash_before_the_commit],
    ids=["cut-inside-a-record", "whole-record-not-committed"],
)
def test_torn_tail_left_by_a_crash_is_removed_and_logged(
    open_store: OpenStore,
    mailbox: Path,
    caplog: pytest.LogCaptureFixture,
    crash: Callable[[str], None],
) -> None:
    child = multiprocessing.get_context("spawn").Process(target=crash, args=(str(mailbox),))
    child.start()
    child.join(WAIT)
    assert child.exitcode == 3
    assert mailbox.stat().st_size > len(record(1))  # the torn tail is there

    with caplog.at_level(logging.WARNING, logger="selsmtp.store"):
        mailbox_store = open_store()

    assert mailbox.read_bytes() == record(1)
    [warning] = [r for r in caplog.records if r.name == "selsmtp.store"]
    assert warning.levelno == logging.WARNING
    assert "torn tail" in warning.getMessage()
    # The cut-off batch's number stays reserved: a reader may have seen its record
    # while the server was down, so it is never given to another message.
    assert mailbox_store.last_number == 2
    assert mailbox_store.try_append([deliver()]) == [3]
    assert mailbox.read_bytes() == record(1) + record(3)


def test_foreign_bytes_with_no_batch_pending_are_kept(
    open_store: OpenStore, mailbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = open_store()
    first.try_append([deliver()])
    first.close()
    foreign = b"appended by another program under the lock\n"
    with mailbox.open("ab") as out:
        out.write(foreign)

    with caplog.at_level(logging.WARNING, logger="selsmtp.store"):
        second = open_store()
        assert not [r for r in caplog.records if r.name == "selsmtp.store"]  # not cut
        assert second.try_append([deliver()]) == [2]

    # kept, and a LF puts record 2 after a blank line (SPEC §7; tests/unit/test_boundaries.py)
    assert mailbox.read_bytes() == record(1) + foreign + b"\n" + record(2)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "selsmtp.store"]
    assert f"offset {len(record(1))}, length {len(foreign)}" in warning


def test_foreign_bytes_between_appends_are_kept(open_store: OpenStore, mailbox: Path) -> None:
    mailbox_store = open_store()
    mailbox_store.try_append([deliver()])
    with mailbox.open("ab") as out:
        out.write(b"foreign\n")

    assert mailbox_store.try_append([deliver()]) == [2]

    assert mailbox.read_bytes() == record(1) + b"foreign\n\n" + record(2)


# -- one fsync per batch, and what a reboot can leave behind -----------------------


class CountingFsync:
    """Stands in for ``os.fsync``: counts the calls per file, and keeps a copy of the
    state file as it is at every fsync of the mailbox (the line of the batch being
    committed) and of the state file itself (what a power cut cannot take away)."""

    def __init__(self, mailbox: Path) -> None:
        self.real = os.fsync
        self.mailbox = mailbox
        self.state = state_path(mailbox)
        self.counts = {"mailbox": 0, "state": 0}
        self.lines: list[bytes] = []  # every state line seen at a mailbox fsync
        self.durable = b""  # the state file at its last fsync

    def __call__(self, fd: int) -> None:
        self.real(fd)
        if is_file(fd, self.mailbox):
            self.counts["mailbox"] += 1
            self.lines.append(self.state.read_bytes())
        elif self.state.exists() and is_file(fd, self.state):
            self.counts["state"] += 1
            self.durable = self.state.read_bytes()


def test_a_batch_costs_one_fsync_and_the_state_line_one_per_reservation(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsync = CountingFsync(mailbox)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(store, "RESERVED_NUMBERS", 5)
    mailbox_store = open_store()
    before = dict(fsync.counts)
    for _ in range(12):
        mailbox_store.try_append([deliver()])
    # the start reserved numbers up to 5; numbers 6 and 12 each need a new reserve
    assert fsync.counts["mailbox"] - before["mailbox"] == 12
    assert fsync.counts["state"] - before["state"] == 2
    mailbox.write_bytes(b"")  # a consumer empties the file: the line is made durable again
    mailbox_store.try_append([deliver()])
    assert fsync.counts["state"] - before["state"] == 3


def _stored_with_every_state_line(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[CountingFsync, bytes]:
    """Store numbers 1-7 in four batches, boot "one"; close cleanly. Returns the fsync
    spy (its ``lines`` hold every state line the batches wrote) and the mailbox."""
    fsync = CountingFsync(mailbox)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(store, "RESERVED_NUMBERS", 100)
    first = open_store(boot="one")
    for size in (1, 2, 1, 3):
        first.try_append([deliver() for _ in range(size)])
        fsync.lines.append(state_path(mailbox).read_bytes())  # the committed line
    first.close()
    assert mailbox.read_bytes() == b"".join(record(n) for n in range(1, 8))
    return fsync, mailbox.read_bytes()


def test_after_a_reboot_an_older_state_line_loses_nothing_and_repeats_no_number(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A power cut can leave any line written since the last fsync of the state file;
    # the mailbox's fsync'd records are all there. Each of those lines in turn:
    fsync, stored = _stored_with_every_state_line(open_store, mailbox, monkeypatch)
    assert len(fsync.lines) == 8
    for line in fsync.lines:
        state_path(mailbox).write_bytes(line)
        reopened = open_store(boot="two")
        assert mailbox.read_bytes() == stored, line  # nothing cut
        # numbers 1-7 are never given again: they continue after the reserve
        assert reopened.last_number == 100, line
        reopened.close()


def test_after_a_reboot_a_batch_not_written_whole_is_cut_and_its_numbers_kept(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsync, _ = _stored_with_every_state_line(open_store, mailbox, monkeypatch)
    pending_line = fsync.lines[-2]  # the last batch (5-7), seen at its fsync
    state_path(mailbox).write_bytes(pending_line)
    whole = b"".join(record(n) for n in range(1, 5))
    with mailbox.open("r+b") as file:  # the power went before the batch reached the disk
        file.truncate(len(whole) + 10)

    reopened = open_store(boot="two")

    assert mailbox.read_bytes() == whole
    assert reopened.try_append([deliver()]) == [101]  # after the reserve


def test_within_one_boot_a_batch_written_whole_but_not_fsynced_is_cut(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same line after a crash of the process alone: it is the last one written,
    # so the batch surely never got its 250.
    fsync, _ = _stored_with_every_state_line(open_store, mailbox, monkeypatch)
    state_path(mailbox).write_bytes(fsync.lines[-2])

    reopened = open_store(boot="one")

    assert mailbox.read_bytes() == b"".join(record(n) for n in range(1, 5))
    assert reopened.last_number == 7


@pytest.mark.parametrize("taken", ["renamed", "emptied"])
def test_after_a_reboot_a_mailbox_taken_away_continues_past_the_reservation(
    open_store: OpenStore,
    mailbox: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    taken: str,
) -> None:
    fsync, _ = _stored_with_every_state_line(open_store, mailbox, monkeypatch)
    if taken == "renamed":
        mailbox.rename(tmp_path / "read-by-a-consumer")
    else:
        mailbox.write_bytes(b"")
    line = fsync.lines[1]  # it knows of number 1 only
    state_path(mailbox).write_bytes(line)
    # the records that held numbers 2-7 are gone: only the reservation knows them
    saved = State.decode(line)
    assert saved is not None and (saved.number, saved.reserved) == (1, 100)
    assert open_store(boot="two").try_append([deliver()]) == [101]


def test_after_a_clean_stop_and_a_reboot_numbers_continue_without_a_gap(
    open_store: OpenStore, mailbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stored_with_every_state_line(open_store, mailbox, monkeypatch)
    mailbox.rename(tmp_path / "read-by-a-consumer")
    assert open_store(boot="two").try_append([deliver()]) == [8]


def _crash(mailbox_store: FileStore) -> None:
    """The process dies: its descriptors close, and nothing more is written."""
    mailbox_store._ready = False
    mailbox_store.close()


def _movemail(mailbox: Path) -> list[int]:
    """A consumer takes the mail: under the lock, read the numbers, empty the file."""
    with mailbox.open("r+b") as consumer:
        fcntl.lockf(consumer, fcntl.LOCK_EX)
        taken = numbers_in(mailbox)
        consumer.truncate(0)
        os.fsync(consumer.fileno())
    return taken


def _append_foreign(mailbox: Path, data: bytes) -> None:
    with mailbox.open("ab") as other:
        fcntl.lockf(other, fcntl.LOCK_EX)
        other.write(data)


FOREIGN = b"Received: from another.mda\n\nhello from elsewhere\n\n"


@pytest.mark.parametrize("refill", [b"", FOREIGN * 20], ids=["emptied", "emptied-and-refilled"])
def test_after_a_reboot_numbers_taken_away_by_a_consumer_never_repeat(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch, refill: bytes
) -> None:
    # The last fsync'd line knows of no message; 1-3 get their 250s; a consumer
    # takes them (another program may append); the power goes.
    fsync = CountingFsync(mailbox)
    monkeypatch.setattr(os, "fsync", fsync)
    first = open_store(boot="one")
    assert [first.try_append([deliver()]) for _ in range(3)] == [[1], [2], [3]]
    _crash(first)
    assert _movemail(mailbox) == [1, 2, 3]
    _append_foreign(mailbox, refill)
    state_path(mailbox).write_bytes(fsync.durable)

    assert open_store(boot="two").try_append([deliver()])[0] > 3


def test_after_a_reboot_numbers_never_repeat_after_a_rotation(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsync = CountingFsync(mailbox)
    monkeypatch.setattr(os, "fsync", fsync)
    first = open_store(boot="one", rotate=3)
    for _ in range(5):
        first.try_append([deliver()])  # 1-3 rotated away (line fsync'd), 4-5 in the file
    _crash(first)
    assert _movemail(mailbox) == [4, 5]
    state_path(mailbox).write_bytes(fsync.durable)

    assert open_store(boot="two", rotate=3).try_append([deliver()])[0] > 5


def test_after_a_reboot_another_programs_mail_where_a_batch_was_pending_is_kept(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsync = CountingFsync(mailbox)
    monkeypatch.setattr(os, "fsync", fsync)
    first = open_store(boot="one")
    first.try_append([deliver()])
    _movemail(mailbox)
    # the first batch into the emptied file makes its marker durable (pending at 0)
    first.try_append([deliver(b"x" * 1000 + b"\r\n")])
    _crash(first)
    _movemail(mailbox)
    _append_foreign(mailbox, FOREIGN)  # shorter than the batch: it looks cut short
    state_path(mailbox).write_bytes(fsync.durable)
    assert (State.decode(fsync.durable) or State()).pending == 0

    open_store(boot="two").close()

    assert mailbox.read_bytes() == FOREIGN


def test_within_one_boot_another_programs_mail_where_a_batch_was_pending_is_kept(
    open_store: OpenStore, mailbox: Path
) -> None:
    # A crash cut a batch short; while the server was down, a consumer emptied the
    # file and another program appended its own mail, past where the batch began but
    # not past where it would have ended. No record head of ours is there: those
    # bytes are another program's, and neither the store nor a reader cuts them.
    child = multiprocessing.get_context("spawn").Process(
        target=_crash_in_the_middle_of_an_append, args=(str(mailbox),)
    )
    child.start()
    child.join(WAIT)
    assert child.exitcode == 3
    state = State.decode(state_path(mailbox).read_bytes())
    assert state is not None and 0 < state.pending < state.end
    _movemail(mailbox)
    foreign = FOREIGN * (state.pending // len(FOREIGN) + 1)
    assert state.pending < len(foreign) <= state.end
    _append_foreign(mailbox, foreign)
    with mailbox.open("rb") as seen:
        assert reader.pending_append(mailbox, seen.fileno()) is None

    open_store().close()

    assert mailbox.read_bytes() == foreign


def test_a_failed_fsync_of_the_state_line_reserves_nothing(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsync = CountingFsync(mailbox)
    failing = FailingFsync()
    failing.real = fsync
    monkeypatch.setattr(os, "fsync", failing)
    monkeypatch.setattr(store, "RESERVED_NUMBERS", 2)
    mailbox_store = open_store(boot="one")  # durable: numbers up to 2 reserved
    assert mailbox_store.try_append([deliver(), deliver()]) == [1, 2]
    failing.fails = lambda fd: is_file(fd, state_path(mailbox))
    with pytest.raises(StoreError):
        mailbox_store.try_append([deliver()])  # needs a new reserve; its fsync fails
    failing.fails = lambda fd: False

    given = [mailbox_store.try_append([deliver()])[0] for _ in range(3)]

    durable = State.decode(fsync.durable)
    assert durable is not None and max(given) <= durable.reserved


def test_a_state_line_from_an_older_selsmtp_is_read(open_store: OpenStore, mailbox: Path) -> None:
    first = open_store()
    first.try_append([deliver(), deliver()])
    first.close()
    st = mailbox.stat()
    version_2 = f"selsmtp-state 2 2 {st.st_size} {st.st_dev} {st.st_ino} -1 1"
    state_path(mailbox).write_bytes(f"{version_2} {zlib.crc32(version_2.encode()):08x}\n".encode())

    assert open_store().try_append([deliver()]) == [3]
    assert numbers_in(mailbox) == [1, 2, 3]


# -- consumers taking the mail away -----------------------------------------------


def test_truncated_to_zero_by_a_consumer_numbers_keep_growing(
    open_store: OpenStore, mailbox: Path
) -> None:
    mailbox_store = open_store()
    mailbox_store.try_append([deliver(), deliver()])
    with mailbox.open("r+b") as consumer:  # movemail: under the lock, read and empty
        fcntl.lockf(consumer, fcntl.LOCK_EX)
        assert numbers_in(mailbox) == [1, 2]
        consumer.truncate(0)

    assert mailbox_store.try_append([deliver()]) == [3]
    assert mailbox.read_bytes() == record(3)

    mailbox_store.close()
    assert open_store().try_append([deliver()]) == [4]
    assert mailbox.read_bytes() == record(3) + record(4)


@pytest.mark.parametrize("how", ["renamed", "unlinked", "replaced"])
def test_mailbox_taken_away_next_append_starts_a_new_file(
    open_store: OpenStore, mailbox: Path, tmp_path: Path, how: str
) -> None:
    mailbox_store = open_store()
    mailbox_store.try_append([deliver(), deliver()])
    old = tmp_path / "old"
    if how == "renamed":
        mailbox.rename(old)
    elif how == "unlinked":
        os.link(mailbox, old)
        mailbox.unlink()
    else:  # a consumer renamed it away and left a new empty file in its place
        mailbox.rename(old)
        mailbox.write_bytes(b"")

    assert mailbox_store.try_append([deliver()]) == [3]

    assert mailbox.read_bytes() == record(3)
    assert old.read_bytes() == record(1) + record(2)  # the old file was not touched
    mailbox_store.close()
    assert open_store().try_append([deliver()]) == [4]
    assert mailbox.read_bytes() == record(3) + record(4)


def test_folder_gone_is_a_store_error_then_recovers(open_store: OpenStore, tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    folder.mkdir()
    path = folder / "mailbox"
    mailbox_store = open_store(path)
    mailbox_store.try_append([deliver()])
    folder.rename(tmp_path / "moved")

    with pytest.raises(StoreError):
        mailbox_store.try_append([deliver()])
    with pytest.raises(StoreError):  # still gone: still an error, not a crash
        mailbox_store.try_append([deliver()])

    folder.mkdir()
    assert mailbox_store.try_append([deliver()]) == [2]
    assert path.read_bytes() == record(2)


# -- failed writes leave nothing behind ---------------------------------------------


class Snapshot:
    """The mailbox and state file bytes, to compare before and after a failure."""

    def __init__(self, mailbox: Path) -> None:
        self.mailbox = mailbox.read_bytes()
        self.state = state_path(mailbox).read_bytes()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Snapshot) and (self.mailbox, self.state) == (
            other.mailbox,
            other.state,
        )

    __hash__ = None  # type: ignore[assignment]


FAIL = b"FAIL"


def failing_renderer(after: int) -> store.Renderer:
    """cs4410, except that a body starting with FAIL raises ENOSPC after ``after`` bytes."""
    normal = cs4410_renderer(NAME)

    def render(number: int, message: Deliver, now: float) -> Iterable[bytes]:
        if not message.body.startswith(FAIL):
            yield from normal(number, message, now)
            return
        yield b"y" * after
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return render


@pytest.mark.parametrize(
    "after", [0, 100, store.WRITE_CHUNK + 100], ids=["nothing", "unwritten", "written"]
)
def test_failure_while_writing_cuts_the_file_back(
    open_store: OpenStore, mailbox: Path, after: int
) -> None:
    mailbox_store = open_store(render=failing_renderer(after))
    mailbox_store.try_append([deliver()])
    with mailbox.open("ab") as out:
        out.write(b"foreign\n")  # the cut goes back to here, not to the last commit
    before = Snapshot(mailbox)

    with pytest.raises(StoreError, match="No space left"):
        mailbox_store.try_append([deliver(), deliver(FAIL), deliver()])

    assert Snapshot(mailbox).mailbox == before.mailbox
    assert mailbox_store.last_number == 1
    assert mailbox_store.try_append([deliver()]) == [2]  # the failed batch used no number
    assert mailbox.read_bytes() == record(1) + b"foreign\n\n" + record(2)


class FailingFsync:
    """Stands in for ``os.fsync``: fails for the descriptors ``fails`` picks."""

    def __init__(self) -> None:
        self.real = os.fsync
        self.fails: Callable[[int], bool] = lambda fd: False
        self.calls = 0

    def __call__(self, fd: int) -> None:
        if self.fails(fd):
            self.calls += 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.real(fd)


def is_file(fd: int, path: Path) -> bool:
    if not path.exists():  # the lock file and its folder are synced before the mailbox exists
        return False
    held, named = os.fstat(fd), os.stat(path)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def test_a_batch_that_cannot_be_cut_back_keeps_its_numbers_and_is_cut_before_the_next(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failed fsync, then a failed cut (a dying disk): the batch's bytes stay in the
    # file for now, numbered. Its numbers are not given out again, and the batch is
    # cut before anything else is appended.
    fsync = FailingFsync()
    monkeypatch.setattr(os, "fsync", fsync)
    mailbox_store = open_store()
    mailbox_store.try_append([deliver()])
    real_ftruncate = os.ftruncate

    def ftruncate(fd: int, length: int) -> None:
        if is_file(fd, mailbox):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_ftruncate(fd, length)

    fsync.fails = lambda fd: is_file(fd, mailbox)
    monkeypatch.setattr(os, "ftruncate", ftruncate)
    with pytest.raises(StoreError):
        mailbox_store.try_append([deliver(b"never acknowledged\r\n")])
    assert mailbox.read_bytes() == record(1) + record(2, b"never acknowledged\n")

    fsync.fails = lambda fd: False
    monkeypatch.setattr(os, "ftruncate", real_ftruncate)
    assert mailbox_store.try_append([deliver()]) == [3]
    assert mailbox.read_bytes() == record(1) + record(3)


@pytest.mark.parametrize("which", ["mailbox", "state"])
def test_failed_fsync_cuts_back_and_is_never_a_success(
    open_store: OpenStore,
    mailbox: Path,
    monkeypatch: pytest.MonkeyPatch,
    which: str,
) -> None:
    fsync = FailingFsync()
    monkeypatch.setattr(os, "fsync", fsync)
    # the state line is fsync'd when its reserved numbers run out: here, every batch
    monkeypatch.setattr(store, "RESERVED_NUMBERS", 0)
    mailbox_store = open_store()
    mailbox_store.try_append([deliver()])
    before = Snapshot(mailbox)
    target = mailbox if which == "mailbox" else state_path(mailbox)
    fsync.fails = lambda fd: is_file(fd, target)

    with pytest.raises(StoreError, match="Input/output error"):
        mailbox_store.try_append([deliver(b"lost\r\n")])

    assert fsync.calls >= 1
    assert Snapshot(mailbox).mailbox == before.mailbox
    assert mailbox_store.last_number == 1
    fsync.fails = lambda fd: False
    assert mailbox_store.try_append([deliver()]) == [2]
    assert mailbox.read_bytes() == record(1) + record(2)
    mailbox_store.close()
    assert open_store().last_number == 2  # the state on disk agrees


def test_state_is_unchanged_after_a_failed_write(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mailbox_store = open_store(render=failing_renderer(store.WRITE_CHUNK + 1))
    mailbox_store.try_append([deliver()])
    before = Snapshot(mailbox)

    with pytest.raises(StoreError):
        mailbox_store.try_append([deliver(FAIL)])

    assert Snapshot(mailbox) == before
    mailbox_store.close()
    reopened = open_store()
    assert reopened.last_number == 1
    assert mailbox.read_bytes() == record(1)


class ShortWrites:
    """Stands in for ``os.writev``: writes at most ``step`` bytes per call, then, after
    ``fail_after`` bytes in all, fails with ENOSPC (a disk filling up mid-record)."""

    def __init__(self, step: int, fail_after: int | None = None) -> None:
        self.real = os.writev
        self.step = step
        self.fail_after = fail_after
        self.written = 0
        self.calls = 0

    def __call__(self, fd: int, buffers: Any) -> int:
        self.calls += 1
        if self.fail_after is not None and self.written >= self.fail_after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        first = bytes(next(b for b in buffers if len(b)))[: self.step]
        written = os.write(fd, first)
        self.written += written
        return written


def test_short_writes_are_continued(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mailbox_store = open_store()
    writes = ShortWrites(step=7)
    monkeypatch.setattr(os, "writev", writes)

    assert mailbox_store.try_append([deliver(b"a longer body\r\nof two lines\r\n"), deliver()]) == [
        1,
        2,
    ]

    assert writes.calls > 20
    assert mailbox.read_bytes() == record(1, b"a longer body\nof two lines\n") + record(2)


def test_short_write_then_failure_leaves_no_partial_record(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mailbox_store = open_store()
    mailbox_store.try_append([deliver()])
    before = Snapshot(mailbox)
    monkeypatch.setattr(os, "writev", ShortWrites(step=50, fail_after=120))

    with pytest.raises(StoreError, match="No space left"):
        mailbox_store.try_append([deliver(b"z" * 500 + b"\r\n")])

    assert Snapshot(mailbox).mailbox == before.mailbox
    monkeypatch.undo()
    assert mailbox_store.try_append([deliver()]) == [2]


# -- big batches ----------------------------------------------------------------------


def test_batch_with_more_pieces_than_one_writev_takes(open_store: OpenStore, mailbox: Path) -> None:
    count = store.MAX_IOV  # three pieces each: well over MAX_IOV buffers
    mailbox_store = open_store()

    assert mailbox_store.try_append([deliver(b"%d\r\n" % n) for n in range(count)]) == list(
        range(1, count + 1)
    )

    assert mailbox.read_bytes() == b"".join(record(n + 1, b"%d\n" % n) for n in range(count))


def test_a_batch_past_part_bytes_is_committed_in_parts(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsync = CountingFsync(mailbox)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(store, "PART_BYTES", 20)  # two 7-byte bodies fit, a third does not
    mailbox_store = open_store()
    before = fsync.counts["mailbox"]

    assert mailbox_store.try_append([deliver() for _ in range(5)]) == [1, 2, 3, 4, 5]

    assert fsync.counts["mailbox"] - before == 3  # parts of 2, 2 and 1
    assert mailbox.read_bytes() == b"".join(record(n) for n in range(1, 6))


def test_a_failed_later_part_takes_the_earlier_parts_back(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "PART_BYTES", 20)
    mailbox_store = open_store(render=failing_renderer(store.WRITE_CHUNK + 1))
    mailbox_store.try_append([deliver()])

    with pytest.raises(StoreError):
        mailbox_store.try_append([deliver(), deliver(), deliver(), deliver(FAIL)])  # 2 + 2

    assert mailbox.read_bytes() == record(1)
    assert mailbox_store.try_append([deliver()]) == [2]


def test_batch_bigger_than_a_write_chunk(open_store: OpenStore, mailbox: Path) -> None:
    bodies = [bytes([65 + n]) * (store.WRITE_CHUNK // 2 + 3) + b"\r\n" for n in range(5)]
    mailbox_store = open_store()

    assert mailbox_store.try_append([deliver(body) for body in bodies]) == [1, 2, 3, 4, 5]

    expected = b"".join(record(n + 1, body[:-2] + b"\n") for n, body in enumerate(bodies))
    assert mailbox.read_bytes() == expected


def test_spooled_body_with_crlf_across_a_chunk_boundary(
    open_store: OpenStore, mailbox: Path
) -> None:
    with tempfile.TemporaryFile() as spool:
        spool.write(b"a" * (formats.CHUNK - 1) + b"\r\n" + b"b\r\n" + b"bare\rcr\r\n")
        spool.seek(0)

        assert open_store().try_append([deliver(spool)]) == [1]

    body = b"a" * (formats.CHUNK - 1) + b"\nb\nbare\rcr\n"
    assert mailbox.read_bytes() == record(1, body)


# -- the lock -----------------------------------------------------------------------


def test_lock_held_by_a_reader_makes_try_append_return_none(
    open_store: OpenStore, mailbox: Path
) -> None:
    mailbox_store = open_store()
    mailbox_store.try_append([deliver()])
    context = multiprocessing.get_context("spawn")
    locked, release = context.Event(), context.Event()
    reader = context.Process(target=hold_shared_lock, args=(str(mailbox), locked, release))
    reader.start()
    try:
        assert locked.wait(WAIT)
        since = time.monotonic()

        assert mailbox_store.try_append([deliver()]) is None
        assert mailbox_store.try_append([deliver()]) is None

        assert time.monotonic() - since < 1.0  # it does not wait for the lock
        assert mailbox.read_bytes() == record(1)
        assert mailbox_store.last_number == 1
    finally:
        release.set()
        reader.join(WAIT)
    assert reader.exitcode == 0

    assert mailbox_store.try_append([deliver()]) == [2]
    assert mailbox.read_bytes() == record(1) + record(2)


def test_torn_tail_found_while_a_reader_holds_the_lock_is_removed_at_the_next_append(
    open_store: OpenStore, mailbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    child = multiprocessing.get_context("spawn").Process(
        target=_crash_in_the_middle_of_an_append, args=(str(mailbox),)
    )
    child.start()
    child.join(WAIT)
    assert child.exitcode == 3
    torn = mailbox.read_bytes()
    assert len(torn) > len(record(1))
    context = multiprocessing.get_context("spawn")
    locked, release = context.Event(), context.Event()
    reader = context.Process(target=hold_shared_lock, args=(str(mailbox), locked, release))
    reader.start()
    try:
        assert locked.wait(WAIT)
        with caplog.at_level(logging.WARNING, logger="selsmtp.store"):
            mailbox_store = open_store()  # cannot repair under the reader's lock
        assert mailbox.read_bytes() == torn
        assert "next append" in caplog.text
    finally:
        release.set()
        reader.join(WAIT)

    assert mailbox_store.try_append([deliver()]) == [3]
    assert mailbox.read_bytes() == record(1) + record(3)


def test_the_lock_is_released_after_each_append(open_store: OpenStore, mailbox: Path) -> None:
    mailbox_store = open_store()
    mailbox_store.try_append([deliver()])
    context = multiprocessing.get_context("spawn")
    locked, release = context.Event(), context.Event()
    reader = context.Process(target=hold_shared_lock, args=(str(mailbox), locked, release))
    reader.start()
    try:
        assert locked.wait(WAIT)  # a reader can take its shared lock between appends
    finally:
        release.set()
        reader.join(WAIT)
    assert reader.exitcode == 0


# -- start-up failures ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["under-a-file", "missing-folder", "a-folder"])
def test_unusable_path_is_a_startup_error(tmp_path: Path, where: str) -> None:
    if where == "under-a-file":
        (tmp_path / "file").write_bytes(b"")
        path = tmp_path / "file" / "mailbox"
    elif where == "missing-folder":
        path = tmp_path / "missing" / "mailbox"
    else:
        path = tmp_path / "folder"
        path.mkdir()

    with pytest.raises(StartupError) as error:
        FileStore(str(path), cs4410_renderer(NAME))

    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message
