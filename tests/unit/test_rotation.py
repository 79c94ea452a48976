"""Rotation (``--rotate N``) of the file formats, on real files in tmp_path.

What ``PATH.A-B`` means (see ``selsmtp/rotation.py``): A..B are the numbers of the
records selsmtp wrote into that file; a file is rotated once it holds a multiple of
N. Checked here: names and contents, batches split at a boundary, restarts, consumers
that empty the file or take it away, failures in the middle of a split batch, and
real crashes (a child process that dies with ``os._exit``) at every step of a
rotation.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mailbox
import multiprocessing
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from selsmtp import formats, mailboxfile, mailindex, read_mailbox, rotation, store
from selsmtp.config import Config
from selsmtp.durable import State
from selsmtp.session import Deliver
from selsmtp.store import FileStore, StoreError, cs4410_renderer, mbox_renderer
from tests.stores import NAME, WAIT, deliver, hold_shared_lock, numbers_in, record

pytestmark = pytest.mark.timeout(60)

ROTATED = re.compile(r"mailbox\.(\d+)-(\d+)")

OpenStore = Callable[..., FileStore]


def records(*numbers: int) -> bytes:
    return b"".join(record(n) for n in numbers)


def layout(folder: Path) -> dict[str, list[int]]:
    """Every mailbox file in ``folder`` (rotated ones and the current one) and the
    record numbers in it."""
    found = {}
    for entry in sorted(folder.iterdir()):
        if entry.name == "mailbox" or ROTATED.fullmatch(entry.name):
            found[entry.name] = numbers_in(entry)
    return found


@pytest.fixture
def mailbox_path(tmp_path: Path) -> Path:
    return tmp_path / "mailbox"


@pytest.fixture
def open_store(mailbox_path: Path) -> Iterator[OpenStore]:
    """``open_store(rotate=N, render=cs4410)``; every store is closed at teardown."""
    opened: list[FileStore] = []

    def open_one(rotate: int | None = 3, render: store.Renderer | None = None) -> FileStore:
        opened.append(FileStore(str(mailbox_path), render or cs4410_renderer(NAME), rotate=rotate))
        return opened[-1]

    yield open_one
    for one in opened:
        one.close()


# -- names and contents -------------------------------------------------------------------


def test_every_n_messages_the_file_is_renamed_a_b_and_a_new_one_begins(
    open_store: OpenStore, mailbox_path: Path
) -> None:
    mailbox_store = open_store(rotate=3)

    for number in range(1, 8):
        assert mailbox_store.try_append([deliver()]) == [number]

    assert layout(mailbox_path.parent) == {
        "mailbox": [7],
        "mailbox.1-3": [1, 2, 3],
        "mailbox.4-6": [4, 5, 6],
    }
    assert (mailbox_path.parent / "mailbox.1-3").read_bytes() == records(1, 2, 3)


def test_the_file_is_rotated_as_soon_as_it_holds_the_nth_message(
    open_store: OpenStore, mailbox_path: Path
) -> None:
    mailbox_store = open_store(rotate=2)

    mailbox_store.try_append([deliver(), deliver()])

    assert layout(mailbox_path.parent) == {"mailbox": [], "mailbox.1-2": [1, 2]}
    assert mailbox_path.read_bytes() == b""


@pytest.mark.parametrize("size", [2, 4, 5, 9, 10, 11])
def test_a_batch_that_crosses_boundaries_is_split_at_them(
    open_store: OpenStore, mailbox_path: Path, size: int
) -> None:
    mailbox_store = open_store(rotate=4)
    mailbox_store.try_append([deliver()])

    assert mailbox_store.try_append([deliver() for _ in range(size)]) == list(range(2, size + 2))

    last = size + 1
    expected = {f"mailbox.{a}-{a + 3}": list(range(a, a + 4)) for a in range(1, last - 2, 4)}
    expected["mailbox"] = list(range(last - last % 4 + 1, last + 1))
    assert layout(mailbox_path.parent) == expected


def test_rotation_of_an_mbox_reads_back_with_mailbox_mbox(tmp_path: Path) -> None:
    path = tmp_path / "mailbox"
    mbox_store = FileStore(
        str(path), mbox_renderer(NAME), rotate=2, number_pattern=formats.MBOX_NUMBER
    )
    try:
        mbox_store.try_append([deliver(b"From %d\r\n" % n) for n in range(1, 6)])
    finally:
        mbox_store.close()

    def numbers(name: str) -> list[int]:
        box = mailbox.mbox(str(tmp_path / name), create=False)
        try:
            return [int(message["X-Selsmtp-Number"]) for message in box]
        finally:
            box.close()

    assert numbers("mailbox.1-2") == [1, 2]
    assert numbers("mailbox.3-4") == [3, 4]
    assert numbers("mailbox") == [5]
    assert b"\n>From 3\n" in (tmp_path / "mailbox.3-4").read_bytes()


def test_without_rotate_nothing_is_ever_renamed(open_store: OpenStore, mailbox_path: Path) -> None:
    mailbox_store = open_store(rotate=None)
    mailbox_store.try_append([deliver() for _ in range(10)])

    assert layout(mailbox_path.parent) == {"mailbox": list(range(1, 11))}


def test_the_lock_held_by_a_reader_stops_the_batch_and_the_rotation(
    open_store: OpenStore, mailbox_path: Path
) -> None:
    mailbox_store = open_store(rotate=2)
    mailbox_store.try_append([deliver()])
    context = multiprocessing.get_context("spawn")
    locked, release = context.Event(), context.Event()
    reader = context.Process(target=hold_shared_lock, args=(str(mailbox_path), locked, release))
    reader.start()
    try:
        assert locked.wait(WAIT)
        assert mailbox_store.try_append([deliver(), deliver()]) is None
        assert layout(mailbox_path.parent) == {"mailbox": [1]}
    finally:
        release.set()
        reader.join(WAIT)

    assert mailbox_store.try_append([deliver(), deliver()]) == [2, 3]
    assert layout(mailbox_path.parent) == {"mailbox.1-2": [1, 2], "mailbox": [3]}


# -- restarts --------------------------------------------------------------------------------


def test_the_count_since_the_last_rotation_persists_across_restarts(
    open_store: OpenStore, mailbox_path: Path
) -> None:
    first = open_store(rotate=5)
    first.try_append([deliver() for _ in range(3)])
    first.close()

    second = open_store(rotate=5)
    second.try_append([deliver() for _ in range(3)])

    assert layout(mailbox_path.parent) == {"mailbox": [6], "mailbox.1-5": [1, 2, 3, 4, 5]}


def test_a_smaller_n_after_a_restart_rotates_the_file_before_the_next_record(
    open_store: OpenStore, mailbox_path: Path
) -> None:
    first = open_store(rotate=10)
    first.try_append([deliver() for _ in range(7)])
    first.close()

    second = open_store(rotate=3)
    second.try_append([deliver()])

    assert layout(mailbox_path.parent) == {"mailbox": [8], "mailbox.1-7": list(range(1, 8))}


def test_rotation_turned_on_later_names_the_file_from_its_first_record(
    open_store: OpenStore, mailbox_path: Path
) -> None:
    first = open_store(rotate=None)
    first.try_append([deliver() for _ in range(5)])
    first.close()

    open_store(rotate=4).try_append([deliver()])

    assert layout(mailbox_path.parent) == {"mailbox": [6], "mailbox.1-5": list(range(1, 6))}


def test_a_lost_state_file_is_rebuilt_from_the_rotated_names_and_the_file(
    open_store: OpenStore, mailbox_path: Path
) -> None:
    first = open_store(rotate=4)
    first.try_append([deliver() for _ in range(4)])  # the current file is empty now
    first.close()
    state = mailbox_path.with_name("mailbox" + store.STATE_SUFFIX)
    state.unlink()

    second = open_store(rotate=4)
    assert second.last_number == 4
    second.try_append([deliver() for _ in range(2)])
    second.close()
    state.unlink()

    third = open_store(rotate=4)
    assert third.last_number == 6
    third.try_append([deliver() for _ in range(3)])  # first is found in the file: 5
    assert layout(mailbox_path.parent) == {
        "mailbox": [9],
        "mailbox.1-4": [1, 2, 3, 4],
        "mailbox.5-8": [5, 6, 7, 8],
    }


def test_a_version_1_state_line_is_still_read() -> None:
    line = "selsmtp-state 1 41 100 2049 77 -1"

    data = f"{line} {zlib.crc32(line.encode()):08x}\n".encode()
    state = State.decode(data)

    assert state is not None
    assert (state.number, state.size, state.dev, state.ino, state.pending, state.first) == (
        41,
        100,
        2049,
        77,
        -1,
        -1,
    )
    assert State.decode(state.encode()) is not None


# -- consumers -------------------------------------------------------------------------------


def test_a_file_emptied_by_a_consumer_keeps_its_a_b(
    open_store: OpenStore, mailbox_path: Path
) -> None:
    mailbox_store = open_store(rotate=4)
    mailbox_store.try_append([deliver(), deliver()])
    with mailbox_path.open("r+b") as consumer:  # movemail: under the lock, read and empty
        fcntl.lockf(consumer, fcntl.LOCK_EX)
        consumer.truncate(0)

    mailbox_store.try_append([deliver(), deliver(), deliver()])

    assert layout(mailbox_path.parent) == {"mailbox": [5], "mailbox.1-4": [3, 4]}


def test_a_file_renamed_away_by_a_consumer_leaves_the_rotation(
    open_store: OpenStore, mailbox_path: Path
) -> None:
    mailbox_store = open_store(rotate=4)
    mailbox_store.try_append([deliver(), deliver()])
    mailbox_path.rename(mailbox_path.with_name("taken"))

    mailbox_store.try_append([deliver(), deliver(), deliver()])

    assert layout(mailbox_path.parent) == {"mailbox": [5], "mailbox.3-4": [3, 4]}
    assert numbers_in(mailbox_path.with_name("taken")) == [1, 2]


# -- failures ----------------------------------------------------------------------------------

FAIL = b"FAIL"


def failing_renderer() -> store.Renderer:
    normal = cs4410_renderer(NAME)

    def render(number: int, message: Deliver, now: float) -> Iterable[bytes]:
        if message.body.startswith(FAIL):
            yield b"partial"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        yield from normal(number, message, now)

    return render


def test_a_failure_after_the_boundary_takes_back_the_whole_batch(
    open_store: OpenStore, mailbox_path: Path
) -> None:
    mailbox_store = open_store(rotate=4, render=failing_renderer())
    mailbox_store.try_append([deliver(), deliver()])

    with pytest.raises(StoreError, match="No space left"):
        mailbox_store.try_append([deliver(), deliver(), deliver(), deliver(FAIL)])

    # 3 and 4 were committed into the file now named 1-4, then cut out again: nothing
    # of the batch is left anywhere, and its numbers up to the boundary stay reserved.
    assert layout(mailbox_path.parent) == {"mailbox": [], "mailbox.1-4": [1, 2]}
    assert mailbox_store.last_number == 4
    assert mailbox_store.try_append([deliver()]) == [5]
    mailbox_store.close()
    assert open_store(rotate=4).try_append([deliver()]) == [6]
    assert layout(mailbox_path.parent) == {"mailbox": [5, 6], "mailbox.1-4": [1, 2]}


def test_a_failure_after_the_boundary_leaves_the_rotated_file_its_index(
    open_store: OpenStore, mailbox_path: Path
) -> None:
    # The part cut out of the rotated file loses its entries; the records before it
    # keep theirs, so readers still tell them from look-alikes in their bodies.
    mailbox_store = open_store(rotate=4, render=failing_renderer())
    mailbox_store.try_append([deliver(), deliver()])

    with pytest.raises(StoreError):
        mailbox_store.try_append([deliver(), deliver(), deliver(), deliver(FAIL)])

    rotated = mailbox_path.with_name("mailbox.1-4")
    assert mailindex.load(str(rotated), rotated.stat()) == [
        (0, len(record(1)), 1),
        (len(record(1)), len(record(2)), 2),
    ]
    box = read_mailbox(rotated)
    assert ([m.number for m in box], box.warnings, box.problems) == ([1, 2], (), ())


def test_a_failure_before_the_boundary_gives_the_numbers_back(
    open_store: OpenStore, mailbox_path: Path
) -> None:
    mailbox_store = open_store(rotate=4, render=failing_renderer())
    mailbox_store.try_append([deliver()])

    with pytest.raises(StoreError):
        mailbox_store.try_append([deliver(), deliver(FAIL), deliver(), deliver()])

    assert layout(mailbox_path.parent) == {"mailbox": [1]}
    assert mailbox_store.try_append([deliver() for _ in range(4)]) == [2, 3, 4, 5]
    assert layout(mailbox_path.parent) == {"mailbox": [5], "mailbox.1-4": [1, 2, 3, 4]}


def test_a_rotation_that_fails_is_logged_and_tried_again_later(
    open_store: OpenStore, mailbox_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Someone else's file already has the name the first rotation wants.
    mailbox_store = open_store(rotate=2)
    squatter = mailbox_path.with_name("mailbox.1-2")
    squatter.write_bytes(b"not ours\n")

    with caplog.at_level(logging.ERROR, logger="selsmtp.store"):
        assert mailbox_store.try_append([deliver(), deliver(), deliver()]) == [1, 2, 3]

    assert "cannot rotate" in caplog.text
    assert squatter.read_bytes() == b"not ours\n"  # never overwritten
    # Mail kept flowing into the file, which was rotated at the next chance, with a
    # new B. The next file ends at the next multiple of N, so the names align again.
    assert layout(mailbox_path.parent) == {
        "mailbox": [],
        "mailbox.1-2": [],
        "mailbox.1-3": [1, 2, 3],
    }
    assert mailbox_store.try_append([deliver(), deliver(), deliver()]) == [4, 5, 6]
    assert layout(mailbox_path.parent) == {
        "mailbox": [],
        "mailbox.1-2": [],
        "mailbox.1-3": [1, 2, 3],
        "mailbox.4-4": [4],
        "mailbox.5-6": [5, 6],
    }
    assert not mailbox_path.with_name("mailbox" + rotation.NEXT_SUFFIX).exists()


# -- crashes in the middle of a rotation ---------------------------------------------------------


def _crash_at(step: str, path: str) -> None:
    """Child process: store 2 messages with rotate=2, dying at ``step`` of the rotation."""
    real = {"link": os.link, "rename": os.rename, "fsync_directory": store.fsync_directory}
    target = "fsync_directory" if step == "state" else step
    calls = [0]

    def die(*args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if step == "state" and calls[0] == 1:  # the one at start-up, not the rotation's
            real["fsync_directory"](*args)
            return
        if step == "rename":
            real["rename"](*args)
        if step == "link":
            real["link"](*args)
        os._exit(3)

    if target == "fsync_directory":  # the start-up one is mailboxfile's, the rotation's store's
        mailboxfile.fsync_directory = die  # type: ignore[assignment]
        store.fsync_directory = die  # type: ignore[assignment]
    else:
        setattr(os, target, die)
    FileStore(path, cs4410_renderer(NAME), rotate=2).try_append([deliver(), deliver()])


@pytest.mark.parametrize(
    "step",
    ["link", "rename", "state"],
    ids=["after-link", "after-rename", "before-state-update"],
)
def test_a_crash_during_a_rotation_loses_and_duplicates_nothing(
    open_store: OpenStore, mailbox_path: Path, step: str
) -> None:
    child = multiprocessing.get_context("spawn").Process(
        target=_crash_at, args=(step, str(mailbox_path))
    )
    child.start()
    child.join(WAIT)
    assert child.exitcode == 3

    mailbox_store = open_store(rotate=2)
    assert mailbox_store.last_number == 2
    assert not mailbox_path.with_name("mailbox" + rotation.NEXT_SUFFIX).exists()
    mailbox_store.try_append([deliver(), deliver(), deliver()])

    assert layout(mailbox_path.parent) == {
        "mailbox": [5],
        "mailbox.1-2": [1, 2],
        "mailbox.3-4": [3, 4],
    }
    assert (mailbox_path.parent / "mailbox.1-2").stat().st_nlink == 1


def test_rotate_is_refused_for_a_maildir() -> None:
    with pytest.raises(ValueError, match="cs4410 and mbox formats only"):
        Config(format="maildir", rotate=3)
    assert Config(format="mbox", rotate=3).rotate == 3


@pytest.mark.parametrize(
    ("every", "first", "number", "due"),
    [
        (0, 1, 100, False),
        (3, -1, 3, False),
        (3, 1, 2, False),
        (3, 1, 3, True),
        (3, 4, 5, False),
        (3, 4, 6, True),
        (3, 3, 3, True),
        (3, 1, 7, True),
    ],
)
def test_a_file_is_due_once_it_reaches_a_multiple_of_n(
    every: int, first: int, number: int, due: bool
) -> None:
    assert rotation.is_due(every, first, number) is due


def test_mail_files_are_private_like_a_maildir(open_store: OpenStore, tmp_path: Path) -> None:
    # A mail spool is read by its owner only (a Maildir's folders are 0700): with the
    # usual umask 022, the mailbox, the file a rotation begins and the side files
    # that describe them are 0600, not readable by every local user.
    old = os.umask(0o022)
    try:
        mailbox_store = open_store(rotate=2)
        assert mailbox_store.try_append([deliver(), deliver(), deliver()]) == [1, 2, 3]
    finally:
        os.umask(old)

    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir() if p.is_file()}
    assert {"mailbox", "mailbox.1-2", "mailbox.selsmtp", "mailbox.selsmtp-index"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o600)
