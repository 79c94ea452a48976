"""TLS between a connection's socket and its session, inside the one loop.

Theory of operation
-------------------
A :class:`TLSTransport` is an ``ssl.SSLObject`` over two ``ssl.MemoryBIO`` buffers:
the connection writes the ciphertext it read from the socket into the incoming one
(:meth:`TLSTransport.feed`) and sends what the outgoing one holds
(:meth:`TLSTransport.pending`). OpenSSL never touches the socket, so nothing here
can block: a step that needs more bytes from the client raises ``SSLWantReadError``
inside this module and simply returns, and the loop serves everyone else until the
socket is readable again. The session above sees plaintext only, and stays a pure
object whose transcripts run one byte at a time.

The handshake (:meth:`TLSTransport.handshake`) is driven by the client's bytes:
each call does the work those bytes allow and no more. A client that stalls costs a
few kilobytes of buffers until its line deadline closes it; one that sends garbage
makes ``do_handshake`` raise ``ssl.SSLError``, which is an ``OSError``, and the
connection closes with a log line. Only TLS 1.2 and newer are accepted (see
:func:`selsmtp.credfiles.tls_context`).

This module imports ``ssl``, which is slow to import; the server loads it only when
TLS is configured.
"""

from __future__ import annotations

import contextlib
import ssl

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import Final

#: plaintext asked of OpenSSL per read (it hands out at most one record, 16 KiB, at a time)
READ_SIZE: Final = 64 * 1024


class TLSTransport:
    """The server side of one TLS connection, over memory buffers."""

    __slots__ = ("_incoming", "_outgoing", "_tls", "established")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.established = False  #: the handshake is done

    def feed(self, data: bytes) -> None:
        """Ciphertext read from the socket; ``b""``: the client closed its side."""
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    def handshake(self) -> bool:
        """Take the handshake as far as the bytes fed allow; True once it is done.

        Raises ``ssl.SSLError`` (an ``OSError``) when it fails.
        """
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        self.established = True
        return True

    def read(self) -> tuple[bytes, bool]:
        """The plaintext the bytes fed so far decrypt to, and whether the stream ended
        (close_notify, or the socket closed). Raises ``ssl.SSLError`` on a bad record."""
        chunks: list[bytes] = []
        ended = False
        while True:
            try:
                chunk = self._tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                ended = True  # Why EOF too: a client that just closes loses only its own
                break
            if not chunk:
                ended = True
                break
            chunks.append(chunk)
        return b"".join(chunks), ended

    def write(self, plaintext: bytes | bytearray) -> None:
        """Encrypt ``plaintext``; its records wait in :meth:`pending`."""
        self._tls.write(plaintext)

    def close_notify(self) -> None:
        """Queue the TLS close alert (sent before the socket closes, as curl expects)."""
        with contextlib.suppress(ssl.SSLError):  # the client's own alert is not waited for
            self._tls.unwrap()

    def pending(self) -> bytes:
        """The ciphertext to send now (possibly empty)."""
        return self._outgoing.read()

    def describe(self) -> tuple[str, str]:
        """The protocol version and cipher agreed (after the handshake)."""
        cipher = self._tls.cipher()
        return self._tls.version() or "TLS", cipher[0] if cipher else "unknown"
