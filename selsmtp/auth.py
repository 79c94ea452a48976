"""SMTP AUTH (RFC 4954): who may log in, and the two mechanisms, PLAIN and LOGIN.

The session runs the exchange (the 334 challenges); this module holds what it needs
and keeps no state: :class:`Credentials` (the users of ``--auth FILE``),
:func:`decode` for the base64 of every client line, and :func:`parse_plain` for the
PLAIN response (RFC 4616). A password is compared in constant time and never leaves
this module: nothing here logs, and :class:`Credentials` shows only its size. Pure:
the users file is read at start-up by :mod:`selsmtp.credfiles`.
"""

from __future__ import annotations

import binascii

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Final

#: the mechanisms offered, in EHLO's order
MECHANISMS: Final = ("PLAIN", "LOGIN")
#: RFC 4954 §4: an AUTH command or response line may be this long, CRLF included
#: (Postfix's line_length_limit for AUTH is the same 12 KiB)
MAX_AUTH_LINE: Final = 12_288
#: the LOGIN challenges: base64 of "Username:" and "Password:"
LOGIN_USERNAME: Final = "VXNlcm5hbWU6"
LOGIN_PASSWORD: Final = "UGFzc3dvcmQ6"


class Credentials:
    """The users of ``--auth FILE``: a name and its password, compared in constant time."""

    __slots__ = ("_users",)

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = {name.encode(): password.encode() for name, password in users.items()}

    def check(self, user: str, password: str) -> bool:
        # Why here: hmac loads OpenSSL's hashing (about 2 ms of every start-up), and
        # only a server with --auth FILE ever compares a password.
        import hmac

        expected = self._users.get(user.encode("utf-8", "surrogateescape"))
        given = password.encode("utf-8", "surrogateescape")
        # Why compare with a dummy for an unknown user: the answer takes as long. Why
        # not ``expected or dummy``: an empty password would then take any run of NULs.
        if expected is None:
            hmac.compare_digest(b"\0" * len(given), given)
            return False
        return hmac.compare_digest(expected, given)

    def __len__(self) -> int:
        return len(self._users)

    def __repr__(self) -> str:  # never the passwords
        return f"Credentials({len(self._users)} users)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Credentials) and other._users == self._users

    def __hash__(self) -> int:
        return hash(frozenset(self._users))


def decode(text: str) -> bytes | None:
    """The bytes of a base64 client line, or None if it is not base64 (RFC 4648)."""
    import base64  # Why here: only AUTH needs it, and start-up time counts.

    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def parse_plain(response: bytes) -> tuple[str, str] | None:
    """``authzid NUL authcid NUL passwd`` (RFC 4616) → (user, password), or None when
    malformed, the user is empty, or the authzid names someone else."""
    parts = response.split(b"\0")
    if len(parts) != 3 or not parts[1]:
        return None
    authzid, user, password = (part.decode("utf-8", "surrogateescape") for part in parts)
    if authzid and authzid != user:
        return None
    return user, password
