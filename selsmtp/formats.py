"""How a stored message looks on disk, as bytes. No file access happens here.

A record is rendered as a list of byte strings ("pieces") so the store can hand the
whole group-committed batch to one ``writev`` without joining it first. A message
spooled to a temporary file is rendered lazily, one chunk at a time, so that a large
message never has to sit in memory whole.

Three formats (SPEC §5):

``cs4410``
    selsmtp's own record: envelope lines, a blank line, the body, a blank line.
``mbox``
    the mboxrd variant: a ``From SENDER DATE`` separator line, the message, a blank
    line. A message line that matches ``>*From `` gets one more ``>`` (so a reader
    that strips one ``>`` from such lines gets the message back exactly, and a real
    separator can never be forged by a body).
``maildir``
    one file per message: the message as it is.

In ``mbox`` and ``maildir`` the message is the client's bytes, CRLF turned into LF,
under three header lines selsmtp adds (:func:`trace_header`): ``Return-Path:``,
``Received:`` and ``X-Selsmtp-Number:``.

Dates are UTC, always: the From_ line has ``time.asctime(time.gmtime(now))``'s form and
the ``Received:`` line an RFC 5322 date with ``+0000``. Local time would make a
mailbox depend on the TZ of the process that wrote it, and the stored bytes on
something the tests cannot pass in. The time itself is an argument (``now``, seconds
since the epoch): this module reads no clock.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator

from selsmtp.framing import Body
from selsmtp.session import Envelope

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import Final

#: Bodies are read back from a spool file in pieces of this size.
CHUNK: Final = 1 << 20

#: Finds a cs4410 record's number: the second header line of every record. At most
#: 18 digits, so a body quoting an absurd number cannot overflow int() at start-up.
CS4410_NUMBER: Final = re.compile(rb"\(CS4410MP3\)\nNumber: (\d{1,18})\n")

_TRACE: Final = (
    rb"Return-Path: [^\n]*\nReceived: [^\n]*\n(?:[ \t][^\n]*\n)*X-Selsmtp-Number: (\d{1,18})\n"
)
#: Finds an mbox message's number. Exact, not a guess: with mboxrd quoting, a line
#: that starts with ``From `` is always a separator, never message text.
MBOX_NUMBER: Final = re.compile(rb"(?m)^From [^\n]*\n" + _TRACE)
#: Finds the number at the top of a Maildir message file.
MAILDIR_NUMBER: Final = re.compile(rb"\A" + _TRACE)

#: mboxrd: a line that starts with any number of ``>`` and then ``From `` is quoted.
FROM_LINE: Final = re.compile(rb"(?m)^>*From ")
#: The start of a line (its end not seen yet) that may still turn out to be one.
_MAYBE_FROM_LINE: Final = re.compile(rb">*(F|Fr|Fro|From)?")

#: a CR that is not the first half of a CRLF (at the very end of the data too)
_BARE_CR: Final = re.compile(rb"\r(?!\n)")

#: English names, whatever the locale (as asctime and RFC 5322 want), three letters each
_WEEKDAYS: Final = "MonTueWedThuFriSatSun"
_MONTHS: Final = "JanFebMarAprMayJunJulAugSepOctNovDec"


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


# -- mbox and maildir --------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def dates(now: float) -> tuple[str, str]:
    """``now`` (seconds since the epoch) in UTC as an asctime date for the From_ line
    and as an RFC 5322 date for ``Received:``. Cached: a batch shares one ``now``."""
    # Why here: datetime takes about 1 ms to import, and the default format (cs4410)
    # never dates anything.
    from datetime import datetime, timezone

    moment = datetime.fromtimestamp(int(now), timezone.utc)
    day = _WEEKDAYS[3 * moment.weekday() :][:3]
    month = _MONTHS[3 * moment.month - 3 :][:3]
    clock = f"{moment:%H:%M:%S}"
    asctime = f"{day} {month} {moment.day:2d} {clock} {moment.year}"
    # RFC 5322 §3.3, as email.utils.format_datetime writes it (that module is slow
    # to import, and start-up time counts).
    rfc5322 = f"{day}, {moment.day:02d} {month} {moment.year:04d} {clock} +0000"
    return asctime, rfc5322


def trace_header(number: int, envelope: Envelope, server_name: str, now: float) -> bytes:
    """The header lines selsmtp puts above the client's message (SPEC §5.2).

    A message that came under TLS or after AUTH says so in its ``Received:`` line
    (SPEC §8): ``with ESMTPS``, ``ESMTPA`` or ``ESMTPSA`` (RFC 3848), the TLS version
    and cipher, and the user.
    """
    if envelope.tls is None and envelope.auth_user is None:
        received = f"Received: from {envelope.helo_name} by {server_name} (CS4410MP3);\n"
    else:
        received = f"Received: from {envelope.helo_name} by {server_name} (CS4410MP3)\n"
        received += received_with(envelope.tls, envelope.auth_user)
    return (
        f"Return-Path: <{envelope.reverse_path}>\n{received}\t{dates(now)[1]}\n"
        f"X-Selsmtp-Number: {number}\n"
    ).encode()


def received_with(tls: str | None, auth_user: str | None) -> str:
    """The ``with`` clause of a Received: line, folded, ending in ``;`` and LF."""
    protocol = "ESMTP" + ("S" if tls else "") + ("A" if auth_user is not None else "")
    clause = f"\twith {protocol}"
    if tls is not None:
        clause += f" ({tls})"  # OpenSSL's names: printable, no parentheses
    if auth_user is not None:
        # Why: the user name is the client's bytes; a CR, LF or parenthesis in it
        # must not end the header or the comment.
        user = _COMMENT_UNSAFE.sub("?", auth_user)
        clause += "\n\t" if tls is not None else " "
        clause += f"(authenticated user {user})"
    return clause + ";\n"


#: what may not appear inside a header comment as selsmtp writes it
_COMMENT_UNSAFE: Final = re.compile(r"[^\x21-\x27\x2a-\x5b\x5d-\x7e]")


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


def mbox_record(
    number: int, envelope: Envelope, body: Body, server_name: str, now: float
) -> Iterator[bytes]:
    """One mboxrd message: From_ line, trace header, the quoted message, a blank line.

    A message that does not end with a line end gets one (the blank line must be a
    line of its own); SMTP messages always end with one.
    """
    sender = envelope.reverse_path or "MAILER-DAEMON"
    yield f"From {sender} {dates(now)[0]}\n".encode() + trace_header(
        number, envelope, server_name, now
    )
    last = b"\n"
    for piece in quote_from_lines(lf_lines(body)):
        if piece:
            last = piece[-1:]
            yield piece
    yield b"\n" if last == b"\n" else b"\n\n"


def maildir_message(
    number: int, envelope: Envelope, body: Body, server_name: str, now: float
) -> Iterator[bytes]:
    """One Maildir message file: the trace header, then the message with LF line ends."""
    yield trace_header(number, envelope, server_name, now)
    yield from lf_lines(body)
