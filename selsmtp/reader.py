"""Reading a ``cs4410`` mailbox back: records, and what is wrong with the file.

This module only parses bytes (:func:`parse`, :func:`check`); the one function that
touches a file, :func:`read_mailbox`, reads it under a shared ``fcntl.lockf`` lock
so that it never sees half of an append (SPEC §5.4).

The format (SPEC §5.1)
----------------------
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
final dot), so every record, and so the whole file, ends with two LFs.

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
record cut by a crash right after a blank line inside its body looks whole; selsmtp
removes such tails at start-up using its state file, which this module does not read.

Problems reported
-----------------
:class:`ProblemKind` lists them: bytes that belong to no record, a torn tail (the
file ends inside a record), a number seen before, a number lower than the previous
one, and a gap in the numbering (selsmtp numbers the records of one file
consecutively; a gap means records were removed from the middle).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import errno
import fcntl
import itertools
import os
import re
import time
from collections.abc import Sequence
from typing import Final

__all__ = [
    "Mailbox",
    "Problem",
    "ProblemKind",
    "Record",
    "check",
    "parse",
    "read_mailbox",
]

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


class ProblemKind(enum.Enum):
    GARBAGE = "garbage"  #: bytes that are not part of any record
    TORN_TAIL = "torn-tail"  #: the file ends inside a record
    DUPLICATE = "duplicate"  #: a record number seen earlier in the file
    OUT_OF_ORDER = "out-of-order"  #: a number lower than the one before it
    GAP = "gap"  #: numbers missing between two neighbouring records


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

    ``number`` is the record number concerned, when there is one.
    """

    kind: ProblemKind
    offset: int
    length: int
    detail: str
    number: int | None = None

    def __str__(self) -> str:
        return f"offset {self.offset}: {self.kind.value}: {self.detail}"


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
class _Candidate:
    offset: int
    match: re.Match[bytes]
    number: int


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

    If the bytes after the last blank line in the last record's body look like the
    start of a record header, the tail is that cut-off record, and the record before
    it is whole. Otherwise the last record itself was cut.
    """
    header_end = last.match.end()
    blank = data.rfind(b"\n\n", header_end - 1)
    if blank >= 0:
        start = blank + 2
        tail = data[start : start + len(HEADER_START)]
        if start < len(data) and start > header_end and HEADER_START.startswith(tail):
            return start
    return last.offset


def _numbering_problems(records: Sequence[Record]) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[int, int] = {}
    previous: Record | None = None
    for record in records:
        number = record.number
        if number in seen:
            problems.append(
                Problem(
                    ProblemKind.DUPLICATE,
                    record.offset,
                    record.length,
                    f"record number {number} again (first at offset {seen[number]})",
                    number,
                )
            )
        elif previous is not None and number < previous.number:
            problems.append(
                Problem(
                    ProblemKind.OUT_OF_ORDER,
                    record.offset,
                    record.length,
                    f"record number {number} after {previous.number}",
                    number,
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
                    record.offset,
                    record.length,
                    f"record number {number} after {previous.number}: {missing} missing",
                    number,
                )
            )
        seen.setdefault(number, record.offset)
        previous = record
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
    numbering = _numbering_problems(records)
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
            _lock_shared_within(file.fileno(), timeout)
        try:
            return file.read()
        finally:
            fcntl.lockf(file, fcntl.LOCK_UN)


def _lock_shared_within(fd: int, timeout: float) -> None:
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
