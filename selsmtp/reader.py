"""Reading mailboxes back: messages, and what is wrong with a mailbox.

Most of this module only parses bytes: :func:`parse` and :func:`check` for the
``cs4410`` format, :func:`parse_mbox` for mboxrd, :func:`parse_maildir_message` and
:func:`check_maildir` for Maildir files, and :func:`parse_file` for either file
format. The functions that touch the file system are :func:`read_mailbox`, which reads
a mailbox file under a shared ``fcntl.lockf`` lock so that it never sees half of an
append (SPEC §5.4), :func:`read_maildir`, :func:`pending_append`, and :func:`load`,
which reads a mailbox of any format and checks it: ``python -m selsmtp.inbox`` and
``tools/flood.py`` both verify mailboxes with it.

Whatever the format, a message comes back as a :class:`Message`: its number, its
envelope as far as the format records it, and its content as the client sent it
(LF line ends). The ``cs4410`` parser also has its own, richer :class:`Record`.

The ``cs4410`` format (SPEC §5.1)
---------------------------------
Each record is a header, a blank line, the body with LF line ends, and a closing
blank line::

    Received: from HELO by NAME (CS4410MP3)
    Number: N
    From: SENDER
    To: RECIPIENT            (one line per recipient, at least one)
                             (blank line)
    BODY
                             (closing blank line)

selsmtp's bodies are empty or end in LF (a message always ends with CRLF before the
final dot), so every record, and so the whole file, ends with two LFs. The body is
what the client sent, except that its CRLFs are LFs now; a CRLF cannot be told from
an LF the client sent any more.

The ambiguity, and how it is resolved
-------------------------------------
Bodies are arbitrary bytes and are not escaped, so a body may contain text that
looks exactly like a record header, blank line before it included (a message that
quotes a mailbox, say). Nothing in the bytes tells such a look-alike from a real
record boundary. The parser proceeds in two steps:

1. *Candidates.* A record can only start at offset 0 or right after a blank line that
   could close the previous record (two LFs), and only where a complete header
   matches, through its blank line. Every such place is a candidate.
2. *Choice.* Every candidate is taken as a record, except where reading some of them
   as body text of the record before gives numbers that increase better. Each
   reading is scored: a pair of neighbouring records whose number goes up by one
   costs 0, a gap (numbers missing) costs 1, a number that does not go up (out of
   order or repeated) costs 3, and each candidate read as body text costs 2. The
   cheapest reading wins (ties go to the one that keeps later candidates as
   records). So a look-alike whose number does not fit between its neighbours is
   body text, while two real records out of order stay records and are reported.
   A header that occurs twice, byte for byte, is always read as a record: that is
   what a duplicated append looks like, and it must be reported, not hidden.

What this cannot tell: a look-alike whose number fits between its neighbours (or
that follows the last record with the next number) is read as a record, and a body
that embeds several look-alikes in a row may be reported as records out of order. A
record cut by a crash right after a blank line inside its body looks whole: only
selsmtp's state file tells, and :func:`load` reads it (:func:`pending_append`).

``mbox`` (mboxrd) and ``maildir`` (SPEC §5.2)
---------------------------------------------
An mbox message starts at a line that begins with ``From `` and ends with a blank
line. The mboxrd quoting makes this exact: a message line that starts with
``>*From `` was stored with one more ``>``, so no line of a message ever starts with
``From ``. :func:`parse_mbox` undoes the quoting. A Maildir message is one file in
``new/`` or ``cur/``, whole by construction (it is renamed there once written).

selsmtp puts three header lines above each message (``formats.trace_header``):
``Return-Path: <SENDER>``, a ``Received:`` line (folded, with the date) and
``X-Selsmtp-Number: N``. :data:`TRACE` recognises them exactly where the store looks
for numbers (``formats.MBOX_NUMBER`` and ``MAILDIR_NUMBER``), and the content of a
message is what follows them. A message without them was not written by selsmtp: it
has no number, and its content is all of it. Neither format records the envelope's
recipients.

Problems reported
-----------------
:class:`ProblemKind` lists them: bytes that belong to no record, a torn tail (the
file ends inside a record), a torn record (an mbox message that does not end with a
blank line before the next one), a number seen before, a number lower than the
previous one, a gap in the numbering (selsmtp numbers the records of one file
consecutively; a gap means records were removed from the middle, or numbers were
given to messages that a crash or a failed write kept out), and, in mbox and
Maildir, a message without selsmtp's trace lines. Gaps and such foreign messages
are normal in a mailbox that consumers take mail from or other programs deliver to,
so each parser can leave them out.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import email.header
import email.utils
import enum
import errno
import fcntl
import itertools
import os
import re
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Final

from selsmtp.durable import State, boot_id
from selsmtp.store import STATE_SUFFIX

__all__ = [
    "FORMATS",
    "Loaded",
    "Mailbox",
    "Message",
    "NotAMailbox",
    "Parsed",
    "Problem",
    "ProblemKind",
    "Record",
    "check",
    "check_maildir",
    "detect_format",
    "header_value",
    "is_maildir",
    "load",
    "lock_shared",
    "maildir_key",
    "message_from_record",
    "parse",
    "parse_file",
    "parse_maildir_message",
    "parse_mbox",
    "pending_append",
    "read_mailbox",
    "read_maildir",
    "subject_of",
]

#: The formats, as ``--format`` names them.
FORMATS: Final = ("cs4410", "mbox", "maildir")

#: The start of every record header.
HEADER_START: Final = b"Received: from "

#: A complete record header, through its blank line. Names and addresses never
#: contain whitespace (selsmtp refuses them); the server's own name may.
HEADER: Final = re.compile(
    rb"Received: from (?P<helo>[^\s]+) by (?P<name>[^\n]+) \(CS4410MP3\)\n"
    rb"Number: (?P<number>[0-9]{1,20})\n"
    rb"From: (?P<sender>[^\s]+)\n"
    rb"(?P<to>(?:To: [^\s]+\n)+)"
    rb"\n"
)

#: Costs of a reading (see the module docstring).
COST_GAP: Final = 1
COST_DISORDER: Final = 3
COST_BODY_TEXT: Final = 2
#: At most this many candidates in a row are considered as body text.
MAX_BODY_TEXT_RUN: Final = 16

#: The start of an mbox message: ``From `` at the start of the file or of a line.
MBOX_SEPARATOR: Final = re.compile(rb"^From ", re.MULTILINE)
#: The header lines selsmtp puts above an mbox or Maildir message, in the shape the
#: store finds numbers by (``formats._TRACE``): a message matches here exactly when
#: the store counts its number.
TRACE: Final = re.compile(
    rb"Return-Path: (?P<path>[^\n]*)\n"
    rb"(?P<received>Received: [^\n]*\n(?:[ \t][^\n]*\n)*)"
    rb"X-Selsmtp-Number: (?P<number>\d{1,18})\n"
)
#: selsmtp's ``Received:`` line, unfolded.
_RECEIVED: Final = re.compile(
    rb"Received: from (?P<helo>\S+) by (?P<name>.+) \(CS4410MP3\);(?P<date>.*)", re.DOTALL
)
#: mboxrd quoting to undo: one ``>`` off every line that matches ``>+From ``.
_QUOTED_FROM: Final = re.compile(rb"^>(>*From )", re.MULTILINE)
#: The date of a From_ line, in the form of ``time.asctime``.
_ASCTIME: Final = re.compile(
    rb"[A-Z][a-z]{2} +(?P<month>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) +"
    rb"(?P<hour>\d{1,2}):(?P<minute>\d{2}):(?P<second>\d{2}) +(?P<year>\d{4})"
)
_MONTHS: Final = (
    "Jan",
    "Feb",
    "Mar",
    "Apr",
    "May",
    "Jun",
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
)
#: A header field's first line: a name of printable characters but the colon, a colon.
_FIELD: Final = re.compile(rb"[!-9;-~]+:")
#: Header fields are looked for in this many bytes at the start of a message.
HEADER_LIMIT: Final = 64 * 1024
#: The start of a Maildir file name: the delivery time in seconds (maildir(5)).
_MAILDIR_TIME: Final = re.compile(r"(\d{1,12})\.")
#: How many bytes :func:`detect_format` shows of a file that is not a mailbox.
_SHOWN: Final = 40


class NotAMailbox(Exception):
    """The path names no mailbox in any of the formats; the message says why, in one line."""


class ProblemKind(enum.Enum):
    GARBAGE = "garbage"  #: bytes that are not part of any record
    TORN_TAIL = "torn-tail"  #: the file ends inside a record
    TORN_RECORD = "torn-record"  #: an mbox message that does not end with a blank line
    DUPLICATE = "duplicate"  #: a record number seen earlier in the file
    OUT_OF_ORDER = "out-of-order"  #: a number lower than the one before it
    GAP = "gap"  #: numbers missing between two neighbouring records
    FOREIGN = "foreign"  #: an mbox or Maildir message without selsmtp's trace lines


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One message as stored.

    ``sender`` is ``""`` for the null sender (written ``<>``). ``body`` has LF line
    ends, as stored. ``offset`` and ``length`` cover the whole record, its closing
    blank line included; the body starts at ``body_offset``.
    """

    number: int
    helo_name: str
    server_name: str
    sender: str
    recipients: tuple[str, ...]
    body: bytes
    offset: int
    length: int
    body_offset: int

    @property
    def end(self) -> int:
        """The offset just past this record."""
        return self.offset + self.length


@dataclasses.dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong with a mailbox, at ``offset`` for ``length`` bytes.

    ``number`` is the record number concerned, when there is one. In a Maildir,
    ``file`` names the message file concerned (``new/NAME`` or ``cur/NAME``).
    """

    kind: ProblemKind
    offset: int
    length: int
    detail: str
    number: int | None = None
    file: str | None = None

    def __str__(self) -> str:
        where = self.file if self.file is not None else f"offset {self.offset}"
        return f"{where}: {self.kind.value}: {self.detail}"


@dataclasses.dataclass(frozen=True, slots=True)
class Mailbox:
    """A parsed mailbox: its whole records in file order, and its problems in offset order.

    A torn last record is not among ``records``; it is reported as a problem.
    """

    records: tuple[Record, ...]
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One stored message, in any format.

    ``content`` is the message as the client sent it, with LF line ends: a cs4410
    body, or an mbox or Maildir message without selsmtp's trace lines (and, in mbox,
    with the quoting undone). ``number`` is ``None`` for a message selsmtp did not
    write. ``sender`` is ``""`` for the null sender and ``None`` if unknown;
    ``recipients`` is ``None`` where the format does not record them (mbox, Maildir);
    ``date`` (UTC) is ``None`` where it does not record one (cs4410). ``offset`` and
    ``length`` cover the stored record in its file; in a Maildir the record is the
    whole file ``name`` (``new/NAME`` or ``cur/NAME``, relative to the folder).
    """

    format: str
    number: int | None
    sender: str | None
    recipients: tuple[str, ...] | None
    helo_name: str | None
    server_name: str | None
    date: datetime | None
    content: bytes
    offset: int = 0
    length: int = 0
    name: str | None = None

    @property
    def end(self) -> int:
        """The offset just past the stored record."""
        return self.offset + self.length

    @property
    def size(self) -> int:
        """The length of :attr:`content` in bytes."""
        return len(self.content)

    @property
    def where(self) -> str:
        """Where the message is: ``offset N``, or its Maildir file."""
        return self.name if self.name is not None else f"offset {self.offset}"

    @property
    def subject(self) -> str | None:
        """The ``Subject:`` header field of the content, decoded; ``None`` if there is none."""
        return subject_of(self.content)


@dataclasses.dataclass(frozen=True, slots=True)
class Parsed:
    """The messages of a mailbox of any format, and its problems.

    ``format`` is ``None`` for an empty file (nothing tells its format). For the file
    formats, ``whole`` is the length of the part of the data that holds whole records
    only: where a torn tail starts, else the whole length.
    """

    format: str | None
    messages: tuple[Message, ...]
    problems: tuple[Problem, ...]
    whole: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclasses.dataclass(frozen=True, slots=True)
class _Candidate:
    offset: int
    match: re.Match[bytes]
    number: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Numbered:
    """What the numbering checks need of a record: its number and where it is."""

    number: int
    offset: int
    length: int
    name: str | None = None

    @property
    def where(self) -> str:
        return f"in {self.name}" if self.name is not None else f"at offset {self.offset}"


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _candidates(data: bytes) -> list[_Candidate]:
    """Every place a record may start: offset 0 or after two LFs, with a whole header."""
    found: list[_Candidate] = []
    pos = 0
    if data.startswith(HEADER_START):
        match = HEADER.match(data, 0)
        if match is not None:
            found.append(_Candidate(0, match, int(match["number"])))
            pos = match.end() - 1  # the next record starts after our closing LF
    needle = b"\n\n" + HEADER_START
    while True:
        hit = data.find(needle, pos)
        if hit < 0:
            return found
        start = hit + 2
        match = HEADER.match(data, start)
        if match is None:
            pos = start
            continue
        found.append(_Candidate(start, match, int(match["number"])))
        pos = match.end() - 1


def _pair_cost(before: int, after: int) -> int:
    if after == before + 1:
        return 0
    return COST_GAP if after > before else COST_DISORDER


def _choose(candidates: Sequence[_Candidate]) -> list[_Candidate]:
    """The cheapest reading (see the module docstring): the candidates kept as records."""
    count = len(candidates)
    numbers = [c.number for c in candidates]
    if all(numbers[i + 1] == numbers[i] + 1 for i in range(count - 1)):
        return list(candidates)  # fast path: nothing to improve on a perfect sequence
    headers = collections.Counter(c.match.group(0) for c in candidates)
    # The first candidate always starts a record; a repeated header is never body text.
    fixed = [i == 0 or headers[c.match.group(0)] > 1 for i, c in enumerate(candidates)]
    best = [0] * count
    back = [-1] * count
    for i in range(1, count):
        cost = best[i - 1] + _pair_cost(numbers[i - 1], numbers[i])
        previous = i - 1
        # Try reading candidates j+1 .. i-1 as body text of record j.
        j = i - 1
        while not fixed[j] and j > 0 and i - j <= MAX_BODY_TEXT_RUN:
            j -= 1
            alternative = (
                best[j] + _pair_cost(numbers[j], numbers[i]) + COST_BODY_TEXT * (i - 1 - j)
            )
            if alternative < cost:
                cost, previous = alternative, j
        best[i], back[i] = cost, previous
    # The last record may also be followed by candidates read as body text.
    last = count - 1
    cost = best[last]
    j = last
    while not fixed[j] and j > 0 and count - 1 - j < MAX_BODY_TEXT_RUN:
        j -= 1
        alternative = best[j] + COST_BODY_TEXT * (count - 1 - j)
        if alternative < cost:
            cost, last = alternative, j
    chosen: list[_Candidate] = []
    index = last
    while index >= 0:
        chosen.append(candidates[index])
        index = back[index]
    chosen.reverse()
    return chosen


def _record(data: bytes, candidate: _Candidate, end: int) -> Record:
    match = candidate.match
    sender = _decode(match["sender"])
    recipients = tuple(_decode(line[4:]) for line in match["to"].split(b"\n")[:-1])
    body_offset = match.end()
    return Record(
        number=candidate.number,
        helo_name=_decode(match["helo"]),
        server_name=_decode(match["name"]),
        sender="" if sender == "<>" else sender,
        recipients=recipients,
        body=data[body_offset : end - 1],
        offset=candidate.offset,
        length=end - candidate.offset,
        body_offset=body_offset,
    )


def _torn_start(data: bytes, last: _Candidate) -> int:
    """Where a torn tail begins, given that the last record does not end properly.

    If the bytes after the last blank line in the last record's body can be the start
    of a record header cut short (:func:`_could_start_record`), the tail is that
    cut-off record, and the record before it is whole. Otherwise the last record
    itself was cut.
    """
    header_end = last.match.end()
    blank = data.rfind(b"\n\n", header_end - 1)
    if blank >= 0:
        start = blank + 2
        if header_end < start < len(data) and _could_start_record(data, start):
            return start
    return last.offset


#: The lines of a record header: the literal each starts with, what follows it in a
#: whole line, and what may follow it in a line cut short (every prefix of the former).
_HEADER_LINES: Final = (
    (
        HEADER_START,
        re.compile(rb"[^\s]+ by [^\n]+ \(CS4410MP3\)"),
        re.compile(rb"[^\s]*(?: (?:b(?:y(?: [^\n]*)?)?)?)?"),
    ),
    (b"Number: ", re.compile(rb"[0-9]{1,20}"), re.compile(rb"[0-9]{0,20}")),
    (b"From: ", re.compile(rb"[^\s]+"), re.compile(rb"[^\s]*")),
)
_TO_LINE: Final = (b"To: ", re.compile(rb"[^\s]+"), re.compile(rb"[^\s]*"))


def _could_start_record(data: bytes, start: int) -> bool:
    """True if ``data[start:]``, which runs to the end of the data, can be the first
    bytes of a record header: every whole line is the right header line, and the last
    line, cut short, is the start of one. Looks at the header's lines only."""
    pos = start
    index = 0
    while True:
        newline = data.find(b"\n", pos)
        complete = newline >= 0
        line = data[pos:newline] if complete else data[pos:]
        if index >= 4 and not line:
            return True  # the header is whole, or the cut fell at the start of a line
        literal, whole, partial = _HEADER_LINES[index] if index < 3 else _TO_LINE
        if not complete and len(line) <= len(literal):
            return literal.startswith(line)
        if not line.startswith(literal):
            return False
        if not (whole if complete else partial).fullmatch(line, len(literal)):
            return False
        if not complete:
            return True
        pos = newline + 1
        index += 1


def _numbering_problems(items: Sequence[_Numbered]) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[int, _Numbered] = {}
    previous: _Numbered | None = None
    for item in items:
        number = item.number
        where = (item.offset, item.length)
        if number in seen:
            problems.append(
                Problem(
                    ProblemKind.DUPLICATE,
                    *where,
                    f"record number {number} again (first {seen[number].where})",
                    number,
                    item.name,
                )
            )
        elif previous is not None and number < previous.number:
            problems.append(
                Problem(
                    ProblemKind.OUT_OF_ORDER,
                    *where,
                    f"record number {number} after {previous.number}",
                    number,
                    item.name,
                )
            )
        elif previous is not None and number > previous.number + 1:
            missing = (
                str(previous.number + 1)
                if number == previous.number + 2
                else f"{previous.number + 1}-{number - 1}"
            )
            problems.append(
                Problem(
                    ProblemKind.GAP,
                    *where,
                    f"record number {number} after {previous.number}: {missing} missing",
                    number,
                    item.name,
                )
            )
        seen.setdefault(number, item)
        previous = item
    return problems


def parse(data: bytes, *, allow_gaps: bool = False) -> Mailbox:
    """Parse the bytes of a whole cs4410 mailbox.

    Returns every whole record, in file order, and every problem found (see
    :class:`ProblemKind`); never raises on bad input. With ``allow_gaps``, numbers
    that skip (as in a file that other programs also append to) are not reported.
    """
    problems: list[Problem] = []
    candidates = _candidates(data)
    if not candidates:
        if data:
            kind = ProblemKind.TORN_TAIL if _looks_like_start(data) else ProblemKind.GARBAGE
            problems.append(Problem(kind, 0, len(data), _describe(kind, len(data))))
        return Mailbox((), tuple(problems))
    chosen = _choose(candidates)
    if chosen[0].offset > 0:
        problems.append(
            Problem(
                ProblemKind.GARBAGE,
                0,
                chosen[0].offset,
                _describe(ProblemKind.GARBAGE, chosen[0].offset),
            )
        )
    records = [
        _record(data, candidate, following.offset)
        for candidate, following in itertools.pairwise(chosen)
    ]
    last = chosen[-1]
    end = len(data)
    if data.endswith(b"\n\n") and end > last.match.end():
        records.append(_record(data, last, end))
    else:
        torn = _torn_start(data, last)
        if torn > last.offset:
            records.append(_record(data, last, torn))
        problems.append(
            Problem(
                ProblemKind.TORN_TAIL,
                torn,
                end - torn,
                _describe(ProblemKind.TORN_TAIL, end - torn),
            )
        )
    numbering = _numbering_problems([_Numbered(r.number, r.offset, r.length) for r in records])
    if allow_gaps:
        numbering = [p for p in numbering if p.kind is not ProblemKind.GAP]
    problems.extend(numbering)
    problems.sort(key=lambda p: p.offset)
    return Mailbox(tuple(records), tuple(problems))


def _looks_like_start(data: bytes) -> bool:
    return data.startswith(HEADER_START) or HEADER_START.startswith(data)


def _describe(kind: ProblemKind, length: int) -> str:
    if kind is ProblemKind.TORN_TAIL:
        return f"the file ends inside a record ({length} bytes cut short)"
    return f"{length} bytes that are not part of any record"


def check(data: bytes, *, allow_gaps: bool = False) -> list[Problem]:
    """Every problem in a whole cs4410 mailbox (empty: the file is sound). See :func:`parse`."""
    return list(parse(data, allow_gaps=allow_gaps).problems)


# -- every format: messages, header fields, dates -------------------------------


def message_from_record(record: Record) -> Message:
    """A cs4410 record as a :class:`Message` (its content is the body, as stored)."""
    return Message(
        format="cs4410",
        number=record.number,
        sender=record.sender,
        recipients=record.recipients,
        helo_name=record.helo_name,
        server_name=record.server_name,
        date=None,
        content=record.body,
        offset=record.offset,
        length=record.length,
    )


def header_value(message: bytes, name: str) -> bytes | None:
    """The value of the first header field ``name`` (any case) of ``message``, unfolded
    and stripped; ``None`` if the header has no such field.

    The header is the run of field lines (and their continuation lines) at the start
    of the message, up to a blank line or the first line that is not a field, within
    the first :data:`HEADER_LIMIT` bytes. A message that starts with a line that is
    not a field has no header.
    """
    wanted = name.lower().encode("ascii") + b":"
    found: list[bytes] | None = None
    for index, line in enumerate(message[:HEADER_LIMIT].split(b"\n")):
        if line[:1] in (b" ", b"\t") and index:
            if found is not None:
                found.append(line)
            continue  # a continuation line (of a field we do not want, if not found)
        if found is not None or not _FIELD.match(line):
            break
        if line[: len(wanted)].lower() == wanted:
            found = [line[len(wanted) :]]
    if found is None:
        return None
    return b"".join(piece.rstrip(b"\r") for piece in found).strip()


def subject_of(message: bytes) -> str | None:
    """The ``Subject:`` of ``message``, RFC 2047 encoded words decoded; ``None`` if none.

    Bytes that are not UTF-8 become U+FFFD. Control characters are left in: whoever
    prints the subject decides how to show them."""
    raw = header_value(message, "Subject")
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace")
    if "=?" in text:
        # a malformed encoded word or an unknown charset: show the text as it is
        with contextlib.suppress(Exception):
            text = str(email.header.make_header(email.header.decode_header(text)))
    return text


def _rfc5322_date(text: bytes) -> datetime | None:
    try:
        moment = email.utils.parsedate_to_datetime(text.decode("ascii", "replace").strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # "-0000": UTC, source unknown
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _asctime_date(line: bytes) -> datetime | None:
    """The date of a From_ line (``Www Mmm dd hh:mm:ss yyyy``), taken as UTC (selsmtp
    writes UTC)."""
    found = _ASCTIME.search(line)
    if found is None or found["month"].decode() not in _MONTHS:
        return None
    try:
        return datetime(
            int(found["year"]),
            _MONTHS.index(found["month"].decode()) + 1,
            int(found["day"]),
            int(found["hour"]),
            int(found["minute"]),
            int(found["second"]),
            tzinfo=timezone.utc,
        )
    except ValueError:
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class _Trace:
    number: int | None
    sender: str | None
    helo_name: str | None
    server_name: str | None
    date: datetime | None


#: What a message without selsmtp's trace lines tells: nothing.
_NO_TRACE: Final = _Trace(None, None, None, None, None)


def _trace(found: re.Match[bytes] | None) -> _Trace:
    if found is None:
        return _NO_TRACE
    path = _decode(found["path"].strip())
    if path.startswith("<") and path.endswith(">"):
        path = path[1:-1]
    received = _RECEIVED.fullmatch(found["received"].replace(b"\n", b""))
    if received is None:
        return _Trace(int(found["number"]), path, None, None, None)
    return _Trace(
        int(found["number"]),
        path,
        _decode(received["helo"]),
        _decode(received["name"]),
        _rfc5322_date(received["date"]),
    )


# -- mbox ------------------------------------------------------------------------


def _mbox_whole(data: bytes, start: int, end: int) -> bool:
    """True if ``data[start:end]`` is a whole mbox message: a From_ line, and a blank
    line at the end (after the From_ line)."""
    line_end = data.find(b"\n", start, end)
    return line_end >= 0 and end - line_end >= 2 and data[end - 2 : end] == b"\n\n"


def _mbox_torn_start(data: bytes, start: int) -> int:
    """Where the torn tail begins in the last message, which starts at ``start`` and
    does not end with a blank line: after it, if what follows its last blank line is
    the first bytes of the next From_ line; else at ``start``."""
    cut = data.rfind(b"\n", start) + 1
    tail = data[cut:]
    if cut > start and b"From ".startswith(tail) and _mbox_whole(data, start, cut):
        return cut
    return start


def _mbox_message(data: bytes, start: int, end: int) -> Message:
    line_end = data.index(b"\n", start, end)
    from_line = data[start + 5 : line_end]
    found = TRACE.match(data, line_end + 1, end)
    content_start = found.end() if found else line_end + 1
    content = _QUOTED_FROM.sub(rb"\1", data[content_start : end - 1])
    trace = _trace(found)
    return Message(
        format="mbox",
        number=trace.number,
        sender=_decode(from_line.split(b" ", 1)[0]) if found is None else trace.sender,
        recipients=None,
        helo_name=trace.helo_name,
        server_name=trace.server_name,
        date=trace.date or _asctime_date(from_line),
        content=content,
        offset=start,
        length=end - start,
    )


def parse_mbox(data: bytes, *, allow_gaps: bool = False, allow_foreign: bool = False) -> Parsed:
    """Parse the bytes of a whole mbox (mboxrd) file; never raises on bad input.

    Every whole message comes back, in file order. Problems: bytes before the first
    From_ line, a message that does not end with a blank line (a torn record, or a
    torn tail at the end of the file), and the numbering problems of :func:`parse`
    among the messages that have a number. With ``allow_gaps``, gaps in the numbering
    are not reported; with ``allow_foreign``, messages without selsmtp's trace lines
    are not either.
    """
    problems: list[Problem] = []
    messages: list[Message] = []
    starts = [found.start() for found in MBOX_SEPARATOR.finditer(data)]
    whole = len(data)
    first = starts[0] if starts else len(data)
    if first:
        if not starts and b"From ".startswith(data):
            problems.append(Problem(ProblemKind.TORN_TAIL, 0, first, _describe_torn(first)))
            whole = 0
        else:
            problems.append(
                Problem(
                    ProblemKind.GARBAGE,
                    0,
                    first,
                    f"{first} bytes before the first From_ line are not part of any message",
                )
            )
    for index, start in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else len(data)
        if _mbox_whole(data, start, end):
            messages.append(_mbox_message(data, start, end))
        elif end < len(data):
            problems.append(
                Problem(
                    ProblemKind.TORN_RECORD,
                    start,
                    end - start,
                    f"a message of {end - start} bytes does not end with a blank line "
                    "before the next From_ line (cut short?)",
                )
            )
        else:
            cut = _mbox_torn_start(data, start)
            if cut > start:
                messages.append(_mbox_message(data, start, cut))
            problems.append(
                Problem(ProblemKind.TORN_TAIL, cut, end - cut, _describe_torn(end - cut))
            )
            whole = cut
    problems.extend(_message_problems(messages, allow_gaps=allow_gaps, allow_foreign=allow_foreign))
    problems.sort(key=lambda p: p.offset)
    return Parsed("mbox", tuple(messages), tuple(problems), whole)


def _message_problems(
    messages: Iterable[Message], *, allow_gaps: bool, allow_foreign: bool
) -> list[Problem]:
    """The numbering problems of ``messages`` (in their order), and their foreign ones."""
    numbered: list[_Numbered] = []
    problems: list[Problem] = []
    for message in messages:
        if message.number is not None:
            numbered.append(_Numbered(message.number, message.offset, message.length, message.name))
        elif not allow_foreign:
            problems.append(
                Problem(
                    ProblemKind.FOREIGN,
                    message.offset,
                    message.length,
                    "a message without selsmtp's X-Selsmtp-Number trace lines",
                    None,
                    message.name,
                )
            )
    numbering = _numbering_problems(numbered)
    if allow_gaps:
        numbering = [p for p in numbering if p.kind is not ProblemKind.GAP]
    return problems + numbering


def _describe_torn(length: int) -> str:
    return _describe(ProblemKind.TORN_TAIL, length)


# -- maildir ---------------------------------------------------------------------


def _maildir_time(name: str) -> datetime | None:
    """The delivery time at the start of a Maildir file name (maildir(5)), if any."""
    found = _MAILDIR_TIME.match(os.path.basename(name))
    if found is None:
        return None
    try:
        return datetime.fromtimestamp(int(found[1]), timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


def parse_maildir_message(name: str, data: bytes) -> Message:
    """The Maildir message file ``name`` (``new/NAME`` or ``cur/NAME``), given its bytes.

    Its date is the one of selsmtp's ``Received:`` line, or else the delivery time
    at the start of the file name."""
    found = TRACE.match(data)
    trace = _trace(found)
    return Message(
        format="maildir",
        number=trace.number,
        sender=trace.sender,
        recipients=None,
        helo_name=trace.helo_name,
        server_name=trace.server_name,
        date=trace.date or _maildir_time(name),
        content=data if found is None else data[found.end() :],
        offset=0,
        length=len(data),
        name=name,
    )


def _maildir_order(message: Message) -> tuple[bool, int, str]:
    return (message.number is None, message.number or 0, message.name or "")


def check_maildir(
    messages: Iterable[Message], *, allow_gaps: bool = False, allow_foreign: bool = False
) -> Parsed:
    """The messages of a Maildir in number order (those without a number last, by
    name), and their problems: a number in two files, gaps (unless ``allow_gaps``),
    and messages without selsmtp's trace lines (unless ``allow_foreign``)."""
    ordered = sorted(messages, key=_maildir_order)
    problems = _message_problems(ordered, allow_gaps=allow_gaps, allow_foreign=allow_foreign)
    return Parsed("maildir", tuple(ordered), tuple(problems), 0)


# -- either file format ----------------------------------------------------------


def detect_format(data: bytes) -> str | None:
    """The format of a mailbox file that starts with ``data``: ``"mbox"`` if it starts
    with ``From ``, ``"cs4410"`` if with a ``Received: from ... (CS4410MP3)`` line,
    ``None`` if it is empty. A file that holds only the first bytes of either (a
    first record cut short) counts as that format. Raises :class:`NotAMailbox`."""
    if not data:
        return None
    first_line, newline, _ = data.partition(b"\n")
    if data.startswith(b"From ") or (not newline and b"From ".startswith(data)):
        return "mbox"
    if newline and re.fullmatch(rb"Received: from \S+ by .+ \(CS4410MP3\)", first_line):
        return "cs4410"
    if not newline and (first_line.startswith(HEADER_START) or HEADER_START.startswith(data)):
        return "cs4410"
    raise NotAMailbox(f"it starts with {data[:_SHOWN]!r}, not with a message of any format")


def parse_file(
    data: bytes,
    fmt: str,
    *,
    allow_gaps: bool = False,
    allow_foreign: bool = False,
    pending: int | None = None,
) -> Parsed:
    """Parse the bytes of a whole ``cs4410`` or ``mbox`` file.

    ``pending`` is where selsmtp's state file says an append was cut short by a
    crash (:func:`pending_append`): the bytes from there on are a torn tail, however
    whole they look."""
    if fmt not in ("cs4410", "mbox"):
        raise ValueError(f"not a file format: {fmt!r}")
    cut = len(data) if pending is None or pending >= len(data) else pending
    head = data if cut == len(data) else data[:cut]
    if fmt == "mbox":
        parsed = parse_mbox(head, allow_gaps=allow_gaps, allow_foreign=allow_foreign)
    else:
        mailbox = parse(head, allow_gaps=allow_gaps)
        torn = [p.offset for p in mailbox.problems if p.kind is ProblemKind.TORN_TAIL]
        parsed = Parsed(
            "cs4410",
            tuple(message_from_record(r) for r in mailbox.records),
            mailbox.problems,
            min(torn, default=len(head)),
        )
    if cut == len(data):
        return parsed
    problem = Problem(
        ProblemKind.TORN_TAIL,
        cut,
        len(data) - cut,
        f"an append cut short by a crash ({len(data) - cut} bytes; selsmtp removes them "
        "when it starts again)",
    )
    return dataclasses.replace(parsed, problems=(*parsed.problems, problem))


# -- reading from the file system -----------------------------------------------


def read_mailbox(path: str | os.PathLike[str], *, timeout: float | None = None) -> bytes:
    """The bytes of the mailbox at ``path``, read under a shared ``lockf`` lock.

    The server appends only under its exclusive lock, so what is read here is whole
    records only. Waits for the lock for at most ``timeout`` seconds (``None``: as long
    as it takes) and then raises :class:`TimeoutError`; raises ``OSError`` if the file
    cannot be opened (``FileNotFoundError`` if it does not exist).

    POSIX locks belong to the process, and closing any descriptor of a file drops them
    all: do not call this in a process that appends to the same file itself (a
    selsmtp server running in a thread of the caller, for instance).
    """
    # A read-only descriptor is enough for a shared (read) lock.
    with open(path, "rb") as file:
        if timeout is None:
            fcntl.lockf(file, fcntl.LOCK_SH)
        else:
            lock_shared(file.fileno(), timeout)
        try:
            return file.read()
        finally:
            fcntl.lockf(file, fcntl.LOCK_UN)


def lock_shared(fd: int, timeout: float) -> None:
    """Take a shared ``lockf`` lock on ``fd``, waiting ``timeout`` seconds at most (then
    ``TimeoutError``). Polls with a growing delay (up to 50 ms): a blocking ``lockf``
    cannot be given a timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError(f"mailbox still locked after {timeout:g} s")
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, 0.05)


def pending_append(path: str | os.PathLike[str], fd: int) -> int | None:
    """Where an append cut short by a crash begins in the mailbox file open as ``fd``,
    according to selsmtp's state file beside ``path`` (``PATH.selsmtp``); ``None`` if
    it names no such append in this very file.

    Meaningful under the shared lock only: selsmtp marks an append in its state file
    while it holds the exclusive lock, and clears the mark before it lets go, so a
    mark seen under a shared lock was left by a process that died while appending.
    Its bytes never got a 250, and selsmtp removes them when it starts again. The one
    exception: a mark written before the machine restarted, whose bytes are all in
    the file, may be older than the append's 250 (see ``selsmtp/store.py``), and
    selsmtp keeps those bytes, so they are no torn tail.
    """
    try:
        with open(os.fspath(path) + STATE_SUFFIX, "rb") as file:
            state = State.decode(file.read(1024))
    except OSError:
        return None
    if state is None or state.pending < 0:
        return None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (state.dev, state.ino) or st.st_size <= state.pending:
        return None
    rebooted = not state.boot or state.boot != boot_id()  # as the store reads it
    if rebooted and state.pending <= state.end <= st.st_size:
        return None
    return state.pending


def _read_locked(path: str, timeout: float | None) -> tuple[bytes, int | None]:
    """The bytes of the file at ``path`` and :func:`pending_append`, both read under one
    shared lock (see :func:`read_mailbox`)."""
    with open(path, "rb") as file:
        if timeout is None:
            fcntl.lockf(file, fcntl.LOCK_SH)
        else:
            lock_shared(file.fileno(), timeout)
        try:
            return file.read(), pending_append(path, file.fileno())
        finally:
            fcntl.lockf(file, fcntl.LOCK_UN)


def is_maildir(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a folder with ``new/`` and ``cur/`` in it."""
    return all(os.path.isdir(os.path.join(path, sub)) for sub in ("new", "cur"))


def maildir_key(name: str) -> str:
    """The unique part of a Maildir file name, which stays when a reader moves the
    file from ``new/`` to ``cur/`` and adds ``:2,FLAGS`` to it."""
    return name.split(":", 1)[0]


def read_maildir(path: str | os.PathLike[str]) -> list[Message]:
    """Every message file in ``new/`` and ``cur/`` of the Maildir at ``path``, in no
    particular order (:func:`check_maildir` sorts them).

    ``new/`` is listed first: a message that a reader moves to ``cur/`` meanwhile is
    found there, once. Names starting with a dot are not messages (maildir(5)).
    Raises ``OSError`` if a folder cannot be listed or a file cannot be read.
    """
    messages: list[Message] = []
    keys: set[str] = set()
    for sub in ("new", "cur"):
        folder = os.path.join(path, sub)
        for name in sorted(os.listdir(folder)):
            key = maildir_key(name)
            if name.startswith(".") or key in keys:
                continue
            try:
                with open(os.path.join(folder, name), "rb") as file:
                    data = file.read()
            except (FileNotFoundError, IsADirectoryError):
                continue  # moved on by a reader (it is in cur/ now), or not a message
            keys.add(key)
            messages.append(parse_maildir_message(f"{sub}/{name}", data))
    return messages


@dataclasses.dataclass(frozen=True, slots=True)
class Loaded:
    """A mailbox read by :func:`load`: where, its parse, and (for a file) its bytes."""

    path: str
    parsed: Parsed
    data: bytes | None

    def raw(self, message: Message) -> bytes:
        """The record of ``message`` as stored (a Maildir file is read again)."""
        if message.name is not None:
            with open(os.path.join(self.path, message.name), "rb") as file:
                return file.read()
        assert self.data is not None
        return self.data[message.offset : message.end]


def load(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    allow_gaps: bool = True,
    allow_foreign: bool = True,
    lock_timeout: float | None = None,
) -> Loaded:
    """Read and check the mailbox at ``path``, in format ``fmt`` (``None``: tell it by
    the path, see :func:`detect_format`; a folder with ``new/`` and ``cur/`` is a
    Maildir).

    A mailbox file is read under a shared lock (waiting ``lock_timeout`` seconds at
    most, see :func:`read_mailbox`), with selsmtp's state file beside it
    (:func:`pending_append`). Gaps in the numbering and foreign messages are reported
    unless allowed (they are by default: consumers and other programs cause them).

    Raises :class:`NotAMailbox`, ``OSError`` (``FileNotFoundError`` if there is
    nothing at ``path``) or ``TimeoutError``.
    """
    name = os.fspath(path)
    options = {"allow_gaps": allow_gaps, "allow_foreign": allow_foreign}
    if os.path.isdir(name):
        if fmt not in (None, "maildir"):
            raise NotAMailbox(f"{name} is a folder, not a {fmt} mailbox file")
        if not is_maildir(name):
            raise NotAMailbox(f"{name} is a folder but not a Maildir (it has no new/ and cur/)")
        return Loaded(name, check_maildir(read_maildir(name), **options), None)
    if fmt == "maildir":
        if not os.path.exists(name):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
        raise NotAMailbox(f"{name} is a file, not a Maildir folder")
    data, pending = _read_locked(name, lock_timeout)
    if fmt is None:
        try:
            fmt = detect_format(data)
        except NotAMailbox as exc:
            raise NotAMailbox(f"{name} is not a mailbox: {exc}") from None
        if fmt is None:
            return Loaded(name, Parsed(None, (), (), 0), data)
    return Loaded(name, parse_file(data, fmt, pending=pending, **options), data)
