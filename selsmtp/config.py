"""Every limit and default in one place, shared by the command line, the server and the tests."""

from __future__ import annotations

from selsmtp.frozen import Frozen, init_field

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import Any, Final

    from selsmtp.auth import Credentials

FORMATS: Final = ("cs4410", "mbox", "maildir")
#: the formats that keep their messages in one file, which --rotate renames
ROTATING_FORMATS: Final = ("cs4410", "mbox")
#: Config.auth: "off", "any" user and password, or the users of a "file"
AUTH_MODES: Final = ("off", "any", "file")

#: RFC 5321 §4.5.3.1.4: a command line is at most 512 octets, CRLF included.
MAX_COMMAND_LINE: Final = 512
#: the longest --timeout, in seconds: a day. A line that takes longer is no longer a
#: client at work, and a larger or non-finite value would disable the timeout silently.
MAX_TIMEOUT: Final = 86_400
#: RFC 5321 §4.5.3.1.2: a domain name is at most 255 octets.
MAX_NAME: Final = 255


def host_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be the server's name, or ``None`` if it can.

    The name goes into every greeting, reply and ``Received:`` line as it is, so it must
    be 1 to 255 bytes (UTF-8) with no whitespace, no control character and nothing
    invisible (format characters such as zero-width spaces, or bytes that were not
    UTF-8). Any other spelling is the user's choice: ``mx.example``, ``[192.0.2.1]``.
    """
    if not name:
        return "is empty"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # a surrogate: bytes on the command line that were not UTF-8
        return "is not UTF-8"
    if size > MAX_NAME:
        return f"is {size} bytes long; at most {MAX_NAME}"
    # Why isprintable: it is False for every control, format, separator (whitespace
    # but the ASCII space), surrogate and unassigned code point.
    if not name.isprintable() or " " in name:
        return "holds whitespace, a control character or an invisible one"
    return None


class Config(Frozen):
    """The server's settings. The defaults are those of the command line (SPEC §2).

    Immutable; :meth:`replace` makes a changed copy. Raises ``ValueError`` for an
    impossible setting.
    """

    __slots__ = __match_args__ = (
        "host",
        "port",
        "mailbox",
        "format",
        "name",
        "timeout",
        "max_message_size",
        "max_recipients",
        "max_connections",
        "rotate",
        "log_level",
        "max_errors",
        "lock_wait",
        "shutdown_lock_wait",
        "spool_threshold",
        "output_high_water",
        "fsync",
        "tls_cert",
        "tls_key",
        "tls_port",
        "require_tls",
        "auth",
        "auth_users",
        "auth_required",
        "auth_allow_insecure",
    )

    host: str
    port: int
    mailbox: str
    format: str
    name: str
    #: seconds a client may take to complete each line (command or message data)
    timeout: float
    max_message_size: int
    max_recipients: int
    max_connections: int
    #: after every N messages, rename the mailbox file to PATH.A-B (None: never;
    #: file formats only)
    rotate: int | None
    log_level: str
    #: error replies after which a session is closed with 421
    max_errors: int
    #: seconds a finished message may wait for the mailbox lock before it gets 451
    lock_wait: float
    #: seconds of shutdown after which messages still waiting for the lock get 451
    shutdown_lock_wait: float
    #: message bodies larger than this many bytes are spooled to a temporary file
    spool_threshold: int
    #: stop reading from a client while this many reply bytes wait to be sent to it
    output_high_water: int
    #: DANGER, benchmarks only: skip fsync, so an acknowledged message can be lost in a crash
    fsync: bool
    #: PEM certificate chain and key (SPEC §8): STARTTLS on ``port`` when both are set
    tls_cert: str | None
    tls_key: str | None
    #: also listen here for implicit TLS (RFC 8314); None: no second listener
    tls_port: int | None
    #: MAIL or AUTH before TLS is refused with 530
    require_tls: bool
    #: AUTH_MODES: "off" (not offered), "any" (every login succeeds), "file" (auth_users)
    auth: str
    #: the users of ``auth == "file"``
    auth_users: Credentials | None
    #: MAIL before a successful AUTH is refused with 530
    auth_required: bool
    #: offer and accept AUTH before TLS (else 538, as Postfix's smtpd_tls_auth_only)
    auth_allow_insecure: bool

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8765,
        mailbox: str = "./mailbox",
        format: str = "cs4410",
        name: str = "localhost",
        timeout: float = 300.0,
        max_message_size: int = 33_554_432,
        max_recipients: int = 1000,
        max_connections: int = 1000,
        rotate: int | None = None,
        log_level: str = "info",
        max_errors: int = 20,
        lock_wait: float = 20.0,
        shutdown_lock_wait: float = 5.0,
        spool_threshold: int = 1 << 20,
        output_high_water: int = 64 * 1024,
        fsync: bool = True,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_port: int | None = None,
        require_tls: bool = False,
        auth: str = "off",
        auth_users: Credentials | None = None,
        auth_required: bool = False,
        auth_allow_insecure: bool = False,
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"unknown mailbox format {format!r}")
        for field, value in (
            ("max_message_size", max_message_size),
            ("max_recipients", max_recipients),
            ("max_connections", max_connections),
        ):
            if value < 1:
                raise ValueError(f"{field} must be at least 1")
        if not 0 < timeout <= MAX_TIMEOUT:  # (False for NaN too)
            raise ValueError(f"timeout must be above 0 and at most {MAX_TIMEOUT} seconds")
        if (problem := host_name_problem(name)) is not None:
            raise ValueError(f"name {name!r} {problem}")
        if rotate is not None and rotate < 1:
            raise ValueError("rotate must be at least 1")
        if rotate is not None and format not in ROTATING_FORMATS:
            raise ValueError(f"rotate applies to the {' and '.join(ROTATING_FORMATS)} formats only")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if tls_cert is None and (tls_port is not None or require_tls):
            raise ValueError("tls_port and require_tls need tls_cert and tls_key")
        if auth not in AUTH_MODES:
            raise ValueError(f"unknown auth mode {auth!r}")
        if (auth == "file") != (auth_users is not None):
            raise ValueError('auth_users go with auth="file", and only with it')
        if auth == "off" and (auth_required or auth_allow_insecure):
            raise ValueError("auth_required and auth_allow_insecure need auth")
        init_field(self, "host", host)
        init_field(self, "port", port)
        init_field(self, "mailbox", mailbox)
        init_field(self, "format", format)
        init_field(self, "name", name)
        init_field(self, "timeout", timeout)
        init_field(self, "max_message_size", max_message_size)
        init_field(self, "max_recipients", max_recipients)
        init_field(self, "max_connections", max_connections)
        init_field(self, "rotate", rotate)
        init_field(self, "log_level", log_level)
        init_field(self, "max_errors", max_errors)
        init_field(self, "lock_wait", lock_wait)
        init_field(self, "shutdown_lock_wait", shutdown_lock_wait)
        init_field(self, "spool_threshold", spool_threshold)
        init_field(self, "output_high_water", output_high_water)
        init_field(self, "fsync", fsync)
        init_field(self, "tls_cert", tls_cert)
        init_field(self, "tls_key", tls_key)
        init_field(self, "tls_port", tls_port)
        init_field(self, "require_tls", require_tls)
        init_field(self, "auth", auth)
        init_field(self, "auth_users", auth_users)
        init_field(self, "auth_required", auth_required)
        init_field(self, "auth_allow_insecure", auth_allow_insecure)

    @property
    def starttls(self) -> bool:
        """True when STARTTLS is offered (a certificate is configured)."""
        return self.tls_cert is not None

    def replace(self, **changes: Any) -> Config:
        """A copy with the fields named in ``changes`` changed (validated again)."""
        fields = {name: getattr(self, name) for name in self.__match_args__}
        fields.update(changes)
        return Config(**fields)
