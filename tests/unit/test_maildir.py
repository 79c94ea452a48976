"""MaildirStore on real folders in tmp_path: layout, names, reading back, numbers,
group commit, failures and crashes.

Messages are read back with the stdlib's ``mailbox.Maildir`` and must equal, byte for
byte, the trace header selsmtp adds and what the client sent with CRLF as LF.
Crashes are real (a child process dies with ``os._exit``), and so is the second
server that must be refused (``lockf`` locks belong to the process).
"""

from __future__ import annotations

import errno
import io
import logging
import mailbox
import multiprocessing
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from selsmtp import formats, maildir
from selsmtp.durable import StartupError, StoreError
from selsmtp.maildir import MaildirStore
from selsmtp.session import Deliver, Envelope

pytestmark = pytest.mark.timeout(60)

NAME = "mx.test"
HOST = "host.test"
NOW = 1_700_000_000.125
WAIT = 10.0
ENVELOPE = Envelope("client.test", "alice@example.org", ("bob@example.net",))
NAME_PATTERN = re.compile(r"(\d+)\.M(\d{6})P(\d+)Q(\d+)\.host\.test")

BODIES = {
    "plain": b"Subject: hi\r\n\r\nHello.\r\n",
    "from-lines": b"From me\r\n>From you\r\n>>From them\r\n",
    "dots": b".\r\n..\r\n.x\r\n",
    "eight-bit": b"\xff\xfe\x00caf\xc3\xa9\r\n",
    "bare-cr-lf": b"a\rb\nc\r\n",
    "no-trailing-newline": b"Subject: x\r\n\r\nno newline",
    "empty": b"",
}

OpenStore = Callable[..., MaildirStore]


def deliver(body: Any = b"hello\r\n", reverse_path: str = "alice@example.org") -> Deliver:
    return Deliver(Envelope("client.test", reverse_path, ("bob@example.net",)), body)


def expected(number: int, body: bytes, reverse_path: str = "alice@example.org") -> bytes:
    envelope = Envelope("client.test", reverse_path, ("bob@example.net",))
    return formats.trace_header(number, envelope, NAME, NOW) + body.replace(b"\r\n", b"\n")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "Maildir"


@pytest.fixture
def open_store(folder: Path) -> Iterator[OpenStore]:
    """``open_store(path=folder)``; every store is closed at teardown."""
    opened: list[MaildirStore] = []

    def open_one(path: Path = folder, **options: Any) -> MaildirStore:
        options.setdefault("clock", lambda: NOW)
        options.setdefault("host", HOST)
        opened.append(MaildirStore(str(path), NAME, **options))
        return opened[-1]

    yield open_one
    for one in opened:
        one.close()


def read_back(folder: Path) -> dict[int, bytes]:
    """Every message of the Maildir by its X-Selsmtp-Number, read with mailbox.Maildir."""
    box = mailbox.Maildir(str(folder), create=False)
    messages = {}
    for key in box.iterkeys():
        data = box.get_bytes(key)
        number = int(box.get_message(key)["X-Selsmtp-Number"])
        assert number not in messages, f"number {number} twice"
        messages[number] = data
    return messages


def files(folder: Path, sub: str) -> list[str]:
    return sorted(os.listdir(folder / sub))


# -- layout and names -----------------------------------------------------------------


def test_the_folder_and_tmp_new_cur_are_created(open_store: OpenStore, folder: Path) -> None:
    open_store()

    assert sorted(p.name for p in folder.iterdir()) == [
        ".selsmtp",
        ".selsmtp.lock",
        "cur",
        "new",
        "tmp",
    ]
    assert all((folder / sub).stat().st_mode & 0o777 == 0o700 for sub in ("tmp", "new", "cur"))


def test_an_existing_maildir_is_used_as_it_is(open_store: OpenStore, folder: Path) -> None:
    mailbox.Maildir(str(folder), create=True).add(b"Subject: old\n\nold\n")

    open_store().try_append([deliver()])

    assert len(files(folder, "new")) == 2


@pytest.mark.parametrize("where", ["a-file", "missing-parent", "sub-is-a-file"])
def test_an_unusable_folder_is_a_startup_error(tmp_path: Path, where: str) -> None:
    path = tmp_path / "Maildir"
    if where == "a-file":
        path.write_bytes(b"")
    elif where == "missing-parent":
        path = tmp_path / "missing" / "Maildir"
    else:
        path.mkdir()
        (path / "new").write_bytes(b"")

    with pytest.raises(StartupError) as error:
        MaildirStore(str(path), NAME)

    assert "\n" not in str(error.value)
    assert str(path) in str(error.value)


def test_names_follow_maildir5_and_are_unique(open_store: OpenStore, folder: Path) -> None:
    md = open_store()
    md.try_append([deliver() for _ in range(5)])
    md.try_append([deliver()])

    names = files(folder, "new")
    assert len(set(names)) == 6
    for name in names:
        match = NAME_PATTERN.fullmatch(name)
        assert match, name
        assert (int(match[1]), int(match[2]), int(match[3])) == (
            1_700_000_000,
            125_000,
            os.getpid(),
        )
    counts = sorted(int(NAME_PATTERN.fullmatch(n)[4]) for n in names)  # type: ignore[index]
    assert counts == list(range(counts[0], counts[0] + 6))
    assert files(folder, "tmp") == []


def test_slash_and_colon_in_the_host_name_are_escaped() -> None:
    assert maildir.safe_host_name("a/b:c.d") == "a\\057b\\072c.d"


# -- reading back -----------------------------------------------------------------------


def test_every_body_reads_back_exactly_with_mailbox_maildir(
    open_store: OpenStore, folder: Path
) -> None:
    bodies = list(BODIES.values())
    md = open_store()

    assert md.try_append([deliver(body) for body in bodies]) == list(range(1, len(bodies) + 1))
    assert md.try_append([deliver(b"bounce\r\n", "")]) == [len(bodies) + 1]

    messages = read_back(folder)
    assert messages == {
        **{n: expected(n, body) for n, body in enumerate(bodies, 1)},
        len(bodies) + 1: expected(len(bodies) + 1, b"bounce\r\n", ""),
    }
    assert messages[len(bodies) + 1].startswith(b"Return-Path: <>\n")


def test_a_spooled_body_is_stored_like_one_in_memory(
    open_store: OpenStore, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(formats, "CHUNK", 3)
    body = b"".join(BODIES.values()) + b"\r\n"

    open_store().try_append([deliver(io.BytesIO(body))])

    assert read_back(folder) == {1: expected(1, body)}


def test_the_stdlib_sees_the_headers(open_store: OpenStore, folder: Path) -> None:
    open_store().try_append([deliver(b"Subject: hello\r\n\r\nbody\r\n")])

    [message] = list(mailbox.Maildir(str(folder), create=False))

    assert message["Subject"] == "hello"
    assert message["Return-Path"] == "<alice@example.org>"
    assert message["Received"].startswith("from client.test by mx.test (CS4410MP3);")
    assert message.get_subdir() == "new"


# -- numbers ----------------------------------------------------------------------------


def test_numbers_continue_across_reopen(open_store: OpenStore, folder: Path) -> None:
    first = open_store()
    assert first.try_append([deliver(), deliver()]) == [1, 2]
    first.close()

    second = open_store()

    assert second.last_number == 2
    assert second.try_append([deliver()]) == [3]
    assert sorted(read_back(folder)) == [1, 2, 3]


@pytest.mark.parametrize("damage", ["deleted", "deleted-with-the-lock-file"])
def test_without_a_state_file_the_last_number_is_read_from_new_and_cur(
    open_store: OpenStore, folder: Path, damage: str
) -> None:
    first = open_store()
    first.try_append([deliver() for _ in range(4)])
    first.close()
    newest = max(files(folder, "new"), key=lambda n: int(NAME_PATTERN.fullmatch(n)[4]))  # type: ignore[index]
    os.rename(folder / "new" / newest, folder / "cur" / (newest + ":2,S"))
    (folder / "cur" / ".hidden").write_bytes(b"X-Selsmtp-Number: 99\n")
    (folder / ".selsmtp").unlink()
    if damage == "deleted-with-the-lock-file":  # the scan is all that is left
        (folder / ".selsmtp.lock").unlink()

    second = open_store()

    assert second.last_number == 4
    assert second.try_append([deliver()]) == [5]


def test_a_second_server_on_the_same_maildir_is_refused(
    open_store: OpenStore, folder: Path
) -> None:
    open_store()
    context = multiprocessing.get_context("spawn")
    result = context.Queue()
    child = context.Process(target=_try_to_open, args=(str(folder), result))
    child.start()
    message = result.get(timeout=WAIT)
    child.join(WAIT)

    assert "another selsmtp" in message


def _try_to_open(path: str, result: Any) -> None:
    try:
        MaildirStore(path, NAME).close()
        result.put("opened")
    except StartupError as exc:
        result.put(str(exc))


# -- group commit -------------------------------------------------------------------------


class CountingFsync:
    """Stands in for ``os.fsync``; records what each call synced, fails on demand."""

    def __init__(self) -> None:
        self.real = os.fsync
        self.synced: list[str] = []
        self.fails: Callable[[str], bool] = lambda what: False

    def __call__(self, fd: int) -> None:
        what = os.readlink(f"/proc/self/fd/{fd}")
        if self.fails(what):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.synced.append(what)
        self.real(fd)


@pytest.fixture
def fsync(monkeypatch: pytest.MonkeyPatch) -> CountingFsync:
    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    counting = CountingFsync()
    monkeypatch.setattr(os, "fsync", counting)  # the store takes os.fsync when it is made
    return counting


def test_a_batch_is_one_fsync_per_file_one_for_new_and_one_for_the_state(
    open_store: OpenStore, folder: Path, fsync: CountingFsync
) -> None:
    md = open_store()
    fsync.synced.clear()

    md.try_append([deliver() for _ in range(5)])

    kinds = ["file" if "/Maildir/tmp/" in what else Path(what).name for what in fsync.synced]
    assert kinds == ["file"] * 5 + ["new", ".selsmtp"]


@pytest.mark.parametrize("which", ["a-message", "new", "state"])
def test_a_failed_fsync_leaves_no_message_and_gives_the_numbers_back(
    open_store: OpenStore, folder: Path, fsync: CountingFsync, which: str
) -> None:
    md = open_store()
    md.try_append([deliver()])
    target = {"a-message": "/Maildir/tmp/", "new": "/Maildir/new", "state": ".selsmtp"}[which]
    fsync.fails = lambda what: what.endswith(target) or (which == "a-message" and target in what)

    with pytest.raises(StoreError, match="Input/output error"):
        md.try_append([deliver(), deliver(), deliver()])

    assert len(files(folder, "new")) == 1
    assert files(folder, "tmp") == []
    assert md.last_number == 1
    fsync.fails = lambda what: False
    assert md.try_append([deliver()]) == [2]
    assert sorted(read_back(folder)) == [1, 2]


def test_a_message_that_cannot_be_taken_back_keeps_its_number(
    open_store: OpenStore, folder: Path, fsync: CountingFsync, monkeypatch: pytest.MonkeyPatch
) -> None:
    # new/'s fsync fails, and so does removing the batch's files from new/ (a dying
    # disk): they stay there, numbered, so their numbers are not given out again.
    md = open_store()
    md.try_append([deliver()])
    fsync.fails = lambda what: what.endswith("/Maildir/new")
    real_unlink = os.unlink

    def unlink(path: Any, *, dir_fd: int | None = None) -> None:
        if dir_fd is not None or "/new/" in str(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(StoreError):
        md.try_append([deliver(), deliver()])
    monkeypatch.setattr(os, "unlink", real_unlink)
    fsync.fails = lambda what: False

    assert md.try_append([deliver()]) == [4]
    assert sorted(read_back(folder)) == [1, 2, 3, 4]


def test_a_failed_rename_takes_back_the_files_already_in_new(
    open_store: OpenStore, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    md = open_store()
    real_rename = os.rename
    renamed: list[str] = []

    def rename(source: Any, target: Any, **dir_fds: Any) -> None:
        if len(renamed) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        renamed.append(str(target))
        real_rename(source, target, **dir_fds)

    monkeypatch.setattr(os, "rename", rename)

    with pytest.raises(StoreError, match="No space left"):
        md.try_append([deliver() for _ in range(4)])

    monkeypatch.undo()
    assert files(folder, "new") == []
    assert files(folder, "tmp") == []
    assert md.try_append([deliver()]) == [1]


def test_a_message_a_reader_took_before_the_failure_keeps_its_number(
    open_store: OpenStore, folder: Path, fsync: CountingFsync
) -> None:
    md = open_store()

    def reader_moves_then_fsync_fails(what: str) -> bool:
        if not what.endswith("/Maildir/new"):
            return False
        for name in os.listdir(folder / "new"):  # mutt opened the folder meanwhile
            os.rename(folder / "new" / name, folder / "cur" / (name + ":2,S"))
        return True

    fsync.fails = reader_moves_then_fsync_fails

    with pytest.raises(StoreError):
        md.try_append([deliver(), deliver()])

    assert len(files(folder, "cur")) == 2  # seen: it cannot be taken back
    assert md.last_number == 2  # so its numbers are not given out again
    fsync.fails = lambda what: False
    assert md.try_append([deliver()]) == [3]


def test_a_failing_body_leaves_nothing(open_store: OpenStore, folder: Path) -> None:
    class Broken(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    md = open_store()
    with pytest.raises(StoreError):
        md.try_append([deliver(), deliver(Broken())])

    assert files(folder, "new") == files(folder, "tmp") == []
    assert md.try_append([deliver()]) == [1]


# -- crashes ------------------------------------------------------------------------------


def _crash_before_the_renames(path: str) -> None:
    """Child process: store one message, then die with a batch written to tmp/ only."""
    md = MaildirStore(path, NAME, host=HOST)
    md.try_append([deliver()])
    os.rename = lambda source, target, **dir_fds: os._exit(3)  # type: ignore[assignment]
    md.try_append([deliver(), deliver()])


def _crash_between_renames(path: str) -> None:
    """Child process: die after the first of two files reached new/."""
    md = MaildirStore(path, NAME, host=HOST)
    real_rename = os.rename

    def rename(source: Any, target: Any, **dir_fds: Any) -> None:
        real_rename(source, target, **dir_fds)
        os._exit(3)

    os.rename = rename  # type: ignore[assignment]
    md.try_append([deliver(b"one\r\n"), deliver(b"two\r\n")])


def test_tmp_files_left_by_a_crash_are_removed_at_start_up_and_logged(
    open_store: OpenStore, folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    child = multiprocessing.get_context("spawn").Process(
        target=_crash_before_the_renames, args=(str(folder),)
    )
    child.start()
    child.join(WAIT)
    assert child.exitcode == 3
    assert len(files(folder, "tmp")) == 2
    foreign = folder / "tmp" / "1700000000.12345_6.otherhost"
    foreign.write_bytes(b"another delivery agent's file\n")

    with caplog.at_level(logging.WARNING, logger="selsmtp.maildir"):
        md = open_store()

    assert files(folder, "tmp") == [foreign.name]  # not ours: left alone
    assert "removed 2 unfinished message files" in caplog.text
    assert "messages 2-3 was cut short" in caplog.text
    assert md.last_number == 3  # the crashed batch's numbers stay reserved
    assert md.try_append([deliver()]) == [4]
    assert sorted(read_back(folder)) == [1, 4]


def test_a_message_that_reached_new_before_a_crash_stays_whole(
    open_store: OpenStore, folder: Path
) -> None:
    child = multiprocessing.get_context("spawn").Process(
        target=_crash_between_renames, args=(str(folder),)
    )
    child.start()
    child.join(WAIT)
    assert child.exitcode == 3

    md = open_store()

    messages = read_back(folder)
    assert list(messages) == [1]
    assert messages[1].endswith(b"\none\n")
    assert files(folder, "tmp") == []
    assert md.try_append([deliver()]) == [3]


# -- folders replaced while the server runs --------------------------------------------


@pytest.mark.parametrize("sub", ["tmp", "new"])
def test_a_folder_replaced_by_a_symlink_while_running_gets_no_mail(
    open_store: OpenStore, folder: Path, tmp_path: Path, sub: str
) -> None:
    # Anyone who can write to the Maildir can swap tmp/ or new/ for a link: the mail
    # must not go where it points (a 250 for mail outside the Maildir), nor be lost.
    store = open_store()
    assert store.try_append([deliver()]) == [1]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folder / sub).rename(folder / f"{sub}.real")
    (folder / sub).symlink_to(elsewhere)

    with pytest.raises(StoreError, match=f"{sub}.*symbolic link"):
        store.try_append([deliver(b"redirected?\r\n")])

    assert os.listdir(elsewhere) == []
    (folder / sub).unlink()
    (folder / f"{sub}.real").rename(folder / sub)
    assert store.try_append([deliver(b"stored again\r\n")]) == [2]
    assert sorted(read_back(folder)) == [1, 2]


def test_a_tmp_swapped_for_a_link_after_the_batch_checked_it_is_not_written_through(
    open_store: OpenStore, folder: Path, tmp_path: Path
) -> None:
    # The race the check above cannot close: tmp/ becomes a link between the check and
    # the file's creation. Files are made in the tmp/ held open, so the link's target
    # is never written to (its mtime would change if a file were made and renamed out).
    store = open_store()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = elsewhere.stat().st_mtime_ns
    name_one = store._unique_name

    def swap_then_name(now: float) -> str:  # called after the check, before the open
        if not (folder / "tmp").is_symlink():
            (folder / "tmp").rename(folder / "tmp.real")
            (folder / "tmp").symlink_to(elsewhere)
        return name_one(now)

    store._unique_name = swap_then_name  # type: ignore[method-assign]

    assert store.try_append([deliver(b"raced\r\n")]) == [1]

    assert os.listdir(elsewhere) == []
    assert elsewhere.stat().st_mtime_ns == before
    assert sorted(read_back(folder)) == [1]
