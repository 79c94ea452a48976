"""The reactor: one thread, one ``selectors`` loop, every client at once.

Theory of operation
-------------------
Each turn of :meth:`Server.run_once`:

1. waits in ``select`` until a socket is ready or the nearest deadline, reading the
   clock once afterwards; that ``now`` is passed down (and read again only after an
   extra poll of step 2);
2. dispatches each ready key: the listener accepts, the wake-up socket notes a stop
   request, a :class:`~selsmtp.connection.Connection` (its own selector data) reads,
   feeds its session and sends its replies. While messages wait to be stored, it
   polls again without waiting and dispatches what became ready meanwhile: clients
   answered earlier in the turn have often sent their next lines already, and a
   message they finish joins this batch instead of paying for an fsync of its own.
   It does so up to :data:`BATCH_POLLS` times while polls find a connection that
   may read (not one that is paused, closing or flooded with unread replies: those
   are read at most once a turn), but not once the batch holds
   :data:`BATCH_POLL_MESSAGES` messages, only once if it holds
   :data:`BATCH_POLL_BYTES` of message data, and not after a stop was asked for;
3. stores every message that was finished in this turn as one batch: one lock, one
   write, one fsync (group commit), then hands each session its number so its 250
   and anything pipelined behind it go out. If a reader holds the mailbox lock, the
   batch waits (its clients wait for their 250) and the lock is tried again on a later
   turn, while everyone else is served;
4. closes the connections whose line deadline passed;
5. brings the selector's interest up to date for the connections that changed in
   this turn (a pause for a message stored in the same turn costs no epoll_ctl),
   and flushes the log lines of the turn.

Because deliveries happen here, in the loop, one at a time, nothing in the process
ever writes the mailbox concurrently: no lock is needed inside the process. The
``fcntl`` lock is for other processes.

Line deadlines live in :class:`~selsmtp.deadlines.Deadlines`. A connection sees the
server only through the small ``Loop`` protocol of :mod:`selsmtp.connection`
(``touched``, ``enqueue``, ``closed``, ``new_tls`` and three read-only attributes);
neither writes the other's fields. The server's life cycle is one :class:`Phase`.

Signals are not handled in the loop: the handler only sets a flag, and
``signal.set_wakeup_fd`` on a socketpair makes ``select`` return at once.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import logging
import math
import selectors
import socket
import time
from collections.abc import Callable

from selsmtp import logs, replies
from selsmtp.config import Config
from selsmtp.connection import RECV_DATA, Connection
from selsmtp.deadlines import COMPACT_MIN, NEVER, Deadlines
from selsmtp.session import Action, Deliver, Session
from selsmtp.store import StoreError, open_store

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    import ssl
    from typing import BinaryIO, Final

    from selsmtp.durable import Store
    from selsmtp.transport import TLSTransport

log = logging.getLogger("selsmtp.server")

#: connections accepted per readiness event of the listener
ACCEPT_BATCH: Final = 64
#: the listener's backlog
BACKLOG: Final = 1024
#: lock retry back-off while a reader holds the mailbox, in seconds
LOCK_RETRY_MIN: Final = 0.001
LOCK_RETRY_MAX: Final = 0.02
#: after running out of descriptors, listen again after this long at the latest
ACCEPT_PAUSE: Final = 1.0
#: at most one log line per this many seconds about refused connections
REFUSAL_LOG_INTERVAL: Final = 1.0
#: seconds after shutdown begins that connections still open are dropped
SHUTDOWN_GRACE: Final = 2.0
#: the longest wait while ``after_turn`` has work pending (log lines stderr did not take)
AFTER_TURN_RETRY: Final = 0.1
__all__ = ["COMPACT_MIN", "Phase", "Server", "format_address", "open_listener"]
#: polls without waiting that a turn may add while it has finished messages to store
#: (step 2 of the module docstring); none once the batch holds BATCH_POLL_MESSAGES
#: messages, and only the first past BATCH_POLL_BYTES of message data: the fsync of
#: such a batch is already shared widely, or costs more for its bytes than for itself,
#: so waiting for more would delay its 250s and gain little (measured: at 200
#: sessions, p50 latency 6.4 -> 5.3 ms with the message cap, throughput unchanged)
BATCH_POLLS: Final = 4
BATCH_POLL_MESSAGES: Final = 16
BATCH_POLL_BYTES: Final = 64 * 1024

Callback = Callable[[int, float], None]


class Phase(enum.Enum):
    """The server's life cycle; it only moves forward."""

    RUNNING = enum.auto()  #: serving
    STOP_REQUESTED = enum.auto()  #: a signal or request_stop(); the loop has not seen it yet
    STOPPING = enum.auto()  #: not accepting; draining the batch, then closing the rest
    STOPPED = enum.auto()  #: serve_forever returns


class _Waiting:
    """A finished message waiting to be stored."""

    __slots__ = ("conn", "deliver", "since", "size")

    def __init__(self, conn: Connection, deliver: Deliver, since: float) -> None:
        self.conn = conn
        self.deliver = deliver
        self.since = since
        body = deliver.body
        #: bytes of message data (a spooled message is larger than any batch limit)
        self.size = len(body) if isinstance(body, bytes) else BATCH_POLL_BYTES


def new_spool_file() -> BinaryIO:
    """A temporary file for a message too large to keep in memory."""
    import tempfile  # Why here: it is slow to import and most servers never spool.

    return tempfile.TemporaryFile()


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
        self._named = replies.named_replies(config.name, config.max_message_size)
        self._selector = selector or selectors.DefaultSelector()
        self._tls_context: ssl.SSLContext | None = None
        if config.tls_cert is not None and config.tls_key is not None:
            from selsmtp.credfiles import tls_context  # Why here: it imports ssl (slow)

            self._tls_context = tls_context(config.tls_cert, config.tls_key)
        self._listener: socket.socket | None = open_listener(config.host, config.port)
        self.address = format_address(self._listener.getsockname())
        #: the implicit-TLS listener (--tls-port), and the address it listens on
        self._tls_listener: socket.socket | None = None
        self.tls_address: str | None = None
        try:
            if config.tls_port is not None:
                self._tls_listener = open_listener(config.host, config.tls_port)
                self.tls_address = format_address(self._tls_listener.getsockname())
            if store is None:
                store = open_store(config)
        except BaseException:
            self._listener.close()
            if self._tls_listener is not None:
                self._tls_listener.close()
            raise
        self.store = store
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, self._on_listener)
        if self._tls_listener is not None:
            self._selector.register(self._tls_listener, selectors.EVENT_READ, self._on_tls_listener)
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
        self._waiting: list[_Waiting] = []
        self._lock_retry_at = 0.0
        self._lock_retry_delay = LOCK_RETRY_MIN
        self._accept_paused_until: float | None = None
        self._refused = 0  # connections refused since the last log line about them
        self._refused_logged_at = -math.inf
        self.phase = Phase.RUNNING
        self._stopping_since = 0.0  # when STOPPING began
        self.delivered = 0

    # -- the loop ----------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        return self.phase is Phase.STOPPED

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
        polls = 0  # step 2's extra polls: more messages for the batch, one fsync for all
        while ready and self._waiting and polls < BATCH_POLLS and self._batch_may_grow(now):
            if len(self._waiting) >= BATCH_POLL_MESSAGES:
                break
            if polls and sum(waiting.size for waiting in self._waiting) >= BATCH_POLL_BYTES:
                break
            polls += 1
            ready = [
                (key, mask)
                for key, mask in self._selector.select(0)
                if type(key.data) is not Connection or key.data.may_read_more()
            ]
            if ready:
                now = self._clock()
                self._dispatch(ready, now)
        self._flush_deliveries(now)
        self._expire_deadlines(now)
        self._maintain(now)
        dirty = self.dirty
        while dirty:
            dirty.pop().refresh_interest()
        if self.after_turn is not None:
            self._after_turn_pending = self.after_turn()

    def _batch_may_grow(self, now: float) -> bool:
        """Whether an extra poll may add to the batch: not while the lock is being
        waited for (it would not be stored), nor once a stop was asked for (the
        listener must accept no more)."""
        return now >= self._lock_retry_at and self.phase is Phase.RUNNING

    def _dispatch(self, ready: list[tuple[selectors.SelectorKey, int]], now: float) -> None:
        for key, mask in ready:
            # A connection is its own selector data (a bound method per connection
            # would cost memory); the listener and the wake-up socket have callbacks.
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
        due = self._deadlines.next_due()
        if self._waiting:
            due = min(due, self._lock_retry_at)
        if self._accept_paused_until is not None:
            due = min(due, self._accept_paused_until)
        if self.phase is Phase.STOPPING:
            lock_limit = self._stopping_since + self.config.shutdown_lock_wait
            due = min(due, lock_limit if self._waiting else lock_limit + SHUTDOWN_GRACE)
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
            "shutting down: %d connections, %d messages waiting to be stored",
            len(self.connections),
            len(self._waiting),
        )
        self.phase = Phase.STOPPING
        self._stopping_since = now
        self._close_listener()
        for conn in list(self.connections):
            self._resolve(conn, conn.session.shut_down, now)

    def _maintain(self, now: float) -> None:
        self._deadlines.compact()
        if self.phase is Phase.STOP_REQUESTED:
            self._begin_shutdown(now)
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._resume_accepting()
        if self.phase is not Phase.STOPPING:
            return
        elapsed = now - self._stopping_since
        if self._waiting and elapsed >= self.config.shutdown_lock_wait:
            log.warning(
                "mailbox still locked after %.0f s of shutdown; %d messages refused",
                elapsed,
                len(self._waiting),
            )
            self._refuse_waiting(self._waiting, replies.MAILBOX_BUSY, now)
            self._waiting = []
        if elapsed >= self.config.shutdown_lock_wait + SHUTDOWN_GRACE:
            for conn in list(self.connections):
                conn.close("shutdown")
        if not self.connections and not self._waiting:
            self.phase = Phase.STOPPED

    def close(self) -> None:
        """Release the sockets, the selector and the mailbox."""
        for conn in list(self.connections):
            conn.close("server closed")
        self._close_listener()
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()
        self._selector.close()
        self.store.close()

    def _close_listener(self) -> None:
        for listener in (self._listener, self._tls_listener):
            if listener is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(listener)
                listener.close()
        self._listener = self._tls_listener = None

    # -- accepting ---------------------------------------------------------------

    def _on_listener(self, mask: int, now: float) -> None:
        assert self._listener is not None
        self._accept(self._listener, False, now)

    def _on_tls_listener(self, mask: int, now: float) -> None:
        assert self._tls_listener is not None
        self._accept(self._tls_listener, True, now)

    def _accept(self, listener: socket.socket, implicit_tls: bool, now: float) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(now, exc)
                elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    log.warning("accept failed: %s", exc)
                return
            peer = format_address(address)
            if len(self.connections) >= self.config.max_connections:
                self._refuse_connection(peer, now)
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    if not implicit_tls:  # Why: plaintext would only confuse a TLS client
                        sock.send(self._named.too_many_connections.wire)
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = Session(self.config, new_spool=new_spool_file)
            tls = self.new_tls() if implicit_tls else None
            conn = Connection(self, sock, peer, session, now, tls)
            self.connections.add(conn)
            log.debug("connection from %s", peer)
            conn.start(now)

    def _refuse_connection(self, peer: str, now: float) -> None:
        # Why rate-limited: a storm of connections must not become a storm of log lines.
        self._refused += 1
        if now - self._refused_logged_at >= REFUSAL_LOG_INTERVAL:
            log.warning(
                "refused %d connection%s (latest from %s): %d connections already",
                self._refused,
                "" if self._refused == 1 else "s",
                peer,
                len(self.connections),
            )
            self._refused, self._refused_logged_at = 0, now

    def _pause_accepting(self, now: float, exc: OSError) -> None:
        # Why: the listener stays readable while the backlog is full, so a
        # level-triggered selector would wake us forever. Stop watching it until a
        # connection closes (or a second passes) and serve the clients we have.
        if self._accept_paused_until is None and self._listener is not None:
            log.warning("accept failed (%s); not accepting until a connection closes", exc.strerror)
            self._selector.unregister(self._listener)
            if self._tls_listener is not None:
                self._selector.unregister(self._tls_listener)
        self._accept_paused_until = now + ACCEPT_PAUSE

    def _resume_accepting(self) -> None:
        self._accept_paused_until = None
        if self._listener is not None:
            self._selector.register(self._listener, selectors.EVENT_READ, self._on_listener)
        if self._tls_listener is not None:
            self._selector.register(self._tls_listener, selectors.EVENT_READ, self._on_tls_listener)

    # -- services for connections ------------------------------------------------

    def touched(self, conn: Connection) -> None:
        """``conn`` changed: refresh its interest at the end of the turn, watch its deadline."""
        self.dirty.add(conn)
        self._deadlines.watch(conn)

    def closed(self, conn: Connection) -> None:
        """``conn`` has closed its socket."""
        self.connections.discard(conn)
        self._deadlines.forget(conn)  # see _maintain
        if self._accept_paused_until is not None:
            self._resume_accepting()

    def new_tls(self) -> TLSTransport:
        """A server-side TLS transport for a connection (STARTTLS or implicit TLS)."""
        from selsmtp.transport import TLSTransport  # Why here: it imports ssl (slow)

        assert self._tls_context is not None, "STARTTLS is only offered with a certificate"
        return TLSTransport(self._tls_context)

    def enqueue(self, conn: Connection, deliver: Deliver, now: float) -> None:
        """A message is finished: store it at the end of this turn."""
        self._waiting.append(_Waiting(conn, deliver, now))

    def _expire_deadlines(self, now: float) -> None:
        for conn in self._deadlines.due(now):
            log.info("%s: no complete line in %.0f s", conn.peer, self.config.timeout)
            try:
                conn.timed_out(now)
            except Exception:
                self._close_after_bug(conn)

    # -- storing -----------------------------------------------------------------

    def _flush_deliveries(self, now: float) -> None:
        if not self._waiting or now < self._lock_retry_at:
            return
        batch, self._waiting = self._waiting, []
        try:
            numbers = self.store.try_append([waiting.deliver for waiting in batch])
        except StoreError as exc:
            log.error("%s; %d messages refused with 451", exc, len(batch))
            self._refuse_waiting(batch, replies.WRITE_ERROR, now)
            return
        except Exception:
            log.exception("bug in the store; %d messages refused with 451", len(batch))
            self._refuse_waiting(batch, replies.WRITE_ERROR, now)
            return
        if numbers is None:
            self._lock_busy(batch, now)
            return
        self._lock_retry_delay = LOCK_RETRY_MIN
        self._lock_retry_at = 0.0
        info = log.isEnabledFor(logging.INFO)  # the line is made only if logged
        for waiting, number in zip(batch, numbers, strict=True):
            self._release(waiting)
            envelope = waiting.deliver.envelope
            conn = waiting.conn
            conn.messages += 1
            self.delivered += 1
            if info:
                count = len(envelope.forward_paths)
                logs.info(
                    log,
                    f"delivered message {number} from <{envelope.reverse_path}> to {count} "
                    f"recipient{'' if count == 1 else 's'} for {conn.peer}",
                )
            self._resolve(conn, functools.partial(conn.session.delivered, number), now)

    def _lock_busy(self, batch: list[_Waiting], now: float) -> None:
        """The mailbox is locked by another process: wait, but not forever."""
        expired = [w for w in batch if now - w.since >= self.config.lock_wait]
        if expired:
            log.warning(
                "mailbox locked for %.0f s; %d messages refused with 451",
                self.config.lock_wait,
                len(expired),
            )
            self._refuse_waiting(expired, replies.MAILBOX_BUSY, now)
            batch = [w for w in batch if now - w.since < self.config.lock_wait]
        self._waiting = batch + self._waiting
        self._lock_retry_at = now + self._lock_retry_delay
        self._lock_retry_delay = min(self._lock_retry_delay * 2, LOCK_RETRY_MAX)

    def _refuse_waiting(self, batch: list[_Waiting], reply: replies.Reply, now: float) -> None:
        for waiting in batch:
            self._release(waiting)
            session = waiting.conn.session
            self._resolve(waiting.conn, functools.partial(session.delivery_failed, reply), now)

    @staticmethod
    def _release(waiting: _Waiting) -> None:
        body = waiting.deliver.body
        if not isinstance(body, bytes):
            body.close()
