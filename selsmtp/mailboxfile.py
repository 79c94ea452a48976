"""The one descriptor of a mailbox file: open, locked, followed, rotated.

The descriptor
--------------
The mailbox file is opened once, as one raw descriptor, and kept open: POSIX record
locks belong to the process and vanish when it closes *any* descriptor of the file,
so nothing else in the process ever opens it. It is opened with
:func:`~selsmtp.durable.open_regular`: a FIFO, a symbolic link, a folder or a device
at the path is never opened for writing nor followed. A file created at the path has
its folder fsync'd, and a folder fsync that failed is done again at the next open;
once per start the folder is fsync'd even if the file was there, since an earlier
process may have created it and died before doing so.

The lock is taken with ``lockf(LOCK_EX | LOCK_NB)``, so the loop never waits for a
reader. If a consumer renamed the file away, the path no longer names the file held
(``lstat``): the store lets it go (:meth:`MailboxFile.let_go`, which drops its lock)
and the next attempt opens, or creates, the file now at the path.

At a rotation (:mod:`selsmtp.rotation`) the file held is renamed and a new one takes
its place; the old descriptor is kept, still locked, until the batch ends
(:meth:`MailboxFile.release`), so that a later part that fails can still cut the
parts written into it.
"""

from __future__ import annotations

import errno
import fcntl
import os

from selsmtp import rotation
from selsmtp.durable import fsync_directory, open_regular, same_file


class MailboxFile:
    """The mailbox file at ``path`` (absolute), held as the descriptor ``fd`` (-1: none
    held; :meth:`try_lock` opens the file at the path). Every method raises
    ``OSError`` on a failed system call."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self._retired: list[int] = []  # files rotated away in this batch (still locked)
        self._rotated_to: dict[int, str] = {}  # where each of them was rotated to
        self._folder_synced = True  # False: the mailbox was created, its folder not fsync'd

    def open(self) -> None:
        """Open the file at the path at start-up, creating it if there is none, and
        make its entry in its folder durable. Raises ``OSError``:
        :class:`~selsmtp.durable.NotRegularFile` if something else is there."""
        self._folder_synced = False
        self.fd = self._open()

    def try_lock(self) -> bool:
        """Take the exclusive lock on the file held (first opening the one at the path
        if none is held); False if another process holds a lock on it."""
        if self.fd < 0:  # reopening failed last time (its folder was gone)
            self.fd = self._open()
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def at_path(self) -> bool:
        """True if the path still names the file held (a consumer may have renamed it)."""
        return same_file(self.path, self.fd)

    def let_go(self) -> None:
        """Close the file held, renamed away (which drops its lock): the next
        :meth:`try_lock` opens the file at the path."""
        os.close(self.fd)
        self.fd = -1

    def rotate(self, target: str) -> None:
        """Rename the file held to ``target`` and hold the new file begun at the path,
        locked (:func:`selsmtp.rotation.begin_next_file`); the old one stays open and
        locked until :meth:`release`. If it raises, the current file stays in use."""
        fd = rotation.begin_next_file(self.path, self.fd, target)
        self._retired.append(self.fd)
        self._rotated_to[self.fd] = target
        self.fd = fd

    def rotated_to(self, fd: int) -> str | None:
        """Where the file ``fd`` was rotated to in this batch (``None``: it was not)."""
        return self._rotated_to.get(fd)

    def release(self) -> None:
        """The batch is over: unlock the file held, and close the files rotated away
        in the batch (closing them drops their locks)."""
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
        while self._retired:
            os.close(self._retired.pop())
        self._rotated_to.clear()

    def unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in [self.fd, *self._retired]:
            if fd >= 0:
                os.close(fd)
        self.fd, self._retired = -1, []

    def _open(self) -> int:
        """Open the regular file at the path, creating it if there is none (and making
        its folder durable). Raises ``OSError``:
        :class:`~selsmtp.durable.NotRegularFile` if something else is there; nothing
        is then opened or changed."""
        flags = os.O_RDWR | os.O_APPEND
        try:
            fd = open_regular(self.path, flags)
        except FileNotFoundError:
            fd = open_regular(self.path, flags | os.O_CREAT)
            self._folder_synced = False
        if not self._folder_synced:  # created now, or last time with a failed fsync
            try:
                fsync_directory(os.path.dirname(self.path))
            except OSError:
                os.close(fd)
                raise
            self._folder_synced = True
        return fd
