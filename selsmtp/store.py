"""The mailbox on disk: locked, group-committed, durable appends.

Theory of operation
-------------------
The mailbox file is opened once, as one raw descriptor, and kept open: POSIX record
locks belong to the process and vanish when it closes *any* descriptor of the file, so
nothing else in the process ever opens it. A batch of finished messages is stored by
:meth:`FileStore.try_append`:

1. take the exclusive lock with ``lockf(LOCK_EX | LOCK_NB)``; if a reader holds it,
   return ``None`` at once (the loop never blocks; the caller tries again later);
2. check that the path still names the file we hold (a consumer may have renamed it
   away; then the file is created again at the path);
3. note the file's length, then write every record of the batch through the raw
   descriptor (``writev``, looping over short writes);
4. ``fsync`` the file, then record the new committed length and last number in the
   state file beside it and ``fsync`` that;
5. release the lock. Only now may the caller send the 250 replies.

If a write or an fsync fails, the file is cut back to its length before the batch
while the lock is still held, and :class:`StoreError` is raised: nothing partial is
left for a reader to see, and nothing is acknowledged.

The state file
--------------
``PATH.selsmtp`` holds one short line: the last number given out, the mailbox length
after the last commit, the identity (device, inode) of that file, and, while a batch
is being written, the offset it started at. It makes numbers continue across
restarts without reading the mailbox, and it is the commit marker of SPEC §5.5: at
start-up, bytes past the committed length of a batch that was being written when
the process died are a torn tail and are removed. Bytes past it with no batch
in progress were appended by another program under the lock and are kept. A reader
that empties the mailbox (movemail) or renames it away needs no help from us: the
next batch sees the new length or the new file, and the numbers go on.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final

from selsmtp import formats
from selsmtp.session import Deliver

log = logging.getLogger("selsmtp.store")

#: writev takes at most IOV_MAX buffers; stay well below it.
MAX_IOV: Final = 512
#: a batch's pieces are written once this many bytes have gathered
WRITE_CHUNK: Final = 4 << 20
STATE_SUFFIX: Final = ".selsmtp"
_STATE_MAGIC: Final = "selsmtp-state 1"

Renderer = Callable[[int, Deliver], Iterable[bytes]]


class StoreError(Exception):
    """A batch could not be stored; the mailbox was left as it was before it."""


class StartupError(Exception):
    """The mailbox cannot be used; the message says why, in one line."""


def fsync_directory(path: str) -> None:
    """Make a new directory entry durable (a created file survives a crash)."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, pieces: Sequence[bytes]) -> int:
    """Write every piece to ``fd`` with ``writev``, looping over short writes."""
    views = [memoryview(piece) for piece in pieces if piece]
    total = done = 0
    while done < len(views):
        written = os.writev(fd, views[done : done + MAX_IOV])
        if written <= 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        total += written
        while done < len(views) and written >= len(views[done]):
            written -= len(views[done])
            done += 1
        if written:
            views[done] = views[done][written:]
    return total


class _State:
    """The committed state of one mailbox, as kept in its state file."""

    __slots__ = ("dev", "ino", "number", "pending", "size")

    def __init__(self) -> None:
        self.number = 0  # last number given out
        self.size = -1  # mailbox length after the last commit (-1: unknown)
        self.dev = -1
        self.ino = -1
        self.pending = -1  # offset where an unfinished batch started (-1: none)

    def encode(self) -> bytes:
        text = f"{_STATE_MAGIC} {self.number} {self.size} {self.dev} {self.ino} {self.pending}"
        return f"{text} {zlib.crc32(text.encode()):08x}\n".encode().ljust(128, b" ")

    @classmethod
    def decode(cls, data: bytes) -> _State | None:
        text, _, crc = data.strip().decode("ascii", "replace").rpartition(" ")
        fields = text.split(" ")
        if (
            not text.startswith(_STATE_MAGIC)
            or len(fields) != 7
            or crc != f"{zlib.crc32(text.encode()):08x}"
        ):
            return None
        state = cls()
        state.number, state.size, state.dev, state.ino, state.pending = map(int, fields[2:])
        return state


class FileStore:
    """A single-file mailbox (the ``cs4410`` format) with group commit.

    ``render(number, deliver)`` yields the bytes of one record. Raises
    :class:`StartupError` if the mailbox or its state file cannot be opened.
    """

    def __init__(self, path: str, render: Renderer, *, fsync: bool = True) -> None:
        self.path = os.path.abspath(path)
        self.state_path = self.path + STATE_SUFFIX
        self._render = render
        self._fsync: Callable[[int], None] = os.fsync if fsync else (lambda fd: None)
        self._fd = -1
        self._state_fd = -1
        self._state = _State()
        self._torn = False  # a crash left a batch unfinished; repair before appending
        try:
            self._fd = self._open_mailbox()
            self._state_fd = os.open(self.state_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            self.close()
            name = exc.filename or self.path
            raise StartupError(f"cannot open mailbox {name}: {exc.strerror}") from exc
        try:
            self._recover()
        except OSError as exc:
            self.close()
            raise StartupError(f"cannot recover mailbox {self.path}: {exc.strerror}") from exc

    @property
    def last_number(self) -> int:
        return self._state.number

    def close(self) -> None:
        for fd in (self._fd, self._state_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._state_fd = -1

    # -- appending ---------------------------------------------------------------

    def try_append(self, batch: Sequence[Deliver]) -> list[int] | None:
        """Store every message of ``batch`` in one write and one fsync.

        Returns their numbers, in order, or ``None`` if another process holds the
        lock (nothing was done; try again later). Raises :class:`StoreError` if the
        mailbox could not be opened or locked, or the write, the fsync or the state
        update failed; the mailbox is then as it was before.
        """
        try:
            if not self._lock():
                return None
        except OSError as exc:
            raise StoreError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
        try:
            return self._append_locked(batch)
        finally:
            self._unlock()

    def _append_locked(self, batch: Sequence[Deliver]) -> list[int]:
        try:
            if self._torn:
                self._repair_locked()
            start = os.fstat(self._fd).st_size
        except OSError as exc:
            raise StoreError(f"cannot append to {self.path}: {exc.strerror or exc}") from exc
        first = self._state.number + 1
        last = first + len(batch) - 1
        try:
            self._begin(start, last)
            written = self._write(first, batch)
            self._fsync(self._fd)
            self._commit(start + written)
        except OSError as exc:
            self._roll_back(start, first - 1)
            raise StoreError(f"cannot append to {self.path}: {exc.strerror or exc}") from exc
        return list(range(first, last + 1))

    def _write(self, first: int, batch: Sequence[Deliver]) -> int:
        pieces: list[bytes] = []
        gathered = written = 0
        for number, deliver in enumerate(batch, first):
            for piece in self._render(number, deliver):
                pieces.append(piece)
                gathered += len(piece)
                if gathered >= WRITE_CHUNK:
                    written += write_all(self._fd, pieces)
                    pieces, gathered = [], 0
        return written + write_all(self._fd, pieces)

    def _begin(self, start: int, last: int) -> None:
        """Mark a batch as started at ``start`` and reserve its numbers, up to ``last``
        (the commit marker's first half)."""
        st = os.fstat(self._fd)
        self._state.number = last
        self._state.size = start
        self._state.dev, self._state.ino = st.st_dev, st.st_ino
        self._state.pending = start
        # Why no fsync: against a process crash the page cache is enough; against a
        # power cut, losing this line at worst keeps the batch's bytes as if another
        # program had appended them (see the README's Guarantees).
        self._save_state(sync=False)

    def _commit(self, size: int) -> None:
        """Record the batch as stored (the commit marker's second half)."""
        self._state.size, self._state.pending = size, -1
        self._save_state(sync=True)

    def _roll_back(self, start: int, number: int) -> None:
        """Cut the mailbox back to ``start`` and the last number back to ``number``."""
        try:
            os.ftruncate(self._fd, start)
            self._fsync(self._fd)
        except OSError:
            log.critical("cannot cut %s back to %d bytes", self.path, start, exc_info=True)
        self._state.number, self._state.size, self._state.pending = number, start, -1
        try:
            self._save_state(sync=True)
        except OSError:
            log.error("cannot update %s", self.state_path, exc_info=True)

    def _save_state(self, *, sync: bool) -> None:
        data = self._state.encode()
        if os.pwrite(self._state_fd, data, 0) != len(data):
            raise OSError(errno.EIO, "short write to the state file")
        if sync:
            self._fsync(self._state_fd)

    # -- locking -----------------------------------------------------------------

    def _lock(self) -> bool:
        """Take the exclusive lock on the file now at the path, or return False."""
        while True:
            if self._fd < 0:  # reopening failed last time (its folder was gone)
                self._fd = self._open_mailbox()
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    return False
                raise
            if self._holds_path():
                return True
            # A consumer renamed the mailbox away: follow the path, not the old file.
            log.info("mailbox %s was moved away; starting a new file", self.path)
            os.close(self._fd)  # also drops the lock on the old file
            self._fd = -1
            self._fd = self._open_mailbox()

    def _unlock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _holds_path(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)

    def _open_mailbox(self) -> int:
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        try:
            return os.open(self.path, flags)
        except FileNotFoundError:
            fd = os.open(self.path, flags | os.O_CREAT, 0o644)
        try:
            fsync_directory(os.path.dirname(self.path))
        except OSError:
            os.close(fd)
            raise
        return fd

    # -- start-up ----------------------------------------------------------------

    def _recover(self) -> None:
        """Find the last number, and remove a torn tail left by a crash."""
        saved = _State.decode(os.pread(self._state_fd, 256, 0))
        if saved is None:
            self._state.number = self._scan_last_number()
            if self._state.number:
                log.info(
                    "no state file; the last number in %s is %d", self.path, self._state.number
                )
            self._save_state(sync=True)
            return
        self._state = saved
        if saved.pending < 0:
            return
        # A batch was being written when the process died. Its numbers stay reserved
        # (a reader may have seen them), and its bytes, whole or not, never got a 250.
        self._torn = True
        if not self._lock():
            log.warning(
                "mailbox %s is locked; its torn tail is removed at the next append", self.path
            )
            return
        try:
            self._repair_locked()
        finally:
            self._unlock()

    def _repair_locked(self) -> None:
        """Cut away what an append cut short by a crash left (the lock is held)."""
        saved = self._state
        st = os.fstat(self._fd)
        if (st.st_dev, st.st_ino) == (saved.dev, saved.ino) and st.st_size > saved.pending:
            os.ftruncate(self._fd, saved.pending)
            self._fsync(self._fd)
            log.warning(
                "removed a torn tail of %d bytes from %s (an append cut short by a crash)",
                st.st_size - saved.pending,
                self.path,
            )
        self._state.pending = -1
        self._state.size = os.fstat(self._fd).st_size
        self._save_state(sync=True)
        self._torn = False

    def _scan_last_number(self) -> int:
        """The largest record number near the end of the mailbox (0 if none).

        Reads backwards in chunks through the one descriptor we own, so a mailbox of
        any size costs only the length of its last record.
        """
        size = os.fstat(self._fd).st_size
        end = size
        overlap = 64
        while end > 0:
            start = max(0, end - formats.CHUNK)
            chunk = os.pread(self._fd, min(end + overlap, size) - start, start)
            numbers = [int(m.group(1)) for m in formats.CS4410_NUMBER.finditer(chunk)]
            if numbers:
                return max(numbers)
            end = start
        return 0


def cs4410_renderer(server_name: str) -> Renderer:
    def render(number: int, deliver: Deliver) -> Iterator[bytes]:
        return formats.cs4410_record(number, deliver.envelope, deliver.body, server_name)

    return render
