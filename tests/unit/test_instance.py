"""The instance lock, the second record of the numbers, and the folder fsync retry.

Real files in tmp_path. ``flock`` locks belong to the open file, so two stores in one
process already conflict: no second process is needed to see the lock refuse.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from selsmtp import instance
from selsmtp.maildir import MaildirStore
from selsmtp.store import FileStore, StartupError, StoreError, cs4410_renderer
from tests.stores import NAME, deliver, numbers_in

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def mailbox(tmp_path: Path) -> Path:
    return tmp_path / "mailbox"


@pytest.fixture
def opened() -> Iterator[list[Any]]:
    stores: list[Any] = []
    yield stores
    for one in stores:
        one.close()


def open_file_store(opened: list[Any], path: Path, **options: Any) -> FileStore:
    opened.append(FileStore(str(path), cs4410_renderer(NAME), **options))
    return opened[-1]  # type: ignore[no-any-return]


def movemail(mailbox: Path) -> list[int]:
    with mailbox.open("r+b") as consumer:
        fcntl.lockf(consumer, fcntl.LOCK_EX)
        taken = numbers_in(mailbox)
        consumer.truncate(0)
    return taken


# -- one server per mailbox -------------------------------------------------------


def test_a_second_store_on_one_mailbox_is_refused_naming_the_holder(
    opened: list[Any], mailbox: Path
) -> None:
    open_file_store(opened, mailbox)

    with pytest.raises(StartupError) as error:
        open_file_store(opened, mailbox, instance_wait=0.2)

    assert str(mailbox) in str(error.value)
    assert f"pid {os.getpid()}" in str(error.value)


def test_the_lock_is_free_again_once_the_store_is_closed(opened: list[Any], mailbox: Path) -> None:
    first = open_file_store(opened, mailbox)
    first.try_append([deliver()])
    first.close()

    assert open_file_store(opened, mailbox, instance_wait=0.2).try_append([deliver()]) == [2]


def test_a_maildir_uses_the_same_lock(opened: list[Any], tmp_path: Path) -> None:
    opened.append(MaildirStore(str(tmp_path / "Maildir"), NAME))

    with pytest.raises(StartupError, match=f"pid {os.getpid()}"):
        MaildirStore(str(tmp_path / "Maildir"), NAME, instance_wait=0.2)


def test_the_lock_is_an_flock_that_a_reader_lockf_never_meets(
    opened: list[Any], mailbox: Path
) -> None:
    open_file_store(opened, mailbox)
    lock = mailbox.with_name("mailbox" + instance.LOCK_SUFFIX)
    with lock.open("rb") as other:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(other, fcntl.LOCK_SH | fcntl.LOCK_NB)  # independent on Linux


# -- numbers never repeat -------------------------------------------------------


def test_a_deleted_state_file_and_an_emptied_mailbox_repeat_no_number(
    opened: list[Any], mailbox: Path
) -> None:
    first = open_file_store(opened, mailbox)
    first.try_append([deliver(), deliver(), deliver()])
    first.close()
    assert movemail(mailbox) == [1, 2, 3]
    mailbox.with_name("mailbox.selsmtp").unlink()

    assert open_file_store(opened, mailbox).try_append([deliver()]) == [4]


@pytest.mark.parametrize("copied", ["after-a-clean-stop", "while-running"])
def test_a_state_file_restored_from_an_older_copy_repeats_no_number(
    opened: list[Any], mailbox: Path, tmp_path: Path, copied: str
) -> None:
    state = mailbox.with_name("mailbox.selsmtp")
    first = open_file_store(opened, mailbox)
    first.try_append([deliver(), deliver()])
    if copied == "while-running":
        shutil.copy(state, tmp_path / "backup")
    first.close()
    if copied == "after-a-clean-stop":
        shutil.copy(state, tmp_path / "backup")
    second = open_file_store(opened, mailbox)
    second.try_append([deliver(), deliver(), deliver()])
    second.close()
    assert movemail(mailbox) == [1, 2, 3, 4, 5]
    shutil.copy(tmp_path / "backup", state)  # the older copy comes back

    assert open_file_store(opened, mailbox).try_append([deliver()]) == [6]


def test_after_a_reboot_a_restored_copy_continues_past_the_durable_reserve(
    opened: list[Any], mailbox: Path, tmp_path: Path
) -> None:
    state = mailbox.with_name("mailbox.selsmtp")
    first = open_file_store(opened, mailbox, boot="one")
    first.try_append([deliver()])
    first.close()
    shutil.copy(state, tmp_path / "backup")
    second = open_file_store(opened, mailbox, boot="one")
    second.try_append([deliver(), deliver()])
    second.close()
    movemail(mailbox)
    shutil.copy(tmp_path / "backup", state)

    assert open_file_store(opened, mailbox, boot="two").try_append([deliver()]) == [4]


def test_a_maildir_emptied_without_its_state_file_repeats_no_number(
    opened: list[Any], tmp_path: Path
) -> None:
    folder = tmp_path / "Maildir"
    first = MaildirStore(str(folder), NAME)
    first.try_append([deliver(), deliver()])
    first.close()
    for name in os.listdir(folder / "new"):
        os.unlink(folder / "new" / name)
    (folder / ".selsmtp").unlink()

    opened.append(MaildirStore(str(folder), NAME))
    assert opened[-1].try_append([deliver()]) == [3]


@pytest.mark.parametrize("damage", ["random-bytes", "truncated-line", "newer-version"])
def test_a_damaged_state_file_is_never_taken_for_a_missing_one(
    opened: list[Any], mailbox: Path, damage: str
) -> None:
    first = open_file_store(opened, mailbox)
    first.try_append([deliver(), deliver()])
    first.close()
    state = mailbox.with_name("mailbox.selsmtp")
    line = state.read_bytes()
    data = {
        "random-bytes": os.urandom(256),
        "truncated-line": line.strip()[:-12],
        "newer-version": line.replace(b"selsmtp-state 4 ", b"selsmtp-state 7 ", 1),
    }[damage]
    state.write_bytes(data)
    mail = mailbox.read_bytes()

    with pytest.raises(StartupError, match=r"damaged.*delete it") as error:
        open_file_store(opened, mailbox)

    assert str(state) in str(error.value)
    assert state.read_bytes() == data
    assert mailbox.read_bytes() == mail
    state.unlink()  # as the error says: numbers continue
    assert open_file_store(opened, mailbox).try_append([deliver()]) == [3]


# -- the folder fsync after creating the mailbox ----------------------------------


class FailingFolderFsync:
    """``os.fsync`` that fails on a folder while ``fail`` is set, counting the
    folder fsyncs that succeeded."""

    def __init__(self) -> None:
        self.real = os.fsync
        self.fail = False
        self.folders = 0

    def __call__(self, fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            if self.fail:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            self.folders += 1
        self.real(fd)


def test_a_failed_folder_fsync_after_creating_the_mailbox_is_done_at_the_next_attempt(
    opened: list[Any], mailbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsync = FailingFolderFsync()
    monkeypatch.setattr(os, "fsync", fsync)
    mailbox_store = open_file_store(opened, mailbox)
    mailbox_store.try_append([deliver()])
    mailbox.rename(tmp_path / "taken")  # the next append creates the file again

    fsync.fail = True
    with pytest.raises(StoreError):
        mailbox_store.try_append([deliver()])
    assert mailbox.exists()  # created, but its folder entry is not durable yet
    fsync.fail = False
    folders = fsync.folders

    assert mailbox_store.try_append([deliver()]) == [2]
    assert fsync.folders > folders  # the folder was fsync'd before the 250
