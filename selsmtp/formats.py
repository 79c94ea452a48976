"""How a stored message looks on disk, as bytes. No file access happens here.

A record is rendered as a list of byte strings ("pieces") so the store can hand the
whole group-committed batch to one ``writev`` without joining it first. A message
spooled to a temporary file is rendered lazily, one chunk at a time, so that a large
message never has to sit in memory whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final

from selsmtp.framing import Body
from selsmtp.session import Envelope

#: Bodies are read back from a spool file in pieces of this size.
CHUNK: Final = 1 << 20

#: Finds a cs4410 record's number: the second header line of every record.
CS4410_NUMBER: Final = re.compile(rb"\(CS4410MP3\)\nNumber: (\d+)\n")


def lf_lines(body: Body) -> Iterator[bytes]:
    """The body with every CRLF turned into LF, in pieces.

    Bare CR and bare LF are content and stay as they are. A CR at the end of one
    spooled chunk is held back until the next chunk says whether an LF follows.
    """
    if isinstance(body, bytes):
        yield body.replace(b"\r\n", b"\n")
        return
    held = b""
    while chunk := body.read(CHUNK):
        chunk = held + chunk
        held = b""
        if chunk.endswith(b"\r"):
            chunk, held = chunk[:-1], b"\r"
        yield chunk.replace(b"\r\n", b"\n")
    if held:
        yield held


def cs4410_header(number: int, envelope: Envelope, server_name: str) -> bytes:
    """The header of a cs4410 record (SPEC §5.1), through the blank line after it."""
    lines = [
        f"Received: from {envelope.helo_name} by {server_name} (CS4410MP3)\n",
        f"Number: {number}\n",
        f"From: {envelope.reverse_path or '<>'}\n",
    ]
    lines.extend(f"To: {recipient}\n" for recipient in envelope.forward_paths)
    lines.append("\n")
    return "".join(lines).encode("utf-8")


def cs4410_record(number: int, envelope: Envelope, body: Body, server_name: str) -> Iterator[bytes]:
    """A whole cs4410 record: header, body with LF line ends, and a closing blank line."""
    yield cs4410_header(number, envelope, server_name)
    yield from lf_lines(body)
    yield b"\n"
