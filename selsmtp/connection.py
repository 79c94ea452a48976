"""One client connection: a socket, its buffers, its session and its line deadline.

The connection is the thin layer between a socket and a :class:`~selsmtp.session.Session`:
``recv`` → ``session.receive`` → reply bytes appended to the output buffer → ``send``
what the kernel takes. It never interprets the protocol. What it asks the selector to
watch is computed from its state (waitress's ``writable()`` idea), once, at the end
of a loop turn in which it changed: READ unless the session is paused, the client has
stopped reading its replies (output over the high-water mark) or the connection is
closing; WRITE only while output is waiting.

With TLS (STARTTLS, or the implicit-TLS port) a :class:`~selsmtp.transport.TLSTransport`
sits between the socket and the session: bytes read go through it before the session
sees them, replies go through it before they reach the output buffer, and ``out``
then holds ciphertext. The 220 to STARTTLS is the last plaintext sent; everything the
session buffered behind it is discarded by the session. On the implicit-TLS port the
greeting waits for the handshake. A handshake that fails closes the connection with a
log line, after one try to send OpenSSL's alert; one that stalls is closed by the line
deadline, which it counts against.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
from collections.abc import Iterable

from selsmtp import logs
from selsmtp.deadlines import NEVER
from selsmtp.replies import AUTH_OK, Reply
from selsmtp.session import Action, Deliver, Session, StartTLS

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import Final, Protocol

    from selsmtp.config import Config
    from selsmtp.transport import TLSTransport

    class Loop(Protocol):
        """What a connection sees of the loop that runs it (the server)."""

        @property
        def config(self) -> Config: ...

        @property
        def recv_view(self) -> memoryview:
            """Where every recv lands (one thread: one read at a time)."""

        @property
        def selector(self) -> selectors.BaseSelector:
            """Registers the connection's socket, with the connection as its data."""

        def touched(self, conn: Connection) -> None:
            """``conn`` changed: refresh its selector interest at the end of the turn
            (:meth:`Connection.refresh_interest`) and watch its deadline."""

        def enqueue(self, conn: Connection, deliver: Deliver, now: float) -> None:
            """A message is finished: store it at the end of this turn."""

        def closed(self, conn: Connection) -> None:
            """``conn`` has closed its socket (and left the selector)."""

        def new_tls(self) -> TLSTransport:
            """A server-side TLS transport (STARTTLS)."""


log = logging.getLogger("selsmtp.connection")

#: bytes asked of the kernel per recv while reading message data. Reads land in one
#: buffer the server shares among all connections (one thread: one read at a time),
#: which spares a large allocation, and its mmap/munmap, on every read.
RECV_DATA: Final = 256 * 1024
#: ... and while reading commands. Why smaller: a turn serves one recv per client,
#: and 16 KiB of pipelined one-word commands already costs a few milliseconds of
#: replies, which is how long every other client waits on this one (SPEC §4.4).
RECV_COMMANDS: Final = 16 * 1024


class Connection:
    """One client. Created by the server on accept; lives until :meth:`close`."""

    __slots__ = (
        "_greet",
        "_loop",
        "_progress_seen",
        "closing",
        "deadline",
        "eof",
        "events",
        "in_deadlines",
        "messages",
        "out",
        "peer",
        "session",
        "sock",
        "tls",
    )

    def __init__(
        self,
        loop: Loop,
        sock: socket.socket,
        peer: str,
        session: Session,
        now: float,
        tls: TLSTransport | None = None,
    ) -> None:
        self._loop = loop
        self.sock: socket.socket | None = sock
        self.peer = peer
        self.session = session
        self.out = bytearray()
        self.closing = False  # close once `out` is sent
        self.eof = False  # the client closed its side
        self.events = 0  # what the selector watches for us now
        self.deadline = now + loop.config.timeout
        self.in_deadlines = False  # whether the deadline heap has an entry for us (its own)
        self.messages = 0
        self._progress_seen = 0
        #: between the socket and the session once TLS begins (None: plaintext)
        self.tls = tls
        self._greet = tls is not None  # implicit TLS: greet once the handshake is done

    def __lt__(self, other: Connection) -> bool:
        # Why: deadline heap entries are (deadline, connection); equal deadlines fall
        # back to comparing connections, and any fixed order will do.
        return id(self) < id(other)

    @property
    def closed(self) -> bool:
        return self.sock is None

    def stored(self) -> None:
        """One of this client's messages was stored (counted for the closing log line)."""
        self.messages += 1

    def start(self, now: float) -> None:
        if self._greet:
            self._update()  # implicit TLS: read the ClientHello first
        else:
            self.apply(self.session.start(), now)

    def on_ready(self, mask: int, now: float) -> None:
        """The selector says the socket is readable and/or writable."""
        if mask & selectors.EVENT_WRITE:
            self._send()
        if mask & selectors.EVENT_READ and self.sock is not None:
            view = self._loop.recv_view
            try:
                size = self.sock.recv_into(
                    view, RECV_DATA if self.session.reading_data else RECV_COMMANDS
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.close(f"recv failed: {exc.strerror or exc}")
                return
            if not size:
                self.eof = True
            if self.tls is None:
                self.apply(self.session.receive(view[:size].tobytes()), now)
            else:
                self._receive_tls(self.tls, view[:size].tobytes(), now)

    def _receive_tls(self, tls: TLSTransport, data: bytes, now: float) -> None:
        """Ciphertext from the client: the handshake, then plaintext for the session."""
        tls.feed(data)
        try:
            if not tls.established:
                done = tls.handshake()
                self.out += tls.pending()
                if not done:
                    if not data:
                        self.close("closed during the TLS handshake")
                    else:
                        self._send()
                    return
                version, cipher = tls.describe()
                log.debug("%s: %s with cipher %s", self.peer, version, cipher)
                actions = self.session.tls_started(version, cipher)
                if self._greet:
                    self._greet = False
                    actions += self.session.start()
                self.apply(actions, now)
                if self.sock is None:
                    return
            plaintext, ended = tls.read()
        except OSError as exc:  # ssl.SSLError is one
            self._send_alert(tls)
            self.close(f"TLS failed: {getattr(exc, 'reason', None) or exc}")
            return
        if plaintext:
            self.apply(self.session.receive(plaintext), now)
        if ended and self.sock is not None:
            self.eof = True
            self.apply(self.session.receive(b""), now)

    def _send_alert(self, tls: TLSTransport) -> None:
        """One try, without waiting, to send the alert OpenSSL queued when TLS failed
        (a client offering TLS 1.1 then learns why, instead of seeing the socket close)."""
        self.out += tls.pending()
        if self.out and self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.send(self.out)

    def apply(self, actions: Iterable[Action], now: float) -> None:
        """Carry out the session's actions, then send what the kernel takes."""
        if self.sock is None:
            return
        tls = self.tls
        out = self.out if tls is None else bytearray()  # plaintext, encrypted below
        for action in actions:
            if type(action) is Reply:
                out += action.wire
                if action is AUTH_OK:  # the user only: a password is never logged
                    log.info("%s authenticated as %r", self.peer, self.session.auth_user)
            elif type(action) is Deliver:
                self._loop.enqueue(self, action, now)
            elif type(action) is StartTLS:
                # The replies so far (the 220) are the last plaintext; then the handshake.
                tls = self.tls = self._loop.new_tls()
                out = bytearray()
            else:
                self.closing = True
        if tls is not None and not self._encrypt(tls, out):
            return
        out = self.out
        session = self.session
        if session.paused:
            self.deadline = NEVER  # the store, not the client, is what we wait for
        elif session.progress != self._progress_seen or self.deadline == NEVER:
            self._progress_seen = session.progress
            self.deadline = now + self._loop.config.timeout  # watched by touched(), below
        if out:
            self._send()
        else:
            self._update()

    def _encrypt(self, tls: TLSTransport, plaintext: bytearray) -> bool:
        """Replies through TLS into ``out``; False if that failed and closed us.

        Before the handshake is done nothing can be sent: a reply then (the 421 of a
        shutdown) is dropped, and the connection just closes.
        """
        if not tls.established:
            return True
        try:
            if plaintext:
                tls.write(plaintext)
            if self.closing:
                tls.close_notify()
        except OSError as exc:
            self.close(f"TLS failed: {getattr(exc, 'reason', None) or exc}")
            return False
        self.out += tls.pending()
        return True

    def timed_out(self, now: float) -> None:
        """The line deadline passed: 421, one try to send it, and close."""
        if self.tls is not None and not self.tls.established:
            self.close("TLS handshake timed out")
            return
        self.apply(self.session.timed_out(), now)
        if self.sock is not None:
            self.close("timeout")

    def _send(self) -> None:
        assert self.sock is not None
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.close(f"send failed: {exc.strerror or exc}")
                return
            del self.out[:sent]
        self._update()

    def _update(self) -> None:
        """Close if done, else have the selector's interest brought up to date."""
        if self.sock is None:
            return
        if not self.out and (self.closing or (self.eof and not self.session.paused)):
            self.close("quit" if self.closing else "client closed")
            return
        # Why deferred to the end of the turn: a message finished in this turn is
        # stored at its end, so the pause it causes is usually over by then and the
        # interest has not changed at all: no epoll_ctl calls for it.
        self._loop.touched(self)

    def may_read_more(self) -> bool:
        """True unless the end of the turn will stop reading from this client (see
        :meth:`refresh_interest`): the server's extra polls pass it over."""
        return not (
            self.sock is None
            or self.closing
            or self.eof
            or self.session.paused
            or len(self.out) >= self._loop.config.output_high_water
        )

    def refresh_interest(self) -> None:
        """Make the selector watch what our state calls for now (end of a loop turn)."""
        if self.sock is None:
            return
        events = 0
        if self.may_read_more():
            events |= selectors.EVENT_READ
        if self.out:
            events |= selectors.EVENT_WRITE
        if events != self.events:
            selector = self._loop.selector
            if self.events == 0:
                selector.register(self.sock, events, self)
            elif events == 0:
                selector.unregister(self.sock)
            else:
                selector.modify(self.sock, events, self)
            self.events = events

    def close(self, reason: str) -> None:
        """Close the socket now (unsent replies are dropped). Safe to call twice."""
        if self.sock is None:
            return
        sock, self.sock = self.sock, None
        if self.events:
            self._loop.selector.unregister(sock)
            self.events = 0
        self._loop.closed(self)
        sock.close()
        self.out.clear()
        if log.isEnabledFor(logging.INFO):  # the line is made only if logged
            count = self.messages
            logs.info(
                log,
                f"connection {self.peer} closed ({reason}) after {count} "
                f"message{'' if count == 1 else 's'}",
            )
