"""Logging for the command line: lines buffered within a loop turn, written without
blocking at its end, dropped and counted when standard error does not take them.

Logging never blocks the loop and never ends it (SPEC §12). Standard error may be a
terminal, a pipe nobody reads (a test fixture's ``subprocess.PIPE``), a pipe whose
reader is gone (``selsmtp 2>&1 | head``), a full disk or a journald socket; none of
them may stall or stop the server. So :class:`Writer` appends each line to a bounded
buffer (256 KiB) and writes it without blocking when the turn ends. What the stream
does not take yet stays pending, and the server waits at most 0.1 s before it tries
again (``Server.after_turn`` returns whether bytes are pending); a full buffer drops
new lines, and a write that fails (EPIPE, ENOSPC, EIO...) drops what is pending. Both
count the lines. Once the stream takes writes again, the gap is reported as a warning
line, ``N log lines dropped``, before any line after it: the lines dropped in between
are part of the gap, so it stays in one piece.

Non-blocking without touching anyone else: descriptor 2 shares its *open file
description* (where O_NONBLOCK lives) with the shell's terminal, or with standard
output in ``2>&1 | head``, whose readiness line must still be written. So the writer
gets a description of its own: a pipe, FIFO or terminal is opened again through
``/proc/self/fd/2`` with O_NONBLOCK (Linux); a socket is written with
``MSG_DONTWAIT`` on a duplicate; a regular file never blocks (and is not reopened,
which would lose its O_APPEND offset). Elsewhere, descriptor 2 is polled before each
write and given at most ``PIPE_BUF`` bytes, which a pipe takes at once or not at all.

Time: lines are written at the end of the turn that logged them, and before the loop
first waits, so the start-up line is out when the server is ready (SPEC §7); warnings
and errors are written at once.

Cost: at ``info`` the server logs a line per delivery and per connection. Those two
go around ``logging``'s record machinery: the caller checks ``isEnabledFor`` once,
formats its message with an f-string, and :func:`info` writes the finished line into
the buffer, byte for byte what the formatter would make (about a fifth of the cost of
``logger.info``). Other lines go through ``logging`` as usual.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import select
import socket
import stat
import sys
import time

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Final, TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: bytes held for a stream that does not take them; past it, new lines are dropped
BUFFER_LIMIT: Final = 256 * 1024
NEWLINE: Final = 0x0A


class Formatter(logging.Formatter):
    """The standard formatter, with the date and time formatted once per second:
    ``strftime`` is a third of the cost of a delivery's log line."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self.stamp(record.created, record.msecs)

    def stamp(self, created: float, msecs: float) -> str:
        """``asctime`` as the standard formatter writes it."""
        second = int(created)
        if second != self._second:
            moment = self.converter(second)
            self._second, self._stamp = second, time.strftime(self.default_time_format, moment)
        return f"{self._stamp},{int(msecs):03d}"  # as default_msec_format has it

    def now(self) -> str:
        """``asctime`` for a line made now."""
        created = time.time()
        return self.stamp(created, (created - int(created)) * 1000)


class Writer:
    """Bytes to a descriptor, never blocking and never raising: see the module docstring.

    :meth:`write` only appends to the buffer; :meth:`flush` writes what the stream
    takes. ``dropped`` is the number of lines lost and not yet reported."""

    def __init__(self, fd: int | None, *, limit: int = BUFFER_LIMIT) -> None:
        self._buffer = bytearray()
        self._limit = limit
        self.dropped = 0
        self._failed_at = 0  # ``dropped`` when the last write failed: no retry until it grows
        self._note_end = 0  # bytes at the buffer's start that are a count not yet written
        self._note_count = 0
        self._mid_line = False  # the stream's last byte is not the end of a line
        self._fd: int | None = None  # the descriptor to poll for room (for drain)
        self._close: Callable[[], None] | None = None
        self._send: Callable[[bytearray], int] = self._refuse
        if fd is not None:
            self._open(fd)

    @classmethod
    def for_stream(cls, stream: TextIO) -> Writer:
        """A writer onto a text stream without a descriptor (e.g. a captured stderr)."""
        writer = cls(None)

        def send(data: bytearray) -> int:
            stream.write(data.decode("utf-8", "replace"))
            stream.flush()
            return len(data)

        writer._send = send
        return writer

    def _open(self, fd: int) -> None:
        try:
            mode = os.fstat(fd).st_mode
        except OSError:  # no descriptor 2 at all: every line is dropped
            return
        if stat.S_ISREG(mode):
            self._fd = fd
            self._send = lambda data: os.write(fd, data)
        elif stat.S_ISSOCK(mode) and hasattr(socket, "MSG_DONTWAIT"):
            try:
                sock = socket.socket(fileno=os.dup(fd))
            except OSError:
                self._fd, self._send = fd, self._polled_sender(fd)
                return
            flags = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
            self._fd, self._close = sock.fileno(), sock.close
            self._send = lambda data: sock.send(data, flags)
        else:
            own = self._reopen(fd, mode)
            if own is not None:
                self._fd, self._close = own, lambda: os.close(own)
                self._send = lambda data: os.write(own, data)
            else:
                self._fd = fd
                self._send = self._polled_sender(fd)

    @staticmethod
    def _reopen(fd: int, mode: int) -> int | None:
        """A new description of what ``fd`` is, non-blocking, or None where that fails."""
        flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        try:
            own = os.open(f"/proc/self/fd/{fd}", flags)
        except OSError:  # no /proc (not Linux), or not allowed
            return None
        theirs = os.fstat(fd)
        mine = os.fstat(own)
        if (mine.st_dev, mine.st_ino, mine.st_mode) != (theirs.st_dev, theirs.st_ino, mode):
            os.close(own)  # not the same pipe or terminal after all
            return None
        return own

    @staticmethod
    def _polled_sender(fd: int) -> Callable[[bytearray], int]:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)

        def send(data: bytearray) -> int:
            if not poller.poll(0):
                raise BlockingIOError(errno.EAGAIN, "no room")
            return os.write(fd, memoryview(data)[: select.PIPE_BUF])

        return send

    @staticmethod
    def _refuse(data: bytearray) -> int:
        raise OSError(errno.EBADF, "no standard error")

    @property
    def pending(self) -> int:
        """Bytes the stream has not taken yet."""
        return len(self._buffer)

    def write(self, text: str) -> None:
        """Add ``text`` (whole lines) to the buffer, or count its lines as dropped."""
        data = text.encode("utf-8", "backslashreplace")
        if self.dropped or len(self._buffer) + len(data) > self._limit:
            self.dropped += data.count(b"\n") or 1
        else:
            self._buffer += data

    def flush(self) -> bool:
        """Write what the stream takes now; return whether bytes are still pending."""
        buffer = self._buffer
        while True:
            if not buffer:
                if not self.dropped or self.dropped == self._failed_at:
                    return False
                self._add_note()
            try:
                sent = self._send(buffer)
            except BlockingIOError:
                return True
            except (OSError, ValueError):
                self._discard()
                return False
            if sent <= 0:
                return True
            self._mid_line = buffer[sent - 1] != NEWLINE
            del buffer[:sent]
            self._note_end = max(0, self._note_end - sent)
            self._failed_at = 0

    def _add_note(self) -> None:
        count = self.dropped
        end_cut_line = "\n" if self._mid_line else ""
        note = (
            f"{end_cut_line}{_formatter.now()} WARNING selsmtp.logs: "
            f"{count} log line{'' if count == 1 else 's'} dropped "
            "(standard error did not take them)\n"
        ).encode()
        self._buffer += note
        self._note_end, self._note_count = len(note), count
        self.dropped = 0

    def _discard(self) -> None:
        """The stream failed: drop what is pending, and count it."""
        lost = self._buffer.count(b"\n")
        if self._note_end:  # a count not written is no log line, but its lines are lost
            lost += self._note_count - 1
        self._buffer.clear()
        self._note_end = 0
        self.dropped += lost
        self._failed_at = self.dropped

    def drain(self, timeout: float) -> None:
        """Flush, waiting up to ``timeout`` seconds for room (for the exit)."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        if self._fd is not None:
            poller.register(self._fd, select.POLLOUT)
        while self.flush():
            left = deadline - time.monotonic()
            if left <= 0 or self._fd is None:
                return
            poller.poll(left * 1000)

    def close(self) -> None:
        close, self._close = self._close, None
        if close is not None:
            with contextlib.suppress(OSError):
                close()


#: the formatter for lines made outside ``logging`` (the dropped count, :func:`info`)
_formatter = Formatter(FORMAT)


class Handler(logging.Handler):
    """Formats records into a :class:`Writer`; its owner flushes it at the end of
    every loop turn (warnings and errors are flushed at once)."""

    def __init__(self, writer: Writer) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()

    def line(self, name: str, message: str) -> None:
        """An info line from logger ``name``, as the formatter would make it."""
        self.writer.write(f"{_formatter.now()} INFO {name}: {message}\n")

    def close(self) -> None:
        self.writer.close()
        super().close()


#: the command line's handler, once :func:`setup` installed it
_handler: Handler | None = None


def counted(count: int, noun: str) -> str:
    """``"1 message"``, ``"2 messages"``: a count and its noun, for log lines."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def info(logger: logging.Logger, message: str) -> None:
    """Log ``message``, already formatted, at info level: straight into the command
    line's buffer when it is set up, else through ``logger``. For the lines made per
    delivery and per connection; callers check ``logger.isEnabledFor(logging.INFO)``
    first, so a line that is not logged is never formatted."""
    handler = _handler
    if handler is not None:
        handler.line(logger.name, message)
    else:
        logger.info(message)


def stderr_writer() -> Writer:
    """A :class:`Writer` onto standard error."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        if sys.stderr is None:  # descriptor 2 was closed at start
            return Writer(None)
        return Writer.for_stream(sys.stderr)  # not a real file (e.g. captured)
    return Writer(fd)


def setup(level: str) -> Handler:
    """Send the ``selsmtp`` logs to stderr at ``level``; return the handler to flush.

    Records skip what the format never shows (the logging HOWTO's "Optimization"):
    the caller's file and line (a stack walk), and the thread and process (a
    ``getpid`` system call per record). These are settings of the ``logging`` module,
    for the whole process: this is for the command line, which owns the process."""
    global _handler
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = Handler(stderr_writer())
    handler.setFormatter(Formatter(FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())
    _handler = handler
    return handler
