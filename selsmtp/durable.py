"""What both stores share: their errors, whole writes, directory fsyncs, the state file.

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
import os
import zlib
from collections.abc import Callable, Iterable, Sequence

from selsmtp.session import Deliver

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import Final, Protocol

#: writev takes at most IOV_MAX buffers; stay well below it.
MAX_IOV: Final = 512
#: a batch's pieces are written once this many bytes have gathered
WRITE_CHUNK: Final = 4 << 20

_MAGIC: Final = "selsmtp-state"
_VERSION: Final = 3
_SIZE: Final = 256
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


def fsync_directory(path: str) -> None:
    """Make a new directory entry durable (a created file survives a crash)."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def same_file(path: str, fd: int) -> bool:
    """True if ``path`` names the file open as ``fd``."""
    try:
        st = os.stat(path)
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


class State:
    """The committed state of one mailbox, as kept in its state file.

    ``-1`` means "none" or "unknown" in every field but ``number``; ``""`` in ``boot``.
    """

    __slots__ = ("boot", "dev", "end", "first", "ino", "number", "pending", "reserved", "size")

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
        text = " ".join([_MAGIC, str(_VERSION), *map(str, fields), self.boot or "-"])
        return f"{text} {zlib.crc32(text.encode()):08x}\n".encode().ljust(_SIZE, b" ")

    @classmethod
    def decode(cls, data: bytes) -> State | None:
        """The state in ``data``, or ``None`` if it is not a whole, intact state line.

        Version 1 lines (no ``first``) and version 2 lines (no ``end``, ``reserved``
        or ``boot``) are read too."""
        text, _, crc = data.strip().decode("ascii", "replace").rpartition(" ")
        fields = text.split(" ")
        if fields[0] != _MAGIC or len(fields) < 2 or crc != f"{zlib.crc32(text.encode()):08x}":
            return None
        version, boot = fields[1], ""
        if version == str(_VERSION) and len(fields) > 2:
            boot = "" if fields[-1] == "-" else fields[-1]
            fields = fields[:-1]
        try:
            values = [int(field) for field in fields[2:]]
        except ValueError:
            return None
        wanted = {"1": 5, "2": 6, str(_VERSION): 8}
        if wanted.get(version) != len(values):
            return None
        values += [-1] * (8 - len(values))
        state = cls()
        state.number, state.size, state.dev, state.ino, state.pending, state.first = values[:6]
        state.end, state.reserved = values[6:]
        state.boot = boot
        return state


class StateFile:
    """The one-line state file at ``path``, opened once and rewritten in place.

    Raises ``OSError`` if it cannot be opened.
    """

    def __init__(self, path: str, fsync: Fsync) -> None:
        self.path = path
        self._fsync = fsync
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def load(self) -> State | None:
        """The saved state; ``None`` if the file is new, empty or damaged."""
        return State.decode(os.pread(self.fd, 2 * _SIZE, 0))

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
