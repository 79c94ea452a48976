"""Parsing of command lines: the verb, HELO names, MAIL/RCPT paths and their parameters.

Every function here either returns a parsed value or raises :class:`SyntaxReply`
carrying the reply the client should get. Lines are decoded as UTF-8 with
``surrogateescape``, so no input can make decoding fail; bytes that are not UTF-8
show up as lone surrogates and are refused wherever a name or an address is read.
"""

from __future__ import annotations

import enum
import functools
import re

from selsmtp import replies
from selsmtp.frozen import Frozen, init_field
from selsmtp.replies import Reply

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import Final


class Verb(enum.Enum):
    """The commands selsmtp implements (RFC 5321 §4.1.1). Anything else gets 502."""

    HELO = "HELO"
    EHLO = "EHLO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    RSET = "RSET"
    NOOP = "NOOP"
    VRFY = "VRFY"
    QUIT = "QUIT"
    HELP = "HELP"
    STARTTLS = "STARTTLS"  # RFC 3207
    AUTH = "AUTH"  # RFC 4954

    __hash__ = object.__hash__  # identity hashing: see State in session.py


VERBS: Final = {verb.value: verb for verb in Verb}

#: RFC 5321 §4.5.3.1: local part 64 octets, domain 255, whole path 256 with its brackets.
MAX_LOCAL_PART: Final = 64
MAX_DOMAIN: Final = 255
MAX_PATH: Final = 256

_WS: Final = " \t"
_MAIL_FROM: Final = re.compile(r"FROM[ \t]*:(.*)\Z", re.IGNORECASE | re.DOTALL)
_RCPT_TO: Final = re.compile(r"TO[ \t]*:(.*)\Z", re.IGNORECASE | re.DOTALL)


@functools.cache
def _forbidden() -> re.Pattern[str]:
    """Matches control bytes, spaces, and lone surrogates (bytes that were not UTF-8)."""
    # Why compiled on first use: the surrogate range makes this pattern slow to compile
    # (0.4 ms, measured), and the first greeting should not wait for it.
    return re.compile(r"[\x00-\x20\x7f\udc80-\udcff]|\s")


class SyntaxReply(Exception):
    """The client's command was malformed; ``reply`` says how to answer it."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply)
        self.reply = reply


class MailFrom(Frozen):
    """A parsed ``MAIL FROM``: the reverse-path ("" for ``<>``) and its parameters."""

    __slots__ = __match_args__ = ("reverse_path", "declared_size", "smtputf8")

    reverse_path: str
    declared_size: int | None
    smtputf8: bool

    def __init__(
        self, reverse_path: str, declared_size: int | None = None, smtputf8: bool = False
    ) -> None:
        init_field(self, "reverse_path", reverse_path)
        init_field(self, "declared_size", declared_size)
        init_field(self, "smtputf8", smtputf8)


def decode_line(line: bytes) -> str:
    """A command line without its line ending (CRLF or bare LF), as text."""
    if line.endswith(b"\r\n"):
        line = line[:-2]
    elif line.endswith(b"\n"):
        line = line[:-1]
    return line.decode("utf-8", "surrogateescape")


def split_command(text: str) -> tuple[Verb | None, str]:
    """Split a command line into its verb and argument.

    Returns ``(None, word)`` for a verb we do not know. Raises ``SyntaxReply`` for a
    blank line.
    """
    text = text.strip(_WS)
    if not text:
        raise SyntaxReply(replies.BAD_SYNTAX)
    word, _, argument = text.replace("\t", " ").partition(" ")
    # Why: only ASCII letters fold; str.upper() would also turn "ma\u0131l" into "MAIL".
    verb = VERBS.get(word.upper()) if word.isascii() else None
    return verb, argument.strip(_WS)


def parse_helo(argument: str) -> str:
    """The client's name from a HELO/EHLO argument: one token, no control bytes."""
    if not argument or _forbidden().search(argument):
        raise SyntaxReply(replies.HELO_SYNTAX)
    return argument


def parse_mail(argument: str, max_size: int) -> MailFrom:
    """Parse the argument of ``MAIL``: ``FROM:<path> [SIZE=n] [BODY=...] [SMTPUTF8]``."""
    match = _MAIL_FROM.match(argument)
    if match is None:
        raise SyntaxReply(replies.BAD_SENDER)
    address, params = parse_path(match.group(1), replies.BAD_SENDER, allow_null=True)
    declared_size = None
    smtputf8 = False
    for param in params:
        keyword, has_value, value = param.partition("=")
        # Why: fold ASCII only, as for verbs ("\u017fize" must not read as SIZE).
        keyword = keyword.upper() if keyword.isascii() else keyword
        if keyword == "SIZE" and has_value:
            if not value.isascii() or not value.isdigit() or len(value) > 20:
                raise SyntaxReply(replies.BAD_SIZE)
            declared_size = int(value)
            if declared_size > max_size:
                raise SyntaxReply(replies.TOO_BIG)
        elif keyword == "BODY" and value.isascii() and value.upper() in ("7BIT", "8BITMIME"):
            pass  # RFC 6152: bodies are stored as bytes either way
        elif keyword == "SMTPUTF8" and not has_value:
            smtputf8 = True
        else:
            raise SyntaxReply(replies.unsupported_option(param))
    return MailFrom(address, declared_size, smtputf8)


def parse_rcpt(argument: str) -> str:
    """Parse the argument of ``RCPT``: ``TO:<path>``; no parameters are supported."""
    match = _RCPT_TO.match(argument)
    if match is None:
        raise SyntaxReply(replies.BAD_RECIPIENT)
    address, params = parse_path(match.group(1), replies.BAD_RECIPIENT, allow_null=False)
    if params:
        raise SyntaxReply(replies.unsupported_option(params[0]))
    return address


def parse_path(text: str, error: Reply, *, allow_null: bool) -> tuple[str, list[str]]:
    """Read a path (``<a@b>`` or ``a@b``) and the parameters after it.

    The brackets are removed, a source route (``<@x,@y:a@b>``, RFC 5321 §4.1.2) is
    reduced to its mailbox, and ``<>`` yields ``""`` when ``allow_null``. Raises
    ``SyntaxReply(error)`` for anything malformed or over the RFC 5321 length limits.
    """
    text = text.lstrip(_WS)
    if text.startswith("<"):
        close = text.find(">")
        if close < 0:
            raise SyntaxReply(error)
        address, rest = text[1:close], text[close + 1 :]
        if rest and rest[0] not in _WS:
            raise SyntaxReply(error)
        if address == "":
            if not allow_null:
                raise SyntaxReply(error)
            return "", rest.split()
        path_length = len(text[: close + 1].encode("utf-8", "surrogateescape"))
    else:
        address, _, rest = text.replace("\t", " ").partition(" ")
        path_length = len(address.encode("utf-8", "surrogateescape")) + 2
    if path_length > MAX_PATH or "<" in address or ">" in address:
        raise SyntaxReply(error)
    if address.startswith("@"):
        route_end = address.find(":")
        if route_end < 0:
            raise SyntaxReply(error)
        address = address[route_end + 1 :]
    if not address or _forbidden().search(address):
        raise SyntaxReply(error)
    local, at, domain = address.rpartition("@")
    if at and (
        not local
        or not domain
        or len(local.encode()) > MAX_LOCAL_PART
        or len(domain.encode()) > MAX_DOMAIN
    ):
        raise SyntaxReply(error)
    if not at and len(address.encode()) > MAX_LOCAL_PART:
        raise SyntaxReply(error)
    return address, rest.split()
