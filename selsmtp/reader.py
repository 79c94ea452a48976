"""Reading mailboxes back: :func:`read_mailbox`, the one read API, for all three formats.

``read_mailbox(path, format=None)`` gives the messages of a mailbox, each with its
number, envelope (sender and recipients), the message as the client sent it (``raw``,
LF line ends) and that message parsed (``message``, an ``EmailMessage`` with
``email.policy.default``), and what is wrong with the mailbox: ``problems`` (damage:
``inbox check`` exits 1) and ``warnings`` (exit status 0). ``python -m selsmtp.inbox``
and ``tools/flood.py`` read mailboxes with it; the grammar of each format is
:mod:`selsmtp.formats`'.

Whole records only, and no forged ones
--------------------------------------
A mailbox file is read under a shared ``fcntl.lockf`` lock (:func:`read_locked`), so
no half-written append is ever seen, together with selsmtp's state file (an append a
crash cut short: :func:`pending_append`) and the store's offsets index
(:mod:`selsmtp.mailindex`). Where the index matches the file, its records are the
records, whatever their bodies hold (a cs4410 body is not quoted and may hold a
look-alike record head: reported as a warning, since a reader without the index is
fooled by it); only the bytes between and after them are parsed by the grammar
(another program's records are listed there, anything else is a damaged region).
Without a usable index the whole file is parsed, with a warning.

A damaged region anywhere in the file is a problem with its offset and length, and
every whole record after it is still found.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import re
import time
from datetime import datetime, timezone
from typing import Any, Final

from selsmtp import formats, mailindex
from selsmtp.durable import (
    HEAD_BYTES,
    STATE_SUFFIX,
    NotRegularFile,
    State,
    boot_id,
    file_format,
    maildir_names,
    open_readable,
    pending_verdict,
    read_regular,
)
from selsmtp.records import Mailbox, Message, Problem, ProblemKind, check_maildir, parse_file

__all__ = [
    "FORMATS",
    "Mailbox",
    "Message",
    "NotAMailbox",
    "Problem",
    "ProblemKind",
    "read_mailbox",
]

FORMATS: Final = formats.FORMATS
#: How many bytes :func:`detect_format` shows of a file that is not a mailbox.
_SHOWN: Final = 40


# -- a mailbox file under the shared lock ----------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """What :func:`read_locked` saw under one shared lock: the bytes from ``offset``,
    where a crash cut an append short (:func:`pending_append`), the offsets index and
    the file's first bytes (``head``, up to ``head_size``)."""

    data: bytes
    offset: int
    stat: os.stat_result
    pending: int | None
    index: list[Any] | None
    head: bytes


def read_locked(
    fd: int, path: str, timeout: float | None, *, offset: int = 0, head_size: int = 0
) -> Snapshot:
    """Read the mailbox file open as ``fd`` (at ``path``) from ``offset`` on, under a
    shared ``lockf`` lock: whole records only, since the server appends under its
    exclusive lock. Waits ``timeout`` seconds at most (``None``: as long as it takes),
    then raises ``TimeoutError``.

    POSIX locks belong to the process, and closing any descriptor of a file drops them
    all: do not call this in a process that appends to the same file itself.
    """
    if timeout is None:
        fcntl.lockf(fd, fcntl.LOCK_SH)
    else:
        lock_shared(fd, timeout)
    try:
        st = os.fstat(fd)
        pieces = []
        position = offset
        while piece := os.pread(fd, 1 << 30, position):
            pieces.append(piece)
            position += len(piece)
        head = os.pread(fd, head_size, 0) if head_size else b""
        pending = pending_append(path, fd)
        index = load_index(path, st)
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN)
    return Snapshot(b"".join(pieces), offset, st, pending, index, head)


def lock_shared(fd: int, timeout: float) -> None:
    """Take a shared ``lockf`` lock on ``fd``, waiting ``timeout`` seconds at most (then
    ``TimeoutError``). Polls with a growing delay (up to 50 ms): a blocking ``lockf``
    cannot be given a timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError(f"mailbox still locked after {timeout:g} s")
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, 0.05)


def pending_append(path: str | os.PathLike[str], fd: int) -> int | None:
    """Where an append cut short by a crash begins in the file open as ``fd``, according
    to selsmtp's state file ``PATH.selsmtp``; ``None`` if it names none in this file
    that selsmtp would cut.

    Meaningful under the shared lock only: selsmtp marks an append while it holds the
    exclusive lock and clears the mark before it lets go. The judgment is the store's
    own (:func:`~selsmtp.durable.pending_verdict`), so a reader hides exactly the bytes
    the store's crash recovery removes.
    """
    try:
        state_fd = open_readable(os.fspath(path) + STATE_SUFFIX)
    except OSError:
        return None
    try:
        state = State.decode(os.pread(state_fd, 1024, 0))
    finally:
        os.close(state_fd)
    if state is None:
        return None
    rebooted = not state.boot or state.boot != boot_id()  # as the store reads it
    fmt = state.format or file_format(fd)
    pattern = formats.MBOX_NUMBER if fmt == "mbox" else formats.CS4410_NUMBER
    verdict = pending_verdict(
        state, os.fstat(fd), rebooted, lambda offset: os.pread(fd, HEAD_BYTES, offset), pattern
    )
    return state.pending if verdict == "cut" else None


def load_index(path: str, st: os.stat_result) -> list[Any] | None:
    """The store's offsets index of the file ``st`` at ``path``, if there is a usable one
    (its own, or the one of the name it had before a consumer renamed it)."""
    found: list[Any] | None = mailindex.find(path, st)
    return found


def recorded_format(path: str, st: os.stat_result) -> str | None:
    """The format selsmtp's side files record for the mailbox file ``st`` at ``path``:
    the header of its offsets index, else its state line, if one names this very file
    (device and inode); ``None`` if neither does. This is what tells the format of a
    file whose first bytes are damage (SPEC §7: the state file records the format)."""
    identity = (st.st_dev, st.st_ino)
    index, state = _head_of(mailindex.index_path(path)), _head_of(path + STATE_SUFFIX)
    found = mailindex.parse_header(index.partition(b"\n")[0])
    if found is not None and found[1:] == identity:
        return found[0]
    line = State.decode(state)
    if line is not None and (line.dev, line.ino) == identity and line.format in mailindex.FORMATS:
        return line.format
    return None


def _head_of(path: str) -> bytes:
    """The first bytes of the regular file at ``path``; ``b""`` if it cannot be read."""
    try:
        fd = open_readable(path)
    except OSError:
        return b""
    try:
        return os.pread(fd, 1024, 0)
    except OSError:
        return b""
    finally:
        os.close(fd)


def told_format(path: str, st: os.stat_result, data: bytes) -> str | None:
    """The format of the mailbox file ``st`` at ``path`` that starts with ``data``: the
    one selsmtp recorded for it (:func:`recorded_format`), else :func:`detect_format`'s."""
    return (recorded_format(path, st) if data else None) or detect_format(data)


def detect_format(data: bytes) -> str | None:
    """The format of a file that starts with ``data`` (``None`` if empty); a first record
    cut short counts. Raises :class:`NotAMailbox`."""
    if not data:
        return None
    if formats.mbox.torn_head(data[:5]):
        return "mbox"
    line, newline, _ = data.partition(b"\n")
    cs4410 = formats.cs4410
    if cs4410.FIRST_LINE.fullmatch(line + newline) if newline else cs4410.torn_head(line):
        return "cs4410"
    raise NotAMailbox(f"it starts with {data[:_SHOWN]!r}, not with a message of any format")


class NotAMailbox(Exception):
    """The path names no mailbox in any of the formats; the message says why, in one line."""


# -- Maildir ---------------------------------------------------------------------

#: The start of a Maildir file name: the delivery time in seconds (maildir(5)).
_MAILDIR_TIME: Final = re.compile(r"(\d{1,12})\.")


def is_maildir(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a folder with ``new/`` and ``cur/`` in it."""
    return all(os.path.isdir(os.path.join(path, sub)) for sub in ("new", "cur"))


def read_maildir_file(path: str, name: str) -> Message | None:
    """The message file ``name`` (``new/NAME``) of the Maildir ``path``; ``None`` if it
    is gone (a reader moved it to ``cur/``) or not a file."""
    try:
        data = read_regular(os.path.join(path, name))
    except (FileNotFoundError, NotRegularFile):
        return None
    message = Message.of("maildir", formats.maildir.parse(data), 0, len(data), name)
    if message.date is None and (found := _MAILDIR_TIME.match(os.path.basename(name))):
        try:
            moment = datetime.fromtimestamp(int(found[1]), timezone.utc)
        except (OverflowError, OSError, ValueError):
            return message
        message = dataclasses.replace(message, date=moment)
    return message


def read_maildir(path: str) -> list[Message]:
    """Every message of the Maildir at ``path``, once each, in no particular order."""
    keys: set[str] = set()
    messages: list[Message] = []
    for name in maildir_names(path):
        key = formats.maildir.unique_part(name[4:])
        if key not in keys and (message := read_maildir_file(path, name)) is not None:
            keys.add(key)
            messages.append(message)
    return messages


# -- any format ------------------------------------------------------------------


def read_mailbox(
    path: str | os.PathLike[str],
    format: str | None = None,  # the name SPEC §10 gives it
    *,
    lock_timeout: float | None = None,
    allow_gaps: bool = True,
    allow_foreign: bool = True,
) -> Mailbox:
    """The messages of the mailbox at ``path``, in ``format`` (``None``: told by the
    path: a folder with ``new/`` and ``cur/`` is a Maildir, else :func:`told_format`),
    with its problems and warnings.

    A mailbox file is read under a shared lock, waiting ``lock_timeout`` seconds at
    most (``None``: as long as it takes). Gaps in the numbering and messages without a
    number are problems only if not allowed (consumers and other programs cause them).
    Raises :class:`NotAMailbox`, ``OSError`` (``FileNotFoundError`` if there is nothing
    at ``path``) or ``TimeoutError``.
    """
    name = os.fspath(path)
    options = {"allow_gaps": allow_gaps, "allow_foreign": allow_foreign}
    if os.path.isdir(name):
        if format not in (None, "maildir"):
            raise NotAMailbox(f"{name} is a folder, not a {format} mailbox file")
        if not is_maildir(name):
            raise NotAMailbox(f"{name} is a folder but not a Maildir (it has no new/ and cur/)")
        return check_maildir(read_maildir(name), name, **options)
    if format == "maildir":
        if not os.path.exists(name):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
        raise NotAMailbox(f"{name} is a file, not a Maildir folder")
    if format not in (None, *FORMATS):
        raise ValueError(f"not a mailbox format: {format!r}")
    fd = open_readable(name)
    try:
        seen = read_locked(fd, name, lock_timeout)
    finally:
        os.close(fd)
    if format is None:
        try:
            format = told_format(name, seen.stat, seen.data)
        except NotAMailbox as exc:
            raise NotAMailbox(f"{name} is not a mailbox: {exc}") from None
        if format is None:
            return Mailbox(name, None, (), data=b"")
    return parse_file(
        seen.data, format, index=seen.index, pending=seen.pending, path=name, **options
    )
