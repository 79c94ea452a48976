"""The ``maildir`` message file (SPEC §5.2): written by :func:`message`, read by :func:`parse`.

One file per message, whole by construction (written in ``tmp/``, renamed into
``new/``): the trace lines (:mod:`selsmtp.formats.trace`), then the client's message
with CRLF as LF, unquoted.
"""

from __future__ import annotations

import re

from selsmtp.formats import trace
from selsmtp.formats.lines import lf_lines
from selsmtp.formats.trace import Stored
from selsmtp.framing import Body

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Final

    from selsmtp.session import Envelope

#: Finds the number (group 1) at the top of a message file.
NUMBER: Final = re.compile(rb"\A" + trace.PATTERN)


def message(
    number: int, envelope: Envelope, body: Body, server_name: str, now: float
) -> Iterator[bytes]:
    """One message file: the trace lines, then the message with LF line ends."""
    yield trace.header(number, envelope, server_name, now)
    yield from lf_lines(body)


def parse(data: bytes) -> Stored:
    """A message file's record: a file without selsmtp's trace lines is all content."""
    found = trace.parse(data, 0, len(data))
    if found is None:
        return Stored(None, None, None, None, None, None, data)
    fields, content = found
    return fields.with_content(data[content:])


def unique_part(name: str) -> str:
    """The unique part of a file name, which stays when a reader moves the file from
    ``new/`` to ``cur/`` and adds ``:2,FLAGS`` to it (maildir(5))."""
    return name.split(":", 1)[0]
