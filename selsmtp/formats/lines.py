"""Message bodies as every format stores them: CRLF turned into LF, in pieces.

A record is rendered as a list of byte strings ("pieces") so the store can hand the
whole group-committed batch to one ``writev`` without joining it first. A message
spooled to a temporary file is rendered lazily, one chunk at a time, so that a large
message never has to sit in memory whole.
"""

from __future__ import annotations

import re

from selsmtp.framing import Body

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Final

#: Bodies are read back from a spool file in pieces of this size.
CHUNK: Final = 1 << 20

#: a CR that is not the first half of a CRLF (at the very end of the data too)
_BARE_CR: Final = re.compile(rb"\r(?!\n)")


def crlf_to_lf(data: bytes) -> bytes:
    """``data`` with every CRLF turned into LF; bare CR and bare LF stay as they are.

    Why not just ``replace``: with a line end every few dozen bytes it copies piece by
    piece, about three times slower than deleting every CR with ``translate``, which
    gives the same bytes whenever each CR is followed by an LF (all real mail).
    """
    if _BARE_CR.search(data):
        return data.replace(b"\r\n", b"\n")
    return data.translate(None, b"\r")


def lf_lines(body: Body) -> Iterator[bytes]:
    """The body with every CRLF turned into LF, in pieces.

    Bare CR and bare LF are content and stay as they are. A CR at the end of one
    spooled chunk is held back until the next chunk says whether an LF follows.
    """
    if isinstance(body, bytes):
        yield crlf_to_lf(body)
        return
    held = b""
    while chunk := body.read(CHUNK):
        chunk = held + chunk
        held = b""
        if chunk.endswith(b"\r"):
            chunk, held = chunk[:-1], b"\r"
        yield crlf_to_lf(chunk)
    if held:
        yield held


def decode(raw: bytes) -> str:
    """Stored header bytes as text: UTF-8, any other byte kept as a surrogate."""
    return raw.decode("utf-8", "surrogateescape")
