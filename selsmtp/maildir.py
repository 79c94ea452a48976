"""A Maildir: one file per message, written in ``tmp/``, fsync'd, renamed into ``new/``.

Theory of operation
-------------------
A Maildir (maildir(5), and D. J. Bernstein's "Using maildir format") needs no lock:
a message is written under a unique name in ``tmp/`` and renamed into ``new/`` only
once it is whole and durable, so a reader (mutt, Dovecot, Python's
``mailbox.Maildir``) never sees part of one. A batch of finished messages is stored
by :meth:`MaildirStore.try_append` in one pass:

1. reserve the batch's numbers in the state file (no fsync, as in ``FileStore``);
2. for each message, create ``tmp/NAME`` (``O_EXCL``), write it, fsync it, close it;
3. rename each file to ``new/NAME``;
4. fsync ``new/`` once, which makes every rename of the batch durable;
5. record the commit in the state file and fsync it. Only now may the caller send
   the 250 replies.

That is group commit for a Maildir: one fsync per file, one for the folder and one
for the state, per batch. If any step fails, the batch's files are removed from
``tmp/`` and ``new/``, its numbers are given back and :class:`StoreError` is raised.

Names
-----
``SECONDS.MMICROSECONDSPPIDQCOUNT.HOST``, the form of maildir(5) that Python's
``mailbox`` and many delivery agents use: the time of the batch, the process id, a
delivery counter of this process, and the host name with ``/`` and ``:`` written as
``\\057`` and ``\\072``. The counter makes names unique within the process; the
process id and the time, across processes. Files are created in ``tmp/`` with
``O_EXCL``; the rename into ``new/`` relies on that uniqueness, as every Maildir
delivery agent does.

State and crashes
-----------------
``PATH/.selsmtp`` is selsmtp's state line (:class:`~selsmtp.durable.StateFile`): the
last number given out, and whether a batch was being written. Mail readers look only
inside ``tmp/``, ``new/`` and ``cur/``. While the server runs it holds the instance
lock on ``PATH/.selsmtp.lock`` (:mod:`selsmtp.instance`, the same ``flock`` as for the
file formats), so a second selsmtp on the same Maildir refuses to start instead of
handing out the same numbers; that file also keeps the second record of the numbers.

Every file is opened with :func:`~selsmtp.durable.open_regular` (never through a
symbolic link, never blocking, a regular file by ``fstat``), and ``tmp/``, ``new/``
and ``cur/`` must be real folders, not links: otherwise start-up refuses, naming the
path and what is there. Each batch looks at ``tmp/`` and ``new/`` again (``lstat``):
a link put there while the server runs gets the batch a :class:`StoreError` (451),
never the mail; files are made in the ``tmp/`` held open and renamed into the
``new/`` held open (the one fsync'd), by their descriptors, so a link put there
between that look and the write is never written through either.

After a crash, files in ``tmp/`` with selsmtp's names for this host were never
acknowledged: they are removed at start-up and logged. Files of the cut-short batch
that had already reached ``new/`` are whole; they stay, and their numbers stay
reserved. If the state file is lost, the last number is the larger of the lock
file's record and the ``X-Selsmtp-Number:`` header of every message in ``new/`` and
``cur/`` (slow for a big Maildir, but only then). A damaged state file stops the
start (:func:`~selsmtp.durable.read_state`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Callable, Sequence

from selsmtp import formats, instance
from selsmtp.durable import (
    STATE_SUFFIX,
    Fsync,
    NotRegularFile,
    StartupError,
    State,
    StateFile,
    StoreError,
    boot_id,
    check_format,
    describe,
    fsync_directory,
    maildir_names,
    open_regular,
    read_state,
    write_pieces,
)
from selsmtp.session import Deliver

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import Final

log = logging.getLogger("selsmtp.maildir")

#: the state file, inside the Maildir
STATE_NAME: Final = STATE_SUFFIX
#: the instance lock file (:mod:`selsmtp.instance`), inside the Maildir
LOCK_NAME: Final = instance.LOCK_SUFFIX
#: how far past the last number the lock file's durable record reserves numbers
RESERVED_NUMBERS: Final = 1000
#: the start of a message file that the state-less scan reads
HEAD_SIZE: Final = 16384


#: deliveries made by this process: the Q of file names. One counter for every store
#: in the process, so two stores on one folder (a restart in-process) never clash.
_deliveries = itertools.count(1)


def _no_fsync(fd: int) -> None:
    pass


def safe_host_name(host: str) -> str:
    """``host`` as maildir(5) wants it in a file name."""
    return host.replace("/", "\\057").replace(":", "\\072")


class MaildirStore:
    """A Maildir folder at ``path`` (created, with ``tmp/``, ``new/`` and ``cur/``, if
    missing). ``clock`` gives ``now``, once per batch; ``host`` goes into file names.
    Raises :class:`StartupError` if the folder cannot be used."""

    def __init__(
        self,
        path: str,
        server_name: str,
        *,
        fsync: bool = True,
        clock: Callable[[], float] = time.time,
        host: str | None = None,
        boot: str | None = None,
        instance_wait: float = instance.WAIT,
    ) -> None:
        self.path = os.path.abspath(path)
        self.state_path = os.path.join(self.path, STATE_NAME)
        self._tmp = os.path.join(self.path, "tmp")
        self._new = os.path.join(self.path, "new")
        self._server_name = server_name
        self._clock = clock
        self._fsync: Fsync = os.fsync if fsync else _no_fsync
        self._host = safe_host_name(host or socket.gethostname())
        self._pid = os.getpid()
        self._boot = boot_id() if boot is None else boot
        self._state = State()
        self._states: StateFile | None = None
        self._new_fd = -1  # new/, kept open for its fsync
        self._tmp_fd = -1  # tmp/, kept open: files are made in it by descriptor
        self._instance: instance.InstanceLock | None = None
        self._ready = False
        try:
            check_format(self.path, "maildir", None)  # reads only
            self._make_folders()
            self._instance = instance.InstanceLock(
                os.path.join(self.path, LOCK_NAME), self.path, fsync=self._fsync, wait=instance_wait
            )
            saved = read_state(self.state_path)
            check_format(self.path, "maildir", saved)
            self._instance.claim()
            self._states = StateFile(self.state_path, self._fsync)
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            self._new_fd = os.open(self._new, flags)
            self._tmp_fd = os.open(self._tmp, flags)
            self._recover(saved)
        except StartupError:
            self.close()
            raise
        except NotRegularFile as exc:
            self.close()
            raise StartupError(f"cannot use maildir {self.path}: {exc}") from exc
        except OSError as exc:
            self.close()
            name = exc.filename or self.path
            raise StartupError(f"cannot use maildir {name}: {exc.strerror or exc}") from exc
        self._ready = True

    @property
    def last_number(self) -> int:
        return self._state.number

    def close(self) -> None:
        """Record the exact last number as the reserve (see :mod:`selsmtp.instance`),
        then close every descriptor, the lock file's last."""
        if self._ready and self._state.pending < 0:
            self._ready = False
            self._state.reserved = self._state.number
            try:
                self._save_state(sync=True)
            except OSError:
                log.error("cannot update %s", self.state_path, exc_info=True)
        for fd in (self._new_fd, self._tmp_fd):
            if fd >= 0:
                os.close(fd)
        self._new_fd = self._tmp_fd = -1
        if self._states is not None:
            self._states.close()
        if self._instance is not None:
            self._instance.close()

    def try_append(self, batch: Sequence[Deliver]) -> list[int]:
        """Store each message of ``batch`` as a file in ``new/``; return their numbers.

        Never ``None``: a Maildir takes no lock. Raises :class:`StoreError` if a file
        could not be written, made durable or renamed, or the state not updated; the
        batch's files are then gone and its numbers unused (see :meth:`_roll_back`).
        """
        try:
            self._check_folders()
        except OSError as exc:
            name = exc.filename or self.path
            raise StoreError(f"cannot deliver to {self.path}: {name}: {exc.strerror}") from exc
        now = self._clock()
        state = self._state
        first = state.number + 1
        made: list[str] = []  # in tmp/
        moved: list[str] = []  # in new/
        try:
            state.number, state.pending = first + len(batch) - 1, first
            self._save_state(sync=False)
            for number, deliver in enumerate(batch, first):
                made.append(self._unique_name(now))
                self._write_file(made[-1], number, deliver, now)
            for name in made:  # into the new/ we hold and fsync, never through a link
                os.rename(name, name, src_dir_fd=self._tmp_fd, dst_dir_fd=self._new_fd)
                moved.append(name)
            self._fsync(self._new_fd)
            state.pending = -1
            self._save_state(sync=True)
        except OSError as exc:
            self._roll_back(made, moved, first - 1)
            raise StoreError(f"cannot deliver to {self.path}: {exc.strerror or exc}") from exc
        return list(range(first, state.number + 1))

    def _check_folders(self) -> None:
        """``tmp/`` and ``new/`` must still be real folders: a symbolic link put there
        while the server runs would send the mail where it points. A real ``new/`` that
        replaced ours (or a real ``tmp/``) is opened again: files are made, renamed and
        removed through the folders held open, never through a path. Raises ``OSError``
        (what is there, and where)."""
        for folder in (self._tmp, self._new):
            st = os.lstat(folder)
            if not stat.S_ISDIR(st.st_mode):
                what = f"{describe(st.st_mode)}, not a folder"
                raise NotADirectoryError(errno.ENOTDIR, what, folder)
            held = os.fstat(self._tmp_fd if folder == self._tmp else self._new_fd)
            if (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino):
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(folder, flags)
                if folder == self._tmp:
                    os.close(self._tmp_fd)
                    self._tmp_fd = fd
                else:
                    os.close(self._new_fd)
                    self._new_fd = fd

    def _unique_name(self, now: float) -> str:
        micro = int(now * 1_000_000) % 1_000_000
        return f"{int(now)}.M{micro:06d}P{self._pid}Q{next(_deliveries)}.{self._host}"

    def _write_file(self, name: str, number: int, deliver: Deliver, now: float) -> None:
        fd = open_regular(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, dir_fd=self._tmp_fd)
        try:
            envelope, body = deliver.envelope, deliver.body
            write_pieces(
                fd, formats.maildir_message(number, envelope, body, self._server_name, now)
            )
            self._fsync(fd)
        finally:
            os.close(fd)

    def _roll_back(self, made: list[str], moved: list[str], number: int) -> None:
        """Remove the failed batch's files and give its numbers back, unless a reader
        already took one of them to ``cur/``, or one cannot be removed from ``new/``:
        then the numbers stay used."""
        seen = kept = False
        for folder, names in ((self._new, moved), (self._tmp, made[len(moved) :])):
            for name in names:
                try:
                    # the new/ they were renamed into, the tmp/ they were made in
                    os.unlink(name, dir_fd=self._new_fd if folder == self._new else self._tmp_fd)
                except FileNotFoundError:
                    seen = seen or folder == self._new
                except OSError:
                    log.critical("cannot remove %s of a failed delivery", name, exc_info=True)
                    kept = kept or folder == self._new
        if moved:
            with contextlib.suppress(OSError):
                self._fsync(self._new_fd)
        if seen:
            log.error("a reader took a message of a failed delivery before it was removed")
        elif not kept:  # else it stays in new/, numbered: its numbers stay used
            self._state.number = number
        self._state.pending = -1
        try:
            self._save_state(sync=True)
        except OSError:
            log.error("cannot update %s", self.state_path, exc_info=True)

    def _save_state(self, *, sync: bool) -> None:
        """Write the state line, then the lock file's record of the numbers. A durable
        line past the reserve reserves the next :data:`RESERVED_NUMBERS`, so that the
        record is fsync'd once per that many numbers (the line itself is fsync'd with
        every batch)."""
        assert self._states is not None and self._instance is not None
        instance.save_numbers(
            self._states, self._instance, self._state, self._boot, RESERVED_NUMBERS, sync=sync
        )

    # -- start-up ----------------------------------------------------------------

    def _make_folders(self) -> None:
        """Create the folder and its tmp/, new/ and cur/ where missing. The folder
        itself may be a symbolic link (the user named it); the three inside may not,
        as mail would be written wherever they point."""
        parent = os.path.dirname(self.path)
        for folder in (self.path, self._tmp, self._new, os.path.join(self.path, "cur")):
            try:
                os.mkdir(folder, 0o700)
            except FileExistsError:
                mode = (os.stat if folder == self.path else os.lstat)(folder).st_mode
                if not stat.S_ISDIR(mode):
                    what = f"{describe(mode)}, not a folder"
                    raise NotADirectoryError(errno.ENOTDIR, what, folder) from None
                continue
            fsync_directory(parent if folder == self.path else self.path)

    def _recover(self, saved: State | None) -> None:
        assert self._instance is not None
        floor = self._instance.floor(self._boot)
        if saved is not None and self._instance.is_older(saved, self._boot):
            log.warning(
                "%s is older than the numbers recorded in %s (restored from a copy?); "
                "numbers continue after %d",
                self.state_path,
                self._instance.path,
                floor,
            )
            saved = None
        if saved is None:
            self._state.number = max(self._scan_numbers(), floor)
            if self._state.number:
                log.info(
                    "no state file; the last number in %s is %d", self.path, self._state.number
                )
        else:
            self._state = saved
            if saved.pending >= 0:
                log.warning(
                    "a delivery to %s of messages %d-%d was cut short by a crash; "
                    "those numbers stay unused",
                    self.path,
                    saved.pending,
                    saved.number,
                )
                saved.pending = -1
        self._state.format, self._state.boot = "maildir", self._boot
        self._save_state(sync=True)  # and the lock file records the numbers from now on
        self._clean_tmp()

    def _clean_tmp(self) -> None:
        """Remove the files a crash left in tmp/ (never acknowledged); leave others'."""
        ours = re.compile(rf"\d+\.M\d{{6}}P\d+Q\d+\.{re.escape(self._host)}")
        removed = 0
        for name in os.listdir(self._tmp):
            if ours.fullmatch(name):
                os.unlink(os.path.join(self._tmp, name))
                removed += 1
        if removed:
            log.warning(
                "removed %d unfinished message files from %s (a delivery cut short by a crash)",
                removed,
                self._tmp,
            )

    def _scan_numbers(self) -> int:
        """The largest X-Selsmtp-Number in new/ and cur/ (0 if none)."""
        last = 0
        for name in maildir_names(self.path):
            try:
                fd = open_regular(os.path.join(self.path, name), os.O_RDONLY)
            except FileNotFoundError:  # a reader moved it meanwhile
                continue
            try:
                found = formats.MAILDIR_NUMBER.match(os.pread(fd, HEAD_SIZE, 0))
            finally:
                os.close(fd)
            if found:
                last = max(last, int(found.group(1)))
        return last
