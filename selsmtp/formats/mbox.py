"""The ``mbox`` message (mboxrd, SPEC §5.2): written by :func:`record`, read by :func:`parse`.

::

    From SENDER DATE             (ASCII: MAILER-DAEMON for the null or an 8-bit sender)
    TRACE LINES                  (selsmtp.formats.trace)
    MESSAGE                      (the client's, CRLF as LF, >From-quoted)
                                 (blank line)

A message line that matches ``>*From `` gets one more ``>``, so a reader that strips
one ``>`` from such lines (:func:`unquote`) gets the message back exactly, and no line
of a message ever starts with ``From ``: every such line is a separator
(:data:`SEPARATOR`), and a body can never pass for a message.
"""

from __future__ import annotations

import re

from selsmtp.formats import trace
from selsmtp.formats.lines import decode, lf_lines
from selsmtp.formats.trace import Stored
from selsmtp.framing import Body

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import Final

    from selsmtp.session import Envelope

#: How every message begins: its separator line.
HEAD_START: Final = b"From "
#: The start of every message: ``From `` at the start of the file or of a line.
SEPARATOR: Final = re.compile(rb"(?m)^From ")
#: A whole From_ line as selsmtp (and every mboxrd writer) writes it: sender, date.
_FROM_LINE: Final = re.compile(
    rb"From (\S+) +([A-Z][a-z]{2} +[A-Z][a-z]{2} +\d{1,2} +\d{1,2}:\d{2}:\d{2} +\d{4})[^\n]*\n"
)
#: Finds a message's number (group 1) where the store scans a file for it. Exact, not a
#: guess: with mboxrd quoting, a line that starts with ``From `` is always a separator.
NUMBER: Final = re.compile(rb"(?m)^From [^\n]*\n" + trace.PATTERN)
#: The same at a given offset (the store's index says a message starts there).
_NUMBER_AT: Final = re.compile(rb"From [^\n]*\n" + trace.PATTERN)
#: mboxrd: a line that starts with any number of ``>`` and then ``From `` is quoted.
FROM_LINE: Final = re.compile(rb"(?m)^>*From ")
#: The start of a line (its end not seen yet) that may still turn out to be one.
_MAYBE_FROM_LINE: Final = re.compile(rb">*(F|Fr|Fro|From)?")
_QUOTED_FROM: Final = re.compile(rb"(?m)^>(>*From )")


def begins_record(data: bytes) -> bool:
    """Whether ``data`` (the start of a file) begins with a message."""
    return data.startswith(b"From ")


def from_line(envelope: Envelope, now: float) -> bytes:
    """The separator line: plain ASCII, so every mbox reader can decode it."""
    sender = envelope.reverse_path
    if not sender or not sender.isascii():
        sender = "MAILER-DAEMON"  # the real one is in Return-Path:
    return f"From {sender} {trace.dates(now)[0]}\n".encode()


def quote_from_lines(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """mboxrd quoting: one more ``>`` before every line that matches ``>*From ``.

    Lines may be split between pieces anywhere. Adding the ``>`` at the end of a
    line's leading run of ``>`` is the same as adding it at its start, so the run is
    passed on at once and only a partial ``From`` (four bytes at most) is held back.
    """
    held = b""
    at_line_start = True  # the current line so far is only ">" (or nothing)
    for piece in pieces:
        text, held = held + piece, b""
        if not at_line_start:
            end = text.find(b"\n") + 1
            if not end:
                yield text
                continue
            yield text[:end]
            text = text[end:]
        quoted = FROM_LINE.sub(rb">\g<0>", text)
        maybe = _MAYBE_FROM_LINE.fullmatch(text, text.rfind(b"\n") + 1)
        at_line_start = maybe is not None
        if maybe and maybe.group(1):
            held = maybe.group(1)
            quoted = quoted[: -len(held)]
        yield quoted
    yield held


def unquote(data: bytes) -> bytes:
    """Undo mboxrd quoting: one ``>`` off every line that matches ``>+From ``."""
    return _QUOTED_FROM.sub(rb"\1", data)


def record(
    number: int, envelope: Envelope, body: Body, server_name: str, now: float
) -> Iterator[bytes]:
    """One message: From_ line, trace lines, the quoted message, a blank line.

    A message that does not end with a line end gets one (the blank line must be a
    line of its own); SMTP messages always end with one.
    """
    yield from_line(envelope, now) + trace.header(number, envelope, server_name, now)
    last = b"\n"
    for piece in quote_from_lines(lf_lines(body)):
        if piece:
            last = piece[-1:]
            yield piece
    yield b"\n" if last == b"\n" else b"\n\n"


def starts(data: bytes, start: int, end: int) -> list[int]:
    """Where a message starts in ``data[start:end]``: every line that starts with ``From ``."""
    return [found.start() for found in SEPARATOR.finditer(data, start, end)]


def parse(data: bytes, start: int, end: int, *, indexed: bool = False) -> Stored | None:
    """The message that is ``data[start:end]``; ``None`` if it is not a whole one (a whole
    From_ line, and a blank line at its end)."""
    line = _FROM_LINE.match(data, start, end)
    if line is None or end - line.end() < 1 or data[end - 2 : end] != b"\n\n":
        return None
    found = trace.parse(data, line.end(), end)
    if found is None:
        moment = trace.asctime_date(decode(line[2]))
        message = unquote(data[line.end() : end - 1])
        return Stored(None, decode(line[1]), None, None, None, moment, message)
    fields, content = found
    return fields.with_content(
        unquote(data[content : end - 1]), trace.asctime_date(decode(line[2]))
    )


def number_at(data: bytes, start: int) -> int | None:
    """The number in the trace lines of the message at ``start``, if they are there."""
    found = _NUMBER_AT.match(data, start)
    return None if found is None else int(found[1])


def look_alikes(data: bytes, start: int, end: int) -> list[int]:
    """Always none: the quoting leaves no line in a message that could start one."""
    return []


def torn_head(tail: bytes) -> bool:
    """True if ``tail`` (the end of a file) can be the first bytes of a message."""
    return tail.startswith(b"From ") or b"From ".startswith(tail)
