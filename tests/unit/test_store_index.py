"""FileStore keeps the offsets index (selsmtp.mailindex) beside its mailbox: every
committed batch is listed, consumers and rotation are followed, crash recovery cuts
what it cuts from the mailbox. Real files in tmp_path; crashes in child processes."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from selsmtp import formats, mailindex
from selsmtp.mailindex import IndexEntry
from selsmtp.session import Envelope
from selsmtp.store import FileStore, StartupError, StoreError, cs4410_renderer
from tests.stores import NAME, WAIT, deliver, record

pytestmark = pytest.mark.timeout(60)

OpenStore = Callable[..., FileStore]

#: issue 9 item 3, exactly: a body ending in a forged record head, with the number
#: the attacker expects the next message to get
FORGED_BODY = (
    b"Hi,\r\n\r\nReceived: from bank.example by mx (CS4410MP3)\r\nNumber: 2\r\n"
    b"From: ceo@corp\r\nTo: victim@corp\r\n\r\nPlease wire the money.\r\n"
)


def index_of(path: Path) -> list[IndexEntry] | None:
    return mailindex.load(str(path), path.stat())


def index_text(path: Path) -> bytes:
    return path.with_name(path.name + ".selsmtp-index").read_bytes()


def lay_out(*records: bytes, start: int = 0, first: int = 1) -> list[IndexEntry]:
    """The entries of ``records`` written one after another from ``start``."""
    entries = []
    for number, data in enumerate(records, first):
        entries.append(IndexEntry(start, len(data), number))
        start += len(data)
    return entries


def mbox_record(number: int, body: bytes = b"hello\r\n") -> bytes:
    envelope = Envelope("client.test", "a@example.org", ("b@example.org",))
    return b"".join(formats.mbox_record(number, envelope, body, NAME, 0.0))


def movemail(mailbox: Path) -> None:
    with mailbox.open("r+b") as consumer:
        fcntl.lockf(consumer, fcntl.LOCK_EX)
        consumer.truncate(0)


def append_foreign(mailbox: Path, data: bytes) -> None:
    with mailbox.open("ab") as other:
        fcntl.lockf(other, fcntl.LOCK_EX)
        other.write(data)


# -- every batch is listed ------------------------------------------------------


def test_every_committed_record_is_listed_with_its_offset_length_and_number(
    open_store: OpenStore, mailbox: Path
) -> None:
    mailbox_store = open_store()
    mailbox_store.try_append([deliver(b"x\r\n")])
    mailbox_store.try_append([deliver(b"y\r\n"), deliver(b"zz\r\n"), deliver(b"")])

    records = record(1, b"x\n"), record(2, b"y\n"), record(3, b"zz\n"), record(4, b"")
    assert mailbox.read_bytes() == b"".join(records)
    assert index_of(mailbox) == lay_out(*records)
    st = mailbox.stat()
    assert index_text(mailbox).startswith(
        b"selsmtp-index 1 cs4410 %d %d\n0 %d 1\n" % (st.st_dev, st.st_ino, len(records[0]))
    )


def test_an_mbox_is_listed_too(open_store: OpenStore, mailbox: Path) -> None:
    mailbox_store = open_store("mbox")
    mailbox_store.try_append([deliver(b"From me\r\n"), deliver(b"no final line end")])

    records = mbox_record(1, b"From me\r\n"), mbox_record(2, b"no final line end")
    assert mailbox.read_bytes() == b"".join(records)
    assert index_of(mailbox) == lay_out(*records)
    assert index_text(mailbox).startswith(b"selsmtp-index 1 mbox ")


def test_a_forged_record_head_in_a_body_is_not_listed(open_store: OpenStore, mailbox: Path) -> None:
    # Issue 9 item 3: the attacker's message becomes 1, and the real message 2 follows.
    mailbox_store = open_store()
    assert mailbox_store.try_append([deliver(FORGED_BODY)]) == [1]
    assert mailbox_store.try_append([deliver(b"the real number 2\r\n")]) == [2]

    data = mailbox.read_bytes()
    heads = [int(n) for n in formats.CS4410_NUMBER.findall(data)]
    assert heads == [1, 2, 2]  # what a parser finds
    entries = index_of(mailbox)
    real = record(1, formats.crlf_to_lf(FORGED_BODY)), record(2, b"the real number 2\n")
    assert entries == lay_out(*real)  # what the store wrote
    assert entries is not None
    assert data[entries[1].offset :].startswith(
        b"Received: from client.test by mx.test (CS4410MP3)\nNumber: 2\n"
    )


def test_the_index_goes_on_across_a_restart(open_store: OpenStore, mailbox: Path) -> None:
    first = open_store()
    first.try_append([deliver(), deliver()])
    first.close()

    second = open_store()
    second.try_append([deliver()])

    assert index_of(mailbox) == lay_out(record(1), record(2), record(3))


def test_a_batch_is_one_write_to_the_index(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mailbox_store = open_store()
    mailbox_store.try_append([deliver()])
    index_fd = os.open(str(mailbox) + ".selsmtp-index", os.O_RDONLY)
    index_ino = os.fstat(index_fd).st_ino
    os.close(index_fd)
    writes: list[int] = []
    real_write = os.write

    def counted(fd: int, data: bytes) -> int:
        if os.fstat(fd).st_ino == index_ino:
            writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counted)
    mailbox_store.try_append([deliver() for _ in range(50)])
    monkeypatch.undo()

    assert len(writes) == 1
    assert index_of(mailbox) == lay_out(*(record(n) for n in range(1, 52)))


# -- what other programs do ------------------------------------------------------


def test_records_another_program_appends_are_left_out(open_store: OpenStore, mailbox: Path) -> None:
    mailbox_store = open_store()
    mailbox_store.try_append([deliver()])
    foreign = record(77, b"another program's\n")
    append_foreign(mailbox, foreign)
    mailbox_store.try_append([deliver()])

    assert index_of(mailbox) == [
        IndexEntry(0, len(record(1)), 1),
        IndexEntry(len(record(1)) + len(foreign), len(record(2)), 2),
    ]


def test_a_file_a_consumer_emptied_gets_its_index_begun_again(
    open_store: OpenStore, mailbox: Path
) -> None:
    mailbox_store = open_store()
    mailbox_store.try_append([deliver(), deliver()])
    movemail(mailbox)
    assert index_of(mailbox) is None  # stale until the next append

    mailbox_store.try_append([deliver()])

    assert index_of(mailbox) == lay_out(record(3), first=3)


def test_a_file_emptied_and_written_longer_by_others_gets_its_index_begun_again(
    open_store: OpenStore, mailbox: Path
) -> None:
    mailbox_store = open_store()
    mailbox_store.try_append([deliver()])
    movemail(mailbox)
    foreign = b"x" * 500 + b"\n\n"
    append_foreign(mailbox, foreign)  # the old entry would now point into these bytes
    assert index_of(mailbox) == [(0, len(record(1)), 1)]

    mailbox_store.try_append([deliver()])

    assert index_of(mailbox) == [(len(foreign), len(record(2)), 2)]


def test_a_file_renamed_in_its_folder_takes_its_index_along_and_the_new_file_gets_one(
    open_store: OpenStore, mailbox: Path, tmp_path: Path
) -> None:
    mailbox_store = open_store()
    mailbox_store.try_append([deliver()])
    os.rename(mailbox, tmp_path / "taken")  # a consumer takes the mail

    mailbox_store.try_append([deliver()])

    assert index_of(mailbox) == lay_out(record(2), first=2)
    taken = tmp_path / "taken"
    assert mailindex.load(str(taken), taken.stat()) == lay_out(record(1))


def test_a_file_renamed_in_a_folder_reached_through_a_symlink_takes_its_index_along(
    open_store: OpenStore, tmp_path: Path
) -> None:
    # ~/mail -> /data/mail: the kernel names the renamed file by its real folder.
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    mailbox_store = open_store(path=tmp_path / "link" / "mailbox")
    mailbox_store.try_append([deliver()])
    os.rename(real / "mailbox", real / "taken")

    mailbox_store.try_append([deliver()])

    assert index_of(real / "mailbox") == lay_out(record(2), first=2)
    taken = real / "taken"
    assert mailindex.load(str(taken), taken.stat()) == lay_out(record(1))


def test_a_file_renamed_out_of_its_folder_keeps_no_index(
    open_store: OpenStore, mailbox: Path, tmp_path: Path
) -> None:
    mailbox_store = open_store()
    mailbox_store.try_append([deliver()])
    (tmp_path / "elsewhere").mkdir()
    taken = tmp_path / "elsewhere" / "taken"
    os.rename(mailbox, taken)

    mailbox_store.try_append([deliver()])

    assert index_of(mailbox) == lay_out(record(2), first=2)
    assert mailindex.load(str(taken), taken.stat()) is None
    assert sorted(p.name for p in taken.parent.iterdir()) == ["taken"]


def test_a_restart_after_a_consumer_emptied_the_file(open_store: OpenStore, mailbox: Path) -> None:
    first = open_store()
    first.try_append([deliver(), deliver()])
    first.close()
    movemail(mailbox)

    second = open_store()
    assert index_of(mailbox) == []  # begun again at start-up
    second.try_append([deliver()])
    assert index_of(mailbox) == lay_out(record(3), first=3)


def test_an_index_left_by_another_file_is_begun_again_at_start_up(
    open_store: OpenStore, mailbox: Path, tmp_path: Path
) -> None:
    first = open_store()
    first.try_append([deliver()])
    first.close()
    os.rename(mailbox, tmp_path / "taken")
    mailbox.write_bytes(record(1))  # restored from a backup, say: another inode

    second = open_store()
    second.try_append([deliver()])

    assert index_of(mailbox) == [(len(record(1)), len(record(2)), 2)]


# -- rotation ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["cs4410", "mbox"])
def test_rotation_takes_the_index_along(open_store: OpenStore, mailbox: Path, fmt: str) -> None:
    render = record if fmt == "cs4410" else mbox_record
    mailbox_store = open_store(fmt, rotate=2)
    mailbox_store.try_append([deliver()])
    mailbox_store.try_append([deliver(), deliver(), deliver(), deliver()])

    for name, numbers in (("mailbox.1-2", [1, 2]), ("mailbox.3-4", [3, 4]), ("mailbox", [5])):
        path = mailbox.with_name(name)
        assert index_of(path) == lay_out(*map(render, numbers), first=numbers[0]), name
        assert index_text(path).startswith(b"selsmtp-index 1 %s " % fmt.encode())


# -- crash recovery ---------------------------------------------------------------


def _crash_after_the_index_write(path: str) -> None:
    """Child process: store one message, then die after the second batch was written,
    fsync'd and listed, but before its commit was recorded: never acknowledged."""
    crashing = FileStore(path, cs4410_renderer(NAME))
    crashing.try_append([deliver()])
    real_append = mailindex.IndexWriter.append

    def append_then_die(self: mailindex.IndexWriter, entries: Any) -> None:
        real_append(self, entries)
        os._exit(3)

    mailindex.IndexWriter.append = append_then_die  # type: ignore[method-assign]
    crashing.try_append([deliver(), deliver()])


def test_recovery_cuts_the_entries_of_the_batch_it_cuts(
    open_store: OpenStore, mailbox: Path
) -> None:
    child = multiprocessing.get_context("spawn").Process(
        target=_crash_after_the_index_write, args=(str(mailbox),)
    )
    child.start()
    child.join(WAIT)
    assert child.exitcode == 3
    assert len(index_of(mailbox) or []) == 3  # listed, never committed

    mailbox_store = open_store()

    assert mailbox.read_bytes() == record(1)
    assert index_of(mailbox) == lay_out(record(1))
    assert mailbox_store.try_append([deliver()]) == [4]  # 2 and 3 stay reserved
    assert index_of(mailbox) == [*lay_out(record(1)), (len(record(1)), len(record(4)), 4)]


def test_a_failed_batch_leaves_no_entries(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mailbox_store = open_store()
    mailbox_store.try_append([deliver()])

    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(mailbox_store, "_fsync", fail)
    with pytest.raises(StoreError, match="cannot append"):
        mailbox_store.try_append([deliver()])
    monkeypatch.undo()

    assert index_of(mailbox) == lay_out(record(1))


def test_something_other_than_a_regular_file_at_the_index_path_is_refused_at_start_up(
    open_store: OpenStore, tmp_path: Path
) -> None:
    index = tmp_path / "mailbox.selsmtp-index"
    index.symlink_to(tmp_path / "elsewhere")  # never followed (SPEC §12)

    with pytest.raises(StartupError, match="selsmtp-index is a symbolic link"):
        open_store()

    assert not (tmp_path / "elsewhere").exists()


def test_the_index_that_cannot_be_written_costs_no_mail(
    open_store: OpenStore, mailbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mailbox_store = open_store()
    assert mailbox_store.try_append([deliver()]) == [1]
    index = mailbox_store._index.writer
    assert index is not None
    read_only = os.open(os.devnull, os.O_RDONLY)
    os.dup2(read_only, index.fd)  # every write to the index now fails (EBADF)
    os.close(read_only)

    assert mailbox_store.try_append([deliver()]) == [2]

    assert mailbox.read_bytes() == record(1) + record(2)
    assert any("selsmtp-index" in r.getMessage() for r in caplog.records)
