"""Readers never hang on a FIFO at the mailbox path, its state file or its index
(issue 10): ``inbox list`` ends promptly with one line, or ignores the bogus
side file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO_ROOT
from .processes import child_env

RECORD = (
    b"Received: from client.test by mx.test (CS4410MP3)\n"
    b"Number: 1\nFrom: a@example.com\nTo: b@example.com\n\nhello\n\n"
)
LIMIT = 10.0  # seconds: a hang is a failure, not a stuck suite


def inbox_list(path: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "selsmtp.inbox", "list", str(path)],
            cwd=REPO_ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=LIMIT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"inbox list hung for {LIMIT:g} s")


def test_a_fifo_at_the_mailbox_path_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "mailbox"
    os.mkfifo(path)
    done = inbox_list(path)
    assert done.returncode != 0
    (line,) = done.stderr.strip().splitlines()
    assert "FIFO" in line and str(path) in line


@pytest.mark.parametrize("suffix", [".selsmtp", ".selsmtp-index"])
def test_a_fifo_beside_the_mailbox_is_not_waited_for(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / "mailbox"
    path.write_bytes(RECORD)
    os.mkfifo(f"{path}{suffix}")
    done = inbox_list(path)
    assert done.returncode == 0, done.stderr
    assert "a@example.com" in done.stdout
