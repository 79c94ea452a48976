"""Accepting: the listening sockets, and what to do when there are too many clients.

Theory of operation
-------------------
:class:`Listeners` holds the main listener and, with ``--tls-port``, the implicit-TLS
one, both in the server's selector. A readiness event accepts up to
:data:`ACCEPT_BATCH` connections; each goes to the server's ``admit``, which makes
its session and connection. Over ``--max-connections`` a client gets the 421 (in
plaintext on the main port only: it would only confuse a TLS client) and is closed,
with at most one log line per :data:`REFUSAL_LOG_INTERVAL` about such refusals.

When ``accept`` fails for want of descriptors or memory, the listener stays readable
while the backlog is full, so a level-triggered selector would wake the loop forever:
the listeners leave the selector until a connection closes, or
:data:`ACCEPT_PAUSE` passes (the server asks :attr:`Listeners.paused_until`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import selectors
import socket

from selsmtp import replies
from selsmtp.store import StartupError

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from collections.abc import Sized
    from typing import Final, Protocol

    from selsmtp.config import Config

    class Host(Protocol):
        """What the listeners see of the server."""

        @property
        def connections(self) -> Sized:
            """The open connections (only counted here)."""

        def admit(self, sock: socket.socket, peer: str, implicit_tls: bool, now: float) -> None:
            """Serve a connection just accepted (non-blocking already)."""


# Why the server's name: these are the loop's log lines, as they always were.
log = logging.getLogger("selsmtp.server")

#: connections accepted per readiness event of the listener
ACCEPT_BATCH: Final = 64
#: the listener's backlog
BACKLOG: Final = 1024
#: after running out of descriptors, listen again after this long at the latest
ACCEPT_PAUSE: Final = 1.0
#: at most one log line per this many seconds about refused connections
REFUSAL_LOG_INTERVAL: Final = 1.0


def format_address(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def open_listener(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket on ``host``:``port`` (IPv4 or IPv6)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Listeners:
    """The listening sockets of one server; bound by the constructor, watched from
    :meth:`listen` until :meth:`close`."""

    __slots__ = (
        "_host",
        "_listener",
        "_paused_until",
        "_refused",
        "_refused_logged_at",
        "_selector",
        "_tls_listener",
        "_too_many",
        "address",
        "config",
        "tls_address",
    )

    def __init__(self, config: Config, selector: selectors.BaseSelector, host: Host) -> None:
        self.config = config
        self._selector = selector
        self._host = host
        self._too_many = replies.named_replies(
            config.name, config.max_message_size
        ).too_many_connections.wire
        self._listener: socket.socket | None = open_listener(config.host, config.port)
        self.address = format_address(self._listener.getsockname())
        #: the implicit-TLS listener (--tls-port), and the address it listens on
        self._tls_listener: socket.socket | None = None
        self.tls_address: str | None = None
        if config.tls_port is not None:
            try:
                self._tls_listener = open_listener(config.host, config.tls_port)
            except OSError as exc:
                self.close()
                # Why: the command line's own message would name --port, which is fine.
                where = format_address((config.host, config.tls_port))
                raise StartupError(
                    f"cannot listen on {where} (--tls-port): {exc.strerror or exc}"
                ) from None
            except BaseException:
                self.close()
                raise
            self.tls_address = format_address(self._tls_listener.getsockname())
        self._paused_until: float | None = None
        self._refused = 0  # connections refused since the last log line about them
        self._refused_logged_at = -math.inf

    @property
    def paused_until(self) -> float | None:
        """When accepting resumes at the latest (None: it is not paused)."""
        return self._paused_until

    def listen(self) -> None:
        """Have the selector watch the listeners."""
        if self._listener is not None:
            self._selector.register(self._listener, selectors.EVENT_READ, self._on_listener)
        if self._tls_listener is not None:
            self._selector.register(self._tls_listener, selectors.EVENT_READ, self._on_tls_listener)

    def close(self) -> None:
        """Stop accepting for good (safe to call twice)."""
        for listener in (self._listener, self._tls_listener):
            if listener is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(listener)
                listener.close()
        self._listener = self._tls_listener = None

    def resume_if_due(self, now: float) -> None:
        if self._paused_until is not None and now >= self._paused_until:
            self._resume()

    def connection_closed(self) -> None:
        """A descriptor was freed: accept again if that was what stopped us."""
        if self._paused_until is not None:
            self._resume()

    def _on_listener(self, mask: int, now: float) -> None:
        assert self._listener is not None
        self._accept(self._listener, False, now)

    def _on_tls_listener(self, mask: int, now: float) -> None:
        assert self._tls_listener is not None
        self._accept(self._tls_listener, True, now)

    def _accept(self, listener: socket.socket, implicit_tls: bool, now: float) -> None:
        host = self._host
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause(now, exc)
                elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    log.warning("accept failed: %s", exc)
                return
            peer = format_address(address)
            if len(host.connections) >= self.config.max_connections:
                self._refuse(peer, now)
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    if not implicit_tls:  # Why: plaintext would only confuse a TLS client
                        sock.send(self._too_many)
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            host.admit(sock, peer, implicit_tls, now)

    def _refuse(self, peer: str, now: float) -> None:
        # Why rate-limited: a storm of connections must not become a storm of log lines.
        self._refused += 1
        if now - self._refused_logged_at >= REFUSAL_LOG_INTERVAL:
            log.warning(
                "refused %d connection%s (latest from %s): %d connections already",
                self._refused,
                "" if self._refused == 1 else "s",
                peer,
                len(self._host.connections),
            )
            self._refused, self._refused_logged_at = 0, now

    def _pause(self, now: float, exc: OSError) -> None:
        # Why: the listener stays readable while the backlog is full, so a
        # level-triggered selector would wake us forever. Stop watching it until a
        # connection closes (or a second passes) and serve the clients we have.
        if self._paused_until is None and self._listener is not None:
            log.warning("accept failed (%s); not accepting until a connection closes", exc.strerror)
            self._selector.unregister(self._listener)
            if self._tls_listener is not None:
                self._selector.unregister(self._tls_listener)
        self._paused_until = now + ACCEPT_PAUSE

    def _resume(self) -> None:
        self._paused_until = None
        self.listen()
