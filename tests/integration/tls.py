"""Helpers for the TLS tests: the test certificates, client contexts, and a TLS client
over memory buffers that can stop a handshake or a record half-way."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from typing import Any

from .conftest import REPO_ROOT, WAIT

CERTS = REPO_ROOT / "tests" / "certs"
CA = CERTS / "ca.pem"
CERT = CERTS / "server.pem"
KEY = CERTS / "server.key"
EXPIRED_CERT = CERTS / "expired.pem"
EXPIRED_KEY = CERTS / "expired.key"

#: config overrides that turn on STARTTLS and the implicit-TLS port
TLS: dict[str, Any] = {"tls_cert": str(CERT), "tls_key": str(KEY), "tls_port": 0}


def client_context() -> ssl.SSLContext:
    """A client context that trusts the test CA and checks the host name."""
    return ssl.create_default_context(cafile=str(CA))


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def client_hello() -> bytes:
    """The bytes of a real ClientHello, as a client would send first."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", "not a TLS handshake record"
    return hello


class MemoryTLSClient:
    """A TLS client over a plain socket, records built in memory so a test can send
    part of one (or send plaintext first, as for STARTTLS)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_context().wrap_bio(
            self.incoming, self.outgoing, server_hostname="localhost"
        )

    def handshake(self) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill(deadline)
        self._flush()

    def record(self, plaintext: bytes) -> bytes:
        """The ciphertext of ``plaintext`` (not sent)."""
        self.tls.write(plaintext)
        return self.outgoing.read()

    def send(self, plaintext: bytes) -> None:
        self.sock.sendall(self.record(plaintext))

    def read_reply(self) -> bytes:
        """The next whole SMTP reply, decrypted."""
        deadline = time.monotonic() + WAIT
        data = b""
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._fill(deadline)
                continue
            if not chunk:  # Why: after the server's close_notify, read() returns b"" forever
                raise ConnectionError(f"the server ended TLS; a partial reply: {data!r}")
            data += chunk
            lines = data.split(b"\r\n")
            complete = lines[:-1]
            if complete and complete[-1][3:4] == b" ":
                return data

    def _flush(self) -> None:
        pending = self.outgoing.read()
        if pending:
            self.sock.sendall(pending)

    def _fill(self, deadline: float) -> None:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.incoming.write(data)
