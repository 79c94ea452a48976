"""``python -m selsmtp.inbox follow``: new messages of a mailbox as they arrive.

There is no portable way to be told that a file changed, so a follower polls: at each
look it compares the file's size and times with the last look, and reads only what
is new, from where it stopped, under the shared lock (:func:`reader.read_locked`). It
keeps its descriptor of the file open, which is what lets it handle the consumers and
the rotation of SPEC §5.4:

* the path names a new file (a consumer renamed the mailbox away, or ``--rotate``
  renamed it to ``PATH.A-B``): the rest of the old file is read through the old
  descriptor, then any rotated file ``PATH.A-B`` it has not seen (several rotations
  may happen between two looks), then the new file from its start;
* the file shrank, or its first bytes changed (movemail emptied it, maybe new mail
  has arrived since): it is read again from the start.

A message is given once it is whole: a torn tail (or the part after an append that
selsmtp's state file says was cut short) waits until it is whole or gone. No message
number is given twice, whatever happens to the file. Mail that a consumer takes away
between two looks is not seen at all.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import os
import select
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Final

from selsmtp import formats, reader
from selsmtp.durable import maildir_names, open_readable
from selsmtp.reader import Message, NotAMailbox
from selsmtp.records import ProblemKind, check_maildir, parse_file
from selsmtp.rotation import rotated_files

#: seconds to wait for the shared lock at the start
DEFAULT_LOCK_TIMEOUT: Final = 30.0
#: later looks wait this long for the lock, then try again at the next look
FOLLOW_LOCK_WAIT: Final = 1.0
#: a follower remembers this many of a file's first bytes, to notice it was rewritten
ANCHOR_SIZE: Final = 4096

Warn = Callable[[str], None]


class NumberSet:
    """A set of integers kept as sorted, disjoint ranges: a run of consecutive numbers
    costs two list entries, however long it is."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []  # inclusive

    def __contains__(self, number: int) -> bool:
        index = bisect.bisect_right(self._starts, number) - 1
        return index >= 0 and number <= self._ends[index]

    def __len__(self) -> int:
        return sum(end - start + 1 for start, end in zip(self._starts, self._ends, strict=True))

    def add(self, number: int) -> None:
        if number in self:
            return
        index = bisect.bisect_right(self._starts, number)
        joins_before = index > 0 and self._ends[index - 1] == number - 1
        joins_after = index < len(self._starts) and self._starts[index] == number + 1
        if joins_before and joins_after:
            self._ends[index - 1] = self._ends[index]
            del self._starts[index], self._ends[index]
        elif joins_before:
            self._ends[index - 1] = number
        elif joins_after:
            self._starts[index] = number
        else:
            self._starts.insert(index, number)
            self._ends.insert(index, number)

    @property
    def ranges(self) -> int:
        return len(self._starts)


@dataclasses.dataclass
class _OpenFile:
    """A mailbox file followed through its own descriptor."""

    fd: int
    ident: tuple[int, int]  # (device, inode)
    fmt: str | None  # None: not known yet (nothing read so far)
    offset: int = 0  # bytes read: whole records, or bytes that are not part of any
    anchor: bytes = b""  # the file's first bytes (up to ANCHOR_SIZE) as read
    stamp: tuple[int, int, int] | None = None  # (size, mtime, ctime) at the last read
    broken: bool = False  # not a mailbox: left alone until the path names another file


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FileFollower:
    """Follows a cs4410 or mbox mailbox file at ``path`` (see the module docstring).

    :meth:`start` opens it, :meth:`poll` returns the messages that arrived since the
    last call (in the order they were stored), :meth:`close` lets go of it.
    ``fmt`` forces the format; ``warn`` is told about bytes skipped and files that
    cannot be read.
    """

    def __init__(
        self, path: str, fmt: str | None, warn: Warn, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    ) -> None:
        self.path = path
        self._fmt = fmt
        self._warn = warn
        self._lock_timeout = lock_timeout  # at the start; later looks wait FOLLOW_LOCK_WAIT
        self._current: _OpenFile | None = None
        self._done: set[tuple[int, int]] = set()  # files read to their end (or ignored)
        self._seen = NumberSet()

    def start(self, *, from_start: bool) -> list[Message]:
        """Open the file; return the messages it holds if ``from_start``, else none
        (following begins at its end). Raises ``OSError`` and :class:`NotAMailbox`."""
        current = self._open()
        self._current = current
        for _, _, name in rotated_files(self.path):
            with contextlib.suppress(OSError):
                self._done.add(_identity(os.stat(name)))
        try:
            if from_start:
                return self._read(current, strict=True, lock_timeout=self._lock_timeout)
            self._skip_to_end(current)
        except BaseException:
            self.close()
            raise
        return []

    def poll(self) -> list[Message]:
        """The messages stored since the last call; never the same number twice."""
        try:
            st: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            st = None  # renamed away, and the server has not made the next one yet
        current = self._current
        fresh: list[Message] = []
        if current is not None:
            fresh += self._read(current)  # after the stat: nothing added before it is missed
        if st is None or (current is not None and _identity(st) == current.ident):
            return fresh
        try:
            following = self._open()
        except FileNotFoundError:
            return fresh
        if current is not None:
            self._done.add(current.ident)
            os.close(current.fd)
        self._current = following
        fresh += self._read_rotated()
        fresh += self._read(following)
        return fresh

    def close(self) -> None:
        if self._current is not None:
            os.close(self._current.fd)
            self._current = None

    def _open(self) -> _OpenFile:
        fd = open_readable(self.path)
        return _OpenFile(fd, _identity(os.fstat(fd)), self._fmt)

    def _read_rotated(self) -> list[Message]:
        """Read the rotated files that appeared since the last look, oldest first."""
        assert self._current is not None
        fresh: list[Message] = []
        for _, _, name in rotated_files(self.path):
            try:
                fd = open_readable(name)
            except OSError:
                continue
            try:
                ident = _identity(os.fstat(fd))
                if ident in self._done or ident == self._current.ident:
                    continue
                self._done.add(ident)  # read once: wait for its lock as long as list would
                sibling = _OpenFile(fd, ident, self._fmt)
                fresh += self._read(sibling, lock_timeout=self._lock_timeout)
            finally:
                os.close(fd)
        return fresh

    def _skip_to_end(self, file: _OpenFile) -> None:
        """Begin after what the file holds now; tell its format if it is not empty."""
        st = os.fstat(file.fd)
        seen = reader.read_locked(
            file.fd, self.path, self._lock_timeout, offset=st.st_size, head_size=ANCHOR_SIZE
        )
        end = seen.stat.st_size if seen.pending is None else seen.pending
        if file.fmt is None and seen.head:
            try:
                file.fmt = reader.told_format(self.path, seen.stat, seen.head)
            except NotAMailbox as exc:
                raise NotAMailbox(f"{self.path} is not a mailbox: {exc}") from None
        file.offset, file.anchor = end, seen.head[: min(end, ANCHOR_SIZE)]
        file.stamp = _stamp(seen.stat)

    def _read(
        self, file: _OpenFile, *, strict: bool = False, lock_timeout: float | None = None
    ) -> list[Message]:
        """The new whole messages of ``file`` not given yet. ``strict``: raise
        :class:`NotAMailbox` for a file that is not one, instead of ignoring it.
        If the lock stays busy ``lock_timeout`` seconds (:data:`FOLLOW_LOCK_WAIT`),
        nothing is read: the next look tries again."""
        if file.broken or _stamp(os.fstat(file.fd)) == file.stamp:
            return []
        wait = FOLLOW_LOCK_WAIT if lock_timeout is None else lock_timeout
        try:
            seen = reader.read_locked(
                file.fd, self.path, wait, offset=file.offset, head_size=ANCHOR_SIZE
            )
            if seen.stat.st_size < file.offset or not seen.head.startswith(file.anchor):
                # Emptied (movemail) or rewritten: read it again; numbers seen stay seen.
                file.offset, file.anchor, file.fmt = 0, b"", self._fmt
                seen = reader.read_locked(file.fd, self.path, wait, head_size=ANCHOR_SIZE)
        except TimeoutError:
            return []
        file.stamp = _stamp(seen.stat)
        if not seen.data:
            return []
        if file.fmt is None:
            try:
                file.fmt = reader.told_format(self.path, seen.stat, seen.data)
            except NotAMailbox as exc:
                why = f"{self.path} is not a mailbox: {exc}"
                if strict:
                    raise NotAMailbox(why) from None
                self._warn(f"{why}; ignoring it until the path names another file")
                file.broken = True
                return []
        assert file.fmt is not None
        base = file.offset
        parsed = parse_file(seen.data, file.fmt, index=seen.index, pending=seen.pending, base=base)
        for problem in parsed.problems:
            if problem.kind in (ProblemKind.GARBAGE, ProblemKind.TORN_RECORD):
                self._warn(
                    f"{self.path}: skipped {problem.length} bytes at offset "
                    f"{base + problem.offset} ({problem.kind.value})"
                )
        file.offset += parsed.whole
        file.anchor = seen.head[: min(file.offset, ANCHOR_SIZE)]
        fresh: list[Message] = []
        for message in parsed.messages:
            if message.number is not None:
                if message.number in self._seen:
                    continue
                self._seen.add(message.number)
            fresh.append(dataclasses.replace(message, offset=base + message.offset))
        return fresh


class MaildirFollower:
    """Follows a Maildir: each look lists ``new/`` then ``cur/`` and reads the files
    whose unique name it has not seen. A message a reader moves from ``new/`` to
    ``cur/`` keeps that name, and is not given again."""

    def __init__(self, path: str, warn: Warn) -> None:
        self.path = path
        self._warn = warn
        self._keys: set[str] = set()
        self._seen = NumberSet()

    def start(self, *, from_start: bool) -> list[Message]:
        if not reader.is_maildir(self.path):
            raise NotAMailbox(
                f"{self.path} is a folder but not a Maildir (it has no new/ and cur/)"
            )
        if from_start:
            return self.poll()
        self._keys = {formats.maildir.unique_part(n[4:]) for n in maildir_names(self.path)}
        return []

    def poll(self) -> list[Message]:
        listed: set[str] = set()
        fresh: list[Message] = []
        for name in maildir_names(self.path):
            key = formats.maildir.unique_part(name[4:])
            if key in self._keys or key in listed:
                listed.add(key)
                continue
            message = reader.read_maildir_file(self.path, name)
            if message is None:
                continue  # moved to cur/ meanwhile (listed too), or not a message
            listed.add(key)
            if message.number is not None:
                if message.number in self._seen:
                    continue
                self._seen.add(message.number)
            fresh.append(message)
        self._keys = listed  # names gone from both folders are forgotten
        return list(check_maildir(fresh).messages)

    def close(self) -> None:
        pass


class Stopper:
    """SIGINT and SIGTERM set :attr:`stopped` and end a :meth:`wait` at once (through
    ``signal.set_wakeup_fd``). Outside the main thread no handlers are installed."""

    def __init__(self) -> None:
        self.stopped = False
        self._saved: dict[int, Any] = {}
        self._wakeup = -1
        self._read_end, self._write_end = os.pipe()
        for fd in (self._read_end, self._write_end):
            os.set_blocking(fd, False)

    def __enter__(self) -> Stopper:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._saved[signum] = signal.signal(signum, self._handle)
            self._wakeup = signal.set_wakeup_fd(self._write_end, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._saved:
            signal.set_wakeup_fd(self._wakeup)
            for signum, handler in self._saved.items():
                signal.signal(signum, handler)
        os.close(self._read_end)
        os.close(self._write_end)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.stopped = True

    def wait(self, seconds: float) -> None:
        if self.stopped or seconds <= 0:
            return
        with contextlib.suppress(InterruptedError):
            select.select([self._read_end], [], [], seconds)
        with contextlib.suppress(BlockingIOError):
            os.read(self._read_end, 512)


def make_follower(
    path: str, fmt: str | None, warn: Warn, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
) -> FileFollower | MaildirFollower:
    if os.path.isdir(path):
        if fmt not in (None, "maildir"):
            raise NotAMailbox(f"{path} is a folder, not a {fmt} mailbox file")
        return MaildirFollower(path, warn)
    if fmt == "maildir":
        if not os.path.exists(path):
            raise FileNotFoundError(2, os.strerror(2), path)
        raise NotAMailbox(f"{path} is a file, not a Maildir folder")
    return FileFollower(path, fmt, warn, lock_timeout=lock_timeout)
