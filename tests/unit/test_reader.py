"""selsmtp.reader and selsmtp.messages without the store's offsets index (test_read_api
has it): mailboxes made by selsmtp.formats, parsed by the grammar alone.

Every mailbox here is built with the server's own renderers (formats.cs4410_record,
mbox_record, maildir_message), so these tests pin the reader to what the stores really
write. The state file beside a mailbox is made with selsmtp.durable.State.
"""

from __future__ import annotations

import fcntl
import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from selsmtp import formats, reader, records
from selsmtp.durable import State, boot_id
from selsmtp.reader import ProblemKind
from selsmtp.session import Envelope

NAME = "mx.test"
NOW = 1_700_000_000.25  # Tue Nov 14 22:13:20 2023 UTC


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


def parse(data: bytes, fmt: str = "cs4410", **options: Any) -> reader.Mailbox:
    options.setdefault("allow_gaps", False)
    return records.parse_file(data, fmt, **options)


def check(data: bytes, **options: Any) -> list[reader.Problem]:
    return list(parse(data, **options).problems)


def numbers(data: bytes) -> list[int]:
    return [r.number for r in parse(data)]  # type: ignore[misc]


def kinds(data: bytes, **options: Any) -> list[ProblemKind]:
    return [p.kind for p in check(data, **options)]


def look_alike(number: int, helo: str = "fake.test") -> bytes:
    """Body text (CRLF lines) that renders to a complete record header after a blank line."""
    return (
        f"\r\nReceived: from {helo} by {NAME} (CS4410MP3)\r\nNumber: {number}\r\n"
        "From: mallory@example.com\r\nTo: bob@example.com\r\n\r\nfake body\r\n"
    ).encode()


def test_empty_mailbox_has_no_records_and_no_problems() -> None:
    parsed = parse(b"")
    assert parsed.messages == ()
    assert parsed.ok


def test_null_sender_is_read_as_empty_string() -> None:
    (only,) = parse(record(1, sender="")).messages
    assert only.sender == ""


def test_records_tile_the_file() -> None:
    data = mailbox(1, 2, 3, 4)
    records = parse(data).messages
    assert records[0].offset == 0
    assert all(a.end == b.offset for a, b in itertools.pairwise(records))
    assert records[-1].end == len(data)
    assert all(data[r.offset : r.end] == record(r.number, b"hello\r\n") for r in records)


def test_server_name_with_spaces() -> None:
    (only,) = parse(record(1, name="my mail host")).messages
    assert only.server_name == "my mail host"


def test_every_cut_inside_the_last_record_is_a_torn_tail() -> None:
    whole = mailbox(1, 2) + record(3, b"Subject: last\r\nand no blank line in this body\r\n")
    last = parse(whole).messages[-1]
    for cut in range(last.offset + 1, len(whole)):
        parsed = parse(whole[:cut])
        assert [p.kind for p in parsed.problems] == [ProblemKind.TORN_TAIL], cut
        (torn,) = parsed.problems
        assert (torn.offset, torn.length) == (last.offset, cut - last.offset), cut
        assert [r.number for r in parsed.messages] == [1, 2], cut


def test_a_cut_inside_the_first_header_is_a_torn_tail_at_zero() -> None:
    data = record(1)[:30]
    (problem,) = check(data)
    assert (problem.kind, problem.offset, problem.length) == (ProblemKind.TORN_TAIL, 0, 30)


def test_bytes_before_the_first_record_are_garbage() -> None:
    data = b"junk\n\n" + mailbox(1, 2)
    (problem,) = check(data)
    assert (problem.kind, problem.offset, problem.length) == (ProblemKind.GARBAGE, 0, 6)
    assert numbers(data) == [1, 2]
    assert check(b"not a mailbox at all\n")[0].kind is ProblemKind.GARBAGE


def test_a_duplicated_record_is_reported_where_the_copy_starts() -> None:
    first, second, third = record(1), record(2), record(3)
    data = first + second + second + third
    (problem,) = check(data)
    assert problem.kind is ProblemKind.DUPLICATE
    assert (problem.offset, problem.length, problem.number) == (
        len(first + second),
        len(second),
        2,
    )
    assert f"first at offset {len(first)}" in problem.detail


def test_numbers_that_go_down_are_out_of_order() -> None:
    data = mailbox(5, 6, 7, 1, 2, 3)
    problems = check(data)
    assert [p.kind for p in problems] == [ProblemKind.OUT_OF_ORDER]
    assert problems[0].number == 1
    assert problems[0].offset == len(mailbox(5, 6, 7))
    assert "record number 1 after 7" in str(problems[0])


def test_a_missing_record_is_a_gap_unless_gaps_are_allowed() -> None:
    data = mailbox(1, 2, 4, 5, 9)
    problems = check(data)
    assert [(p.kind, p.number) for p in problems] == [(ProblemKind.GAP, 4), (ProblemKind.GAP, 9)]
    assert "3 missing" in problems[0].detail
    assert "6-8 missing" in problems[1].detail
    assert check(data, allow_gaps=True) == []


def test_problems_come_in_offset_order() -> None:
    data = b"junk\n\n" + mailbox(1, 2, 2, 4) + record(5)[:20]
    offsets = [p.offset for p in check(data)]
    assert offsets == sorted(offsets)
    assert kinds(data) == [
        ProblemKind.GARBAGE,
        ProblemKind.DUPLICATE,
        ProblemKind.GAP,
        ProblemKind.TORN_TAIL,
    ]


def _hold_exclusive_lock(path: str, locked: Any, release: Any) -> None:
    with open(path, "r+b") as file:
        fcntl.lockf(file, fcntl.LOCK_EX)
        locked.set()
        release.wait(10)


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
        (b"Subject: =?bogus-charset?q?x?=\n\n", "x"),  # email.policy.default's reading
        (b"Subject: raw \xc3\xa9 \xff\n\n", "raw é \ufffd"),
        (b"Subject: first\nSubject: second\n\n", "first"),
        (b"Subject:\n\n", ""),
        (b"X: y\n\nSubject: in the body\n", None),
        (b"hello\nSubject: not a header\n", None),
        (b" continuation first\nSubject: no\n", "no"),  # email.policy.default's reading
        (b"", None),
        (b"Subject: cr\r\n\r\n", "cr"),
    ],
)
def test_subjects(message: bytes, subject: str | None) -> None:
    assert reader.Message("cs4410", 1, "", (), None, None, None, message).subject == subject


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


def mbox_record(
    number: int, body: bytes, sender: str = "alice@example.com", when: float = NOW
) -> bytes:
    envelope = Envelope("client.test", sender, ("bob@example.com",))
    return b"".join(formats.mbox_record(number, envelope, body, NAME, when))


def test_every_cut_of_the_last_mbox_message_is_a_torn_tail() -> None:
    whole = mbox_record(1, b"one\r\n") + mbox_record(2, b"Subject: last\r\nno blank line here\r\n")
    second = len(mbox_record(1, b"one\r\n"))
    for cut in range(second + 1, len(whole)):
        parsed = parse(whole[:cut], "mbox", allow_foreign=False)
        assert [p.kind for p in parsed.problems] == [ProblemKind.TORN_TAIL], cut
        assert (parsed.problems[0].offset, parsed.whole) == (second, second), cut
        assert [m.number for m in parsed.messages] == [1], cut
    for cut in range(1, 5):  # the cut falls in the next From_ line
        parsed = parse(whole[: second + cut], "mbox", allow_foreign=False)
        assert [m.number for m in parsed.messages] == [1]
        assert (parsed.problems[0].kind, parsed.whole) == (ProblemKind.TORN_TAIL, second)


def test_mbox_messages_without_selsmtp_trace_lines_are_foreign() -> None:
    foreign = b"From x@y Wed Jan  3 04:05:06 2024\nSubject: s\n\nhi\n\n"
    data = mbox_record(1, b"a\r\n") + foreign + mbox_record(2, b"b\r\n")
    (problem,) = parse(data, "mbox", allow_foreign=False).problems
    assert (problem.kind, problem.offset) == (ProblemKind.FOREIGN, len(mbox_record(1, b"a\r\n")))
    parsed = parse(data, "mbox", allow_foreign=True)
    assert parsed.ok and [m.number for m in parsed.messages] == [1, None, 2]


def maildir_file(number: int, body: bytes = b"Subject: s\r\n\r\nhi\r\n") -> bytes:
    envelope = Envelope("client.test", "a@b", ("c@d",))
    return b"".join(formats.maildir_message(number, envelope, body, NAME, NOW))


def test_maildir_numbering_problems_name_the_files(tmp_path: Path) -> None:
    for sub in ("new", "cur", "tmp"):
        (tmp_path / sub).mkdir()
    for name, data in [
        ("new/c", maildir_file(3)),
        ("new/a", maildir_file(1)),
        ("cur/b:2,", maildir_file(1)),
        ("new/f", b"no trace\n"),
        ("new/d", maildir_file(6)),
        ("new/.hidden", maildir_file(7)),
    ]:
        (tmp_path / name).write_bytes(data)
    parsed = reader.read_mailbox(tmp_path, allow_gaps=False, allow_foreign=False)
    assert [m.name for m in parsed.messages] == ["cur/b:2,", "new/a", "new/c", "new/d", "new/f"]
    assert [str(p) for p in parsed.problems] == [
        f"new/a: duplicate: record number 1 again (first at cur/b:2,) "
        f"({len(maildir_file(1))} bytes)",
        f"new/c: gap: record number 3 after 1: 2 missing ({len(maildir_file(3))} bytes)",
        f"new/d: gap: record number 6 after 3: 4-5 missing ({len(maildir_file(6))} bytes)",
        "new/f: foreign: a message without selsmtp's X-Selsmtp-Number line (9 bytes)",
    ]
    lenient = reader.read_mailbox(tmp_path)
    assert [p.kind for p in lenient.problems] == [ProblemKind.DUPLICATE]


def test_load_refuses_what_is_not_a_mailbox(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"dear diary\n")
    with pytest.raises(
        reader.NotAMailbox, match=r"notes.txt is not a mailbox: it starts with b'dear"
    ):
        reader.read_mailbox(path)
    with pytest.raises(reader.NotAMailbox, match="is a file, not a Maildir folder"):
        reader.read_mailbox(path, "maildir")
    with pytest.raises(reader.NotAMailbox, match="is a folder but not a Maildir"):
        reader.read_mailbox(tmp_path)
    with pytest.raises(reader.NotAMailbox, match="is a folder, not a mbox mailbox file"):
        reader.read_mailbox(tmp_path, "mbox")
    with pytest.raises(FileNotFoundError):
        reader.read_mailbox(tmp_path / "absent")
    with pytest.raises(FileNotFoundError):
        reader.read_mailbox(tmp_path / "absent", "maildir")


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
    assert reader.read_mailbox(path).ok  # without the state file it looks whole
    write_state(path, pending=len(first))
    parsed = reader.read_mailbox(path)
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
    assert reader.read_mailbox(path).ok
    write_state(path, pending=len(first + cut))
    assert reader.read_mailbox(path).ok
    Path(f"{path}.selsmtp").write_bytes(b"garbage")
    assert reader.read_mailbox(path).ok


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
    assert [m.number for m in reader.read_mailbox(path).messages] == [1, 2]


# -- one crash rule: the reader judges a pending batch as the store does ----------


def _store_keeps(path: Path) -> bool:
    """Start a store on ``path`` (which settles the state line's pending batch) and
    say whether it kept every byte."""
    from selsmtp.store import FileStore, cs4410_renderer

    before = path.read_bytes()
    FileStore(str(path), cs4410_renderer(NAME)).close()
    return path.read_bytes() == before


def test_a_batch_another_writer_appended_after_is_kept_by_store_and_reader(
    tmp_path: Path,
) -> None:
    """Bytes past where the pending batch would end were appended by another program:
    the store keeps them, so the reader lists the records in them."""
    first, second, third = record(1), record(2, b"x" * 200 + b"\r\n"), record(3)
    path = tmp_path / "box"
    path.write_bytes(first + second[:40] + b"\n\n" + third * 3)
    write_state(path, pending=len(first), end=len(first) + len(second), boot=boot_id())
    assert path.stat().st_size > len(first) + len(second)
    assert 3 in [m.number for m in reader.read_mailbox(path).messages]
    assert _store_keeps(path)


def test_after_a_reboot_a_pending_offset_with_no_record_head_is_kept_by_both(
    tmp_path: Path,
) -> None:
    """After a reboot, a pending offset where none of our record heads begins is not
    ours (the file was emptied and written again): both keep what is there."""
    data = record(4) + record(5)
    path = tmp_path / "box"
    path.write_bytes(data)
    write_state(path, pending=len(record(4)) - 3, end=len(data) + 100, boot="another-boot")
    assert [m.number for m in reader.read_mailbox(path).messages] == [4, 5]
    assert _store_keeps(path)
