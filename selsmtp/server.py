"""The reactor: one thread, one ``selectors`` loop, every client at once.

Theory of operation
-------------------
Each turn of :meth:`Server.run_once`:

1. waits in ``select`` until a socket is ready or the nearest deadline, reading the
   clock once afterwards; that ``now`` is passed down (and read again only after an
   extra poll of step 2);
2. dispatches each ready key: a listener accepts (:mod:`selsmtp.listeners`), the
   wake-up socket notes a stop request, a :class:`~selsmtp.connection.Connection`
   (its own selector data) reads, feeds its session and sends its replies. While
   messages wait to be stored, it polls again without waiting and dispatches what
   became ready meanwhile: clients answered earlier in the turn have often sent their
   next lines already, and a message they finish joins this batch instead of paying
   for an fsync of its own. It does so while polls find a connection that may read
   (not one that is paused, closing or flooded with unread replies: those are read at
   most once a turn), within the limits of
   :meth:`~selsmtp.deliveries.Deliveries.may_grow`, and not after a stop was asked for;
3. stores every message that was finished in this turn as one batch
   (:mod:`selsmtp.deliveries`): one lock, one write, one fsync (group commit), then
   hands each session its number so its 250 and anything pipelined behind it go out.
   If a reader holds the mailbox lock, the batch waits (its clients wait for their
   250) and the lock is tried again on a later turn, while everyone else is served;
4. closes the connections whose line deadline passed;
5. brings the selector's interest up to date for the connections that changed in
   this turn (a pause for a message stored in the same turn costs no epoll_ctl),
   and flushes the log lines of the turn.

Because deliveries happen here, in the loop, one at a time, nothing in the process
ever writes the mailbox concurrently: no lock is needed inside the process. The
``fcntl`` lock is for other processes.

The server owns and drives three helpers, none of which writes another's fields:
:class:`~selsmtp.listeners.Listeners` (accepting), :class:`~selsmtp.deliveries.Deliveries`
(the batch and the lock's back-off) and :class:`~selsmtp.deadlines.Deadlines` (line
deadlines). A connection sees the server only through the small ``Loop`` protocol of
:mod:`selsmtp.connection` (``touched``, ``enqueue``, ``closed``, ``new_tls`` and
three read-only attributes). The server's life cycle is one :class:`Phase`.

Signals are not handled in the loop: the handler only sets a flag, and
``signal.set_wakeup_fd`` on a socketpair makes ``select`` return at once.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import selectors
import socket
import time
from collections.abc import Callable

from selsmtp import logs, replies
from selsmtp.config import Config
from selsmtp.connection import RECV_DATA, Connection
from selsmtp.deadlines import NEVER, Deadlines
from selsmtp.deliveries import Deliveries
from selsmtp.listeners import Listeners
from selsmtp.session import Action, Deliver, Session
from selsmtp.store import open_store

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    import ssl
    from typing import BinaryIO, Final

    from selsmtp.durable import Store
    from selsmtp.transport import TLSTransport

log = logging.getLogger("selsmtp.server")

#: seconds after shutdown begins that connections still open are dropped
SHUTDOWN_GRACE: Final = 2.0
#: the longest wait while ``after_turn`` has work pending (log lines stderr did not take)
AFTER_TURN_RETRY: Final = 0.1
__all__ = ["Phase", "Server"]

Callback = Callable[[int, float], None]


class Phase(enum.Enum):
    """The server's life cycle; it only moves forward."""

    RUNNING = enum.auto()  #: serving
    STOP_REQUESTED = enum.auto()  #: a signal or request_stop(); the loop has not seen it yet
    STOPPING = enum.auto()  #: not accepting; draining the batch, then closing the rest
    STOPPED = enum.auto()  #: serve_forever returns


def new_spool_file() -> BinaryIO:
    """A temporary file for a message too large to keep in memory."""
    import tempfile  # Why here: it is slow to import and most servers never spool.

    return tempfile.TemporaryFile()


class Server:
    """The SMTP server: a listener, its connections and the mailbox store.

    ``Server(config)`` binds the socket and opens the mailbox (raising ``OSError`` or
    :class:`~selsmtp.store.StartupError`); :meth:`serve_forever` runs the loop until
    :meth:`request_stop` (thread-safe) or a signal ends it. ``store``, ``selector``
    and ``clock`` replace the mailbox's store, the ``selectors.DefaultSelector`` and
    ``time.monotonic`` (for tests that need to watch or steer them).
    """

    def __init__(
        self,
        config: Config,
        *,
        store: Store | None = None,
        selector: selectors.BaseSelector | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._clock = clock
        self._selector = selector or selectors.DefaultSelector()
        self._tls_context: ssl.SSLContext | None = None
        if config.tls_cert is not None and config.tls_key is not None:
            from selsmtp.credfiles import tls_context  # Why here: it imports ssl (slow)

            self._tls_context = tls_context(config.tls_cert, config.tls_key)
        self._listeners = Listeners(config, self._selector, self)
        self.address = self._listeners.address
        #: the address of the implicit-TLS listener (--tls-port)
        self.tls_address = self._listeners.tls_address
        try:
            if store is None:
                store = open_store(config)
        except BaseException:
            self._listeners.close()
            raise
        self.store = store
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._listeners.listen()
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self.connections: set[Connection] = set()
        #: connections whose selector interest may have changed in this turn
        self.dirty: set[Connection] = set()
        #: where every connection's recv lands before its bytes are copied out
        self.recv_view = memoryview(bytearray(RECV_DATA))
        #: called at the end of every loop turn (the command line flushes its logs
        #: here); while it returns true (log bytes pending), the loop waits at most
        #: AFTER_TURN_RETRY before its next turn
        self.after_turn: Callable[[], bool] | None = None
        self._after_turn_pending = False
        self._deadlines = Deadlines()
        self._deliveries = Deliveries(config, store, self._resolve)
        self.phase = Phase.RUNNING
        self._stopping_since = 0.0  # when STOPPING began

    # -- the loop ----------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        return self.phase is Phase.STOPPED

    @property
    def delivered(self) -> int:
        """Messages stored since the server started."""
        return self._deliveries.delivered

    @property
    def selector(self) -> selectors.BaseSelector:
        return self._selector

    @property
    def wakeup_fd(self) -> int:
        """The descriptor to pass to ``signal.set_wakeup_fd``."""
        return self._wake_w.fileno()

    def serve_forever(self) -> None:
        """Run until stopped, then release every resource."""
        try:
            while self.phase is not Phase.STOPPED:
                self.run_once()
        finally:
            self.close()

    def run_once(self) -> None:
        """One turn of the loop (see the module docstring)."""
        timeout = self._next_timeout(self._clock())
        ready = self._selector.select(timeout)
        now = self._clock()
        self._dispatch(ready, now)
        deliveries = self._deliveries
        polls = 0  # step 2's extra polls: more messages for the batch, one fsync for all
        # Why RUNNING only: once a stop was asked for, the listener must accept no more.
        while ready and self.phase is Phase.RUNNING and deliveries.may_grow(polls, now):
            polls += 1
            ready = [
                (key, mask)
                for key, mask in self._selector.select(0)
                if type(key.data) is not Connection or key.data.may_read_more()
            ]
            if ready:
                now = self._clock()
                self._dispatch(ready, now)
        deliveries.flush(now)
        self._expire_deadlines(now)
        self._maintain(now)
        dirty = self.dirty
        while dirty:
            dirty.pop().refresh_interest()
        if self.after_turn is not None:
            self._after_turn_pending = self.after_turn()

    def _dispatch(self, ready: list[tuple[selectors.SelectorKey, int]], now: float) -> None:
        for key, mask in ready:
            # A connection is its own selector data (a bound method per connection
            # would cost memory); the listeners and the wake-up socket have callbacks.
            target: Connection | Callback = key.data
            try:
                if type(target) is Connection:
                    target.on_ready(mask, now)
                else:
                    target(mask, now)  # type: ignore[operator]
            except Exception:
                self._crashed(target)

    def _crashed(self, target: Connection | Callback) -> None:
        if isinstance(target, Connection):
            self._close_after_bug(target)
        else:
            log.exception("bug in the server loop")

    @staticmethod
    def _close_after_bug(conn: Connection) -> None:
        # G6: an exception out of a session or connection is a bug. It costs that
        # client its connection (with the traceback in the log), never the server.
        log.exception("bug while serving %s; closing that connection", conn.peer)
        conn.close("internal error")

    def _resolve(self, conn: Connection, step: Callable[[], list[Action]], now: float) -> None:
        """Apply ``step()``'s actions to ``conn``, containing any bug to that connection."""
        try:
            conn.apply(step(), now)
        except Exception:
            self._close_after_bug(conn)

    def _next_timeout(self, now: float) -> float | None:
        if self.phase is Phase.STOP_REQUESTED:
            return 0
        due = min(self._deadlines.next_due(), self._deliveries.next_due())
        paused_until = self._listeners.paused_until
        if paused_until is not None:
            due = min(due, paused_until)
        if self.phase is Phase.STOPPING:
            lock_limit = self._stopping_since + self.config.shutdown_lock_wait
            due = min(due, lock_limit if self._deliveries else lock_limit + SHUTDOWN_GRACE)
        if self._after_turn_pending:
            due = min(due, now + AFTER_TURN_RETRY)
        if due == NEVER:
            return None
        return max(0.0, due - now)

    # -- stopping ----------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to shut down gracefully. Safe from signal handlers and threads."""
        # Why no lock: only this method leaves RUNNING, and only for STOP_REQUESTED.
        if self.phase is Phase.RUNNING:
            self.phase = Phase.STOP_REQUESTED
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _on_wake(self, mask: int, now: float) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass

    def _begin_shutdown(self, now: float) -> None:
        log.info(
            "shutting down: %s, %s waiting to be stored",
            logs.counted(len(self.connections), "connection"),
            logs.counted(len(self._deliveries), "message"),
        )
        self.phase = Phase.STOPPING
        self._stopping_since = now
        self._listeners.close()
        for conn in list(self.connections):
            self._resolve(conn, conn.session.shut_down, now)

    def _maintain(self, now: float) -> None:
        self._deadlines.compact()
        if self.phase is Phase.STOP_REQUESTED:
            self._begin_shutdown(now)
        self._listeners.resume_if_due(now)
        if self.phase is not Phase.STOPPING:
            return
        elapsed = now - self._stopping_since
        deliveries = self._deliveries
        if deliveries and elapsed >= self.config.shutdown_lock_wait:
            log.warning(
                "mailbox still locked after %.0f s of shutdown; %s refused",
                elapsed,
                logs.counted(len(deliveries), "message"),
            )
            deliveries.refuse_all(replies.MAILBOX_BUSY, now)
        if elapsed >= self.config.shutdown_lock_wait + SHUTDOWN_GRACE:
            for conn in list(self.connections):
                conn.close("shutdown")
        if not self.connections and not deliveries:
            self.phase = Phase.STOPPED

    def close(self) -> None:
        """Release the sockets, the selector and the mailbox."""
        for conn in list(self.connections):
            conn.close("server closed")
        self._listeners.close()
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()
        self._selector.close()
        self.store.close()

    # -- services for the listeners and connections ------------------------------

    def admit(self, sock: socket.socket, peer: str, implicit_tls: bool, now: float) -> None:
        """Serve a connection the listeners accepted."""
        session = Session(self.config, new_spool=new_spool_file)
        tls = self.new_tls() if implicit_tls else None
        conn = Connection(self, sock, peer, session, now, tls)
        self.connections.add(conn)
        log.debug("connection from %s", peer)
        conn.start(now)

    def touched(self, conn: Connection) -> None:
        """``conn`` changed: refresh its interest at the end of the turn, watch its deadline."""
        self.dirty.add(conn)
        self._deadlines.watch(conn)

    def closed(self, conn: Connection) -> None:
        """``conn`` has closed its socket."""
        self.connections.discard(conn)
        self._deadlines.forget(conn)  # see _maintain
        self._listeners.connection_closed()

    def new_tls(self) -> TLSTransport:
        """A server-side TLS transport for a connection (STARTTLS or implicit TLS)."""
        from selsmtp.transport import TLSTransport  # Why here: it imports ssl (slow)

        assert self._tls_context is not None, "STARTTLS is only offered with a certificate"
        return TLSTransport(self._tls_context)

    def enqueue(self, conn: Connection, deliver: Deliver, now: float) -> None:
        """A message is finished: store it at the end of this turn."""
        self._deliveries.enqueue(conn, deliver, now)

    def _expire_deadlines(self, now: float) -> None:
        for conn in self._deadlines.due(now):
            log.info("%s: no complete line in %.0f s", conn.peer, self.config.timeout)
            try:
                conn.timed_out(now)
            except Exception:
                self._close_after_bug(conn)
