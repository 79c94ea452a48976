"""Every limit and default in one place, shared by the command line, the server and the tests."""

from __future__ import annotations

import dataclasses
from typing import Final

FORMATS: Final = ("cs4410", "mbox", "maildir")
#: the formats that keep their messages in one file, which --rotate renames
ROTATING_FORMATS: Final = ("cs4410", "mbox")

#: RFC 5321 §4.5.3.1.4: a command line is at most 512 octets, CRLF included.
MAX_COMMAND_LINE: Final = 512


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """The server's settings. The defaults are those of the command line (SPEC §2)."""

    host: str = "127.0.0.1"
    port: int = 8765
    mailbox: str = "./mailbox"
    format: str = "cs4410"
    name: str = "localhost"
    #: seconds a client may take to complete each line (command or message data)
    timeout: float = 300.0
    max_message_size: int = 33_554_432
    max_recipients: int = 1000
    max_connections: int = 1000
    #: after every N messages, rename the mailbox file to PATH.A-B (None: never;
    #: file formats only)
    rotate: int | None = None
    log_level: str = "info"
    #: error replies after which a session is closed with 421
    max_errors: int = 20
    #: seconds a finished message may wait for the mailbox lock before it gets 451
    lock_wait: float = 20.0
    #: seconds of shutdown after which messages still waiting for the lock get 451
    shutdown_lock_wait: float = 5.0
    #: message bodies larger than this many bytes are spooled to a temporary file
    spool_threshold: int = 1 << 20
    #: stop reading from a client while this many reply bytes wait to be sent to it
    output_high_water: int = 64 * 1024
    #: DANGER, benchmarks only: skip fsync, so an acknowledged message can be lost in a crash
    fsync: bool = True

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown mailbox format {self.format!r}")
        for field in ("max_message_size", "max_recipients", "max_connections"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.rotate is not None and self.rotate < 1:
            raise ValueError("rotate must be at least 1")
        if self.rotate is not None and self.format not in ROTATING_FORMATS:
            raise ValueError(f"rotate applies to the {' and '.join(ROTATING_FORMATS)} formats only")
