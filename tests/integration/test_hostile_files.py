"""Files that are not what they seem at the mailbox's paths (SPEC §12, issue 10).

A consumer renames the mailbox away and something else appears at the path: a FIFO
(opening or writing it could block the loop forever) or a symbolic link to another
file (following it would append clients' mail there). The server must refuse that
batch with ``451``, log the path and what is there, keep serving everyone, end on
``SIGTERM`` within SPEC §6's time, and store again once the path is fixed. At
start-up, anything but a regular file at the mailbox, its state file or its lock
file is exit 1 with one line. Everything here is a real ``python -m selsmtp``.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import WAIT, WireClient, delivered, read_mailbox, transaction
from .processes import SelsmtpProcess, run_selsmtp

pytestmark = pytest.mark.timeout(60)

WRITE_ERROR = b"451 4.3.0 Error: queue file write error\r\n"
#: more than a pipe holds (64 KiB), so a server writing into a FIFO would block
BIG = b"x" * 99 + b"\r\n"
BIG_BODY = BIG * 1500
#: SPEC §6: a stop takes "a few seconds" (5 s of a busy lock at most, then exit)
STOP_WITHIN = 7.0


@pytest.fixture
def process(tmp_path: Path) -> Iterator[SelsmtpProcess]:
    running = SelsmtpProcess(tmp_path / "mailbox")
    yield running
    running.kill()


def send(client: WireClient, body: bytes, timeout: float = WAIT) -> bytes:
    """One message on a greeted connection; the reply to its end of data."""
    client.send(transaction("a@example.org", ["b@example.org"], body))
    return client.read_replies(4, timeout)[-1]


def deliver_first(process: SelsmtpProcess) -> WireClient:
    client = process.connect()
    client.handshake()
    assert send(client, b"first\r\n") == delivered(1)
    return client


def stop_quickly(process: SelsmtpProcess) -> str:
    """SIGTERM; the process must exit 0 within :data:`STOP_WITHIN`. Returns its stderr."""
    since = time.monotonic()
    process.signal(signal.SIGTERM)
    code, _, err = process.wait(timeout=STOP_WITHIN)
    assert code == 0, err
    assert time.monotonic() - since < STOP_WITHIN
    assert "Traceback" not in err
    return err


def what_is_there_lines(err: str, path: Path, what: str) -> list[str]:
    return [line for line in err.splitlines() if str(path) in line and what in line]


# -- while running ---------------------------------------------------------------


def test_a_fifo_at_the_path_gets_451_never_hangs_and_the_server_serves_again(
    process: SelsmtpProcess, tmp_path: Path
) -> None:
    mailbox = process.mailbox
    sender, bystander = deliver_first(process), process.connect()
    try:
        bystander.handshake()
        mailbox.rename(tmp_path / "taken")  # a consumer took the mail ...
        os.mkfifo(mailbox)  # ... and a FIFO appeared in its place

        # Enough data to fill a pipe three times over: nothing may block on it.
        for _ in range(3):
            assert send(sender, BIG_BODY) == WRITE_ERROR
        assert bystander.command("NOOP") == b"250 2.0.0 Ok\r\n"  # everyone is served

        mailbox.unlink()  # the path is fixed: the next message is stored again
        assert send(sender, b"after\r\n") == delivered(2)
    finally:
        sender.close()
        bystander.close()
    err = stop_quickly(process)
    assert what_is_there_lines(err, mailbox, "FIFO")
    assert [r.body for r in read_mailbox(mailbox)] == [b"after\n"]
    assert [r.number for r in read_mailbox(tmp_path / "taken")] == [1]


def test_sigterm_ends_the_server_while_a_fifo_is_at_the_path(
    process: SelsmtpProcess, tmp_path: Path
) -> None:
    mailbox = process.mailbox
    client = deliver_first(process)
    try:
        mailbox.rename(tmp_path / "taken")
        os.mkfifo(mailbox)
        client.send(transaction("a@example.org", ["b@example.org"], BIG_BODY))
        client.send(transaction("a@example.org", ["b@example.org"], BIG_BODY))
        stop_quickly(process)
    finally:
        client.close()


def test_a_symlink_at_the_path_is_not_followed(process: SelsmtpProcess, tmp_path: Path) -> None:
    mailbox = process.mailbox
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    client = deliver_first(process)
    try:
        mailbox.rename(tmp_path / "taken")
        os.symlink(victim, mailbox)

        assert send(client, b"redirected?\r\n") == WRITE_ERROR
        assert send(client, b"redirected again?\r\n") == WRITE_ERROR
        assert victim.read_bytes() == b"precious\n"

        mailbox.unlink()
        mailbox.write_bytes(b"")  # a regular file again: stored there
        assert send(client, b"after\r\n") == delivered(2)
    finally:
        client.close()
    err = stop_quickly(process)
    assert victim.read_bytes() == b"precious\n"
    assert what_is_there_lines(err, mailbox, "symbolic link")
    assert [r.body for r in read_mailbox(mailbox)] == [b"after\n"]


def test_a_symlink_to_the_mailbox_itself_is_not_taken_for_it(
    process: SelsmtpProcess, tmp_path: Path
) -> None:
    # The identity check must not follow the link: the path no longer names the file.
    mailbox = process.mailbox
    client = deliver_first(process)
    try:
        mailbox.rename(tmp_path / "taken")
        os.symlink(tmp_path / "taken", mailbox)
        assert send(client, b"where?\r\n") == WRITE_ERROR
    finally:
        client.close()
    stop_quickly(process)
    assert [r.number for r in read_mailbox(tmp_path / "taken")] == [1]


# -- at start-up -----------------------------------------------------------------


def make_special(path: Path, kind: str, tmp_path: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious\n")
        os.symlink(victim, path)
    elif kind == "dangling-symlink":
        os.symlink(tmp_path / "nowhere", path)
    elif kind == "directory":
        path.mkdir()
    else:
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # like /dev/null
        except PermissionError:
            pytest.skip("this container may not make device nodes")


KINDS = ["fifo", "symlink", "dangling-symlink", "directory", "device"]
SAYS = {
    "fifo": "FIFO",
    "symlink": "symbolic link",
    "dangling-symlink": "symbolic link",
    "directory": "directory",
    "device": "device",
}


def assert_refused(result: subprocess.CompletedProcess[str], path: Path, kind: str) -> str:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("selsmtp: ")
    assert str(path) in lines[0]
    assert SAYS[kind] in lines[0]
    assert result.stdout == ""
    return str(lines[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", ["cs4410", "mbox"])
def test_at_start_up_the_mailbox_must_be_a_regular_file(
    kind: str, fmt: str, tmp_path: Path
) -> None:
    mailbox = tmp_path / "mailbox"
    make_special(mailbox, kind, tmp_path)

    result = run_selsmtp("--port", "0", "--mailbox", str(mailbox), "--format", fmt)

    assert_refused(result, mailbox, kind)
    if kind == "symlink":
        assert (tmp_path / "victim").read_bytes() == b"precious\n"
    if kind == "dangling-symlink":
        assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
@pytest.mark.parametrize("suffix", [".selsmtp", ".selsmtp.lock", ".selsmtp-index"])
def test_at_start_up_the_state_and_lock_files_must_be_regular_files(
    kind: str, suffix: str, tmp_path: Path
) -> None:
    mailbox = tmp_path / "mailbox"
    special = tmp_path / f"mailbox{suffix}"
    make_special(special, kind, tmp_path)

    result = run_selsmtp("--port", "0", "--mailbox", str(mailbox))

    assert_refused(result, special, kind)
    if kind == "symlink":
        assert (tmp_path / "victim").read_bytes() == b"precious\n"


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
@pytest.mark.parametrize("where", [".selsmtp", "new/entry", "cur/entry"])
def test_at_start_up_maildir_files_must_be_regular_files(
    kind: str, where: str, tmp_path: Path
) -> None:
    folder = tmp_path / "maildir"
    for sub in ("tmp", "new", "cur"):
        (folder / sub).mkdir(parents=True)
    special = folder / where
    make_special(special, kind, tmp_path)

    result = run_selsmtp("--port", "0", "--mailbox", str(folder), "--format", "maildir")

    assert_refused(result, special, kind)


@pytest.mark.parametrize("sub", ["tmp", "new", "cur"])
def test_at_start_up_maildir_folders_must_not_be_symlinks(sub: str, tmp_path: Path) -> None:
    folder = tmp_path / "maildir"
    folder.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("tmp", "new", "cur"):
        if name == sub:
            os.symlink(elsewhere, folder / name)
        else:
            (folder / name).mkdir()

    result = run_selsmtp("--port", "0", "--mailbox", str(folder), "--format", "maildir")

    assert_refused(result, folder / sub, "symlink")
    assert list(elsewhere.iterdir()) == []
