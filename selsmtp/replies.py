"""SMTP replies as values: each one carries its wire code and is defined once.

Handlers return these constants; nothing formats a reply inline. A reply renders
itself to wire bytes once, when it is made, so sending it is a buffer append.
Replies that name the server (the greeting, the 421s) are built per server name by
:func:`named_replies`.
"""

from __future__ import annotations

import functools
import re

from selsmtp.frozen import Frozen, init_field

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import Final


class Reply(Frozen):
    """An SMTP reply: a three-digit code and one or more lines of text.

    ``wire`` is the reply as sent: every line but the last as ``CODE-text``, the last
    as ``CODE text``, each ending in CRLF (RFC 5321 §4.2.1). Replies are equal when
    their code and lines are. Raises ``ValueError`` for a code outside 200-599 or no
    lines.
    """

    __slots__ = ("code", "lines", "wire")
    __match_args__ = ("code", "lines")

    code: int
    lines: tuple[str, ...]
    wire: bytes

    def __init__(self, code: int, lines: tuple[str, ...]) -> None:
        if not 200 <= code <= 599 or not lines:
            raise ValueError(f"bad reply {code} {lines!r}")
        last = len(lines) - 1
        wire = "".join(
            f"{code}{' ' if i == last else '-'}{line}\r\n" for i, line in enumerate(lines)
        )
        init_field(self, "code", code)
        init_field(self, "lines", lines)
        init_field(self, "wire", wire.encode("utf-8"))

    @property
    def is_error(self) -> bool:
        """True for a transient (4xx) or permanent (5xx) negative reply."""
        return self.code >= 400

    @classmethod
    def of(cls, code: int, *lines: str) -> Reply:
        return cls(code, lines)


_UNPRINTABLE: Final = re.compile(r"[^\x21-\x7e]")


# -- fixed replies (SPEC §3) -------------------------------------------------

OK: Final = Reply.of(250, "2.0.0 Ok")
MAIL_OK: Final = Reply.of(250, "2.1.0 Ok")
RCPT_OK: Final = Reply.of(250, "2.1.5 Ok")
START_DATA: Final = Reply.of(354, "End data with <CR><LF>.<CR><LF>")
CANNOT_VRFY: Final = Reply.of(252, "2.0.0 Cannot VRFY user, but will accept message")
BYE: Final = Reply.of(221, "2.0.0 Bye")

BAD_SYNTAX: Final = Reply.of(500, "5.5.2 Error: bad syntax")
LINE_TOO_LONG: Final = Reply.of(500, "5.5.2 Error: line too long")
UNKNOWN_COMMAND: Final = Reply.of(502, "5.5.2 Error: command not recognized")
HELO_SYNTAX: Final = Reply.of(501, "Syntax: HELO hostname")
NEED_HELO: Final = Reply.of(503, "5.5.1 Error: need HELO command")
NEED_MAIL: Final = Reply.of(503, "5.5.1 Error: need MAIL command")
NEED_RCPT: Final = Reply.of(503, "5.5.1 Error: need RCPT command")
NESTED_MAIL: Final = Reply.of(503, "5.5.1 Error: nested MAIL command")
DUPLICATE_HELO: Final = Reply.of(503, "5.5.1 Error: duplicate HELO")
BAD_SENDER: Final = Reply.of(501, "5.1.7 Bad sender address syntax")
BAD_RECIPIENT: Final = Reply.of(501, "5.1.3 Bad recipient address syntax")
DATA_SYNTAX: Final = Reply.of(501, "5.5.4 Syntax: DATA")
RSET_SYNTAX: Final = Reply.of(501, "5.5.4 Syntax: RSET")
VRFY_SYNTAX: Final = Reply.of(501, "5.5.4 Syntax: VRFY address")
BAD_SIZE: Final = Reply.of(501, "5.5.4 Bad message size syntax")
TOO_BIG: Final = Reply.of(552, "5.3.4 Error: message file too big")
TOO_MANY_RECIPIENTS: Final = Reply.of(452, "4.5.3 Error: too many recipients")
WRITE_ERROR: Final = Reply.of(451, "4.3.0 Error: queue file write error")
MAILBOX_BUSY: Final = Reply.of(451, "4.3.0 Error: mailbox busy, try again later")
HELP: Final = Reply.of(214, "2.0.0 See RFC 5321 and https://www.rfc-editor.org")

# -- TLS and AUTH (SPEC §8) --------------------------------------------------

READY_FOR_TLS: Final = Reply.of(220, "2.0.0 Ready to start TLS")
STARTTLS_SYNTAX: Final = Reply.of(501, "5.5.4 Syntax: STARTTLS")
TRANSACTION_IN_PROGRESS: Final = Reply.of(503, "5.5.1 Error: MAIL transaction in progress")
TLS_ALREADY_ACTIVE: Final = Reply.of(503, "5.5.1 Error: TLS already active")
MUST_STARTTLS: Final = Reply.of(530, "5.7.0 Must issue a STARTTLS command first")
AUTH_REQUIRED: Final = Reply.of(530, "5.7.0 Authentication required")
ENCRYPTION_REQUIRED: Final = Reply.of(
    538, "5.7.11 Encryption required for requested authentication mechanism"
)
AUTH_OK: Final = Reply.of(235, "2.7.0 Authentication successful")
AUTH_FAILED: Final = Reply.of(535, "5.7.8 Error: authentication failed")
AUTH_ABORTED: Final = Reply.of(501, "5.7.0 Authentication aborted")
BAD_BASE64: Final = Reply.of(501, "5.5.2 Error: invalid base64")
AUTH_SYNTAX: Final = Reply.of(501, "5.5.4 Syntax: AUTH mechanism")
AUTH_MECHANISM: Final = Reply.of(504, "5.5.4 Error: unsupported authentication mechanism")
ALREADY_AUTHENTICATED: Final = Reply.of(503, "5.5.1 Error: already authenticated")
AUTH_NEEDS_EHLO: Final = Reply.of(503, "5.5.1 Error: send HELO/EHLO first")
AUTH_LINE_TOO_LONG: Final = Reply.of(500, "5.5.6 Authentication exchange line is too long")
#: RFC 4954 §4: the empty challenge (PLAIN without an initial response)
AUTH_CONTINUE: Final = Reply.of(334, "")
ASK_USERNAME: Final = Reply.of(334, "VXNlcm5hbWU6")  # base64 of "Username:"
ASK_PASSWORD: Final = Reply.of(334, "UGFzc3dvcmQ6")  # base64 of "Password:"


def unsupported_option(param: str) -> Reply:
    """555 for a MAIL or RCPT parameter we do not support, naming it as sent.

    Why: the parameter is the client's text. Only printable ASCII is echoed (anything
    else shows as ``?``), so a reply never carries control bytes, and bytes that were
    not UTF-8 (lone surrogates after decoding) cannot make rendering fail.
    """
    return Reply.of(555, f"5.5.4 Unsupported option: {_UNPRINTABLE.sub('?', param)}")


def delivered(number: int) -> Reply:
    """The reply sent once message ``number`` is written and fsync'd."""
    return Reply.of(250, f"2.0.0 Ok: delivered message {number}")


class NamedReplies(Frozen):
    """The replies that carry the server's name, built once per name."""

    __slots__ = __match_args__ = (
        "greeting",
        "helo",
        "ehlo",
        "too_many_connections",
        "too_many_errors",
        "timeout",
        "shutting_down",
    )

    greeting: Reply
    helo: Reply
    ehlo: Reply
    too_many_connections: Reply
    too_many_errors: Reply
    timeout: Reply
    shutting_down: Reply

    def __init__(
        self,
        greeting: Reply,
        helo: Reply,
        ehlo: Reply,
        too_many_connections: Reply,
        too_many_errors: Reply,
        timeout: Reply,
        shutting_down: Reply,
    ) -> None:
        init_field(self, "greeting", greeting)
        init_field(self, "helo", helo)
        init_field(self, "ehlo", ehlo)
        init_field(self, "too_many_connections", too_many_connections)
        init_field(self, "too_many_errors", too_many_errors)
        init_field(self, "timeout", timeout)
        init_field(self, "shutting_down", shutting_down)


@functools.lru_cache(maxsize=16)
def named_replies(name: str, max_message_size: int) -> NamedReplies:
    """Build the name-bearing replies for a server called ``name``.

    ``ehlo`` is the reply without STARTTLS or AUTH (see :func:`ehlo`).
    """
    return NamedReplies(
        greeting=Reply.of(220, f"{name} SMTP CS4410MP3"),
        helo=Reply.of(250, name),
        ehlo=ehlo(name, max_message_size, starttls=False, auth=False),
        too_many_connections=Reply.of(421, f"4.7.0 {name} Error: too many connections"),
        too_many_errors=Reply.of(421, f"4.7.0 {name} Error: too many errors"),
        timeout=Reply.of(421, f"4.4.2 {name} Error: timeout exceeded"),
        shutting_down=Reply.of(421, f"4.3.2 {name} Service shutting down"),
    )


@functools.lru_cache(maxsize=64)
def ehlo(name: str, max_message_size: int, *, starttls: bool, auth: bool) -> Reply:
    """The EHLO reply: the extensions of SPEC §4.1 and §8. ``starttls``: STARTTLS is
    offered (configured, and not under TLS yet); ``auth``: AUTH can succeed now.

    SIZE carries the configured limit (RFC 1870).
    """
    lines = [name, "PIPELINING", f"SIZE {max_message_size}", "8BITMIME", "SMTPUTF8"]
    if starttls:
        lines.append("STARTTLS")
    if auth:
        lines.append("AUTH PLAIN LOGIN")
    lines += ["ENHANCEDSTATUSCODES", "HELP"]
    return Reply(250, tuple(lines))
