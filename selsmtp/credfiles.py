"""The files TLS and AUTH need, read once at start-up: the certificate and key, and
the users of ``--auth FILE``.

Each may be a symlink (certbot and secrets managers make them) but must end at a
regular file (SPEC §12): a FIFO or a device would block the start-up or never end.
Every failure is a :class:`~selsmtp.store.StartupError` with one line naming the file
and the cause, which the command line prints before it exits 1.
"""

from __future__ import annotations

import os
import stat

from selsmtp.auth import Credentials
from selsmtp.store import StartupError

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    import ssl
    from typing import Final

#: a users file larger than this is surely not one
MAX_USERS_FILE: Final = 1 << 20


def check_regular(option: str, path: str) -> None:
    """Raise StartupError unless ``path`` (symlinks followed) is a readable regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise StartupError(f"{option} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise StartupError(f"{option} {path}: not a regular file")


def load_credentials(path: str) -> Credentials:
    """Read ``path``: one ``user:password`` per line; blank lines and ``#`` comments skip."""
    # Why open, then fstat: a file swapped for a FIFO between a check by path and the
    # open would block the start-up; O_NONBLOCK makes the open itself never wait.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise StartupError(f"--auth {path}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StartupError(f"--auth {path}: not a regular file")
        with open(fd, "rb", closefd=False) as file:
            data = file.read(MAX_USERS_FILE + 1)
    except OSError as exc:
        raise StartupError(f"--auth {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_USERS_FILE:
        raise StartupError(f"--auth {path}: larger than {MAX_USERS_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise StartupError(f"--auth {path}: not UTF-8") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, colon, password = line.partition(":")
        if not colon or not user:
            # Why not the line itself: it may hold a password.
            raise StartupError(f"--auth {path}: line {number} is not user:password")
        users[user] = password
    if not users:
        raise StartupError(f"--auth {path}: no users")
    return Credentials(users)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for ``cert`` and ``key`` (PEM): TLS 1.2 or newer."""
    import ssl  # Why here: ssl is slow to import, and most servers run without TLS.

    check_regular("--tls-cert", cert)
    check_regular("--tls-key", key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Why: renegotiation would let a client make the loop redo a handshake's CPU
    # work at will, inside one connection (a cheap denial of service).
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        # Why a callback: without one OpenSSL asks for a passphrase on the terminal,
        # which hangs a start-up in a terminal and garbles the one-line error without.
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _Encrypted:
        raise StartupError(
            f"--tls-key {key}: encrypted with a passphrase; selsmtp needs the key without "
            "one (openssl pkey -in KEY -out PLAIN.key)"
        ) from None
    except ssl.SSLError as exc:
        raise StartupError(
            f"--tls-cert {cert} and --tls-key {key} cannot be used: {exc.reason or exc}"
        ) from None
    except OSError as exc:
        raise StartupError(f"--tls-cert {cert}: {exc.strerror or exc}") from None
    return context


class _Encrypted(Exception):
    """The key asked for a passphrase (raised by :func:`_no_passphrase`)."""


def _no_passphrase() -> bytes:
    """OpenSSL's passphrase callback: called only for an encrypted key."""
    raise _Encrypted
