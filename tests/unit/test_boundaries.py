"""Each record selsmtp writes begins at a record boundary, whatever the file already
holds (SPEC §7, issue 9 item 1): FileStore keeps another program's bytes, writes the
fewest bytes that put its record after a blank line, and says where the damage is.

Real files in tmp_path; other programs are this process writing under the lock;
crashes are child processes that die with ``os._exit``."""

from __future__ import annotations

import fcntl
import logging
import mailbox as stdlib_mailbox
import multiprocessing
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from selsmtp import durable, formats, mailindex, read_mailbox
from selsmtp.mailindex import IndexEntry
from selsmtp.session import Envelope
from selsmtp.store import FileStore
from tests.stores import NAME, WAIT, deliver, record, store_options

pytestmark = pytest.mark.timeout(60)

OpenStore = Callable[..., FileStore]
FORMATS = ["cs4410", "mbox"]

#: a record another cs4410 writer left cut short, inside its last header line
#: (issue 9 item 1: "...To: c@Received: from ...")
TORN_CS4410 = b"Received: from other.test by other (CS4410MP3)\nNumber: 50\nFrom: a@b\nTo: c@"
#: an mbox message another program left cut short inside its body
TORN_MBOX = b"From other@example.org Thu Jan  1 00:00:00 1970\nSubject: torn\n\npartial bo"
TORN = {"cs4410": TORN_CS4410, "mbox": TORN_MBOX}


def mbox_record(number: int, body: bytes = b"hello\r\n") -> bytes:
    envelope = Envelope("client.test", "a@example.org", ("b@example.org",))
    return b"".join(formats.mbox_record(number, envelope, body, NAME, 0.0))


RECORD = {"cs4410": record, "mbox": mbox_record}


def append_foreign(path: Path, data: bytes) -> None:
    """Another program appends ``data`` under the lock."""
    with path.open("ab") as other:
        fcntl.lockf(other, fcntl.LOCK_EX)
        other.write(data)


def movemail(path: Path) -> None:
    with path.open("r+b") as consumer:
        fcntl.lockf(consumer, fcntl.LOCK_EX)
        consumer.truncate(0)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "selsmtp.store" and r.levelno == logging.WARNING
    ]


def damage_reported(caplog: pytest.LogCaptureFixture, offset: int, length: int) -> bool:
    wanted = re.compile(rf"\boffset {offset}\b.*\blength {length}\b")
    return any(wanted.search(message) for message in warnings(caplog))


def index_of(path: Path) -> list[IndexEntry] | None:
    return mailindex.load(str(path), path.stat())


# -- the boundary rule -------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_torn_record_another_program_left_is_kept_and_the_next_record_follows_a_blank_line(
    open_store: OpenStore, mailbox: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    mailbox_store = open_store(fmt)
    mailbox_store.try_append([deliver(), deliver()])
    before = mailbox.read_bytes()
    append_foreign(mailbox, TORN[fmt])

    with caplog.at_level(logging.WARNING, logger="selsmtp.store"):
        assert mailbox_store.try_append([deliver(b"mine\r\n")]) == [3]

    mine = RECORD[fmt](3, b"mine\r\n") if fmt == "mbox" else record(3, b"mine\n")
    assert mailbox.read_bytes() == before + TORN[fmt] + b"\n\n" + mine
    assert damage_reported(caplog, len(before), len(TORN[fmt]))
    offset = len(before) + len(TORN[fmt]) + 2
    assert index_of(mailbox) == [
        *[IndexEntry(n * len(before) // 2, len(before) // 2, n + 1) for n in range(2)],
        IndexEntry(offset, len(mine), 3),
    ]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("tail", "fixup"),
    [(b"x", b"\n\n"), (b"x\n", b"\n"), (b"x\n\n", b""), (b"\n", b""), (b"x\n\n\n", b"")],
    ids=["no-line-end", "one-line-end", "blank-line", "another-blank-line", "two-blank-lines"],
)
def test_the_fewest_bytes_are_written(
    open_store: OpenStore,
    mailbox: Path,
    fmt: str,
    tail: bytes,
    fixup: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mailbox_store = open_store(fmt)
    mailbox_store.try_append([deliver()])
    before = mailbox.read_bytes()
    append_foreign(mailbox, tail)

    with caplog.at_level(logging.WARNING, logger="selsmtp.store"):
        mailbox_store.try_append([deliver()])

    assert mailbox.read_bytes() == before + tail + fixup + RECORD[fmt](2)
    assert bool(warnings(caplog)) == bool(fixup)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_that_ends_at_a_boundary_gets_nothing_and_no_warning(
    open_store: OpenStore, mailbox: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    mailbox.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="selsmtp.store"):
        mailbox_store = open_store(fmt)
        mailbox_store.try_append([deliver(b"")])  # an empty body
        mailbox_store.try_append([deliver(b"no final line end")])
        mailbox_store.close()
        open_store(fmt).try_append([deliver()])

    render = RECORD[fmt]
    assert mailbox.read_bytes() == render(1, b"") + render(2, b"no final line end") + render(3)
    assert warnings(caplog) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_holding_only_a_line_end_gets_a_blank_line_before_the_first_record(
    open_store: OpenStore, mailbox: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    # ``echo > mailbox`` leaves one LF. A record right after it follows no blank
    # line: a reader that parses (no index, e.g. once the file is renamed away)
    # does not find it there, nor tell the file's format.
    mailbox.write_bytes(b"\n")

    with caplog.at_level(logging.WARNING, logger="selsmtp.store"):
        assert open_store(fmt).try_append([deliver()]) == [1]

    assert mailbox.read_bytes() == b"\n\n" + RECORD[fmt](1)
    assert damage_reported(caplog, 0, 1)
    Path(mailindex.index_path(str(mailbox))).unlink()
    assert [m.number for m in read_mailbox(mailbox, fmt)] == [1]
    assert [m.number for m in read_mailbox(mailbox)] == [1]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_torn_tail_left_while_the_server_was_down_is_kept_after_a_restart(
    open_store: OpenStore, mailbox: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = open_store(fmt)
    first.try_append([deliver(), deliver()])
    first.close()
    before = mailbox.read_bytes()
    append_foreign(mailbox, TORN[fmt])  # another writer died mid-append

    with caplog.at_level(logging.WARNING, logger="selsmtp.store"):
        second = open_store(fmt)
        assert second.try_append([deliver()]) == [3]

    assert mailbox.read_bytes() == before + TORN[fmt] + b"\n\n" + RECORD[fmt](3)
    assert damage_reported(caplog, len(before), len(TORN[fmt]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_torn_tail_in_a_mailbox_with_no_state_file_is_kept(
    open_store: OpenStore, mailbox: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = open_store(fmt)
    first.try_append([deliver()])
    first.close()
    before = mailbox.read_bytes()
    append_foreign(mailbox, TORN[fmt])
    Path(str(mailbox) + ".selsmtp").unlink()

    with caplog.at_level(logging.WARNING, logger="selsmtp.store"):
        open_store(fmt).try_append([deliver()])

    data = mailbox.read_bytes()
    assert data.startswith(before + TORN[fmt] + b"\n\n")
    assert damage_reported(caplog, len(before), len(TORN[fmt]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_after_a_consumer_emptied_the_file_a_torn_tail_written_since_is_kept(
    open_store: OpenStore, mailbox: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    mailbox_store = open_store(fmt)
    mailbox_store.try_append([deliver(), deliver()])
    movemail(mailbox)
    append_foreign(mailbox, TORN[fmt])

    with caplog.at_level(logging.WARNING, logger="selsmtp.store"):
        assert mailbox_store.try_append([deliver()]) == [3]

    assert mailbox.read_bytes() == TORN[fmt] + b"\n\n" + RECORD[fmt](3)
    assert damage_reported(caplog, 0, len(TORN[fmt]))
    assert index_of(mailbox) == [(len(TORN[fmt]) + 2, len(RECORD[fmt](3)), 3)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_after_a_consumer_emptied_the_file_and_a_restart(
    open_store: OpenStore, mailbox: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = open_store(fmt)
    first.try_append([deliver(), deliver()])
    first.close()
    movemail(mailbox)
    append_foreign(mailbox, TORN[fmt])

    with caplog.at_level(logging.WARNING, logger="selsmtp.store"):
        assert open_store(fmt).try_append([deliver()]) == [3]

    assert mailbox.read_bytes() == TORN[fmt] + b"\n\n" + RECORD[fmt](3)
    assert damage_reported(caplog, 0, len(TORN[fmt]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_new_file_another_program_put_at_the_path_after_a_rename(
    open_store: OpenStore, mailbox: Path, fmt: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mailbox_store = open_store(fmt)
    mailbox_store.try_append([deliver()])
    os.rename(mailbox, tmp_path / "taken")
    mailbox.write_bytes(TORN[fmt])  # another program created the new file first

    with caplog.at_level(logging.WARNING, logger="selsmtp.store"):
        assert mailbox_store.try_append([deliver()]) == [2]

    assert mailbox.read_bytes() == TORN[fmt] + b"\n\n" + RECORD[fmt](2)
    assert damage_reported(caplog, 0, len(TORN[fmt]))
    assert (tmp_path / "taken").read_bytes() == RECORD[fmt](1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_whole_records_another_program_appended_are_not_counted_as_damage(
    open_store: OpenStore, mailbox: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    mailbox_store = open_store(fmt)
    mailbox_store.try_append([deliver()])
    whole = RECORD[fmt](40, b"another program's whole record\r\n")
    before = mailbox.read_bytes() + whole
    append_foreign(mailbox, whole + TORN[fmt])

    with caplog.at_level(logging.WARNING, logger="selsmtp.store"):
        mailbox_store.try_append([deliver()])

    assert mailbox.read_bytes() == before + TORN[fmt] + b"\n\n" + RECORD[fmt](2)
    assert damage_reported(caplog, len(before), len(TORN[fmt]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_across_rotation(
    open_store: OpenStore, mailbox: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    mailbox_store = open_store(fmt, rotate=2)
    mailbox_store.try_append([deliver()])
    append_foreign(mailbox, TORN[fmt])

    with caplog.at_level(logging.WARNING, logger="selsmtp.store"):
        assert mailbox_store.try_append([deliver(), deliver()]) == [2, 3]

    rotated = mailbox.with_name("mailbox.1-2")
    one, two, three = (RECORD[fmt](n) for n in (1, 2, 3))
    assert rotated.read_bytes() == one + TORN[fmt] + b"\n\n" + two
    assert mailindex.load(str(rotated), rotated.stat()) == [
        (0, len(one), 1),
        (len(one) + len(TORN[fmt]) + 2, len(two), 2),
    ]
    assert mailbox.read_bytes() == three
    assert damage_reported(caplog, len(one), len(TORN[fmt]))

    append_foreign(mailbox, TORN[fmt])  # and in the file that began with the rotation
    mailbox_store.try_append([deliver()])
    assert mailbox.with_name("mailbox.3-4").read_bytes() == (
        three + TORN[fmt] + b"\n\n" + RECORD[fmt](4)
    )


def test_mbox_readers_find_the_next_message(open_store: OpenStore, mailbox: Path) -> None:
    mailbox_store = open_store("mbox")
    mailbox_store.try_append([deliver()])
    append_foreign(mailbox, TORN_MBOX)
    mailbox_store.try_append([deliver(b"Subject: mine\r\n\r\nfound\r\n")])

    box = stdlib_mailbox.mbox(str(mailbox), create=False)
    try:
        messages = [box.get_message(key) for key in box.iterkeys()]
    finally:
        box.close()
    assert [m["X-Selsmtp-Number"] for m in messages] == ["1", None, "2"]
    assert messages[2]["Subject"] == "mine"
    assert messages[2].get_payload() == "found\n"


# -- what a crash leaves -----------------------------------------------------------


def _write_then_die(keep: Callable[[bytes], int]) -> None:
    """The next batch written puts ``keep(data)`` of its bytes in the file, and the
    process dies there (exit status 3)."""

    def write_some(fd: int, pieces: Sequence[bytes]) -> int:
        data = b"".join(pieces)
        os.write(fd, data[: keep(data)])
        os._exit(3)

    durable.write_all = write_some  # type: ignore[assignment]


def _crash_after_the_fixup(path: str, fmt: str, boot: str, cut: str) -> None:
    """Child: store one message, let another program leave a torn record, then die
    with only the fix-up (``cut="fixup"``) or all but one byte of the batch written."""
    crashing = FileStore(path, **store_options(fmt), boot=boot)
    crashing.try_append([deliver()])
    append_foreign(Path(path), TORN[fmt])
    _write_then_die((lambda data: 2) if cut == "fixup" else (lambda data: len(data) - 1))
    crashing.try_append([deliver(), deliver()])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cut", ["fixup", "record"])
@pytest.mark.parametrize("reboot", [False, True], ids=["crash", "reboot"])
def test_a_crash_right_after_the_fixup_cuts_only_our_own_bytes(
    open_store: OpenStore, mailbox: Path, fmt: str, cut: str, reboot: bool
) -> None:
    child = multiprocessing.get_context("spawn").Process(
        target=_crash_after_the_fixup, args=(str(mailbox), fmt, "boot-one", cut)
    )
    child.start()
    child.join(WAIT)
    assert child.exitcode == 3
    assert mailbox.read_bytes().startswith(RECORD[fmt](1) + TORN[fmt] + b"\n\n")

    mailbox_store = open_store(fmt, boot="boot-two" if reboot else "boot-one")

    assert mailbox.read_bytes() == RECORD[fmt](1) + TORN[fmt]  # nothing of theirs cut
    numbers = mailbox_store.try_append([deliver()])
    assert numbers is not None and numbers[0] > 3  # 2 and 3 stay reserved
    assert mailbox.read_bytes() == (RECORD[fmt](1) + TORN[fmt] + b"\n\n" + RECORD[fmt](numbers[0]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_fixup_is_in_the_committed_length(
    open_store: OpenStore, mailbox: Path, fmt: str
) -> None:
    first = open_store(fmt)
    first.try_append([deliver()])
    append_foreign(mailbox, TORN[fmt])
    first.try_append([deliver()])
    first.close()
    state = durable.State.decode(Path(str(mailbox) + ".selsmtp").read_bytes())
    assert state is not None
    assert state.size == mailbox.stat().st_size

    open_store(fmt).try_append([deliver()])  # no new fix-up, no warning: a boundary

    assert mailbox.read_bytes() == (
        RECORD[fmt](1) + TORN[fmt] + b"\n\n" + RECORD[fmt](2) + RECORD[fmt](3)
    )


# -- cost ----------------------------------------------------------------------------


def test_no_read_of_the_file_while_only_selsmtp_writes_it(
    open_store: OpenStore, mailbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mailbox_store = open_store()
    mailbox_store.try_append([deliver()])
    reads: list[int] = []
    real_pread = os.pread

    def counted(fd: int, size: int, offset: int) -> bytes:
        reads.append(fd)
        return real_pread(fd, size, offset)

    monkeypatch.setattr(os, "pread", counted)
    for _ in range(5):
        mailbox_store.try_append([deliver(), deliver()])
    assert reads == []


def _crash_mid_append(path: str, fmt: str) -> None:
    """Child: store one message, then die with all but one byte of the next written."""
    crashing = FileStore(path, **store_options(fmt))
    crashing.try_append([deliver()])
    _write_then_die(lambda data: len(data) - 1)
    crashing.try_append([deliver()])


@pytest.mark.parametrize("fmt", FORMATS)
def test_bytes_past_the_end_the_torn_batch_could_reach_are_never_cut(
    open_store: OpenStore, mailbox: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The batch cut short could have ended one byte later at most; another program
    # appended more than that while selsmtp was down: those bytes are not ours.
    child = multiprocessing.get_context("spawn").Process(
        target=_crash_mid_append, args=(str(mailbox), fmt)
    )
    child.start()
    child.join(WAIT)
    assert child.exitcode == 3
    append_foreign(mailbox, TORN[fmt])
    left = mailbox.read_bytes()

    with caplog.at_level(logging.WARNING, logger="selsmtp.store"):
        mailbox_store = open_store(fmt)
        assert mailbox.read_bytes() == left  # nothing cut
        assert mailbox_store.try_append([deliver()]) == [3]

    assert mailbox.read_bytes() == left + b"\n\n" + RECORD[fmt](3)
    assert any("kept a torn tail" in r.getMessage() for r in caplog.records)


def _crash_before_the_batch(path: str, fmt: str) -> None:
    """Child: store one message, then die with the next batch marked pending in the
    state line and none of its bytes written."""
    crashing = FileStore(path, **store_options(fmt))
    crashing.try_append([deliver()])
    _write_then_die(lambda data: 0)
    crashing.try_append([deliver()])


@pytest.mark.parametrize("fmt", FORMATS)
def test_bytes_appended_where_a_batch_left_nothing_are_not_taken_for_its_torn_tail(
    open_store: OpenStore, mailbox: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The crash came after the state line named the batch, before any of its bytes;
    # another program then appended a few bytes that begin no record head of ours.
    # They fit in the space the batch could have filled, but they are not ours.
    child = multiprocessing.get_context("spawn").Process(
        target=_crash_before_the_batch, args=(str(mailbox), fmt)
    )
    child.start()
    child.join(WAIT)
    assert child.exitcode == 3
    assert mailbox.read_bytes() == RECORD[fmt](1)
    append_foreign(mailbox, b"another program's line\n")
    left = mailbox.read_bytes()

    with caplog.at_level(logging.WARNING, logger="selsmtp.store"):
        mailbox_store = open_store(fmt)
        assert mailbox.read_bytes() == left  # nothing cut
        numbers = mailbox_store.try_append([deliver()])

    assert numbers is not None
    assert mailbox.read_bytes() == left + b"\n" + RECORD[fmt](numbers[0])
    assert not any("removed a torn tail" in r.getMessage() for r in caplog.records)
