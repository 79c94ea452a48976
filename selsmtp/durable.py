"""What both stores share: errors, safe opens, whole writes, the state file, the format guard.

Every file of ours is opened by :func:`open_regular`: never through a symbolic link,
never blocking (a FIFO at the path would otherwise hang the loop), and only if
``fstat`` says it is a regular file; :func:`same_file` compares identities with
``lstat``. The state line is read at start-up by :func:`read_state`, which tells a
missing or blank file from a damaged one and refuses the latter, and
:func:`check_format` compares the mailbox's format (from the line, or its first
record) with ``--format`` before anything is written.

:class:`~selsmtp.store.FileStore` (the ``cs4410`` and ``mbox`` formats) and
:class:`~selsmtp.maildir.MaildirStore` keep one short line of state each, beside or
inside the mailbox. It holds the last number given out, so numbers continue across
restarts without reading any mail, and the commit marker of an append (SPEC §5.5).
The line is rewritten in place with one ``pwrite``, padded to a fixed length and
checksummed, so a torn write is recognised rather than believed.

The line names the boot of the machine it was written in (:func:`boot_id`). Within
one boot the page cache makes every write visible to the next reader, fsync'd or
not, so after a crash of the process alone the line is exactly the last one written.
After a reboot (a power cut, say) only fsync'd writes are sure to be there, and the
line may be older than the mailbox: the store reads it with that in mind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import zlib
from collections.abc import Callable, Iterable, Sequence

from selsmtp import formats
from selsmtp.session import Deliver

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import Final, Protocol


#: writev takes at most IOV_MAX buffers; stay well below it.
MAX_IOV: Final = 512
#: a batch's pieces are written once this many bytes have gathered
WRITE_CHUNK: Final = 4 << 20

_MAGIC: Final = "selsmtp-state"
_VERSION: Final = 4
_SIZE: Final = 256
#: added to every open of a file of ours (see :func:`open_regular`)
_SAFE_FLAGS: Final = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: where Linux names the current boot; elsewhere every start counts as after a reboot
BOOT_ID_PATH: Final = "/proc/sys/kernel/random/boot_id"

Fsync = Callable[[int], None]


class StoreError(Exception):
    """A batch could not be stored; the mailbox was left as it was before it."""


class StartupError(Exception):
    """The mailbox cannot be used; the message says why, in one line."""


# Why for mypy only: a Protocol is never instantiated, and defining one at run time
# would import typing, which is slow to import (start-up time counts).
if TYPE_CHECKING:

    class Store(Protocol):
        """What the server needs from a mailbox, whatever its format."""

        path: str

        @property
        def last_number(self) -> int: ...

        def try_append(self, batch: Sequence[Deliver]) -> list[int] | None:
            """The numbers ``batch`` was stored as; ``None``: locked, nothing done, try later.
            Raises :class:`StoreError` if nothing could be stored."""
            ...

        def close(self) -> None: ...


class NotRegularFile(OSError):
    """Something other than a regular file (a FIFO, a symbolic link, a folder, a
    device) is where a file of ours should be. ``str()`` says where and what."""

    def __str__(self) -> str:
        return f"{self.filename} is {self.strerror}, not a regular file"


#: what ``fstat``/``lstat`` modes are called in messages
_KINDS: Final = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def describe(mode: int) -> str:
    """What a file of this ``st_mode`` is, in words (``"a FIFO"``)."""
    for test, words in _KINDS:
        if test(mode):
            return words
    return "not a regular file"


def open_regular(path: str, flags: int, mode: int = 0o600, *, dir_fd: int | None = None) -> int:
    """Open the regular file at ``path`` as a raw descriptor, safely; return it.

    The one way selsmtp opens its own files (mailbox, state and lock files, rotated
    files, Maildir entries): the last component of ``path`` is never followed if it
    is a symbolic link (``O_NOFOLLOW``), opening never blocks, as it would on a FIFO
    with no writer or some devices (``O_NONBLOCK``, cleared again once the file is
    known to be regular, where it means nothing), the descriptor is not inherited
    across ``exec`` (``O_CLOEXEC``), and ``fstat`` on the open descriptor, not a second
    look at the path, decides that it is a regular file. A file it creates is ``mode``,
    by default readable and writable by its owner only, as mail should be (a Maildir's
    folders are 0700). ``dir_fd``: ``path`` is relative to that open folder (a folder
    held open cannot be swapped for a link between a check and the open). Raises
    :class:`NotRegularFile` (naming the path and what is there) or any other
    ``OSError`` of ``open``.
    """
    try:
        fd = os.open(path, flags | _SAFE_FLAGS, mode, dir_fd=dir_fd)
    except OSError as exc:
        # ELOOP: a symlink under O_NOFOLLOW; EISDIR: a folder opened for writing;
        # ENXIO: a FIFO with no reader opened write-only; EWOULDBLOCK: a lease.
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENODEV, errno.EAGAIN):
            try:
                st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                raise exc from None
            if not stat.S_ISREG(st.st_mode):
                raise NotRegularFile(exc.errno, describe(st.st_mode), path) from None
        raise
    return _regular(fd, path)


def _regular(fd: int, path: str) -> int:
    """``fd``, if ``fstat`` shows a regular file, made blocking again; else close it
    and raise :class:`NotRegularFile`."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, describe(st.st_mode), path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_readable(path: str) -> int:
    """Open the regular file at ``path`` read-only for a reader, as a raw descriptor.

    The readers' counterpart of :func:`open_regular`: a symbolic link a user made is
    followed (a reader writes nothing), but opening never blocks on a FIFO or a device
    (``O_NONBLOCK``), and ``fstat`` must show a regular file, else
    :class:`NotRegularFile`."""
    return _regular(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), path)


def read_regular(path: str) -> bytes:
    """All of the regular file at ``path``, opened with :func:`open_readable`."""
    fd = open_readable(path)
    try:
        pieces = []
        while piece := os.read(fd, 1 << 20):
            pieces.append(piece)
        return b"".join(pieces)
    finally:
        os.close(fd)


def maildir_names(path: str) -> list[str]:
    """Every message file of the Maildir at ``path`` as ``new/NAME`` or ``cur/NAME``,
    ``new/`` first: a message a reader moves to ``cur/`` meanwhile is in one of the
    two listings. Names starting with a dot are not messages (maildir(5))."""
    found: list[str] = []
    for sub in ("new", "cur"):
        try:
            names = os.listdir(os.path.join(path, sub))
        except FileNotFoundError:
            continue
        found.extend(f"{sub}/{name}" for name in sorted(names) if not name.startswith("."))
    return found


def fsync_directory(path: str) -> None:
    """Make a new directory entry durable (a created file survives a crash)."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def same_file(path: str, fd: int) -> bool:
    """True if ``path`` itself (not what a symbolic link there points to) names the
    file open as ``fd``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


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


def write_pieces(fd: int, pieces: Iterable[bytes]) -> int:
    """Write ``pieces`` to ``fd`` in a few large ``writev`` calls; return the byte count.

    Pieces are gathered up to :data:`WRITE_CHUNK` bytes at a time, so a spooled
    message is never read into memory whole."""
    gathered: list[bytes] = []
    size = written = 0
    for piece in pieces:
        gathered.append(piece)
        size += len(piece)
        if size >= WRITE_CHUNK:
            written += write_all(fd, gathered)
            gathered, size = [], 0
    return written + write_all(fd, gathered)


def boot_id() -> str:
    """A name for the current boot of this machine: 16 hex digits, or ``""`` if unknown."""
    try:
        with open(BOOT_ID_PATH, "rb") as file:
            text = file.read(64).decode("ascii", "replace")
    except OSError:
        return ""
    digits = "".join(c for c in text if c in "0123456789abcdef")
    return digits[:16]


_KIND_OF_MAILBOX: Final = {
    "cs4410": "a cs4410 mailbox",
    "mbox": "an mbox mailbox",
    "maildir": "a maildir folder",
    "a file": "a file",
}


#: the first bytes of the files selsmtp keeps beside a mailbox (state line, offsets
#: index, lock record): never a mailbox, and mail appended to one would damage it
_SIDE_FILES: Final = (b"selsmtp-state ", b"selsmtp-index ", b"selsmtp-lock ")


def file_format(fd: int) -> str:
    """The format the first record of the open mailbox file is in; ``""`` if it is
    empty or begins with neither format's record."""
    head = os.pread(fd, HEAD_BYTES, 0)
    for name, module in (("cs4410", formats.cs4410), ("mbox", formats.mbox)):
        if module.begins_record(head):
            return name
    return ""


def check_format(path: str, wanted: str, saved: State | None, *, by_content: bool = True) -> None:
    """The format guard (SPEC §7): raise :class:`StartupError` if the mailbox at
    ``path`` is in another format than ``wanted``, as its state line ``saved`` says
    or, without one that knows this file (its device and inode), its first record
    (or, for a Maildir, the kind of file there). ``by_content=False``: a mailbox
    file's first record is not looked at (a state line not read yet may know the
    file). Reads only; nothing is created or written."""
    found, why = "", ""
    if saved is not None and saved.format and saved.format != wanted:
        found, why = saved.format, "its state file says so"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if found or st is None:
        pass
    elif saved is not None and saved.format and (st.st_dev, st.st_ino) == (saved.dev, saved.ino):
        # The line knows this very file and says it is ``wanted``: what its first
        # bytes look like now (another program wrote into it after a consumer emptied
        # it) does not change that; the store keeps those bytes (SPEC §7).
        pass
    elif wanted == "maildir" and stat.S_ISREG(st.st_mode):
        found, why = "a file", ""
        fd = open_regular(path, os.O_RDONLY)
        try:
            found = file_format(fd) or found
        finally:
            os.close(fd)
    elif wanted != "maildir" and stat.S_ISDIR(st.st_mode):
        inside = set(os.listdir(path))
        if {"new", "cur"} <= inside or ".selsmtp" in inside:
            found = "maildir"
    elif wanted != "maildir" and stat.S_ISREG(st.st_mode):
        fd = open_regular(path, os.O_RDONLY)
        try:
            if os.pread(fd, 16, 0).startswith(_SIDE_FILES):
                raise StartupError(
                    f"mailbox {path} is not a mailbox but a file selsmtp keeps beside one "
                    "(a state line, an offsets index or a lock record); name the mailbox itself"
                )
            found = file_format(fd) if by_content else ""
        finally:
            os.close(fd)
        if found == wanted:
            found = ""
        why = "its first record says so"
    if not found:
        return
    what, wanted_what = _KIND_OF_MAILBOX.get(found, found), _KIND_OF_MAILBOX[wanted]
    raise StartupError(
        f"mailbox {path} is {what}{f' ({why})' if why else ''}, not {wanted_what} as "
        f"--format {wanted} says; start with the mailbox's format, or another --mailbox"
    )


class State:
    """The committed state of one mailbox, as kept in its state file.

    ``-1`` means "none" or "unknown" in every field but ``number``; ``""`` in ``boot``
    and ``format``.
    """

    __slots__ = (
        *("boot", "dev", "end", "first", "format", "ino", "number", "pending", "reserved"),
        "size",
    )

    def __init__(self) -> None:
        self.number = 0  #: the last number given out
        self.size = -1  #: the mailbox file's length after the last commit
        self.dev = -1  #: identity (device, inode) of that file
        self.ino = -1
        #: a batch was being written: where it started (file offset, or for a Maildir
        #: its first number); it never got its 250
        self.pending = -1
        #: the number of the first record selsmtp wrote into the current file (the A
        #: of its rotated name PATH.A-B)
        self.first = -1
        #: where the pending batch ends when written whole (file offset)
        self.end = -1
        #: numbers up to here may have been given out: the last one that a line made
        #: durable by fsync promised (see FileStore)
        self.reserved = -1
        #: the boot this line was written in (:func:`boot_id`)
        self.boot = ""
        #: the mailbox's format (``cs4410``, ``mbox``, ``maildir``); ``""`` in lines
        #: older than version 4
        self.format = ""

    def copy(self) -> State:
        other = State()
        for name in State.__slots__:
            setattr(other, name, getattr(self, name))
        return other

    def encode(self) -> bytes:
        fields = (
            *(self.number, self.size, self.dev, self.ino, self.pending, self.first),
            *(self.end, self.reserved),
        )
        words = [_MAGIC, str(_VERSION), *map(str, fields), self.boot or "-", self.format or "-"]
        text = " ".join(words)
        return f"{text} {zlib.crc32(text.encode()):08x}\n".encode().ljust(_SIZE, b" ")

    @classmethod
    def decode(cls, data: bytes) -> State | None:
        """The state in ``data``, or ``None`` if it is not a whole, intact state line."""
        try:
            return cls.parse(data)
        except ValueError:
            return None

    @classmethod
    def parse(cls, data: bytes) -> State:
        """The state in ``data``; raises ``ValueError`` saying what is wrong with it.

        Lines of every version so far are read: 1 (no ``first``), 2 (no ``end``,
        ``reserved`` or ``boot``), 3 (no ``format``) and 4."""
        line = data.strip()
        text, _, crc = line.decode("ascii", "replace").rpartition(" ")
        fields = text.split(" ")
        if not line.startswith(_MAGIC.encode() + b" ") or len(fields) < 2:
            raise ValueError("it does not hold a selsmtp state line")
        version, boot, format_ = fields[1], "", ""
        wanted = _FIELDS.get(version)
        if wanted is None:
            if version.isdigit() and int(version) > _VERSION:
                raise ValueError(f"its line is version {version}, newer than this selsmtp reads")
            raise ValueError(f"its line has an unknown version {version[:20]!r}")
        if crc != f"{zlib.crc32(text.encode()):08x}":
            raise ValueError("its checksum does not match (a torn or altered line)")
        if version == "4" and len(fields) > 3:
            format_ = "" if fields[-1] == "-" else fields[-1]
            fields = fields[:-1]
        if version in ("3", "4") and len(fields) > 2:
            boot = "" if fields[-1] == "-" else fields[-1]
            fields = fields[:-1]
        try:
            values = [int(field) for field in fields[2:]]
        except ValueError:
            raise ValueError("it holds a field that is not a number") from None
        if wanted != len(values):
            raise ValueError(f"it holds {len(values)} numbers where version {version} has {wanted}")
        values += [-1] * (8 - len(values))
        state = cls()
        state.number, state.size, state.dev, state.ino, state.pending, state.first = values[:6]
        state.end, state.reserved = values[6:]
        state.boot, state.format = boot, format_
        return state


#: how many numbers each version of the state line holds
_FIELDS: Final = {"1": 5, "2": 6, "3": 8, "4": 8}


#: The state file of the mailbox ``PATH`` is ``PATH`` + this (:class:`StateFile`).
STATE_SUFFIX: Final = ".selsmtp"
#: How much of the file :func:`pending_verdict` reads at a pending batch's offset.
HEAD_BYTES: Final = 4096


def pending_verdict(
    state: State,
    st: os.stat_result,
    rebooted: bool,
    read_at: Callable[[int], bytes],
    number_pattern: re.Pattern[bytes],
) -> str:
    """The crash rule (SPEC §7): what to do with the batch ``state`` names as pending
    in the mailbox file whose ``fstat`` is ``st``. The one copy of the rule, used by
    the store at start-up and by every reader under the shared lock.

    ``rebooted``: the machine restarted since the line was written (so the line may be
    older than the file); ``read_at(offset)``: up to :data:`HEAD_BYTES` of the file
    from ``offset``; ``number_pattern``: the format's record-head number. Returns

    * ``"none"``: no batch of ours is pending in this file (none named, the file was
      replaced, or it ends at or before the batch's start);
    * ``"whole"``: after a reboot, every byte of the batch is in the file; its fsync
      may have finished and its 250 gone out: keep it, committed up to ``state.end``;
    * ``"not-ours"``: no record head of ours begins at the offset (a consumer emptied
      the file and another program wrote into it since, before or after a reboot):
      keep everything;
    * ``"appended"``: the file reaches past where the batch would end: another
      program appended after it, and cutting would destroy its bytes: keep them;
    * ``"cut"``: the bytes from ``state.pending`` on are our torn batch: cut them
      (readers hide them).
    """
    if state.pending < 0:
        return "none"
    if (st.st_dev, st.st_ino) != (state.dev, state.ino) or st.st_size <= state.pending:
        return "none"
    if rebooted and state.pending <= state.end <= st.st_size:
        return "whole"
    if not _record_head(read_at(state.pending), state.number, number_pattern):
        return "not-ours"
    if 0 <= state.end < st.st_size:
        return "appended"
    return "cut"


def _record_head(head: bytes, last: int, number_pattern: re.Pattern[bytes]) -> bool:
    """True if ``head`` begins one of our records numbered at most ``last`` (after the
    one or two LFs the store may write before a record to reach a record boundary),
    or a header cut short before its number or its end that begins as ours do."""
    stripped = head.lstrip(b"\n")
    if len(head) - len(stripped) <= 2:
        head = stripped
    found = number_pattern.search(head)
    if found is None:
        # Cut short before its number: it must still begin as our records do.
        starts = any(
            head[: len(start)] == start[: len(head)] for start in formats.HEAD_STARTS.values()
        )
        return starts and b"\n\n" not in head
    return b"\n" not in head[: found.start()] and int(found.group(1)) <= last


def is_blank(data: bytes) -> bool:
    """True for a state or lock file that holds nothing yet: empty, or zeros (what a
    file created just before a power cut can hold)."""
    return not data.strip(b"\0")


def read_state(path: str) -> State | None:
    """The state saved at ``path``, read without creating or changing anything.

    ``None`` if there is no state file or it holds nothing yet. Raises
    :class:`StartupError` if it is damaged or not a regular file: a damaged line is
    never taken for a missing one (numbers would start again at 1)."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except NotRegularFile as exc:
        raise StartupError(f"cannot use state file: {exc}") from exc
    try:
        data = os.pread(fd, 2 * _SIZE, 0)
    finally:
        os.close(fd)
    if is_blank(data):
        return None
    try:
        return State.parse(data)
    except ValueError as exc:
        raise StartupError(
            f"state file {path} is damaged: {exc}; delete it and selsmtp finds the last "
            "number again (from the mailbox and its lock file)"
        ) from None


class StateFile:
    """The one-line state file at ``path``, opened once and rewritten in place.

    Raises ``OSError`` if it cannot be opened.
    """

    def __init__(self, path: str, fsync: Fsync) -> None:
        self.path = path
        self._fsync = fsync
        self.fd = open_regular(path, os.O_RDWR | os.O_CREAT)

    def save(self, state: State, *, sync: bool) -> None:
        """Write ``state`` (and make it durable if ``sync``); raises ``OSError``."""
        data = state.encode()
        if os.pwrite(self.fd, data, 0) != len(data):
            raise OSError(errno.EIO, "short write to the state file")
        if sync:
            self._fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
