"""selsmtp.reader: records read back from cs4410 mailboxes made by selsmtp.formats.

Every mailbox here is built with the server's own renderer (formats.cs4410_record), so
these tests pin the reader to what the store really writes.
"""

from __future__ import annotations

import fcntl
import itertools
import multiprocessing
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from selsmtp import formats, reader
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
