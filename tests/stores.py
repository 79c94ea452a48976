"""Helpers shared by the tests of the single-file stores (test_store, test_rotation, test_mbox)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selsmtp import durable, formats
from selsmtp.session import Deliver, Envelope

NAME = "mx.test"
WAIT = 10.0


def deliver(body: bytes | Any = b"hello\r\n", *recipients: str) -> Deliver:
    """A message from a@example.org (to b@example.org unless ``recipients`` say)."""
    envelope = Envelope("client.test", "a@example.org", recipients or ("b@example.org",))
    return Deliver(envelope, body)


def record(number: int, body: bytes = b"hello\n") -> bytes:
    """The exact cs4410 record ``deliver(...)`` is stored as (SPEC §5.1)."""
    return (
        b"Received: from client.test by mx.test (CS4410MP3)\n"
        + b"Number: %d\n" % number
        + b"From: a@example.org\nTo: b@example.org\n\n"
        + body
        + b"\n"
    )


def numbers_in(path: Path) -> list[int]:
    """The record numbers in the cs4410 mailbox at ``path``, in file order."""
    return [int(n) for n in formats.CS4410_NUMBER.findall(path.read_bytes())]


def hold_shared_lock(path: str, locked: Any, release: Any) -> None:
    """Child process: hold ``lockf(LOCK_SH)`` on ``path`` from ``locked`` to ``release``."""
    with open(path, "rb") as reader:
        fcntl.lockf(reader, fcntl.LOCK_SH)
        locked.set()
        release.wait(60)


def die_in_the_middle_of_the_next_write() -> None:
    """In a child process: the next batch written puts all but its last byte in the
    file, and the process dies there (exit status 3), as in a crash mid-append."""

    def write_most(fd: int, pieces: Sequence[bytes]) -> int:
        data = b"".join(pieces)
        os.write(fd, data[:-1])
        os._exit(3)

    durable.write_all = write_most  # type: ignore[assignment]


def store_options(fmt: str) -> dict[str, Any]:
    """FileStore's keyword arguments for a ``fmt`` ("cs4410", "mbox") store named
    :data:`NAME`, with a clock stopped at the epoch."""
    from selsmtp.store import cs4410_renderer, mbox_renderer

    if fmt == "mbox":
        return {
            "render": mbox_renderer(NAME),
            "number_pattern": formats.MBOX_NUMBER,
            "format": "mbox",
            "clock": lambda: 0.0,
        }
    return {"render": cs4410_renderer(NAME), "format": "cs4410", "clock": lambda: 0.0}
