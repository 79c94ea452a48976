"""The records of a mailbox, and what is wrong with it: the types of the read API
(:class:`Message`, :class:`Mailbox`, :class:`Problem`) and the parsing of a mailbox
file's bytes (:func:`parse_file`) and of a Maildir's messages (:func:`check_maildir`).
Nothing here touches the file system; :mod:`selsmtp.reader` does.

A mailbox file is parsed in regions. Where the store's offsets index matches the file
(each entry starts with a record head carrying its number, and is a whole record), its
entries are the records, whatever their bodies hold. The bytes between and after them
(all of the file, without a usable index) are parsed by the format's grammar
(:mod:`selsmtp.formats`): a record may start at the start of a region or, in cs4410,
after a blank line where a whole head follows (in mbox, at every ``From `` line); a
record runs to the next start; bytes before the first start, and a record that is not
whole, are damaged regions. At the end of the file a damaged region is a torn tail.
"""

from __future__ import annotations

import dataclasses
import email.message
import email.parser
import email.policy
import enum
import functools
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, Final

from selsmtp import formats
from selsmtp.durable import read_regular
from selsmtp.formats.trace import Stored


class NotAMailbox(Exception):
    """The path names no mailbox in any of the formats; the message says why, in one line."""


class ProblemKind(enum.Enum):
    GARBAGE = "garbage"  #: bytes that are not part of any record
    TORN_TAIL = "torn-tail"  #: the file ends inside a record
    TORN_RECORD = "torn-record"  #: a record cut short, with more records after it
    DUPLICATE = "duplicate"  #: a record number seen earlier in the file
    OUT_OF_ORDER = "out-of-order"  #: a number lower than the one before it
    GAP = "gap"  #: numbers missing between two neighbouring records
    FOREIGN = "foreign"  #: a message without selsmtp's number (another program's)
    # warnings: the exit status of ``check`` stays 0
    LOOK_ALIKE = "look-alike"  #: a body holds what a naive reader takes for a record
    NO_INDEX = "no-index"  #: no usable offsets index: the file was parsed


WARNINGS: Final = frozenset({ProblemKind.LOOK_ALIKE, ProblemKind.NO_INDEX})


@dataclasses.dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong at ``offset`` for ``length`` bytes (in a Maildir: in ``file``)."""

    kind: ProblemKind
    offset: int
    length: int
    detail: str
    number: int | None = None
    file: str | None = None

    def __str__(self) -> str:
        where = self.file if self.file is not None else f"offset {self.offset}"
        if self.kind in WARNINGS:
            return f"{where}: warning: {self.kind.value}: {self.detail}"
        return f"{where}: {self.kind.value}: {self.detail} ({self.length} bytes)"


@dataclasses.dataclass(frozen=True)
class Message:
    """One stored message, in any format.

    ``raw`` is the message as the client sent it, with LF line ends. ``number`` is
    ``None`` for a message selsmtp did not write; ``sender`` is ``""`` for the null
    sender; ``sender`` and ``recipients`` are ``None`` where the record does not tell.
    ``date`` (UTC) is ``None`` in cs4410. ``offset`` and ``length`` cover the stored
    record; in a Maildir it is the whole file ``name`` (``new/NAME`` or ``cur/NAME``).
    """

    format: str
    number: int | None
    sender: str | None
    recipients: tuple[str, ...] | None
    helo_name: str | None
    server_name: str | None
    date: datetime | None
    raw: bytes
    offset: int = 0
    length: int = 0
    name: str | None = None

    @classmethod
    def of(
        cls, fmt: str, stored: Stored, offset: int, length: int, name: str | None = None
    ) -> Message:
        fields = stored
        return cls(
            fmt,
            fields.number,
            fields.sender,
            fields.recipients,
            fields.helo_name,
            fields.server_name,
            fields.date,
            fields.content,
            offset,
            length,
            name,
        )

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def where(self) -> str:
        """``offset N``, or the Maildir file."""
        return self.name if self.name is not None else f"offset {self.offset}"

    @functools.cached_property
    def message(self) -> email.message.EmailMessage:
        """:attr:`raw` parsed with ``email.policy.default``."""
        parser = email.parser.BytesParser(policy=email.policy.default)
        return parser.parsebytes(self.raw)

    @functools.cached_property
    def subject(self) -> str | None:
        """The ``Subject:`` header field, decoded; ``None`` if there is none."""
        parser = email.parser.BytesHeaderParser(policy=email.policy.default)
        try:
            subject = parser.parsebytes(self.raw[: 64 * 1024])["Subject"]
        except Exception:  # a header field the policy cannot make sense of
            return None
        return None if subject is None else str(subject).strip()


@dataclasses.dataclass(frozen=True)
class Mailbox(Sequence[Message]):
    """A mailbox as read: its messages (in file order; a Maildir's by number), its
    problems and warnings in offset order. ``format`` is ``None`` for an empty file.
    ``whole``: how much of the data holds whole records only (where a torn tail starts)."""

    path: str
    format: str | None
    messages: tuple[Message, ...]
    problems: tuple[Problem, ...] = ()
    warnings: tuple[Problem, ...] = ()
    whole: int = 0
    data: bytes | None = dataclasses.field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.messages)

    def __getitem__(self, index: Any) -> Any:
        return self.messages[index]

    def __iter__(self) -> Iterator[Message]:
        return iter(self.messages)

    @property
    def ok(self) -> bool:
        return not self.problems

    def stored(self, message: Message) -> bytes:
        """The record of ``message`` as it is on disk (a Maildir file is read again)."""
        if message.name is not None:
            return read_regular(os.path.join(self.path, message.name))
        assert self.data is not None
        return self.data[message.offset : message.end]


@dataclasses.dataclass
class _Found:
    messages: list[Message] = dataclasses.field(default_factory=list)
    problems: list[Problem] = dataclasses.field(default_factory=list)
    warnings: list[Problem] = dataclasses.field(default_factory=list)
    whole: int = 0


def parse_file(
    data: bytes,
    fmt: str,
    *,
    index: Sequence[Any] | None = None,
    pending: int | None = None,
    base: int = 0,
    path: str = "",
    allow_gaps: bool = True,
    allow_foreign: bool = True,
) -> Mailbox:
    """Parse the bytes of a ``cs4410`` or ``mbox`` file from offset ``base`` on (``data``
    is the file from there). ``index``: the store's entries (``offset``, ``length``,
    ``number``, offsets in the file); ``pending``: where selsmtp's state file says an
    append was cut short by a crash (the bytes from there on are a torn tail, however
    whole they look). Offsets in the result are relative to ``data``."""
    grammar = formats.cs4410 if fmt == "cs4410" else formats.mbox
    end = len(data) if pending is None or pending - base >= len(data) else pending - base
    found = _Found(whole=end)
    entries = _usable(data, end, grammar, index, base)
    if entries is None:
        if fmt == "cs4410" and data and base == 0:
            why = "no usable offsets index" if index is None else "the offsets index does not match"
            why += ": the file is parsed, and a body that holds a record head is read as a record"
            found.warnings.append(Problem(ProblemKind.NO_INDEX, 0, 0, why))
        entries = []
    position = 0
    for offset, length in entries:
        _parse_region(data, position, offset, grammar, fmt, found, at_end=False)
        stored = grammar.parse(data, offset, offset + length, indexed=True)
        assert stored is not None  # checked by _usable
        found.messages.append(Message.of(fmt, stored, offset, length))
        for look_alike in grammar.look_alikes(data, offset, offset + length):
            number = grammar.number_at(data, look_alike)
            found.warnings.append(
                Problem(
                    ProblemKind.LOOK_ALIKE,
                    look_alike,
                    0,
                    f"the body of record {stored.number} holds a record-head look-alike "
                    f"(number {number}): a reader without selsmtp's index takes it for a record",
                    number,
                )
            )
        position = offset + length
    _parse_region(data, position, end, grammar, fmt, found, at_end=True)
    if end < len(data):
        detail = "an append cut short by a crash (selsmtp removes it when it starts again)"
        found.problems.append(Problem(ProblemKind.TORN_TAIL, end, len(data) - end, detail))
    found.problems += _numbering(found.messages, allow_gaps=allow_gaps, allow_foreign=allow_foreign)
    return Mailbox(
        path,
        fmt,
        tuple(found.messages),
        tuple(sorted(found.problems, key=lambda p: p.offset)),
        tuple(sorted(found.warnings, key=lambda p: p.offset)),
        found.whole,
        data,
    )


def _usable(
    data: bytes, end: int, grammar: Any, index: Sequence[Any] | None, base: int
) -> list[tuple[int, int]] | None:
    """The index's records within ``data`` as (offset, length), if every one of them is
    where it says, as it says; else ``None``. Entries from ``end`` on (an append a crash
    cut short, which readers hide: the process died after listing it) are left out."""
    if index is None:
        return None
    entries: list[tuple[int, int]] = []
    position = 0
    for entry in index:
        offset = entry.offset - base
        if offset < 0:
            continue  # before what was read (follow reads from where it stopped)
        if offset >= end and end < len(data):
            break  # in the torn tail: never committed, and hidden with it
        stop = offset + entry.length
        if (
            offset < position
            or stop > end
            or grammar.number_at(data, offset) != entry.number
            or grammar.parse(data, offset, stop, indexed=True) is None
        ):
            return None
        entries.append((offset, entry.length))
        position = stop
    return entries


def _parse_region(
    data: bytes, start: int, end: int, grammar: Any, fmt: str, found: _Found, *, at_end: bool
) -> None:
    """Find the records in ``data[start:end]``, which no index covers."""
    if start >= end:
        return
    starts = grammar.starts(data, start, end)
    first = starts[0] if starts else end
    if first > start:
        _damaged(data, start, first, grammar, found, at_end=at_end and first == end)
    for here, following in itertools.pairwise([*starts, end]):
        stored = grammar.parse(data, here, following)
        if stored is not None:
            found.messages.append(Message.of(fmt, stored, here, following - here))
            continue
        if at_end and following == end:
            # The last record may be whole, with the first bytes of the next one after it.
            cut = data.rfind(b"\n\n", here, end) + 2
            if here < cut < end and grammar.torn_head(data[cut:end]):
                whole = grammar.parse(data, here, cut)
                if whole is not None:
                    found.messages.append(Message.of(fmt, whole, here, cut - here))
                    here = cut
        _damaged(data, here, following, grammar, found, at_end=at_end and following == end)


def _damaged(
    data: bytes, start: int, end: int, grammar: Any, found: _Found, *, at_end: bool
) -> None:
    length = end - start
    if at_end and grammar.torn_head(data[start : start + 15]):
        found.problems.append(
            Problem(ProblemKind.TORN_TAIL, start, length, "the file ends inside a record")
        )
        found.whole = min(found.whole, start)
    elif grammar.torn_head(data[start : start + 15]):
        found.problems.append(
            Problem(ProblemKind.TORN_RECORD, start, length, "a record cut short, or damaged")
        )
    else:
        found.problems.append(
            Problem(ProblemKind.GARBAGE, start, length, "bytes that are not part of any record")
        )


def check_maildir(
    messages: Iterable[Message],
    path: str = "",
    *,
    allow_gaps: bool = True,
    allow_foreign: bool = True,
) -> Mailbox:
    """The messages of a Maildir in number order (those without one last, by name), and
    their problems."""
    ordered = sorted(messages, key=lambda m: (m.number is None, m.number or 0, m.name or ""))
    problems = _numbering(ordered, allow_gaps=allow_gaps, allow_foreign=allow_foreign)
    return Mailbox(path, "maildir", tuple(ordered), tuple(problems))


def _numbering(
    messages: Iterable[Message], *, allow_gaps: bool, allow_foreign: bool
) -> list[Problem]:
    """Numbers seen twice, going down or (unless ``allow_gaps``) skipping; messages
    without a number (unless ``allow_foreign``)."""
    problems: list[Problem] = []
    seen: dict[int, Message] = {}
    previous: int | None = None
    for message in messages:
        number = message.number

        def problem(kind: ProblemKind, detail: str, message: Message = message) -> None:
            where = (message.offset, message.length)
            problems.append(Problem(kind, *where, detail, message.number, message.name))

        if number is None:
            if not allow_foreign:
                problem(ProblemKind.FOREIGN, "a message without selsmtp's X-Selsmtp-Number line")
            continue
        if number in seen:
            first = seen[number].where
            problem(ProblemKind.DUPLICATE, f"record number {number} again (first at {first})")
        elif previous is not None and number < previous:
            problem(ProblemKind.OUT_OF_ORDER, f"record number {number} after {previous}")
        elif previous is not None and number > previous + 1 and not allow_gaps:
            missing = f"{previous + 1}"
            if number > previous + 2:
                missing += f"-{number - 1}"
            problem(ProblemKind.GAP, f"record number {number} after {previous}: {missing} missing")
        seen.setdefault(number, message)
        previous = number
    return problems
