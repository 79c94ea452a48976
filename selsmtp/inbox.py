"""``python -m selsmtp.inbox``: list, show, follow and check a selsmtp mailbox.

Usage::

    python -m selsmtp.inbox list PATH           one line per message
    python -m selsmtp.inbox show PATH N         message number N as the client sent it
    python -m selsmtp.inbox follow PATH         each new message's line as it arrives
    python -m selsmtp.inbox check PATH          exit 0 if the mailbox is sound, else 1

All three formats are understood (``cs4410``, ``mbox``, ``maildir``); the format is
told by the path unless ``--format`` names it: a folder with ``new/`` and ``cur/`` is a
Maildir, a file that starts with ``From `` is an mbox, one that starts with a
``Received: from ... (CS4410MP3)`` line is a cs4410 mailbox, and an empty file is an
empty mailbox. The parsing is :mod:`selsmtp.reader`'s; this module is the command line
and the ``follow`` loop.

Reading while the server writes
-------------------------------
A mailbox file is read under a shared ``fcntl.lockf`` lock, held only while its bytes
are read (never while they are parsed or printed), so the reader sees whole records
only and the server's clients wait for it as briefly as possible. A Maildir needs no
lock: a message appears in ``new/`` whole, by a rename.

Following (``follow``)
----------------------
There is no portable way to be told that a file changed, so ``follow`` polls: every
``--interval`` seconds (0.25 by default) it compares the file's size and times with
the last look, and reads only what is new, from where it stopped, under the lock. It
keeps its descriptor of the file open, which is what lets it handle the consumers and
the rotation of SPEC §5.4:

* the path names a new file (a consumer renamed the mailbox away, or ``--rotate``
  renamed it to ``PATH.A-B``): the rest of the old file is read through the old
  descriptor, then any rotated file ``PATH.A-B`` it has not seen (several rotations
  may happen between two looks), then the new file from its start;
* the file shrank, or its first bytes changed (movemail emptied it, maybe new mail
  has arrived since): it is read again from the start.

A message is printed once it is whole: a torn tail (or the part after an append that
selsmtp's state file says was cut short) waits until it is whole or gone. No message
number is printed twice in one run, whatever happens to the file. Mail that a
consumer takes away between two looks is not seen at all. SIGINT and SIGTERM stop
it (exit 0); ``--count N`` and ``--timeout S`` bound it for scripts and tests.

Exit status: 0 for success, 1 for a problem found by ``check``, a message ``show``
does not find, a path that is not a mailbox or cannot be read; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, Final

from selsmtp import reader
from selsmtp.argtypes import non_negative_int, positive_float, positive_int
from selsmtp.reader import Message, NotAMailbox
from selsmtp.rotation import ROTATED_NAME

PROG: Final = "python -m selsmtp.inbox"
#: seconds between two looks at a followed mailbox
DEFAULT_INTERVAL: Final = 0.25
#: seconds to wait for the shared lock before giving up (list, show, check)
DEFAULT_LOCK_TIMEOUT: Final = 30.0
#: follow waits this long for the lock, then tries again at the next look
FOLLOW_LOCK_WAIT: Final = 1.0
#: follow remembers this many of a file's first bytes, to notice it was rewritten
ANCHOR_SIZE: Final = 4096
#: a summary line names at most this many recipients, then counts the rest
SHOWN_RECIPIENTS: Final = 5

Warn = Callable[[str], None]


# -- summaries -----------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: characters that are not printable (control
    and format characters, tabs, line ends) are written as ``\\t``, ``\\x1b``, ``\\u202e``."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def summary_fields(message: Message) -> list[str]:
    """The columns of a summary line: number, date (UTC), sender, recipients, size, subject."""
    recipients = message.recipients
    if recipients is None:
        shown = "-"
    else:
        shown = ",".join(recipients[:SHOWN_RECIPIENTS])
        if len(recipients) > SHOWN_RECIPIENTS:
            shown += f",+{len(recipients) - SHOWN_RECIPIENTS} more"
    subject = message.subject
    return [
        "-" if message.number is None else str(message.number),
        "-" if message.date is None else message.date.strftime("%Y-%m-%d %H:%M:%S"),
        "-" if message.sender is None else message.sender or "<>",
        shown,
        str(message.size),
        "-" if subject is None else subject,
    ]


def summary_line(message: Message) -> str:
    """One tab-separated line, safe to print on a terminal."""
    return "\t".join(printable(field) for field in summary_fields(message))


def summary_json(message: Message) -> str:
    fields: dict[str, Any] = {
        "number": message.number,
        "date": None if message.date is None else message.date.isoformat(),
        "sender": message.sender,
        "recipients": None if message.recipients is None else list(message.recipients),
        "size": message.size,
        "subject": message.subject,
        "format": message.format,
        "where": message.where,
    }
    return json.dumps(fields)


# -- follow --------------------------------------------------------------------


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


def _pread_all(fd: int, offset: int, length: int) -> bytes:
    pieces: list[bytes] = []
    while length > 0:
        piece = os.pread(fd, min(length, 1 << 30), offset)
        if not piece:
            break
        pieces.append(piece)
        offset += len(piece)
        length -= len(piece)
    return b"".join(pieces)


def rotated_files(path: str) -> list[tuple[int, int, str]]:
    """The rotated files ``PATH.A-B`` beside ``path``, as (A, B, path), by A then B."""
    folder, name = os.path.split(os.path.abspath(path))
    found: list[tuple[int, int, str]] = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return found
    for entry in entries:
        match = ROTATED_NAME.fullmatch(entry, len(name)) if entry.startswith(name) else None
        if match:
            found.append((int(match[1]), int(match[2]), os.path.join(folder, entry)))
    found.sort()
    return found


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
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        return _OpenFile(fd, _identity(os.fstat(fd)), self._fmt)

    def _read_rotated(self) -> list[Message]:
        """Read the rotated files that appeared since the last look, oldest first."""
        assert self._current is not None
        fresh: list[Message] = []
        for _, _, name in rotated_files(self.path):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
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
        reader.lock_shared(file.fd, self._lock_timeout)  # raises TimeoutError
        try:
            st = os.fstat(file.fd)
            end = st.st_size
            pending = reader.pending_append(self.path, file.fd)
            if pending is not None:
                end = pending
            head = os.pread(file.fd, ANCHOR_SIZE, 0)
        finally:
            fcntl.lockf(file.fd, fcntl.LOCK_UN)
        if file.fmt is None and head:
            try:
                file.fmt = reader.detect_format(head)
            except NotAMailbox as exc:
                raise NotAMailbox(f"{self.path} is not a mailbox: {exc}") from None
        file.offset, file.anchor, file.stamp = end, head[: min(end, ANCHOR_SIZE)], _stamp(st)

    def _read(
        self, file: _OpenFile, *, strict: bool = False, lock_timeout: float | None = None
    ) -> list[Message]:
        """The new whole messages of ``file`` not printed yet. ``strict``: raise
        :class:`NotAMailbox` for a file that is not one, instead of ignoring it.
        If the lock stays busy ``lock_timeout`` seconds (:data:`FOLLOW_LOCK_WAIT`),
        nothing is read: the next look tries again."""
        if file.broken or _stamp(os.fstat(file.fd)) == file.stamp:
            return []
        try:
            reader.lock_shared(file.fd, FOLLOW_LOCK_WAIT if lock_timeout is None else lock_timeout)
        except TimeoutError:
            return []
        try:
            st = os.fstat(file.fd)
            size = st.st_size
            anchor = file.anchor
            if size < file.offset or (anchor and os.pread(file.fd, len(anchor), 0) != anchor):
                # Emptied (movemail) or rewritten: read it again; numbers seen stay seen.
                file.offset, file.anchor, file.fmt = 0, b"", self._fmt
            end = size
            pending = reader.pending_append(self.path, file.fd)
            if pending is not None and pending >= file.offset:
                end = pending
            data = _pread_all(file.fd, file.offset, end - file.offset)
            head = os.pread(file.fd, ANCHOR_SIZE, 0) if len(file.anchor) < ANCHOR_SIZE else b""
            file.stamp = _stamp(st)
        finally:
            fcntl.lockf(file.fd, fcntl.LOCK_UN)
        if not data:
            return []
        if file.fmt is None:
            try:
                file.fmt = reader.detect_format(data)
            except NotAMailbox as exc:
                why = f"{self.path} is not a mailbox: {exc}"
                if strict:
                    raise NotAMailbox(why) from None
                self._warn(f"{why}; ignoring it until the path names another file")
                file.broken = True
                return []
        assert file.fmt is not None
        parsed = reader.parse_file(data, file.fmt, allow_gaps=True, allow_foreign=True)
        base = file.offset
        for problem in parsed.problems:
            if problem.kind in (reader.ProblemKind.GARBAGE, reader.ProblemKind.TORN_RECORD):
                self._warn(
                    f"{self.path}: skipped {problem.length} bytes at offset "
                    f"{base + problem.offset} ({problem.kind.value})"
                )
        file.offset += parsed.whole
        if head:
            file.anchor = head[: min(file.offset, ANCHOR_SIZE)]
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
    whose unique name (:func:`reader.maildir_key`) it has not seen. A message a reader
    moves from ``new/`` to ``cur/`` keeps that name, and is not printed again."""

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
        self._keys = {reader.maildir_key(name) for _, name in self._names()}
        return []

    def _names(self) -> list[tuple[str, str]]:
        """(folder, name) of every message file, those in ``new/`` first: a file that a
        reader moves to ``cur/`` meanwhile is in one of the two listings."""
        found: list[tuple[str, str]] = []
        for sub in ("new", "cur"):
            try:
                names = os.listdir(os.path.join(self.path, sub))
            except FileNotFoundError:
                continue
            found.extend((sub, name) for name in names if not name.startswith("."))
        return found

    def poll(self) -> list[Message]:
        listed: set[str] = set()
        fresh: list[Message] = []
        for sub, name in self._names():
            key = reader.maildir_key(name)
            if key in self._keys or key in listed:
                listed.add(key)
                continue
            try:
                with open(os.path.join(self.path, sub, name), "rb") as file:
                    data = file.read()
            except (FileNotFoundError, IsADirectoryError):
                continue  # moved to cur/ meanwhile (listed too), or not a message
            listed.add(key)
            message = reader.parse_maildir_message(f"{sub}/{name}", data)
            if message.number is not None:
                if message.number in self._seen:
                    continue
                self._seen.add(message.number)
            fresh.append(message)
        self._keys = listed  # names gone from both folders are forgotten
        return list(reader.check_maildir(fresh, allow_gaps=True, allow_foreign=True).messages)

    def close(self) -> None:
        pass


class _Stopper:
    """SIGINT and SIGTERM set :attr:`stopped` and end a :meth:`wait` at once (through
    ``signal.set_wakeup_fd``). Outside the main thread no handlers are installed."""

    def __init__(self) -> None:
        self.stopped = False
        self._saved: dict[int, Any] = {}
        self._wakeup = -1
        self._read_end, self._write_end = os.pipe()
        for fd in (self._read_end, self._write_end):
            os.set_blocking(fd, False)

    def __enter__(self) -> _Stopper:
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


# -- the commands --------------------------------------------------------------


def _error(text: str) -> None:
    sys.stderr.write(f"{PROG}: {text}\n")
    sys.stderr.flush()


def _load(args: argparse.Namespace, *, strict: bool = False) -> reader.Loaded:
    return reader.load(
        args.path,
        args.format,
        allow_gaps=not strict,
        allow_foreign=not strict,
        lock_timeout=args.lock_timeout,
    )


def cmd_list(args: argparse.Namespace) -> int:
    loaded = _load(args)
    render = summary_json if args.json else summary_line
    out = sys.stdout
    for message in loaded.parsed.messages:
        out.write(render(message) + "\n")
    out.flush()
    return 0


def _find(loaded: reader.Loaded, number: int) -> list[Message]:
    return [m for m in loaded.parsed.messages if m.number == number]


def cmd_show(args: argparse.Namespace) -> int:
    loaded = _load(args)
    found = _find(loaded, args.number)
    if not found and loaded.parsed.format in ("cs4410", "mbox", None):
        # It may have been rotated away to PATH.A-B, with A <= N <= B.
        for first, last, name in rotated_files(args.path):
            if first <= args.number <= last:
                with contextlib.suppress(OSError, NotAMailbox):
                    older = reader.load(name, args.format, lock_timeout=args.lock_timeout)
                    found = _find(older, args.number)
                    if found:
                        loaded = older
                        _error(f"message {args.number} is in the rotated file {name}")
                        break
    if not found:
        _error(f"{args.path}: no message number {args.number}")
        return 1
    if len(found) > 1:
        _error(
            f"{loaded.path}: number {args.number} is stored {len(found)} times; "
            f"showing the first, at {found[0].where}"
        )
    data = loaded.raw(found[0]) if args.raw else found[0].content
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


def describe(parsed: reader.Parsed) -> str:
    """``cs4410 mailbox, 3 messages, numbers 1-3``, ``mbox, ...``, ``Maildir, ...`` or
    ``empty mailbox``."""
    count = len(parsed.messages)
    if parsed.format is None or (count == 0 and not parsed.problems):
        return "empty mailbox" if parsed.format is None else f"empty {parsed.format} mailbox"
    kind = {"maildir": "Maildir", "mbox": "mbox"}.get(parsed.format, f"{parsed.format} mailbox")
    text = f"{kind}, {count} message{'' if count == 1 else 's'}"
    numbers = [m.number for m in parsed.messages if m.number is not None]
    if numbers:
        low, high = min(numbers), max(numbers)
        text += f", number {low}" if low == high else f", numbers {low}-{high}"
    if len(numbers) < count:
        text += f", {count - len(numbers)} without a number"
    return text


def cmd_check(args: argparse.Namespace) -> int:
    loaded = _load(args, strict=args.strict)
    parsed = loaded.parsed
    out = sys.stdout
    for problem in parsed.problems:
        out.write(f"{args.path}: {problem}\n")
    if parsed.problems:
        count = len(parsed.problems)
        out.write(
            f"{args.path}: {count} problem{'' if count == 1 else 's'} in {describe(parsed)}\n"
        )
    else:
        out.write(f"{args.path}: ok: {describe(parsed)}\n")
    out.flush()
    return 1 if parsed.problems else 0


def make_follower(
    path: str, fmt: str | None, warn: Warn, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
) -> FileFollower | MaildirFollower:
    if os.path.isdir(path):
        if fmt not in (None, "maildir"):
            raise NotAMailbox(f"{path} is a folder, not a {fmt} mailbox file")
        return MaildirFollower(path, warn)
    if fmt == "maildir":
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        raise NotAMailbox(f"{path} is a file, not a Maildir folder")
    return FileFollower(path, fmt, warn, lock_timeout=lock_timeout)


def cmd_follow(args: argparse.Namespace) -> int:
    follower = make_follower(args.path, args.format, _error, args.lock_timeout)
    render = summary_json if args.json else summary_line
    count: int | None = args.count
    printed = 0
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    out = sys.stdout
    with _Stopper() as stopper:
        try:
            messages = follower.start(from_start=args.all)
            while True:
                for message in messages:
                    out.write(render(message) + "\n")
                    out.flush()
                    printed += 1
                    if count is not None and printed >= count:
                        return 0
                if stopper.stopped:
                    return 0
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                wait = args.interval if deadline is None else min(args.interval, deadline - now)
                stopper.wait(wait)
                if stopper.stopped:
                    return 0
                messages = follower.poll()
        finally:
            follower.close()
    if count is not None:
        _error(f"{args.path}: {printed} of {count} messages within {args.timeout:g} s")
        return 1
    return 0


# -- the command line ----------------------------------------------------------


COLUMNS: Final = """\
Each message is one line of tab-separated columns: NUMBER, DATE (UTC), SENDER,
RECIPIENTS, SIZE, SUBJECT. "-" stands for what the format does not record: cs4410
records carry no date; mbox and Maildir messages do not record the envelope's
recipients (only the sender, as Return-Path), so RECIPIENTS is "-" there. A message
that selsmtp did not write has no NUMBER. SIZE is the length in bytes of the message
as `show` prints it. The null sender is "<>"; characters a terminal would act on are
escaped (\\t, \\x1b, ...)."""


FOLLOW_DESCRIPTION: Final = """\
Print each new message's line as it arrives, like tail -f, until SIGINT or SIGTERM
(exit 0). The mailbox is polled every --interval seconds, as there is no portable
way to be told of a change. A consumer that empties the file or renames it away, and
rotation to PATH.A-B, are followed. No message number is printed twice, and a message
only once it is whole. Mail that a consumer takes away between two looks is not seen."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Read a selsmtp mailbox (cs4410, mbox or Maildir), also while the server "
        "writes to it: mailbox files are read under a shared lockf lock.",
        epilog="Exit status: 0 success, 1 problems found or an error, 2 bad arguments.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("path", metavar="PATH", help="the mailbox file, or the Maildir folder")
    common.add_argument(
        "--format",
        choices=reader.FORMATS,
        default=None,
        help="the mailbox format (default: told by the path: a folder with new/ and cur/ "
        "is a Maildir, a file starting with 'From ' an mbox, one starting with a "
        "'Received: from ... (CS4410MP3)' line a cs4410 mailbox)",
    )
    common.add_argument(
        "--lock-timeout",
        type=positive_float,
        default=DEFAULT_LOCK_TIMEOUT,
        metavar="S",
        help="give up if the mailbox stays locked this long (%(default)g s)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    formatter = argparse.RawDescriptionHelpFormatter

    listing = commands.add_parser(
        "list",
        parents=[common],
        help="one line per message",
        description="Print one line per message, in the order stored (Maildir: by number).",
        epilog=COLUMNS,
        formatter_class=formatter,
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line instead")
    listing.set_defaults(run=cmd_list)

    show = commands.add_parser(
        "show",
        parents=[common],
        help="print message N as the client sent it",
        description="Print message number N as the client sent it, with LF line ends: a "
        "cs4410 body as stored (CRLF was stored as LF, so the two cannot be told apart "
        "any more); an mbox or Maildir message without the Return-Path, Received and "
        "X-Selsmtp-Number lines selsmtp added, and in mbox with the >From quoting undone. "
        "A number rotated away to PATH.A-B is looked for there.",
    )
    show.add_argument("number", metavar="N", type=non_negative_int, help="the message number")
    show.add_argument(
        "--raw", action="store_true", help="print the stored record instead, as it is on disk"
    )
    show.set_defaults(run=cmd_show)

    follow = commands.add_parser(
        "follow",
        parents=[common],
        help="print each new message's line as it arrives, until interrupted",
        description=FOLLOW_DESCRIPTION,
        epilog=COLUMNS,
        formatter_class=formatter,
    )
    follow.add_argument("--all", action="store_true", help="print the messages already there first")
    follow.add_argument("--json", action="store_true", help="one JSON object per line instead")
    follow.add_argument(
        "--count", type=positive_int, default=None, metavar="N", help="exit after N messages"
    )
    follow.add_argument(
        "--timeout",
        type=positive_float,
        default=None,
        metavar="S",
        help="exit after S seconds: 0, or 1 if --count messages were not printed by then",
    )
    follow.add_argument(
        "--interval",
        type=positive_float,
        default=DEFAULT_INTERVAL,
        metavar="S",
        help="seconds between two looks (%(default)g)",
    )
    follow.set_defaults(run=cmd_follow)

    check = commands.add_parser(
        "check",
        parents=[common],
        help="verify the mailbox; exit 0 if sound, 1 if not",
        description="Verify the mailbox: whole records, no bytes outside them, no torn "
        "tail (selsmtp's state file PATH.selsmtp is read too: it knows of an append cut "
        "short by a crash that looks whole), numbers unique and increasing. One line per "
        "problem, with its offset (or Maildir file) and number, then a summary line. "
        "Gaps in the numbering are normal (a crash or a failed write leaves numbers "
        "unused, consumers take mail away) and reported only with --strict.",
    )
    check.add_argument(
        "--strict",
        action="store_true",
        help="also report gaps in the numbering, and mbox/Maildir messages selsmtp did not write",
    )
    check.set_defaults(run=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except NotAMailbox as exc:
        _error(str(exc))
        return 1
    except TimeoutError as exc:
        _error(f"{args.path}: {exc}")
        return 1
    except KeyboardInterrupt:  # Ctrl-C in list, show or check (follow handles its own)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (``... | head``): not an error of ours.
        # Point stdout at /dev/null so that the interpreter's last flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    except OSError as exc:
        name = exc.filename if exc.filename is not None else args.path
        _error(f"cannot read {name}: {exc.strerror or exc}")
        return 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
