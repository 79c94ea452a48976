"""Logging for the command line: records buffered within a loop turn, flushed at its end.

At info level the server logs a line per delivery and per connection. A plain
``StreamHandler`` on stderr writes (and so makes a system call) per line; at
thousands of messages a second that is a measurable share of the server's CPU. This
handler only appends to a buffer; the server flushes it at the end of every loop
turn (``Server.after_turn``), before it waits again, so a line reaches stderr at most
one turn late. Warnings and errors are written at once.
"""

from __future__ import annotations

import io
import logging
import sys
import time

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
        second = int(record.created)
        if second != self._second:
            moment = self.converter(second)
            self._second, self._stamp = second, time.strftime(self.default_time_format, moment)
        return f"{self._stamp},{int(record.msecs):03d}"  # as default_msec_format has it


class TurnBufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that leaves flushing to its owner, except for warnings."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING:
                self.flush()
        except Exception:
            self.handleError(record)


def buffered_stderr() -> TextIO:
    """A text stream on descriptor 2 with a 64 KiB buffer (stderr flushes per line)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return sys.stderr  # not a real file (e.g. captured): keep it as it is
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(
        io.BufferedWriter(raw, 64 * 1024), encoding="utf-8", errors="backslashreplace"
    )


def setup(level: str) -> TurnBufferedHandler:
    """Send the ``selsmtp`` logs to stderr at ``level``; return the handler to flush.

    Records skip what the format never shows (the logging HOWTO's "Optimization"):
    the caller's file and line (a stack walk), and the thread and process (a
    ``getpid`` system call per record). These are settings of the ``logging`` module,
    for the whole process: this is for the command line, which owns the process."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = TurnBufferedHandler(buffered_stderr())
    handler.setFormatter(Formatter(FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
