"""Start-up refuses a mailbox it would damage (SPEC §7 format guard, §12).

Each case is a real ``python -m selsmtp`` on files made as a user would have them:
a mailbox of another format (with and without its state file), a Maildir folder
named as a file mailbox and the other way round, a damaged state file. Each must be
exit 1 with one line on stderr that says what is wrong, and write nothing: the
mailbox's and the state file's bytes stay as they were.
"""

from __future__ import annotations

import fcntl
import subprocess
import zlib
from pathlib import Path

import pytest

from selsmtp import formats, reader
from selsmtp.maildir import MaildirStore
from selsmtp.session import Deliver, Envelope
from selsmtp.store import FileStore, cs4410_renderer, mbox_renderer
from tests.stores import NAME, deliver, record

from .processes import run_selsmtp

pytestmark = pytest.mark.timeout(60)


def make_mailbox(path: Path, fmt: str, count: int = 2) -> None:
    """A mailbox of ``fmt`` holding ``count`` messages, as selsmtp leaves it."""
    if fmt == "maildir":
        store: FileStore | MaildirStore = MaildirStore(str(path), NAME)
    else:
        render = cs4410_renderer(NAME) if fmt == "cs4410" else mbox_renderer(NAME)
        pattern = formats.MBOX_NUMBER if fmt == "mbox" else formats.CS4410_NUMBER
        store = FileStore(str(path), render, number_pattern=pattern)
    try:
        store.try_append([deliver() for _ in range(count)])
    finally:
        store.close()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes (the lock file's pid line included:
    a refused start must not even say it was there)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def assert_one_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("selsmtp: ")
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]
    assert result.stdout == ""
    return lines[0]


@pytest.mark.parametrize("state", ["with-state-file", "without-state-file"])
@pytest.mark.parametrize(("made", "asked"), [("cs4410", "mbox"), ("mbox", "cs4410")])
def test_a_file_mailbox_of_another_format_is_refused_and_left_alone(
    made: str, asked: str, state: str, tmp_path: Path
) -> None:
    mailbox = tmp_path / "mailbox"
    make_mailbox(mailbox, made)
    if state == "without-state-file":
        (tmp_path / "mailbox.selsmtp").unlink()
    before = snapshot(tmp_path)

    result = run_selsmtp("--port", "0", "--mailbox", str(mailbox), "--format", asked)

    assert_one_line(result, str(mailbox), f"{made} mailbox", f"--format {asked}")
    assert snapshot(tmp_path) == before


def test_a_first_record_with_long_names_still_tells_the_format(tmp_path: Path) -> None:
    # A HELO name near the 512-byte line limit and a long --name make the first line
    # longer than a short peek at the file: the guard must still see a cs4410 head.
    mailbox = tmp_path / "mailbox"
    envelope = Envelope("h" * 490 + ".test", "a@example.org", ("b@example.org",))
    store = FileStore(
        str(mailbox), cs4410_renderer("n" * 250 + ".test"), number_pattern=formats.CS4410_NUMBER
    )
    try:
        store.try_append([Deliver(envelope, b"hello\r\n")])
    finally:
        store.close()
    (tmp_path / "mailbox.selsmtp").unlink()
    assert mailbox.read_bytes().index(b"\n") > 512
    before = snapshot(tmp_path)

    result = run_selsmtp("--port", "0", "--mailbox", str(mailbox), "--format", "mbox")

    assert_one_line(result, str(mailbox), "cs4410 mailbox", "--format mbox", "first record")
    assert snapshot(tmp_path) == before


def test_an_emptied_mailbox_still_has_its_format_in_the_state_file(tmp_path: Path) -> None:
    mailbox = tmp_path / "mailbox"
    make_mailbox(mailbox, "mbox")
    mailbox.write_bytes(b"")  # a consumer took the mail: the first record cannot tell
    before = snapshot(tmp_path)

    result = run_selsmtp("--port", "0", "--mailbox", str(mailbox), "--format", "cs4410")

    assert_one_line(result, str(mailbox), "mbox mailbox", "--format cs4410", "state file")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("asked", ["cs4410", "mbox"])
def test_a_maildir_folder_is_refused_as_a_file_mailbox(asked: str, tmp_path: Path) -> None:
    folder = tmp_path / "Maildir"
    make_mailbox(folder, "maildir")
    before = snapshot(tmp_path)

    result = run_selsmtp("--port", "0", "--mailbox", str(folder), "--format", asked)

    assert_one_line(result, str(folder), "maildir folder", f"--format {asked}")
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "Maildir.selsmtp.lock").exists()


@pytest.mark.parametrize("made", ["cs4410", "mbox"])
def test_a_file_mailbox_is_refused_as_a_maildir(made: str, tmp_path: Path) -> None:
    mailbox = tmp_path / "mailbox"
    make_mailbox(mailbox, made)
    before = snapshot(tmp_path)

    result = run_selsmtp("--port", "0", "--mailbox", str(mailbox), "--format", "maildir")

    assert_one_line(result, str(mailbox), f"{made} mailbox", "--format maildir")
    assert snapshot(tmp_path) == before


def version_3_line(number: int, mailbox: Path) -> bytes:
    st = mailbox.stat()
    text = f"selsmtp-state 3 {number} {st.st_size} {st.st_dev} {st.st_ino} -1 1 -1 {number} -"
    return f"{text} {zlib.crc32(text.encode()):08x}\n".encode().ljust(256, b" ")


def test_a_version_3_state_line_without_a_format_lets_the_first_record_tell(
    tmp_path: Path,
) -> None:
    mailbox = tmp_path / "mailbox"
    make_mailbox(mailbox, "mbox")
    (tmp_path / "mailbox.selsmtp").write_bytes(version_3_line(2, mailbox))
    before = snapshot(tmp_path)

    result = run_selsmtp("--port", "0", "--mailbox", str(mailbox), "--format", "cs4410")

    assert_one_line(result, str(mailbox), "mbox mailbox", "--format cs4410")
    assert snapshot(tmp_path) == before


DAMAGE = {
    "random-bytes": bytes(range(7, 250, 3)) * 2,
    "truncated-line": b"selsmtp-state 4 2 180 2049 1234",
    "newer-version": None,  # made below: a well-formed line of version 9
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_state_file_is_refused_with_what_to_do(damage: str, tmp_path: Path) -> None:
    mailbox = tmp_path / "mailbox"
    make_mailbox(mailbox, "cs4410")
    state = tmp_path / "mailbox.selsmtp"
    data = DAMAGE[damage]
    if data is None:
        text = "selsmtp-state 9 2 0 0 0 -1 1 -1 2 - cs4410 x"
        data = f"{text} {zlib.crc32(text.encode()):08x}\n".encode()
    state.write_bytes(data)
    before = snapshot(tmp_path)

    result = run_selsmtp("--port", "0", "--mailbox", str(mailbox))

    line = assert_one_line(result, str(state), "damaged", "delete it")
    if damage == "newer-version":
        assert "version 9" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fmt", ["cs4410", "mbox"])
@pytest.mark.parametrize("suffix", [".selsmtp", ".selsmtp-index", ".selsmtp.lock"])
def test_a_file_selsmtp_keeps_beside_a_mailbox_is_refused_as_a_mailbox(
    fmt: str, suffix: str, tmp_path: Path
) -> None:
    # --mailbox mailbox.selsmtp (a slip of tab completion) would append mail to the
    # other mailbox's state line, index or lock record, and damage it.
    make_mailbox(tmp_path / "mailbox", "cs4410")
    side = tmp_path / f"mailbox{suffix}"
    before = side.read_bytes()

    result = run_selsmtp("--port", "0", "--mailbox", str(side), "--format", fmt)

    assert_one_line(result, str(side), "not a mailbox")
    assert side.read_bytes() == before


FOREIGN_MBOX = b"From nobody Mon Jan  1 00:00:00 2001\nSubject: x\n\nhi\n"


@pytest.mark.parametrize(
    ("made", "foreign"), [("cs4410", FOREIGN_MBOX), ("mbox", record(1))], ids=["cs4410", "mbox"]
)
def test_an_emptied_mailbox_another_program_wrote_into_is_still_ours(
    made: str, foreign: bytes, tmp_path: Path
) -> None:
    # A consumer emptied the mailbox (same file, the state line knows it and its
    # format); another program then wrote a message of the other format into it. The
    # state line tells the format (SPEC §7), so start-up goes on, keeps those bytes,
    # and stores after them, as a running server does.
    mailbox = tmp_path / "mailbox"
    make_mailbox(mailbox, made, count=1)
    with mailbox.open("r+b") as file:
        fcntl.lockf(file, fcntl.LOCK_EX)
        file.truncate(0)
        file.write(foreign)

    render = cs4410_renderer(NAME) if made == "cs4410" else mbox_renderer(NAME)
    pattern = formats.MBOX_NUMBER if made == "mbox" else formats.CS4410_NUMBER
    store = FileStore(str(mailbox), render, number_pattern=pattern)
    try:
        store.try_append([deliver(b"after\r\n")])
    finally:
        store.close()

    assert mailbox.read_bytes().startswith(foreign)
    box = reader.read_mailbox(mailbox, made)
    assert [m.number for m in box.messages if m.number is not None] == [2]
