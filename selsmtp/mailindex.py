"""The offsets index beside a file mailbox: where every record selsmtp wrote lies.

Why it exists
-------------
A ``cs4410`` body is not quoted (SPEC §5.1), so a client can put bytes in its body
that look exactly like the head of another record, with a plausible number. A reader
that finds records by parsing cannot tell those from real ones; the store can, since
it wrote every record and knows where each begins. It keeps that knowledge here, in a
file readers can use (SPEC §7), and readers fall back to parsing, with a warning,
only when the index does not describe the file in front of them.

The file
--------
The index of the mailbox ``PATH`` (``cs4410`` and ``mbox`` only) is
``PATH.selsmtp-index``; when the store rotates ``PATH`` to ``PATH.A-B`` the index
goes along, to ``PATH.A-B.selsmtp-index``. It is text, appended to only::

    selsmtp-index 1 FORMAT DEV INO
    OFFSET LENGTH NUMBER
    OFFSET LENGTH NUMBER
    ...

The first line names the format (``cs4410`` or ``mbox``) and the identity (device,
inode) of the mailbox file it describes. Each further line is one record selsmtp
wrote, in file order, in decimal: the record is ``mailbox[OFFSET:OFFSET+LENGTH]``,
from the first byte of its head to the end of its closing blank line, and NUMBER is
its number. A last line without its LF is a write cut short, and is ignored.

Bytes of the mailbox that no entry covers are not records selsmtp wrote *as far as
this index knows*: another program's records, damage another writer left, the few
bytes (a LF or two) the store writes to put its next record after a blank line, or
records written before the index existed (an older selsmtp, or an index the store
had to begin again). A reader parses those gaps as it would a file with no index.

When it is stale
----------------
:func:`load` answers ``None`` when the index cannot describe the file: none there,
not a regular file, a header naming another file or an unknown format, entries out
of order, or an entry past the end of the file (a consumer emptied it, as movemail
does, so the index is stale until the store's next append begins it again). The
store changes the index only under the mailbox's exclusive lock, and readers load it
holding the shared lock, so the two agree.

A file a consumer renames within its folder keeps its index: readers of the new name
look for an index in the folder whose header names the file (:func:`find`), and the
store, at its next append, renames the index along (Linux tells it the new name).

Durability
----------
The index is written after the records it lists are written and fsync'd, and before
the commit is recorded, so an entry is never ahead of the mail it points to, and the
crash recovery of the store cuts the entries of a batch it cuts
(:meth:`IndexWriter.truncate_to`). It costs one ``write`` per batch and no fsync of
its own: after a crash of the process the page cache still holds it, and it is
fsync'd with the state line (about once per thousand messages). After a power cut it
may lack its last entries; those records are then a gap a reader parses.
"""

from __future__ import annotations

import collections
import errno
import os

from selsmtp.durable import open_regular

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Final, NamedTuple

    class IndexEntry(NamedTuple):
        """One record selsmtp wrote: ``mailbox[offset:offset+length]``, numbered ``number``."""

        offset: int
        length: int
        number: int

else:
    # Why not typing.NamedTuple: importing typing slows start-up (see selsmtp/__init__.py).
    IndexEntry = collections.namedtuple("IndexEntry", ["offset", "length", "number"])
    IndexEntry.__doc__ = (
        "One record selsmtp wrote: ``mailbox[offset:offset+length]``, numbered ``number``."
    )

__all__ = ["FORMATS", "SUFFIX", "IndexEntry", "IndexWriter", "cut", "find", "index_path"]
__all__ += ["load", "parse"]

#: the index of ``PATH`` is ``PATH`` + this
SUFFIX: Final = ".selsmtp-index"
#: the formats an index may describe
FORMATS: Final = ("cs4410", "mbox")
_MAGIC: Final = b"selsmtp-index"
_VERSION: Final = b"1"
#: the index is read backwards in pieces of this size when entries are cut
_CHUNK: Final = 1 << 16
#: more than the longest line of an index (three 20-digit numbers, a header)
_LINE: Final = 256


def index_path(mailbox_path: str) -> str:
    """Where the index of the mailbox at ``mailbox_path`` is."""
    return mailbox_path + SUFFIX


def header(fmt: str, dev: int, ino: int) -> bytes:
    """The first line of an index describing a ``fmt`` mailbox file (``dev``, ``ino``)."""
    if fmt not in FORMATS:
        raise ValueError(f"no index for the {fmt} format")
    return b"%s %s %s %d %d\n" % (_MAGIC, _VERSION, fmt.encode(), dev, ino)


def encode(entries: Iterable[IndexEntry]) -> bytes:
    """The lines of ``entries``."""
    return b"".join(b"%d %d %d\n" % entry for entry in entries)


def _decimal(field: bytes) -> int:
    """A field of the index: plain ASCII digits (no sign, no spaces), or ValueError."""
    if not field.isdigit() or not field.isascii():
        raise ValueError(field)
    return int(field)


def parse_header(line: bytes) -> tuple[str, int, int] | None:
    """``(format, dev, ino)`` from an index's first line (its LF included or not)."""
    fields = line.rstrip(b"\n").split(b" ")
    if len(fields) != 5 or fields[0] != _MAGIC or fields[1] != _VERSION:
        return None
    fmt = fields[2].decode("ascii", "replace")
    if fmt not in FORMATS:
        return None
    try:
        return fmt, _decimal(fields[3]), _decimal(fields[4])
    except ValueError:
        return None


def parse_entry(line: bytes) -> IndexEntry | None:
    """The entry on one line of an index (its LF included or not); ``None`` if not one."""
    fields = line.rstrip(b"\n").split(b" ")
    if len(fields) != 3:
        return None
    try:
        return IndexEntry(*map(_decimal, fields))
    except ValueError:
        return None


def parse(data: bytes, st: os.stat_result) -> tuple[str, list[IndexEntry]] | None:
    """The format and the entries of the index ``data``, if it describes the mailbox
    file whose stat is ``st``; ``None`` if it does not (see the module docstring)."""
    data = data[: data.rfind(b"\n") + 1]  # a torn last line is ignored
    lines = data.split(b"\n")[:-1]
    if not lines:
        return None
    described = parse_header(lines[0])
    if described is None or described[1:] != (st.st_dev, st.st_ino):
        return None
    entries: list[IndexEntry] = []
    end = number = 0
    for line in lines[1:]:
        entry = parse_entry(line)
        if (
            entry is None
            or entry.offset < end
            or entry.length <= 0
            or entry.number <= number
            or entry.offset + entry.length > st.st_size
        ):
            return None
        entries.append(entry)
        end, number = entry.offset + entry.length, entry.number
    return described[0], entries


def load(mailbox_path: str, st: os.stat_result) -> list[IndexEntry] | None:
    """The entries of the index of ``mailbox_path``, if it describes the file whose
    stat (taken by the caller, e.g. with ``fstat`` on its descriptor) is ``st``.

    ``None``: no usable index; parse the mailbox instead. Call it holding the
    mailbox's shared lock. Never raises ``OSError``.
    """
    try:
        fd = open_regular(index_path(mailbox_path), os.O_RDONLY)
    except OSError:  # missing, or not a regular file (never followed, never waited for)
        return None
    try:
        pieces = []
        while piece := os.read(fd, 1 << 20):
            pieces.append(piece)
    except OSError:
        return None
    finally:
        os.close(fd)
    parsed = parse(b"".join(pieces), st)
    return None if parsed is None else parsed[1]


def find(mailbox_path: str, st: os.stat_result) -> list[IndexEntry] | None:
    """The entries of the index of the mailbox file ``st`` at ``mailbox_path``: its own
    (:func:`load`), else the index of another name in the same folder whose header
    names this very file: a consumer renamed the mailbox (``mv mailbox taken``) and
    the store has not appended since, which takes the index along. ``None`` if none.
    Call it holding the mailbox's shared lock. Never raises ``OSError``."""
    found = load(mailbox_path, st)
    if found is not None:
        return found
    own = index_path(os.path.abspath(mailbox_path))
    folder = os.path.dirname(own)
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    for name in names:
        side = os.path.join(folder, name)
        if name.endswith(SUFFIX) and side != own and _names(side, st):
            return load(side[: -len(SUFFIX)], st)
    return None


def _names(path: str, st: os.stat_result) -> bool:
    """True if the header of the index at ``path`` names the mailbox file ``st``."""
    try:
        fd = open_regular(path, os.O_RDONLY)
        try:
            described = parse_header(os.pread(fd, _LINE, 0).partition(b"\n")[0])
        finally:
            os.close(fd)
    except OSError:
        return False
    return described is not None and described[1:] == (st.st_dev, st.st_ino)


def cut(mailbox_path: str, st: os.stat_result, length: int) -> None:
    """Cut the entries of records that do not end within the first ``length`` bytes
    out of the index of the mailbox file ``st`` at ``mailbox_path`` (a file no
    :class:`IndexWriter` holds: one rotated away). Nothing changes if the index does
    not describe that file. Raises ``OSError``."""
    entries = load(mailbox_path, st)
    if entries is None:
        return
    kept = [entry for entry in entries if entry.offset + entry.length <= length]
    fd = _open(index_path(mailbox_path))
    try:  # the file as IndexWriter writes it: its header, then the entries
        fmt = parse_header(os.pread(fd, _LINE, 0).partition(b"\n")[0])
        if fmt is not None:
            os.ftruncate(fd, len(header(fmt[0], st.st_dev, st.st_ino)) + len(encode(kept)))
    finally:
        os.close(fd)


def _open(path: str) -> int:
    """Open (create) the index file at ``path`` for appending, with
    :func:`~selsmtp.durable.open_regular`: ``OSError`` if it is not a regular file."""
    return open_regular(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)


class IndexWriter:
    """The store's side of the index of the mailbox at ``mailbox_path``: opened once,
    appended to under the mailbox's exclusive lock.

    The writer knows the file it describes (``fmt``, ``dev``, ``ino``), where its last
    entry ends in the mailbox (``end``) and its last number (``last``); ``dev`` is -1
    until :meth:`adopt` or :meth:`reset` has said which file that is. Every method
    raises ``OSError`` on a failed system call; the index is then at worst stale or
    short, which readers notice or read around.
    """

    def __init__(self, mailbox_path: str, fsync: Callable[[int], None]) -> None:
        self.path = index_path(mailbox_path)
        self._fsync = fsync
        self.fmt = ""
        self.dev = self.ino = -1
        self.end = 0  #: where the last entry's record ends in the mailbox (0: none)
        self.last = 0  #: the last entry's number (0: none)
        self.last_offset = 0  #: where the last entry's record begins
        self._size = 0  #: the index file's length
        self._header = 0  #: its header's length
        self.fd = _open(self.path)

    def describes(self, dev: int, ino: int) -> bool:
        return (self.dev, self.ino) == (dev, ino)

    def adopt(self, fmt: str, st: os.stat_result) -> bool:
        """Go on with the index already there if its header names this ``fmt`` file
        (``st``) and its last entry fits in it; else :meth:`reset` it. True if kept.

        Reads the header and the last entry only (the file can be large, and start-up
        counts); a torn last line is cut off."""
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, _LINE, 0)
        header_end = head.find(b"\n") + 1
        if header_end and parse_header(head[:header_end]) == (fmt, st.st_dev, st.st_ino):
            tail_start = max(header_end, size - _LINE)
            tail = os.pread(self.fd, size - tail_start, tail_start)
            cut = tail.rfind(b"\n") + 1  # a torn last line is cut off
            line_start = tail.rfind(b"\n", 0, cut - 1) + 1 if cut else 0
            last = parse_entry(tail[line_start:cut]) if cut else None
            if not cut and tail_start == header_end:  # no entries
                last, cut = IndexEntry(0, 0, 0), 0
            elif line_start == 0 and tail_start != header_end:
                last = None  # a line longer than any entry: not an index
            if last is not None and last.offset + last.length <= st.st_size:
                if tail_start + cut != size:
                    os.ftruncate(self.fd, tail_start + cut)
                self._size, self._header = tail_start + cut, header_end
                self.fmt, self.dev, self.ino = fmt, st.st_dev, st.st_ino
                self._keep(last if last.length else None)
                return True
        self.reset(fmt, st.st_dev, st.st_ino)
        return False

    def reset(self, fmt: str, dev: int, ino: int) -> None:
        """Begin the index again, with no entries, for the ``fmt`` file (``dev``, ``ino``)."""
        line = header(fmt, dev, ino)
        self.dev = self.ino = -1  # unknown until the new header is written
        if self.fd < 0:
            self.fd = _open(self.path)
        os.ftruncate(self.fd, 0)
        self._size = 0
        self._keep(None)
        self._write(line)
        self.fmt, self.dev, self.ino = fmt, dev, ino
        self._header = len(line)

    def append(self, entries: Iterable[IndexEntry]) -> None:
        """Add ``entries`` (records just committed after every entry so far) in one
        ``write``. If it fails, the index is cut back to what it held before."""
        entries = list(entries)
        if not entries:
            return
        data = encode(entries)
        size = self._size
        try:
            self._write(data)
        except OSError:
            try:
                os.ftruncate(self.fd, size)
                self._size = size
            except OSError:
                self.dev = self.ino = -1  # unknown: the next append begins it again
            raise
        self._keep(entries[-1])

    def truncate_to(self, mailbox_length: int) -> None:
        """Cut the entries of records that do not end within the first
        ``mailbox_length`` bytes of the mailbox (crash recovery cut them)."""
        if self.end <= mailbox_length:
            return
        # Read backwards: everything from ``position`` (a line's start) on is cut.
        position, kept = self._size, None
        while kept is None and position > self._header:
            start = max(self._header, position - _CHUNK)
            lines = os.pread(self.fd, position - start, start).split(b"\n")[:-1]
            if start != self._header:
                del lines[0]  # it may have begun before ``start``
            moved = position
            for line in reversed(lines):
                entry = parse_entry(line)
                if entry is not None and entry.offset + entry.length <= mailbox_length:
                    kept = entry
                    break
                position -= len(line) + 1
            if position == moved and kept is None:  # not an index line: cut it all
                position = self._header
        os.ftruncate(self.fd, position)
        self._size = position
        self._keep(kept)

    def rename(self, mailbox_path: str) -> None:
        """The mailbox was renamed to ``mailbox_path`` (rotation): its index goes along,
        and a new, empty index file takes its place; :meth:`reset` it next."""
        os.rename(self.path, index_path(mailbox_path))
        os.close(self.fd)
        self.fd = -1  # reset() opens the new one
        self.dev = self.ino = -1
        self._size = self._header = 0
        self._keep(None)

    def sync(self) -> None:
        if self.fd >= 0:
            self._fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _keep(self, last: IndexEntry | None) -> None:
        """Remember ``last`` as the last entry (``None``: there are none)."""
        if last is None:
            self.end = self.last = self.last_offset = 0
        else:
            self.end, self.last = last.offset + last.length, last.number
            self.last_offset = last.offset

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            if written <= 0:
                raise OSError(errno.EIO, "short write to the index", self.path)
            self._size += written
            view = view[written:]
