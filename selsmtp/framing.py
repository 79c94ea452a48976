"""Framing: where a command line ends, and where a message ends.

Theory of operation
-------------------
The session keeps one input buffer (a ``bytearray``). In command mode a
:class:`LineReader` cuts lines out of it; after ``354`` a :class:`DataReader` takes
every byte until the end-of-data line and hands back what follows it, which is
pipelined command input again.

Both readers are resumable: they remember how far they have searched, keep at most a
few bytes of lookahead, and never loop over bytes in Python (``find`` does the work in
C; Python sees only lines, and in message data only the lines that start with a dot),
so any split of the input, down to one byte per read, gives the same lines and the
same message.

Command lines (RFC 5321 §2.3.8, §4.5.3.1.4) end in CRLF; a bare LF is accepted too, for
people typing into telnet or netcat. A line may be 512 bytes long, its line ending
included. Once a line is known to be longer, its bytes are dropped as they arrive
(memory stays bounded) and the line is reported as too long when its end comes.

Message data (RFC 5321 §4.1.1.4) ends only at ``CRLF . CRLF``. A bare LF or bare CR
never ends a line here, so ``\\n.\\n``, ``\\r.\\r``, ``\\n.\\r\\n`` and ``\\r\\n.\\n`` are
all message content: accepting any of them is the SMTP smuggling flaw
(CVE-2023-51764 and its kin). A leading dot on a data line is transparency
(RFC 5321 §4.5.2) and is removed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import BinaryIO, Final, TypeAlias

CRLF: Final = b"\r\n"
END_OF_DATA: Final = b"\r\n.\r\n"
#: a data line that starts with a dot: the end-of-data line, or a dot to unstuff
DOT_LINE: Final = b"\r\n."
#: A read with more than MANY_DOT_LINES dot lines, plus one per DOT_LINE_SPACING bytes,
#: is unstuffed in bulk (see DataReader.feed). Measured: a dot line costs the loop about
#: as much as the bulk path's extra passes over 300 bytes, so the loop never costs
#: more than the bulk path would, and hostile data thick with dot lines at most twice.
MANY_DOT_LINES: Final = 16
DOT_LINE_SPACING: Final = 512
#: Kept pieces shorter than this are copied into one ``bytearray`` instead of being kept
#: as objects of their own. A bytes object costs about 50 bytes besides its data (its
#: header, the allocator's rounding, its slot in the list): kept one by one, data read
#: two bytes at a time would take 28 times its size, and the spool threshold, which
#: counts the data, would let a connection hold 28 MiB. Pieces this long or longer
#: cost at most 5% more than their data, and keeping them as they are spares the copy.
SMALL_PIECE: Final = 1024


class LineStatus(enum.Enum):
    TOO_LONG = enum.auto()  #: a line longer than the limit ended; its bytes were dropped


class LineReader:
    """Cuts command lines out of a buffer, enforcing a length limit while buffering.

    Lines that begin with ``AUTH`` (and every line while :attr:`long_lines` is set,
    for the responses of an AUTH exchange) may be up to ``long_limit`` bytes long
    (RFC 4954 §4): the limit is looked at only once a line outgrows ``limit``, so the
    other lines pay nothing for it.
    """

    __slots__ = ("_discarding", "_scanned", "limit", "long_limit", "long_lines")

    def __init__(self, limit: int, long_limit: int | None = None) -> None:
        self.limit = limit
        self.long_limit = limit if long_limit is None else long_limit
        self.long_lines = False  #: every line may be long_limit bytes
        self._scanned = 0  # bytes at the front of the buffer known to hold no LF
        self._discarding = False  # inside a line already known to be too long

    def _limit_for(self, line: bytes | bytearray) -> int:
        """The limit for ``line`` (the start of one line, at least ``limit`` bytes)."""
        if self.long_lines or line[:5].upper() in (b"AUTH ", b"AUTH\t"):
            return self.long_limit
        return self.limit

    def maybe_next_line(self, buf: bytearray) -> bytes | LineStatus | None:
        """Remove and return the next complete line of ``buf`` (line ending included).

        Returns ``None`` when ``buf`` holds no complete line yet (the partial line stays
        in ``buf``, unless it is already too long, in which case it is dropped), or
        :attr:`LineStatus.TOO_LONG` when a line over the limit has just ended.
        """
        end = buf.find(b"\n", self._scanned)
        if end < 0:
            if self._discarding or (len(buf) >= self.limit and len(buf) >= self._limit_for(buf)):
                # Why: with no LF in `limit` bytes the line cannot fit any more.
                self._discarding = True
                buf.clear()
                self._scanned = 0
            else:
                self._scanned = len(buf)
            return None
        line = bytes(buf[: end + 1])
        del buf[: end + 1]
        self._scanned = 0
        if self._discarding or (len(line) > self.limit and len(line) > self._limit_for(line)):
            self._discarding = False
            return LineStatus.TOO_LONG
        return line

    def reset(self) -> None:
        """Forget any partial line (the buffer it was cutting from was emptied)."""
        self._scanned = 0
        self._discarding = False


#: A finished message: bytes when small, else a spooled file positioned at 0. (Only a
#: string at run time: nothing there needs the type, and building it needs typing.)
Body: TypeAlias = "bytes | BinaryIO"


class DataReader:
    """Collects one message's data up to ``CRLF . CRLF``, unstuffing dots.

    The stream is read as if a CRLF came before its first byte (the one that ended
    the DATA command), so a first line of ``.`` ends an empty message and a leading
    dot on the first line is unstuffed like any other.

    At most ``max_size`` bytes (after unstuffing, CRLFs included) are kept; past that
    the reader goes on looking for the end but drops the data (:attr:`too_big`).
    Past ``spool_threshold`` bytes the data moves to a file from ``new_spool``; if that
    file cannot be made or written, the reader drops the data and reads on
    (:attr:`spool_failed`).

    Memory is bounded in real bytes, not only in data: what is held is about the data's
    size (at most about 1.2 times) however small the reads, because short pieces are
    gathered into one ``bytearray`` (see :data:`SMALL_PIECE`).
    """

    __slots__ = (
        "_carry",
        "_chunks",
        "_max_size",
        "_new_spool",
        "_skip",
        "_small",
        "_spool",
        "_spool_threshold",
        "size",
        "spool_failed",
        "too_big",
    )

    def __init__(
        self,
        max_size: int,
        *,
        spool_threshold: int = 1 << 20,
        new_spool: Callable[[], BinaryIO] | None = None,
    ) -> None:
        self._max_size = max_size
        self._spool_threshold = spool_threshold
        self._new_spool = new_spool
        self._carry = CRLF  # bytes seen but not yet judged; starts with the virtual CRLF
        self._skip = len(CRLF)  # bytes at the front of the carry never to be kept
        #: the data kept so far, in order: pieces of SMALL_PIECE bytes or more as they
        #: came, shorter ones gathered into bytearrays; then ``_small``, still growing
        #: (made only when needed: most messages never need it)
        self._chunks: list[bytes | bytearray] = []
        self._small: bytearray | None = None
        self._spool: BinaryIO | None = None
        self.size = 0
        self.too_big = False
        #: the spool file could not be made or written; the message is lost (451)
        self.spool_failed = False

    def feed(self, data: bytes) -> bytes | None:
        """Consume ``data``. Returns ``None`` while the message goes on, or, once the
        end-of-data line has been read, the bytes that followed it (maybe ``b""``).

        One ``find`` for ``CRLF .`` (a line that starts with a dot) finds both the
        end-of-data line and every dot to unstuff, so each byte is scanned once and
        Python sees only the dot lines, which are rare in real mail. Data with many of
        them goes to :meth:`_feed_dotted`, which has C do each step over all of it.
        """
        search = self._carry + data if self._carry else data
        kept = self._skip  # search[:kept] is already emitted, dropped or virtual
        hit = search.find(DOT_LINE)
        dots = 0
        while 0 <= hit <= len(search) - len(END_OF_DATA):
            if search[hit + 3] == 0x0D and search[hit + 4] == 0x0A:  # CRLF . CRLF
                self._emit(search[kept : hit + 2])  # the last line keeps its CRLF
                self._carry, self._skip = b"", 0
                return search[hit + 5 :]
            dots += 1
            # (hit >= kept: the virtual CRLF in front is never handed to the bulk path)
            if dots > MANY_DOT_LINES + len(search) // DOT_LINE_SPACING and hit >= kept:
                self._emit(search[kept:hit])
                return self._feed_dotted(search[hit:])
            # RFC 5321 §4.5.2: a line that starts with a dot has that dot removed.
            self._emit(search[kept : hit + 2])
            kept = hit + 3
            hit = search.find(DOT_LINE, kept)
        # Keep back whatever may still turn out to start a dot line or the end line:
        # a "CRLF ." too near the end to judge, or a trailing CR or CRLF.
        if hit >= 0:
            cut = hit
        elif search.endswith(CRLF):
            cut = len(search) - 2
        elif search.endswith(b"\r"):
            cut = len(search) - 1
        else:
            cut = len(search)
        if cut > kept:
            self._emit(search[kept:cut])
        self._carry, self._skip = search[cut:], max(0, kept - cut)
        return None

    def _feed_dotted(self, search: bytes) -> bytes | None:
        """:meth:`feed` for data that starts at a line start (a CRLF) and holds many
        dot lines: one ``find`` for the end, one ``replace`` to unstuff."""
        end = search.find(END_OF_DATA)
        if end >= 0:
            self._emit(search[: end + 2].replace(DOT_LINE, CRLF))
            self._carry, self._skip = b"", 0
            return search[end + 5 :]
        # Keep the last four bytes (a possible partial end line), and never cut inside
        # a "CRLF ." so that the replace sees every line start whole.
        cut = len(search) - 4
        if cut > 0:
            if search[cut - 1] == 0x0D:
                cut -= 1
            elif cut >= 2 and search[cut - 2 : cut] == CRLF:
                cut -= 2
        if cut <= 0:
            self._carry, self._skip = search, 0
            return None
        self._emit(search[:cut].replace(DOT_LINE, CRLF))
        self._carry, self._skip = search[cut:], 0
        return None

    def _emit(self, piece: bytes) -> None:
        if not piece:
            return
        self.size += len(piece)
        if self.too_big:
            return
        if self.size > self._max_size:
            self.too_big = True
            self.discard()
            return
        if self.spool_failed:
            return
        try:
            if self._spool is not None:
                self._spool.write(piece)
            elif self._new_spool is not None and self.size > self._spool_threshold:
                self._spool = spool = self._new_spool()
                for chunk in self._chunks:
                    spool.write(chunk)
                if self._small is not None:
                    spool.write(self._small)
                spool.write(piece)
                self._chunks = []
                self._small = None
            elif len(piece) < SMALL_PIECE and self._chunks:
                if self._small is None:
                    self._small = bytearray(piece)
                else:
                    self._small += piece
            else:
                # Why a lone first piece is kept as it is, however short: a message that
                # came in one read is then joined without a copy.
                if self._small is not None:
                    self._chunks.append(self._small)
                    self._small = None
                self._chunks.append(piece)
        except OSError:
            # Why: no descriptor or no room for the spool file. The message cannot be
            # kept, but the client must still be read to its end and told (451).
            self.spool_failed = True
            self.discard()

    def body(self) -> Body | None:
        """The finished message (call once, after :meth:`feed` returned non-``None``),
        or ``None`` if it could not be kept (:attr:`spool_failed`)."""
        if self._spool is not None:
            try:
                self._spool.flush()
                self._spool.seek(0)
            except OSError:
                self.spool_failed = True
                self.discard()
                return None
            return self._spool
        if self.spool_failed:
            return None
        if self._small is not None:
            self._chunks.append(self._small)
            self._small = None
        return b"".join(self._chunks)

    def discard(self) -> None:
        """Drop what was collected (the client went away mid-message)."""
        self._chunks = []
        self._small = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None
