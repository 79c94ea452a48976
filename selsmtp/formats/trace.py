"""The trace lines selsmtp puts above an ``mbox`` or ``maildir`` message, and their dates.

Written by :func:`header`, matched by :data:`TRACE` (and, through its source
:data:`PATTERN`, by the number patterns the store scans files with)::

    Return-Path: <SENDER>
    Received: from HELO by NAME (CS4410MP3);
    \tDATE
    X-Selsmtp-Number: N
    X-Original-To: RECIPIENT          (one line per RCPT, in order)

Dates are UTC, always: the From_ line has ``time.asctime(time.gmtime(now))``'s form and
the ``Received:`` line an RFC 5322 date with ``+0000``. Local time would make a
mailbox depend on the TZ of the process that wrote it. The time itself is an argument
(``now``, seconds since the epoch): nothing here reads a clock.

:class:`Stored` is what the parsers of every format give back for one record.
"""

from __future__ import annotations

import functools
import re

from selsmtp.formats.lines import decode
from selsmtp.frozen import Frozen, init_field

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from datetime import datetime
    from typing import Final

    from selsmtp.session import Envelope

#: English names, whatever the locale (as asctime and RFC 5322 want), three letters each
WEEKDAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

#: The trace lines through ``X-Selsmtp-Number:``; group 1 is the number (at most 18
#: digits, so a body quoting an absurd number cannot overflow anything at start-up).
PATTERN: Final = (
    rb"Return-Path: [^\n]*\nReceived: [^\n]*\n(?:[ \t][^\n]*\n)*X-Selsmtp-Number: (\d{1,18})\n"
)
TRACE: Final = re.compile(PATTERN + rb"((?:X-Original-To: [^\n]*\n)*)")
#: the Received: line, unfolded; its ``with`` clause (SPEC §8, where a user name may
#: hold a ``;``) is skipped, and the date follows the last ``;``
_RECEIVED: Final = re.compile(
    rb"Received: from (\S+) by (\S+) \(CS4410MP3\)(?:\s*with .*)?;([^;]*)", re.DOTALL
)


class Stored(Frozen):
    """One record as a parser reads it. ``sender`` is ``""`` for the null sender and
    ``None`` where the record does not tell (nor the rest, then); ``content`` is the
    message as the client sent it, with LF line ends."""

    __slots__ = __match_args__ = (
        "number",
        "sender",
        "recipients",
        "helo_name",
        "server_name",
        "date",
        "content",
    )

    number: int | None
    sender: str | None
    recipients: tuple[str, ...] | None
    helo_name: str | None
    server_name: str | None
    date: datetime | None
    content: bytes

    def __init__(
        self,
        number: int | None,
        sender: str | None,
        recipients: tuple[str, ...] | None,
        helo_name: str | None,
        server_name: str | None,
        date: datetime | None,
        content: bytes,
    ) -> None:
        for name, value in zip(
            self.__match_args__,
            (number, sender, recipients, helo_name, server_name, date, content),
            strict=True,
        ):
            init_field(self, name, value)

    def with_content(self, content: bytes, date: datetime | None = None) -> Stored:
        """These trace fields with ``content``; ``date`` where the trace has none."""
        return Stored(
            self.number,
            self.sender,
            self.recipients,
            self.helo_name,
            self.server_name,
            self.date if self.date is not None else date,
            content,
        )


@functools.lru_cache(maxsize=4)
def dates(now: float) -> tuple[str, str]:
    """``now`` (seconds since the epoch) in UTC as an asctime date for the From_ line
    and as an RFC 5322 date for ``Received:``. Cached: a batch shares one ``now``."""
    # Why here: datetime takes about 1 ms to import, and the default format (cs4410)
    # never dates anything.
    from datetime import datetime, timezone

    moment = datetime.fromtimestamp(int(now), timezone.utc)
    day = WEEKDAYS[moment.weekday()]
    month = MONTHS[moment.month - 1]
    clock = f"{moment:%H:%M:%S}"
    asctime = f"{day} {month} {moment.day:2d} {clock} {moment.year}"
    # RFC 5322 §3.3, as email.utils.format_datetime writes it (that module is slow
    # to import, and start-up time counts).
    rfc5322 = f"{day}, {moment.day:02d} {month} {moment.year:04d} {clock} +0000"
    return asctime, rfc5322


def header(number: int, envelope: Envelope, server_name: str, now: float) -> bytes:
    """The header lines selsmtp puts above the client's message (SPEC §5.2, §7).

    A message that came under TLS or after AUTH says so in its ``Received:`` line
    (SPEC §8): ``with ESMTPS``, ``ESMTPA`` or ``ESMTPSA`` (RFC 3848), the TLS version
    and cipher, and the user.
    """
    received = f"Received: from {envelope.helo_name} by {server_name} (CS4410MP3)"
    if envelope.tls is None and envelope.auth_user is None:
        received += ";\n"
    else:
        received += "\n" + received_with(envelope.tls, envelope.auth_user)
    recipients = "".join(f"X-Original-To: {to}\n" for to in envelope.forward_paths)
    return (
        f"Return-Path: <{envelope.reverse_path}>\n{received}\t{dates(now)[1]}\n"
        f"X-Selsmtp-Number: {number}\n{recipients}"
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


def parse(data: bytes, start: int, end: int) -> tuple[Stored, int] | None:
    """The trace lines at ``data[start:end]`` and where they end; ``None`` if there are
    none there (a message selsmtp did not write). ``content`` is left empty."""
    found = TRACE.match(data, start, end)
    if found is None:
        return None
    text = found[0]
    first_end = text.index(b"\n")
    path = decode(text[len(b"Return-Path: ") : first_end].strip())
    if path.startswith("<") and path.endswith(">"):
        path = path[1:-1]
    to_lines = found[2].split(b"\n")[:-1]
    recipients = tuple(decode(line[len(b"X-Original-To: ") :]) for line in to_lines)
    number_line = found.start(1) - start - len(b"X-Selsmtp-Number: ")
    received = _RECEIVED.fullmatch(text[first_end + 1 : number_line].replace(b"\n", b""))
    helo = name = moment = None
    if received is not None:
        helo, name = decode(received[1]), decode(received[2])
        moment = rfc5322_date(received[3])
    fields = Stored(int(found[1]), path, recipients or None, helo, name, moment, b"")
    return fields, found.end()


def rfc5322_date(text: bytes) -> datetime | None:
    """An RFC 5322 date (folded or not) in UTC; ``None`` if it is not one."""
    from datetime import timezone
    from email.utils import parsedate_to_datetime

    try:
        moment = parsedate_to_datetime(decode(text).replace("\n", " ").strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # "-0000": UTC, source unknown
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def asctime_date(text: str) -> datetime | None:
    """The date at the end of a From_ line (``Www Mmm dd hh:mm:ss yyyy``), as UTC."""
    from datetime import datetime, timezone

    try:
        return datetime.strptime(" ".join(text.split()[-5:]), "%a %b %d %H:%M:%S %Y").replace(
            tzinfo=timezone.utc
        )
    except ValueError:
        return None
