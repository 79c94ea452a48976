"""The users file of ``--auth FILE`` as :func:`selsmtp.credfiles.load_credentials`
reads it, on real files: what a line means, and which passwords then pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from selsmtp.credfiles import load_credentials
from selsmtp.store import StartupError


def test_a_users_file_line_by_line(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_bytes(
        b"# comment\r\n"
        b"\r\n"
        b"alice:s3cret\r\n"  # CRLF, as an editor on Windows writes it
        b"bob:with:colons\n"  # the password is everything after the first colon
        b"carol: spaced \n"  # ... spaces included
        b"  # an indented comment\n"
        b"dave:\n"  # an empty password
        b"erin:p\xc3\xa4ss\n"  # UTF-8
    )
    credentials = load_credentials(str(users))
    assert len(credentials) == 5
    accepted = [
        ("alice", "s3cret"),
        ("bob", "with:colons"),
        ("carol", " spaced "),
        ("dave", ""),
        ("erin", "p\u00e4ss"),
    ]
    for user, password in accepted:
        assert credentials.check(user, password), (user, password)
    refused = [
        ("alice", "s3cret\r"),
        ("alice", "S3CRET"),
        ("alice", "s3cre"),
        ("alice", ""),
        ("Alice", "s3cret"),
        ("bob", "with"),
        ("carol", "spaced"),
        ("dave", "\0"),
        ("dave", " "),
        ("nobody", ""),
        ("nobody", "\0"),
        ("# comment", ""),
    ]
    for user, password in refused:
        assert not credentials.check(user, password), (user, password)
    assert "s3cret" not in repr(credentials)


def test_a_users_file_that_is_a_folder_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="not a regular file"):
        load_credentials(str(tmp_path))
