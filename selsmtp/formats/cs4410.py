"""The ``cs4410`` record (SPEC §5.1): written by :func:`record`, read by :func:`parse`.

::

    Received: from HELO by NAME (CS4410MP3)
    Number: N
    From: SENDER                 (<> for the null sender)
    To: RECIPIENT                (one line per recipient, at least one)
                                 (blank line)
    BODY                         (the client's message, CRLF as LF)
                                 (closing blank line)

selsmtp's bodies are empty or end in LF, so every record ends with two LFs, and the
next one starts right after a blank line. Bodies are not quoted: a body may hold text
that looks exactly like a record head, blank line before it included. Nothing in the
bytes tells such a look-alike from a real record; selsmtp's readers go by the store's
offsets index (:mod:`selsmtp.mailindex`) and use :func:`starts` only where it has
nothing to say. :func:`look_alikes` finds what would fool a reader that has no index.
"""

from __future__ import annotations

import re

from selsmtp.formats.lines import decode, lf_lines
from selsmtp.formats.trace import Stored
from selsmtp.framing import Body

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Final

    from selsmtp.session import Envelope

#: The start of every record head.
HEAD_START: Final = b"Received: from "
_FIRST_LINE: Final = rb"Received: from ([^\s]+) by ([^\n]+) \(CS4410MP3\)\n"
_NUMBER_LINE: Final = rb"Number: ([0-9]{1,18})\n"
#: The first line of a head.
FIRST_LINE: Final = re.compile(_FIRST_LINE)
#: A whole record head, through its blank line. Names and addresses never contain
#: whitespace (selsmtp refuses them); the server's own name may. At most 18 digits,
#: so a body quoting an absurd number cannot overflow anything at start-up.
HEAD: Final = re.compile(_FIRST_LINE + _NUMBER_LINE + rb"From: ([^\s]+)\n((?:To: [^\s]+\n)+)\n")
#: Finds a record's number (group 1) where the store scans a file for it.
NUMBER: Final = re.compile(rb"\(CS4410MP3\)\n" + _NUMBER_LINE)
_BEGINS: Final = re.compile(_FIRST_LINE + rb"Number: [0-9]")


def begins_record(data: bytes) -> bool:
    """Whether ``data`` (the start of a file) begins with a record head."""
    return _BEGINS.match(data) is not None


def head(number: int, envelope: Envelope, server_name: str) -> bytes:
    """The head of a record, through the blank line after it."""
    lines = [
        f"Received: from {envelope.helo_name} by {server_name} (CS4410MP3)\n",
        f"Number: {number}\n",
        f"From: {envelope.reverse_path or '<>'}\n",
    ]
    lines.extend(f"To: {recipient}\n" for recipient in envelope.forward_paths)
    lines.append("\n")
    return "".join(lines).encode("utf-8")


def record(number: int, envelope: Envelope, body: Body, server_name: str) -> Iterator[bytes]:
    """A whole record: head, body with LF line ends, and a closing blank line."""
    yield head(number, envelope, server_name)
    yield from lf_lines(body)
    yield b"\n"


def starts(data: bytes, start: int, end: int) -> list[int]:
    """Where a record may start in ``data[start:end]``: at ``start`` or right after a
    blank line, wherever a whole head follows."""
    found = [start] if HEAD.match(data, start, end) else []
    pos = start
    while (hit := data.find(b"\n\n" + HEAD_START, pos, end)) >= 0:
        pos = hit + 2
        if HEAD.match(data, pos, end):
            found.append(pos)
    return found


def parse(data: bytes, start: int, end: int, *, indexed: bool = False) -> Stored | None:
    """The record that is ``data[start:end]``; ``None`` if it is not a whole one: a head,
    then the body and the closing LF. Unless the store's index says where it ends
    (``indexed``), the body must end with an LF too (selsmtp's always do over SMTP):
    two LFs end the record, which is how a parser finds the next one."""
    found = HEAD.match(data, start, end)
    ending = b"\n" if indexed else b"\n\n"
    if found is None or end <= found.end() or not data.endswith(ending, start, end):
        return None
    sender = decode(found[4])
    return Stored(
        int(found[3]),
        "" if sender == "<>" else sender,
        tuple(decode(line[4:]) for line in found[5].split(b"\n")[:-1]),
        decode(found[1]),
        decode(found[2]),
        None,
        data[found.end() : end - 1],
    )


def number_at(data: bytes, start: int) -> int | None:
    """The number of the record head at ``start``, if a whole head is there."""
    found = HEAD.match(data, start)
    return None if found is None else int(found[3])


def look_alikes(data: bytes, start: int, end: int) -> list[int]:
    """Where the body of the record ``data[start:end]`` holds a whole record head right
    after a blank line: what a reader without the index takes for a record."""
    found = HEAD.match(data, start, end)
    body = found.end() - 2 if found else start
    return [pos for pos in starts(data, body, end) if pos > body]


#: Each line of a head, without its LF (the last one repeats: one per recipient).
_HEAD_LINES: Final = (
    (HEAD_START, re.compile(_FIRST_LINE[:-2])),
    (b"Number: ", re.compile(_NUMBER_LINE[:-2])),
    (b"From: ", re.compile(rb"From: [^\s]+")),
    (b"To: ", re.compile(rb"To: [^\s]+")),
)


def torn_head(tail: bytes) -> bool:
    """True if ``tail`` (the end of a file) can be the first bytes of a record head:
    each whole line is the right head line, and the last one starts like one."""
    *whole, last = tail.split(b"\n")
    for index, line in enumerate(whole):
        if not _HEAD_LINES[min(index, 3)][1].fullmatch(line):
            return False
    start = _HEAD_LINES[min(len(whole), 3)][0]
    return last.startswith(start) or start.startswith(last)
