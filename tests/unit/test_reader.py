"""selsmtp.reader: messages read back from mailboxes made by selsmtp.formats.

Every mailbox here is built with the server's own renderers (formats.cs4410_record,
mbox_record, maildir_message), so these tests pin the reader to what the stores really
write. The state file beside a mailbox is made with selsmtp.durable.State.
"""

from __future__ import annotations

import fcntl
import itertools
import mailbox as stdlib_mailbox
import multiprocessing
import os
import random
import re
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from selsmtp import formats, reader
from selsmtp.durable import State, boot_id
from selsmtp.reader import ProblemKind
from selsmtp.session import Envelope

NAME = "mx.test"


def record(
    number: int,
    body: bytes = b"Subject: hi\r\n\r\nhello\r\n",
    *,
    sender: str = "alice@example.com",
    recipients: Sequence[str] = ("bob@example.com",),
    helo: str = "client.test",
    name: str = NAME,
) -> bytes:
    """One record exactly as the store writes it (``body`` as received: CRLF lines)."""
    envelope = Envelope(helo, sender, tuple(recipients))
    return b"".join(formats.cs4410_record(number, envelope, body, name))


def mailbox(*numbers: int, body: bytes = b"hello\r\n") -> bytes:
    return b"".join(record(n, body) for n in numbers)


def numbers(data: bytes) -> list[int]:
    return [r.number for r in reader.parse(data).records]


def kinds(data: bytes, **options: Any) -> list[ProblemKind]:
    return [p.kind for p in reader.check(data, **options)]


def look_alike(number: int, helo: str = "fake.test") -> bytes:
    """Body text (CRLF lines) that renders to a complete record header after a blank line."""
    return (
        f"\r\nReceived: from {helo} by {NAME} (CS4410MP3)\r\nNumber: {number}\r\n"
        "From: mallory@example.com\r\nTo: bob@example.com\r\n\r\nfake body\r\n"
    ).encode()


# -- well-formed mailboxes -----------------------------------------------------


def test_empty_mailbox_has_no_records_and_no_problems() -> None:
    parsed = reader.parse(b"")
    assert parsed.records == ()
    assert parsed.ok


def test_one_record_round_trips_every_field() -> None:
    data = record(7, b"Subject: x\r\n\r\nline\r\n", recipients=("b@x", "c@y", "b@x"))
    (only,) = reader.parse(data).records
    assert only == reader.Record(
        number=7,
        helo_name="client.test",
        server_name=NAME,
        sender="alice@example.com",
        recipients=("b@x", "c@y", "b@x"),
        body=b"Subject: x\n\nline\n",
        offset=0,
        length=len(data),
        body_offset=data.index(b"\n\n") + 2,
    )
    assert only.end == len(data)


def test_null_sender_is_read_as_empty_string() -> None:
    (only,) = reader.parse(record(1, sender="")).records
    assert only.sender == ""


def test_empty_body_and_blank_only_body() -> None:
    data = record(1, b"") + record(2, b"\r\n") + record(3, b"\r\n\r\n") + record(4)
    parsed = reader.parse(data)
    assert parsed.ok
    assert [r.body for r in parsed.records] == [b"", b"\n", b"\n\n", b"Subject: hi\n\nhello\n"]


def test_records_tile_the_file() -> None:
    data = mailbox(1, 2, 3, 4)
    records = reader.parse(data).records
    assert records[0].offset == 0
    assert all(a.end == b.offset for a, b in itertools.pairwise(records))
    assert records[-1].end == len(data)
    assert all(data[r.offset : r.end] == record(r.number, b"hello\r\n") for r in records)


def test_body_bytes_are_kept_as_stored() -> None:
    body = b"8-bit \xff\xfe caf\xc3\xa9\r\nbare\rcr and bare\nlf\r\n.\r\n..two\r\n"
    (only,) = reader.parse(record(1, body)).records
    assert only.body == body.replace(b"\r\n", b"\n")


def test_server_name_with_spaces() -> None:
    (only,) = reader.parse(record(1, name="my mail host")).records
    assert only.server_name == "my mail host"


def test_numbers_need_not_start_at_one() -> None:
    """After movemail empties the file, numbering goes on from where it was."""
    assert numbers(mailbox(41, 42, 43)) == [41, 42, 43]
    assert reader.check(mailbox(41, 42, 43)) == []


# -- bodies that look like headers ---------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"From: eve@example.com\r\nTo: someone@example.com\r\nNumber: 2\r\n",
        b"Received: from x by y (CS4410MP3)\r\nNumber: 2\r\nFrom: a\r\nTo: b\r\n\r\n",
        b"text\r\n\r\nReceived: from x by y (CS4410MP3)\r\nNumber: 2\r\nX-Other: 1\r\n\r\n",
        b"text\r\n\r\nReceived: from x by y (CS4410MP3)\r\n",
        b"\r\n\r\n\r\nNumber: 1\r\n\r\n",
    ],
    ids=[
        "header-lines",
        "header-without-blank-before",
        "incomplete-header",
        "first-line",
        "blanks",
    ],
)
def test_header_like_lines_that_cannot_start_a_record_stay_in_the_body(body: bytes) -> None:
    data = record(1) + record(2, body) + record(3)
    parsed = reader.parse(data)
    assert parsed.ok
    assert [r.body for r in parsed.records][1] == body.replace(b"\r\n", b"\n")


@pytest.mark.parametrize("fake", [0, 1, 2, 5, 99, 10**12])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_a_whole_look_alike_that_does_not_fit_is_body_text(fake: int, where: int) -> None:
    """A complete record header inside a body, numbered so that it cannot sit between
    its neighbours, is read as text (the reading whose numbers increase)."""
    bodies = [b"one\r\n", b"two\r\n", b"three\r\n", b"four\r\n"]
    bodies[where] = b"before\r\n" + look_alike(fake) + b"after\r\n"
    data = b"".join(record(n, body) for n, body in zip((10, 11, 12, 13), bodies, strict=True))
    parsed = reader.parse(data)
    assert parsed.ok, parsed.problems
    assert [r.body for r in parsed.records] == [b.replace(b"\r\n", b"\n") for b in bodies]


def test_a_look_alike_of_the_next_record_before_the_real_one_is_body_text() -> None:
    body = b"quoted:\r\n" + look_alike(2)
    data = record(1, body) + record(2) + record(3)
    parsed = reader.parse(data)
    assert parsed.ok
    assert [r.number for r in parsed.records] == [1, 2, 3]
    assert parsed.records[0].body == body.replace(b"\r\n", b"\n")
    assert parsed.records[1].helo_name == "client.test"


def test_a_look_alike_in_the_last_body_numbered_lower_is_body_text() -> None:
    data = record(1) + record(2, b"x\r\n" + look_alike(1, helo="other.test"))
    assert numbers(data) == [1, 2]
    assert reader.check(data) == []


def test_random_bodies_with_look_alikes_parse_back_exactly() -> None:
    rng = random.Random(4410)
    pieces = [
        b"plain text\r\n",
        b"\r\n",
        b".\r\n",
        b"From: x@y\r\n",
        b"To: x@y\r\n",
        b"Number: 3\r\n",
        b"Received: from a by b (CS4410MP3)\r\n",
        b"\xff\xfe\r\n",
    ]
    for trial in range(30):
        count = rng.randint(1, 12)
        bodies = []
        for index in range(count):
            parts = [rng.choice(pieces) for _ in range(rng.randint(0, 8))]
            if index < count - 1 and rng.random() < 0.3:
                # numbered 0: never fits, wherever it is
                parts.insert(rng.randint(0, len(parts)), look_alike(0, helo=f"f{trial}.{index}"))
            bodies.append(b"".join(parts))
        first = rng.randint(1, 1000)
        data = b"".join(record(first + i, body) for i, body in enumerate(bodies))
        parsed = reader.parse(data)
        assert parsed.ok, (trial, parsed.problems)
        assert [r.body for r in parsed.records] == [b.replace(b"\r\n", b"\n") for b in bodies]


# -- damaged mailboxes ---------------------------------------------------------


def test_every_cut_inside_the_last_record_is_a_torn_tail() -> None:
    whole = mailbox(1, 2) + record(3, b"Subject: last\r\nand no blank line in this body\r\n")
    last = reader.parse(whole).records[-1]
    for cut in range(last.offset + 1, len(whole)):
        parsed = reader.parse(whole[:cut])
        assert [p.kind for p in parsed.problems] == [ProblemKind.TORN_TAIL], cut
        (torn,) = parsed.problems
        assert (torn.offset, torn.length) == (last.offset, cut - last.offset), cut
        assert [r.number for r in parsed.records] == [1, 2], cut


def test_a_cut_right_after_a_blank_line_in_the_body_looks_whole() -> None:
    """The documented blind spot: selsmtp's state file, not the reader, catches this."""
    whole = mailbox(1) + record(2, b"para one\r\n\r\npara two\r\n")
    cut = whole.index(b"para one\n\n") + len(b"para one\n\n")
    assert reader.check(whole[:cut]) == []


def test_a_cut_inside_the_first_header_is_a_torn_tail_at_zero() -> None:
    data = record(1)[:30]
    (problem,) = reader.check(data)
    assert (problem.kind, problem.offset, problem.length) == (ProblemKind.TORN_TAIL, 0, 30)


def test_bytes_before_the_first_record_are_garbage() -> None:
    data = b"junk\n\n" + mailbox(1, 2)
    (problem,) = reader.check(data)
    assert (problem.kind, problem.offset, problem.length) == (ProblemKind.GARBAGE, 0, 6)
    assert numbers(data) == [1, 2]
    assert reader.check(b"not a mailbox at all\n")[0].kind is ProblemKind.GARBAGE


def test_a_duplicated_record_is_reported_where_the_copy_starts() -> None:
    first, second, third = record(1), record(2), record(3)
    data = first + second + second + third
    (problem,) = reader.check(data)
    assert problem.kind is ProblemKind.DUPLICATE
    assert (problem.offset, problem.length, problem.number) == (
        len(first + second),
        len(second),
        2,
    )
    assert f"first at offset {len(first)}" in problem.detail


def test_a_record_copied_to_the_end_is_a_duplicate() -> None:
    data = mailbox(1, 2, 3, 4) + record(2)
    assert kinds(data) == [ProblemKind.DUPLICATE]


def test_numbers_reused_by_different_records_are_duplicates() -> None:
    data = mailbox(1, 2, 3) + b"".join(record(n, b"other\r\n", sender="x@y") for n in (2, 3, 4))
    assert numbers(data) == [1, 2, 3, 2, 3, 4]
    assert kinds(data) == [ProblemKind.DUPLICATE, ProblemKind.DUPLICATE]


def test_numbers_that_go_down_are_out_of_order() -> None:
    data = mailbox(5, 6, 7, 1, 2, 3)
    problems = reader.check(data)
    assert [p.kind for p in problems] == [ProblemKind.OUT_OF_ORDER]
    assert problems[0].number == 1
    assert problems[0].offset == len(mailbox(5, 6, 7))
    assert "record number 1 after 7" in str(problems[0])


def test_a_missing_record_is_a_gap_unless_gaps_are_allowed() -> None:
    data = mailbox(1, 2, 4, 5, 9)
    problems = reader.check(data)
    assert [(p.kind, p.number) for p in problems] == [(ProblemKind.GAP, 4), (ProblemKind.GAP, 9)]
    assert "3 missing" in problems[0].detail
    assert "6-8 missing" in problems[1].detail
    assert reader.check(data, allow_gaps=True) == []


def test_problems_come_in_offset_order() -> None:
    data = b"junk\n\n" + mailbox(1, 2, 2, 4) + record(5)[:20]
    offsets = [p.offset for p in reader.check(data)]
    assert offsets == sorted(offsets)
    assert kinds(data) == [
        ProblemKind.GARBAGE,
        ProblemKind.DUPLICATE,
        ProblemKind.GAP,
        ProblemKind.TORN_TAIL,
    ]


# -- reading the file under its lock -------------------------------------------


def test_read_mailbox_returns_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "mailbox"
    path.write_bytes(mailbox(1, 2, 3))
    assert reader.read_mailbox(path) == mailbox(1, 2, 3)
    assert reader.read_mailbox(str(path), timeout=1) == mailbox(1, 2, 3)


def test_read_mailbox_of_a_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        reader.read_mailbox(tmp_path / "nothing")


def _hold_exclusive_lock(path: str, locked: Any, release: Any) -> None:
    with open(path, "r+b") as file:
        fcntl.lockf(file, fcntl.LOCK_EX)
        locked.set()
        release.wait(10)


def test_read_mailbox_waits_for_a_writer_and_times_out(tmp_path: Path) -> None:
    """lockf locks belong to the process, so the writer must be another process."""
    path = tmp_path / "mailbox"
    path.write_bytes(mailbox(1))
    context = multiprocessing.get_context("spawn")
    locked, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_exclusive_lock, args=(str(path), locked, release))
    holder.start()
    try:
        assert locked.wait(10)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            reader.read_mailbox(path, timeout=0.2)
        assert 0.15 < time.monotonic() - started < 5
    finally:
        release.set()
        holder.join(10)
    assert reader.read_mailbox(path, timeout=5) == mailbox(1)


def test_a_blank_line_then_a_header_that_cannot_be_one_is_not_a_cut_off_record() -> None:
    """flood's filler has this line; the record it is in, cut short, is all torn."""
    body = (
        b"text\r\n\r\nReceived: from look.alike by look.alike (CS4410MP3)\r\nNumber: 1\r\n"
        b"X-Not-A: record\r\nmore text\r\n"
    )
    whole = mailbox(1) + record(2, body)
    # Cut before "X-Not-A", the look-alike may be a header cut short: that tail is torn.
    for cut in range(whole.index(b"X-Not-A") + 1, len(whole) - 1):
        parsed = reader.parse(whole[:cut])
        assert numbers(whole[:cut]) == [1], cut
        (torn,) = parsed.problems
        assert (torn.kind, torn.offset) == (ProblemKind.TORN_TAIL, len(mailbox(1))), cut


@pytest.mark.parametrize(
    "tail",
    [b"R", b"Received: from x", b"Received: from x b", b"Received: from x by y (CS44",
     b"Received: from x by y (CS4410MP3)\nNumber: 12", b"Received: from x by y (CS4410MP3)\n"
     b"Number: 1\nFrom: a@b\nTo: c@d\nTo: e"],
)  # fmt: skip
def test_a_header_cut_short_after_a_blank_line_is_the_torn_tail(tail: bytes) -> None:
    data = mailbox(1) + record(2, b"para\r\n")[:-1] + b"\n" + tail
    parsed = reader.parse(data)
    assert numbers(data) == [1, 2]
    (torn,) = parsed.problems
    assert (torn.kind, torn.offset) == (ProblemKind.TORN_TAIL, len(data) - len(tail))


# -- every format: Message, header fields ------------------------------------------


def test_a_record_as_a_message() -> None:
    data = mailbox(1) + record(2, b"Subject: two\r\n\r\nx\r\n", recipients=("b@x", "c@y"))
    parsed = reader.parse_file(data, "cs4410")
    assert parsed.format == "cs4410" and parsed.ok and parsed.whole == len(data)
    message = parsed.messages[1]
    assert message == reader.message_from_record(reader.parse(data).records[1])
    assert (message.number, message.sender, message.recipients) == (
        2,
        "alice@example.com",
        ("b@x", "c@y"),
    )
    assert (message.helo_name, message.server_name, message.date) == ("client.test", NAME, None)
    assert (message.content, message.size, message.subject) == (b"Subject: two\n\nx\n", 16, "two")
    assert data[message.offset : message.end] == record(
        2, b"Subject: two\r\n\r\nx\r\n", recipients=("b@x", "c@y")
    )
    assert message.where == f"offset {message.offset}"


@pytest.mark.parametrize(
    ("message", "subject"),
    [
        (b"Subject: plain\n\nbody\n", "plain"),
        (b"subject:   spaced   \n\n", "spaced"),
        (b"From: a\nSUBJECT: upper\nX: y\n\n", "upper"),
        (b"Subject: folded\n  over\n\tlines\nX: y\n", "folded  over\tlines"),
        (
            b"Subject: =?utf-8?q?caf=C3=A9?= =?iso-8859-1?b?6XTp?=\n\n",
            "caféété",
        ),  # RFC 2047: no space between words
        (b"Subject: =?bogus-charset?q?x?=\n\n", "=?bogus-charset?q?x?="),
        (b"Subject: raw \xc3\xa9 \xff\n\n", "raw é \ufffd"),
        (b"Subject: first\nSubject: second\n\n", "first"),
        (b"Subject:\n\n", ""),
        (b"X: y\n\nSubject: in the body\n", None),
        (b"hello\nSubject: not a header\n", None),
        (b" continuation first\nSubject: no\n", None),
        (b"", None),
        (b"Subject: cr\r\n\r\n", "cr"),
    ],
)
def test_subjects(message: bytes, subject: str | None) -> None:
    assert reader.subject_of(message) == subject


def test_header_fields_are_looked_for_in_the_first_64_kib_only() -> None:
    padding = b"X-Pad: " + b"p" * 70_000 + b"\n"
    assert reader.header_value(b"Subject: s\n" + padding, "subject") == b"s"
    assert reader.header_value(padding + b"Subject: s\n", "subject") is None


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"", None),
        (b"From a@b Thu Jan  1 00:00:00 1970\n", "mbox"),
        (b"From ", "mbox"),
        (b"Fr", "mbox"),
        (b"Received: from a by b c (CS4410MP3)\nNumber: 1\n", "cs4410"),
        (b"Received: from a b", "cs4410"),
        (b"Rece", "cs4410"),
    ],
)
def test_the_format_is_told_by_the_first_bytes(head: bytes, fmt: str | None) -> None:
    assert reader.detect_format(head) == fmt


@pytest.mark.parametrize(
    "head",
    [b"hello\n", b"\x7fELF\x02\x01", b"Received: from a by b\nNumber: 1\n", b"\n\nFrom x\n", b"X"],
)
def test_other_first_bytes_are_not_a_mailbox(head: bytes) -> None:
    with pytest.raises(reader.NotAMailbox, match="it starts with"):
        reader.detect_format(head)


# -- mbox ----------------------------------------------------------------------------

NOW = 1_700_000_000.25  # Tue Nov 14 22:13:20 2023 UTC
NOW_UTC = datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
MBOX_BODIES = [
    b"Subject: from lines\r\n\r\nFrom the start\r\nFrom: header-like\r\n",
    b">From once\r\n>>From twice\r\nFromage\r\n From indented\r\n",
    b"",
    b"\r\n\r\n\r\nFrom after blanks\r\n\r\n",
    b"Subject: x\r\n\r\nno newline at the end",
    b"caf\xc3\xa9 \xff\xfe\x00\r\n",
]


def mbox_record(
    number: int, body: bytes, sender: str = "alice@example.com", when: float = NOW
) -> bytes:
    envelope = Envelope("client.test", sender, ("bob@example.com",))
    return b"".join(formats.mbox_record(number, envelope, body, NAME, when))


def sent(body: bytes) -> bytes:
    """What the client sent, with LF line ends (and the final line end SMTP guarantees)."""
    body = body.replace(b"\r\n", b"\n")
    return body if not body or body.endswith(b"\n") else body + b"\n"


def test_mbox_messages_come_back_as_sent() -> None:
    data = b"".join(mbox_record(n, body, when=NOW + n) for n, body in enumerate(MBOX_BODIES, 1))
    parsed = reader.parse_mbox(data)
    assert parsed.ok and parsed.format == "mbox" and parsed.whole == len(data)
    assert [m.content for m in parsed.messages] == [sent(b) for b in MBOX_BODIES]
    assert [m.number for m in parsed.messages] == [1, 2, 3, 4, 5, 6]
    first = parsed.messages[0]
    assert (first.sender, first.helo_name, first.server_name) == (
        "alice@example.com",
        "client.test",
        NAME,
    )
    assert first.recipients is None
    assert first.date == datetime(2023, 11, 14, 22, 13, 21, tzinfo=timezone.utc)
    assert first.subject == "from lines"
    assert b"".join(data[m.offset : m.end] for m in parsed.messages) == data


def test_mbox_agrees_with_the_stdlib_reader(tmp_path: Path) -> None:
    data = b"".join(mbox_record(n, body) for n, body in enumerate(MBOX_BODIES, 1))
    path = tmp_path / "mbox"
    path.write_bytes(data)
    box = stdlib_mailbox.mbox(path, create=False)
    theirs = [box.get_bytes(key) for key in box.iterkeys()]
    box.close()
    ours = reader.parse_mbox(data).messages
    assert len(theirs) == len(ours)
    for message, stdlib in zip(ours, theirs, strict=True):
        assert re.sub(rb"(?m)^>(>*From )", rb"\1", stdlib).endswith(message.content)


def test_mbox_null_sender_and_the_from_line_date() -> None:
    (message,) = reader.parse_mbox(mbox_record(1, b"x\r\n", sender="")).messages
    assert message.sender == ""
    foreign = b"From someone@example.com Wed Jan  3 04:05:06 2024\nSubject: s\n\nhi\n\n"
    (other,) = reader.parse_mbox(foreign, allow_foreign=True).messages
    assert (other.number, other.sender, other.helo_name) == (None, "someone@example.com", None)
    assert other.date == datetime(2024, 1, 3, 4, 5, 6, tzinfo=timezone.utc)
    assert (other.content, other.subject) == (b"Subject: s\n\nhi\n", "s")


def test_every_cut_of_the_last_mbox_message_is_a_torn_tail() -> None:
    whole = mbox_record(1, b"one\r\n") + mbox_record(2, b"Subject: last\r\nno blank line here\r\n")
    second = len(mbox_record(1, b"one\r\n"))
    for cut in range(second + 1, len(whole)):
        parsed = reader.parse_mbox(whole[:cut])
        assert [p.kind for p in parsed.problems] == [ProblemKind.TORN_TAIL], cut
        assert (parsed.problems[0].offset, parsed.whole) == (second, second), cut
        assert [m.number for m in parsed.messages] == [1], cut
    for cut in range(1, 5):  # the cut falls in the next From_ line
        parsed = reader.parse_mbox(whole[: second + cut])
        assert [m.number for m in parsed.messages] == [1]
        assert (parsed.problems[0].kind, parsed.whole) == (ProblemKind.TORN_TAIL, second)


def test_mbox_garbage_torn_records_and_numbering() -> None:
    one, two, three = (mbox_record(n, b"x\r\n") for n in (1, 2, 3))
    assert [p.kind for p in reader.parse_mbox(b"junk\n" + one).problems] == [ProblemKind.GARBAGE]
    assert [p.kind for p in reader.parse_mbox(b"Fro").problems] == [ProblemKind.TORN_TAIL]
    cut = one[:-1] + two  # no blank line before the next From_ line
    problems = reader.parse_mbox(cut).problems
    assert [(p.kind, p.offset, p.length) for p in problems] == [
        (ProblemKind.TORN_RECORD, 0, len(one) - 1)
    ]
    assert "does not end with a blank line" in str(problems[0])
    assert [p.kind for p in reader.parse_mbox(one + two + two + three).problems] == [
        ProblemKind.DUPLICATE
    ]
    assert [p.kind for p in reader.parse_mbox(two + one).problems] == [ProblemKind.OUT_OF_ORDER]
    assert [p.kind for p in reader.parse_mbox(one + three).problems] == [ProblemKind.GAP]
    assert reader.parse_mbox(one + three, allow_gaps=True).ok


def test_mbox_messages_without_selsmtp_trace_lines_are_foreign() -> None:
    foreign = b"From x@y Wed Jan  3 04:05:06 2024\nSubject: s\n\nhi\n\n"
    data = mbox_record(1, b"a\r\n") + foreign + mbox_record(2, b"b\r\n")
    (problem,) = reader.parse_mbox(data).problems
    assert (problem.kind, problem.offset) == (ProblemKind.FOREIGN, len(mbox_record(1, b"a\r\n")))
    parsed = reader.parse_mbox(data, allow_foreign=True)
    assert parsed.ok and [m.number for m in parsed.messages] == [1, None, 2]


def test_the_trace_lines_are_found_where_the_store_finds_numbers() -> None:
    """reader.TRACE and formats.MBOX_NUMBER / MAILDIR_NUMBER agree on every message."""
    envelope = Envelope("h" * 200, "a@" + "b" * 200, ("c@d",))
    message = b"".join(
        formats.maildir_message(77, envelope, b"X-Selsmtp-Number: 5\r\n", "n a m e", NOW)
    )
    assert formats.MAILDIR_NUMBER.match(message)[1] == b"77"  # type: ignore[index]
    parsed = reader.parse_maildir_message("new/x", message)
    assert (parsed.number, parsed.helo_name, parsed.server_name) == (77, "h" * 200, "n a m e")
    assert parsed.content == b"X-Selsmtp-Number: 5\n"
    data = mbox_record(3, b"Return-Path: <x>\r\n") + mbox_record(4, b"")
    found = [int(m[1]) for m in formats.MBOX_NUMBER.finditer(data)]
    assert found == [m.number for m in reader.parse_mbox(data).messages] == [3, 4]


# -- maildir -------------------------------------------------------------------------


def maildir_file(
    number: int, body: bytes = b"Subject: s\r\n\r\nhi\r\n", sender: str = "a@b"
) -> bytes:
    envelope = Envelope("client.test", sender, ("c@d",))
    return b"".join(formats.maildir_message(number, envelope, body, NAME, NOW))


def test_a_maildir_message_comes_back_as_sent() -> None:
    message = reader.parse_maildir_message("cur/1.M2P3Q4.host:2,S", maildir_file(9, sender=""))
    assert (message.number, message.sender, message.recipients, message.date) == (
        9,
        "",
        None,
        NOW_UTC,
    )
    assert (message.content, message.subject, message.name) == (
        b"Subject: s\n\nhi\n",
        "s",
        "cur/1.M2P3Q4.host:2,S",
    )
    assert message.where == "cur/1.M2P3Q4.host:2,S"
    assert message.length == len(maildir_file(9, sender=""))
    foreign = reader.parse_maildir_message("new/1700000000.x.host", b"Subject: f\n\nx\n")
    assert (foreign.number, foreign.sender, foreign.date) == (None, None, NOW_UTC)
    assert foreign.content == b"Subject: f\n\nx\n"
    assert reader.parse_maildir_message("new/name", b"").date is None


def test_maildir_numbering_problems_name_the_files() -> None:
    messages = [
        reader.parse_maildir_message(name, data)
        for name, data in [
            ("new/c", maildir_file(3)),
            ("new/a", maildir_file(1)),
            ("cur/b:2,", maildir_file(1)),
            ("new/f", b"no trace\n"),
            ("new/d", maildir_file(6)),
        ]
    ]
    parsed = reader.check_maildir(messages)
    assert [m.name for m in parsed.messages] == ["cur/b:2,", "new/a", "new/c", "new/d", "new/f"]
    assert [str(p) for p in parsed.problems] == [
        "new/f: foreign: a message without selsmtp's X-Selsmtp-Number trace lines",
        "new/a: duplicate: record number 1 again (first in cur/b:2,)",
        "new/c: gap: record number 3 after 1: 2 missing",
        "new/d: gap: record number 6 after 3: 4-5 missing",
    ]
    lenient = reader.check_maildir(messages, allow_gaps=True, allow_foreign=True)
    assert [p.kind for p in lenient.problems] == [ProblemKind.DUPLICATE]


def test_read_maildir_skips_dot_files_and_reads_a_message_once(tmp_path: Path) -> None:
    for sub in ("new", "cur", "tmp"):
        (tmp_path / sub).mkdir()
    (tmp_path / "new" / "1.A.host").write_bytes(maildir_file(1))
    (tmp_path / "cur" / "1.A.host:2,S").write_bytes(maildir_file(1))  # the same message
    (tmp_path / "cur" / "2.B.host:2,").write_bytes(maildir_file(2))
    (tmp_path / "new" / ".hidden").write_bytes(b"x")
    (tmp_path / "tmp" / "3.C.host").write_bytes(maildir_file(3))
    (tmp_path / ".selsmtp").write_bytes(b"state")
    names = sorted(m.name or "" for m in reader.read_maildir(tmp_path))
    assert names == ["cur/2.B.host:2,", "new/1.A.host"]
    assert reader.is_maildir(tmp_path) and not reader.is_maildir(tmp_path / "new")


# -- load: files, folders, the state file ------------------------------------------


def test_load_tells_the_format_and_checks(tmp_path: Path) -> None:
    path = tmp_path / "box"
    path.write_bytes(mailbox(1, 2, 4))
    loaded = reader.load(path)
    assert loaded.parsed.format == "cs4410" and loaded.parsed.ok  # gaps are allowed
    assert loaded.raw(loaded.parsed.messages[1]) == record(2, b"hello\r\n")
    strict = reader.load(path, allow_gaps=False)
    assert [p.kind for p in strict.parsed.problems] == [ProblemKind.GAP]
    path.write_bytes(mbox_record(1, b"x\r\n"))
    assert reader.load(path).parsed.format == "mbox"
    assert [p.kind for p in reader.load(path, "cs4410").parsed.problems] == [ProblemKind.GARBAGE]
    path.write_bytes(b"")
    assert reader.load(path).parsed == reader.Parsed(None, (), (), 0)


def test_load_refuses_what_is_not_a_mailbox(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"dear diary\n")
    with pytest.raises(
        reader.NotAMailbox, match=r"notes.txt is not a mailbox: it starts with b'dear"
    ):
        reader.load(path)
    with pytest.raises(reader.NotAMailbox, match="is a file, not a Maildir folder"):
        reader.load(path, "maildir")
    with pytest.raises(reader.NotAMailbox, match="is a folder but not a Maildir"):
        reader.load(tmp_path)
    with pytest.raises(reader.NotAMailbox, match="is a folder, not a mbox mailbox file"):
        reader.load(tmp_path, "mbox")
    with pytest.raises(FileNotFoundError):
        reader.load(tmp_path / "absent")
    with pytest.raises(FileNotFoundError):
        reader.load(tmp_path / "absent", "maildir")


def test_load_reads_a_maildir(tmp_path: Path) -> None:
    for sub in ("new", "cur", "tmp"):
        (tmp_path / sub).mkdir()
    (tmp_path / "new" / "2.x").write_bytes(maildir_file(2))
    (tmp_path / "cur" / "1.x:2,").write_bytes(maildir_file(1))
    loaded = reader.load(tmp_path)
    assert [m.number for m in loaded.parsed.messages] == [1, 2]
    assert loaded.data is None
    assert loaded.raw(loaded.parsed.messages[0]) == maildir_file(1)


def write_state(
    path: Path, *, pending: int, number: int = 9, end: int = -1, boot: str = ""
) -> None:
    """selsmtp's state file beside ``path``, as a crash in the middle of an append leaves it."""
    st = path.stat()
    state = State()
    state.number, state.size, state.dev, state.ino = number, pending, st.st_dev, st.st_ino
    state.pending, state.end, state.boot = pending, end, boot
    Path(f"{path}.selsmtp").write_bytes(state.encode())


@pytest.mark.parametrize("fmt", ["cs4410", "mbox"])
def test_an_append_the_state_file_says_was_cut_short_is_a_torn_tail(
    tmp_path: Path, fmt: str
) -> None:
    """Even when the bytes look whole (a cut right after a blank line in the body)."""
    render = (lambda n, b: record(n, b)) if fmt == "cs4410" else mbox_record
    first = render(1, b"one\r\n")
    cut = render(2, b"para\r\n\r\npara two\r\n")
    cut = cut[: cut.index(b"para\n\n") + 6]
    path = tmp_path / "box"
    path.write_bytes(first + cut)
    assert reader.load(path).parsed.ok  # without the state file it looks whole
    write_state(path, pending=len(first))
    parsed = reader.load(path).parsed
    assert [m.number for m in parsed.messages] == [1]
    (problem,) = parsed.problems
    assert (problem.kind, problem.offset, problem.length) == (
        ProblemKind.TORN_TAIL,
        len(first),
        len(cut),
    )
    assert "cut short by a crash" in problem.detail
    assert parsed.whole == len(first)
    with path.open("rb") as file:
        assert reader.pending_append(path, file.fileno()) == len(first)
    # A state file about another file, or a mark at the very end, says nothing.
    os.rename(path, tmp_path / "old")
    path.write_bytes(first + cut)
    assert reader.load(path).parsed.ok
    write_state(path, pending=len(first + cut))
    assert reader.load(path).parsed.ok
    Path(f"{path}.selsmtp").write_bytes(b"garbage")
    assert reader.load(path).parsed.ok


def test_a_whole_append_marked_before_a_reboot_is_no_torn_tail(tmp_path: Path) -> None:
    # After a power cut the mark can be older than the append's 250; selsmtp keeps a
    # batch whose bytes are all there, and so does the reader.
    first, second = record(1, b"one\r\n"), record(2, b"two\r\n")
    path = tmp_path / "box"
    path.write_bytes(first + second)
    end = len(first + second)
    with path.open("rb") as file:
        write_state(path, pending=len(first), end=end, boot=boot_id())
        assert reader.pending_append(path, file.fileno()) == len(first)  # this boot: torn
        write_state(path, pending=len(first), end=end, boot="before-the-reboot")
        assert reader.pending_append(path, file.fileno()) is None
        write_state(path, pending=len(first), end=end, boot="")  # unknown: as if rebooted
        assert reader.pending_append(path, file.fileno()) is None
        write_state(path, pending=len(first), end=end + 1, boot="before-the-reboot")
        assert reader.pending_append(path, file.fileno()) == len(first)  # not all there
    write_state(path, pending=len(first), end=end, boot="before-the-reboot")
    assert [m.number for m in reader.load(path).parsed.messages] == [1, 2]


def test_a_problem_names_its_file_or_offset() -> None:
    assert str(reader.Problem(ProblemKind.GAP, 5, 1, "why")) == "offset 5: gap: why"
    assert str(reader.Problem(ProblemKind.GAP, 0, 1, "why", 3, "new/x")) == "new/x: gap: why"
