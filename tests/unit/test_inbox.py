"""selsmtp.inbox: the command line in-process, and the followers driven look by look.

Mailboxes are built with the server's own renderers (selsmtp.formats), and changed the
ways consumers and the store change them: appends, movemail's truncation, renames,
rotation to PATH.A-B, a crash's torn tail. No server runs here (the integration tests
in tests/integration/test_inbox.py have one), so the test process may lock freely.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from selsmtp import follow, formats, inbox, reader
from selsmtp.durable import State
from selsmtp.session import Envelope
from selsmtp.store import FileStore
from tests.stores import deliver, store_options

NAME = "mx.test"
NOW = 1_700_000_000.0  # Tue Nov 14 22:13:20 2023 UTC
ENVELOPE = Envelope("client.test", "alice@example.com", ("bob@example.com", "carol@example.com"))


def cs4410(number: int, body: bytes = b"Subject: hi\r\n\r\nhello\r\n") -> bytes:
    return b"".join(formats.cs4410_record(number, ENVELOPE, body, NAME))


def mbox(number: int, body: bytes = b"Subject: hi\r\n\r\nhello\r\n") -> bytes:
    return b"".join(formats.mbox_record(number, ENVELOPE, body, NAME, NOW))


def subject(number: int) -> bytes:
    return f"Subject: message {number}\r\n\r\nFrom here\r\nbody {number}\r\n".encode()


RENDER: dict[str, Callable[[int, bytes], bytes]] = {"cs4410": cs4410, "mbox": mbox}


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    status = inbox.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def run_bytes(capfdbinary: pytest.CaptureFixture[bytes], *argv: str | Path) -> tuple[int, bytes]:
    status = inbox.main([str(arg) for arg in argv])
    out, _ = capfdbinary.readouterr()
    return status, out


# -- summaries -----------------------------------------------------------------


def message(**fields: object) -> reader.Message:
    values: dict[str, object] = {
        "format": "mbox",
        "number": 7,
        "sender": "a@b",
        "recipients": None,
        "helo_name": "h",
        "server_name": NAME,
        "date": datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc),
        "raw": b"Subject: s\n\nx\n",
    }
    values.update(fields)
    return reader.Message(**values)  # type: ignore[arg-type]


def test_a_summary_line_has_six_tab_separated_columns() -> None:
    line = inbox.summary_line(message())
    assert line == "7\t2023-11-14 22:13:20\ta@b\t-\t14\ts"
    cs = message(format="cs4410", date=None, sender="", recipients=("x@y", "z@w"))
    assert inbox.summary_line(cs) == "7\t-\t<>\tx@y,z@w\t14\ts"
    foreign = message(number=None, sender=None, raw=b"no header\n")
    assert inbox.summary_line(foreign).split("\t") == [
        "-",
        "2023-11-14 22:13:20",
        "-",
        "-",
        "10",
        "-",
    ]
    many = message(recipients=tuple(f"r{i}@x" for i in range(8)))
    assert inbox.summary_fields(many)[3] == "r0@x,r1@x,r2@x,r3@x,r4@x,+3 more"


def test_what_a_terminal_would_act_on_is_escaped() -> None:
    evil = message(raw=b"Subject: a\tb \x1b[31mred\x1b[0m \xe2\x80\xae rtl caf\xc3\xa9\n\n")
    line = inbox.summary_line(evil)
    assert line.split("\t")[-1] == "a\\tb \\x1b[31mred\\x1b[0m \\u202e rtl café"
    assert "\x1b" not in line and line.count("\t") == 5
    assert inbox.printable("plain text") == "plain text"


def test_a_json_summary() -> None:
    fields = json.loads(inbox.summary_json(message(name="new/x", recipients=("a",))))
    assert fields == {
        "number": 7,
        "date": "2023-11-14T22:13:20+00:00",
        "sender": "a@b",
        "recipients": ["a"],
        "size": 14,
        "subject": "s",
        "format": "mbox",
        "where": "new/x",
    }


def test_number_set() -> None:
    numbers = follow.NumberSet()
    for n in [5, 3, 4, 10, 1, 2, 9, 7, 7, 100]:
        numbers.add(n)
    assert [n for n in range(0, 102) if n in numbers] == [1, 2, 3, 4, 5, 7, 9, 10, 100]
    assert len(numbers) == 9
    assert numbers.ranges == 4  # 1-5, 7, 9-10, 100
    numbers.add(6)
    numbers.add(8)
    assert numbers.ranges == 2


# -- list, show, check ---------------------------------------------------------


@pytest.mark.parametrize("fmt", ["cs4410", "mbox"])
def test_list_show_and_check_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    path = tmp_path / "box"
    path.write_bytes(b"".join(RENDER[fmt](n, subject(n)) for n in (1, 2, 3)))
    status, out, err = run(capsys, "list", path)
    assert (status, err) == (0, "")
    lines = [line.split("\t") for line in out.splitlines()]
    assert [line[0] for line in lines] == ["1", "2", "3"]
    assert [line[5] for line in lines] == ["message 1", "message 2", "message 3"]
    assert {line[4] for line in lines} == {str(len(b"Subject: message 1\n\nFrom here\nbody 1\n"))}
    assert lines[0][2] == "alice@example.com"
    date = "-" if fmt == "cs4410" else "2023-11-14 22:13:20"
    assert (lines[0][1], lines[0][3]) == (date, "bob@example.com,carol@example.com")
    status, out, _ = run(capsys, "list", "--json", path)
    assert [json.loads(line)["number"] for line in out.splitlines()] == [1, 2, 3]
    status, out, err = run(capsys, "check", path)
    assert (status, err) == (0, "")
    kind = "cs4410 mailbox" if fmt == "cs4410" else "mbox"
    # written by hand, so without the store's offsets index: a cs4410 file is parsed
    warning = (
        f"{path}: offset 0: warning: no-index: no usable offsets index: the file is "
        "parsed, and a body that holds a record head is read as a record\n"
    )
    assert (
        out
        == (warning if fmt == "cs4410" else "") + f"{path}: ok: {kind}, 3 messages, numbers 1-3\n"
    )


@pytest.mark.parametrize("fmt", ["cs4410", "mbox"])
def test_show_prints_the_message_as_sent_and_raw_as_stored(
    tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes], fmt: str
) -> None:
    path = tmp_path / "box"
    path.write_bytes(b"".join(RENDER[fmt](n, subject(n)) for n in (1, 2, 3)))
    status, out = run_bytes(capfdbinary, "show", path, "2")
    assert (status, out) == (0, b"Subject: message 2\n\nFrom here\nbody 2\n")
    status, out = run_bytes(capfdbinary, "show", "--raw", path, "2")
    assert (status, out) == (0, RENDER[fmt](2, subject(2)))


def test_show_a_number_that_is_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "box"
    path.write_bytes(cs4410(1))
    status, out, err = run(capsys, "show", path, "5")
    assert (status, out) == (1, "")
    assert err == f"python -m selsmtp.inbox: {path}: no message number 5\n"


def test_show_finds_a_number_in_a_rotated_file(
    tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    path = tmp_path / "box"
    (tmp_path / "box.1-2").write_bytes(mbox(1, subject(1)) + mbox(2, subject(2)))
    path.write_bytes(mbox(3, subject(3)))
    status, out = run_bytes(capfdbinary, "show", path, "2")
    assert (status, out) == (0, b"Subject: message 2\n\nFrom here\nbody 2\n")


def test_show_a_duplicated_number_shows_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "box"
    path.write_bytes(cs4410(1, b"first\r\n") + cs4410(1, b"second\r\n"))
    status, out, err = run(capsys, "show", path, "1")
    assert (status, out) == (0, "first\n")
    assert "number 1 is stored 2 times; showing the first, at offset 0" in err


def test_check_reports_problems_precisely(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "box"
    one, two, four = cs4410(1), cs4410(2), cs4410(4)
    path.write_bytes(one + two + two + four + cs4410(5)[:30])
    status, out, err = run(capsys, "check", path)
    assert (status, err) == (1, "")
    assert out.splitlines()[1:] == [
        f"{path}: offset {len(one + two)}: duplicate: record number 2 again "
        f"(first at offset {len(one)}) ({len(two)} bytes)",
        f"{path}: offset {len(one + two + two + four)}: torn-tail: the file ends inside a record "
        "(30 bytes)",
        f"{path}: 2 problems in cs4410 mailbox, 4 messages, numbers 1-4",
    ]
    status, out, _ = run(capsys, "check", "--strict", path)
    assert status == 1
    assert f"{path}: offset {len(one + two + two)}: gap: record number 4 after 2: 3 missing" in out


def test_gaps_and_foreign_messages_only_with_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "box"
    path.write_bytes(mbox(1) + b"From x@y Wed Jan  3 04:05:06 2024\n\nhi\n\n" + mbox(3))
    status, out, _ = run(capsys, "check", path)
    assert (status, out) == (0, f"{path}: ok: mbox, 3 messages, numbers 1-3, 1 without a number\n")
    status, out, _ = run(capsys, "check", "--strict", path)
    assert status == 1
    assert ": foreign: " in out and ": gap: " in out


def test_an_empty_file_is_an_empty_mailbox(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "box"
    path.write_bytes(b"")
    assert run(capsys, "list", path) == (0, "", "")
    assert run(capsys, "check", path) == (0, f"{path}: ok: empty mailbox\n", "")
    assert run(capsys, "check", "--format", "mbox", path)[1] == f"{path}: ok: empty mbox mailbox\n"


@pytest.mark.parametrize("command", ["list", "check", "follow", "show"])
def test_a_file_that_is_not_a_mailbox_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\x7fELF binary stuff\n")
    extra = ["1"] if command == "show" else []
    status, out, err = run(capsys, command, path, *extra)
    assert (status, out) == (1, "")
    assert err == (
        f"python -m selsmtp.inbox: {path} is not a mailbox: it starts with "
        "b'\\x7fELF binary stuff\\n', not with a message of any format\n"
    )


@pytest.mark.parametrize("command", ["list", "check", "follow"])
def test_missing_paths_and_wrong_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    status, out, err = run(capsys, command, tmp_path / "absent")
    assert (status, out) == (1, "")
    absent = tmp_path / "absent"
    assert err == f"python -m selsmtp.inbox: cannot read {absent}: No such file or directory\n"
    status, _, err = run(capsys, command, tmp_path)
    assert status == 1
    assert err.endswith("is a folder but not a Maildir (it has no new/ and cur/)\n")
    (tmp_path / "file").write_bytes(cs4410(1))
    status, _, err = run(capsys, command, "--format", "maildir", tmp_path / "file")
    assert (status, err.count("\n")) == (1, 1)
    assert err.endswith("is a file, not a Maildir folder\n")


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    bad = [
        [],
        ["list"],
        ["show", "box"],
        ["show", "box", "x"],
        ["list", "--format", "x", "b"],
        ["follow", "b", "--count", "0"],
        ["follow", "b", "--interval", "-1"],
        ["nope", "b"],
    ]
    for argv in bad:
        with pytest.raises(SystemExit) as exit_info:
            inbox.main(argv)
        assert exit_info.value.code == 2, argv
    _, err = capsys.readouterr()
    assert "usage: python -m selsmtp.inbox" in err


def test_maildir_list_show_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for sub in ("new", "cur", "tmp"):
        (tmp_path / sub).mkdir()
    for number, name in [(2, "new/200.A.host"), (1, "cur/100.B.host:2,S")]:
        data = b"".join(formats.maildir_message(number, ENVELOPE, subject(number), NAME, NOW))
        (tmp_path / name).write_bytes(data)
    status, out, _ = run(capsys, "list", tmp_path)
    assert status == 0
    assert [line.split("\t")[:4] for line in out.splitlines()] == [
        ["1", "2023-11-14 22:13:20", "alice@example.com", "bob@example.com,carol@example.com"],
        ["2", "2023-11-14 22:13:20", "alice@example.com", "bob@example.com,carol@example.com"],
    ]
    assert run(capsys, "show", tmp_path, "1")[1] == "Subject: message 1\n\nFrom here\nbody 1\n"
    assert run(capsys, "check", tmp_path)[:2] == (
        0,
        f"{tmp_path}: ok: Maildir, 2 messages, numbers 1-2\n",
    )


# -- FileFollower ----------------------------------------------------------------


class Box:
    """A mailbox file and a follower of it; ``numbers()`` is what the next look prints."""

    def __init__(self, path: Path, fmt: str, *, from_start: bool = True) -> None:
        self.path = path
        self.render = RENDER[fmt]
        self.warnings: list[str] = []
        if not path.exists():
            path.write_bytes(b"")
        self.follower = follow.FileFollower(str(path), None, self.warnings.append)
        self.first = [m.number for m in self.follower.start(from_start=from_start)]

    def append(self, *numbers: int) -> None:
        with self.path.open("ab") as file:
            file.write(b"".join(self.render(n, subject(n)) for n in numbers))

    def numbers(self) -> list[int | None]:
        return [m.number for m in self.follower.poll()]


@pytest.fixture(params=["cs4410", "mbox"])
def box(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Box]:
    made = Box(tmp_path / "box", request.param)
    yield made
    made.follower.close()


def test_follow_prints_appends_once(box: Box) -> None:
    assert box.first == []
    assert box.numbers() == []
    box.append(1)
    box.append(2, 3)
    assert box.numbers() == [1, 2, 3]
    assert box.numbers() == []
    box.append(4)
    assert box.numbers() == [4]


def test_follow_starts_at_the_end_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "box"
    path.write_bytes(cs4410(1) + cs4410(2))
    late = Box(path, "cs4410", from_start=False)
    assert late.first == []
    late.append(3)
    assert late.numbers() == [3]
    assert Box(path, "cs4410").first == [1, 2, 3]


def test_follow_after_movemail_emptied_the_file(box: Box) -> None:
    box.append(1, 2)
    assert box.numbers() == [1, 2]
    box.path.write_bytes(b"")  # movemail: truncated to zero, same file
    assert box.numbers() == []
    box.append(3)
    assert box.numbers() == [3]
    # Emptied and refilled past where we were, between two looks: the first bytes differ.
    box.append(4)
    assert box.numbers() == [4]
    box.path.write_bytes(b"")
    box.append(5, 6, 7)
    assert box.numbers() == [5, 6, 7]


def test_follow_never_prints_a_number_twice_when_the_file_is_rewritten(box: Box) -> None:
    box.append(1, 2, 3)
    assert box.numbers() == [1, 2, 3]
    # A mail reader deletes message 2 and rewrites the file in place; 4 arrives.
    box.path.write_bytes(b"".join(box.render(n, subject(n)) for n in (1, 3, 4)))
    assert box.numbers() == [4]


def test_follow_a_file_renamed_away(box: Box) -> None:
    box.append(1)
    assert box.numbers() == [1]
    box.append(2)  # arrives just before the consumer renames the file away
    os.rename(box.path, f"{box.path}.taken")
    assert box.numbers() == [2]  # read through the old descriptor
    assert box.numbers() == []  # nothing at the path yet
    box.append(3)  # the server makes a new file
    assert box.numbers() == [3]
    os.rename(box.path, f"{box.path}.taken2")
    box.append(4, 5)
    assert box.numbers() == [4, 5]


def test_follow_rotation_even_several_between_two_looks(box: Box) -> None:
    box.append(1)
    assert box.numbers() == [1]
    box.append(2)
    for first, last in [(1, 2), (3, 4), (5, 6)]:
        os.link(box.path, f"{box.path}.{first}-{last}")
        next_file = Path(f"{box.path}.selsmtp-next")
        next_file.write_bytes(b"")
        os.rename(next_file, box.path)
        box.append(last + 1, last + 2) if last < 6 else box.append(7)
    assert box.numbers() == [2, 3, 4, 5, 6, 7]
    assert box.numbers() == []
    box.append(8)
    assert box.numbers() == [8]


def test_follow_waits_for_a_torn_tail_to_be_whole(box: Box) -> None:
    record = box.render(1, subject(1))
    with box.path.open("ab") as file:
        file.write(record[:-5])
    assert box.numbers() == []
    with box.path.open("ab") as file:
        file.write(record[-5:])
    assert box.numbers() == [1]


def test_follow_skips_an_append_the_state_file_says_was_cut_short(tmp_path: Path) -> None:
    box = Box(tmp_path / "box", "cs4410")
    box.append(1)
    size = box.path.stat().st_size
    cut = cs4410(2, b"para\r\n\r\nmore\r\n")
    with box.path.open("ab") as file:
        file.write(cut[: cut.index(b"para\n\n") + 6])  # looks whole
    st = box.path.stat()
    state = State()
    state.number, state.size, state.dev, state.ino, state.pending = (
        2,
        size,
        st.st_dev,
        st.st_ino,
        size,
    )
    Path(f"{box.path}.selsmtp").write_bytes(state.encode())
    assert box.numbers() == [1]
    # selsmtp starts again: it cuts the tail away, clears the mark, and goes on.
    os.truncate(box.path, size)
    state.pending = -1
    Path(f"{box.path}.selsmtp").write_bytes(state.encode())
    box.append(3)
    assert box.numbers() == [3]


def test_follow_warns_about_garbage_and_a_file_that_is_not_a_mailbox(box: Box) -> None:
    box.append(1)
    assert box.numbers() == [1]
    with box.path.open("ab") as file:  # after a whole record (else it is body text)
        file.write(b"junk\n\n")
    box.append(2)
    assert box.numbers() == [2]
    assert box.warnings == [
        f"{box.path}: skipped 6 bytes at offset {len(box.render(1, subject(1)))} (garbage)"
    ]
    os.rename(box.path, f"{box.path}.old")
    box.path.write_bytes(b"not a mailbox\n")
    assert box.numbers() == []
    assert box.warnings[-1].endswith("; ignoring it until the path names another file")
    os.rename(f"{box.path}.old", box.path)
    box.append(3)
    assert box.numbers() == [3]


def _hold_exclusive_lock(path: str, locked: Any, release: Any) -> None:
    with open(path, "r+b") as file:
        fcntl.lockf(file, fcntl.LOCK_EX)
        locked.set()
        release.wait(10)


def test_follow_does_not_wait_long_for_a_busy_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lockf locks belong to the process, so the writer holding it is a child."""
    monkeypatch.setattr(follow, "FOLLOW_LOCK_WAIT", 0.05)
    box = Box(tmp_path / "box", "cs4410")
    context = multiprocessing.get_context("spawn")
    locked, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_exclusive_lock, args=(str(box.path), locked, release))
    holder.start()
    try:
        assert locked.wait(10)
        box.append(1)
        started = time.monotonic()
        assert box.numbers() == []
        assert time.monotonic() - started < 2
    finally:
        release.set()
        holder.join(10)
    assert box.numbers() == [1]


# -- MaildirFollower ---------------------------------------------------------------


def test_follow_a_maildir(tmp_path: Path) -> None:
    for sub in ("new", "cur", "tmp"):
        (tmp_path / sub).mkdir()

    def deliver(number: int, name: str) -> None:
        data = b"".join(formats.maildir_message(number, ENVELOPE, subject(number), NAME, NOW))
        (tmp_path / "tmp" / name).write_bytes(data)
        os.rename(tmp_path / "tmp" / name, tmp_path / "new" / name)

    deliver(1, "1.A.host")
    follower = follow.MaildirFollower(str(tmp_path), lambda text: None)
    assert follower.start(from_start=False) == []
    assert follower.poll() == []
    deliver(3, "3.C.host")
    deliver(2, "2.B.host")
    assert [m.number for m in follower.poll()] == [2, 3]
    os.rename(tmp_path / "new" / "2.B.host", tmp_path / "cur" / "2.B.host:2,S")  # a reader saw it
    os.rename(tmp_path / "new" / "1.A.host", tmp_path / "cur" / "1.A.host:2,")
    deliver(4, "4.D.host")
    assert [m.number for m in follower.poll()] == [4]
    os.unlink(tmp_path / "cur" / "2.B.host:2,S")
    assert follower.poll() == []
    again = follow.MaildirFollower(str(tmp_path), lambda text: None)
    assert [m.number for m in again.start(from_start=True)] == [1, 3, 4]


# -- follow on the command line ------------------------------------------------------


def test_follow_all_with_a_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "box"
    path.write_bytes(cs4410(1, subject(1)) + cs4410(2, subject(2)))
    status, out, _ = run(capsys, "follow", "--all", "--count", "2", path)
    assert status == 0
    assert [line.split("\t")[5] for line in out.splitlines()] == ["message 1", "message 2"]
    status, out, _ = run(capsys, "follow", "--all", "--json", "--count", "1", path)
    assert (status, json.loads(out)["number"]) == (0, 1)


@pytest.mark.parametrize("fmt", ["cs4410", "mbox"])
def test_damage_at_the_start_of_a_file_hides_no_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    # Another program left bytes that are no record in the empty file; the store's
    # messages after them are listed and followed, and check names the damage.
    path = tmp_path / "box"
    path.write_bytes(b"junk\n")
    store = FileStore(str(path), **store_options(fmt))
    try:
        assert store.try_append([deliver(subject(1)), deliver(subject(2))]) == [1, 2]
    finally:
        store.close()

    status, out, _ = run(capsys, "list", path)
    assert (status, [line.split("\t")[0] for line in out.splitlines()]) == (0, ["1", "2"])
    status, out, _ = run(capsys, "follow", "--all", "--count", "2", "--timeout", "5", path)
    assert (status, [line.split("\t")[0] for line in out.splitlines()]) == (0, ["1", "2"])
    status, out, _ = run(capsys, "check", path)
    assert status == 1 and "offset 0: garbage" in out


def test_follow_timeout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "box"
    path.write_bytes(cs4410(1))
    assert run(capsys, "follow", "--timeout", "0.1", "--interval", "0.05", path) == (0, "", "")
    status, out, err = run(capsys, "follow", "--all", "--count", "3", "--timeout", "0.1", path)
    assert (status, out.count("\n")) == (1, 1)
    assert err == f"python -m selsmtp.inbox: {path}: 1 of 3 messages within 0.1 s\n"


def test_follow_stops_on_sigterm_and_restores_the_handlers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "box"
    path.write_bytes(b"")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert run(capsys, "follow", "--interval", "5", "--timeout", "20", path) == (0, "", "")
    finally:
        timer.cancel()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
