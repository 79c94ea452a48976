"""The delivery queue: finished messages, stored once a loop turn as one batch.

Theory of operation
-------------------
A connection whose session finishes a message hands it to :meth:`Deliveries.enqueue`
(through the server); the message waits there, its client paused, until the end of
the turn. While some wait, the server may poll again without waiting so that more
join the batch (:meth:`Deliveries.may_grow`: at most :data:`BATCH_POLLS` polls, none
once the batch holds :data:`BATCH_POLL_MESSAGES` messages, only the first past
:data:`BATCH_POLL_BYTES` of message data).

:meth:`Deliveries.flush` then stores the batch: one lock, one write, one fsync (group
commit), and only after that hands each session its number, so its 250, and anything
pipelined behind it, goes out after the message is durable: write, fsync, then 250.
If another process holds the mailbox lock, the batch waits (its clients wait for
their 250) and the lock is tried again on a later turn, backing off from
:data:`LOCK_RETRY_MIN` to :data:`LOCK_RETRY_MAX` seconds; a message that has waited
``--lock-wait`` is refused with 451, and so is a batch the store fails to write.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from selsmtp import logs, replies
from selsmtp.deadlines import NEVER
from selsmtp.store import StoreError

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import Final

    from selsmtp.config import Config
    from selsmtp.connection import Connection
    from selsmtp.durable import Store
    from selsmtp.session import Action, Deliver

    #: applies ``step()``'s actions to a connection, containing any bug to it
    Resolve = Callable[[Connection, Callable[[], list[Action]], float], None]

# Why the server's name: these are the loop's log lines, as they always were.
log = logging.getLogger("selsmtp.server")

#: lock retry back-off while a reader holds the mailbox, in seconds
LOCK_RETRY_MIN: Final = 0.001
LOCK_RETRY_MAX: Final = 0.02
#: polls without waiting that a turn may add while it has finished messages to store
#: (step 2 of the server's module docstring); none once the batch holds
#: BATCH_POLL_MESSAGES messages, and only the first past BATCH_POLL_BYTES of message
#: data: the fsync of such a batch is already shared widely, or costs more for its
#: bytes than for itself, so waiting for more would delay its 250s and gain little
#: (measured: at 200 sessions, p50 latency 6.4 -> 5.3 ms with the message cap,
#: throughput unchanged)
BATCH_POLLS: Final = 4
BATCH_POLL_MESSAGES: Final = 16
BATCH_POLL_BYTES: Final = 64 * 1024


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


class Deliveries:
    """The messages finished and not yet stored, and the mailbox lock's back-off."""

    __slots__ = (
        "_config",
        "_lock_retry_at",
        "_lock_retry_delay",
        "_resolve",
        "_store",
        "_waiting",
        "delivered",
    )

    def __init__(self, config: Config, store: Store, resolve: Resolve) -> None:
        self._config = config
        self._store = store
        self._resolve = resolve
        self._waiting: list[_Waiting] = []
        self._lock_retry_at = 0.0
        self._lock_retry_delay = LOCK_RETRY_MIN
        #: messages stored since the server started
        self.delivered = 0

    def __len__(self) -> int:
        """Messages waiting to be stored."""
        return len(self._waiting)

    def enqueue(self, conn: Connection, deliver: Deliver, now: float) -> None:
        """A message is finished: store it at the next :meth:`flush`."""
        self._waiting.append(_Waiting(conn, deliver, now))

    def next_due(self) -> float:
        """When the lock is to be tried again (NEVER while nothing waits)."""
        return self._lock_retry_at if self._waiting else NEVER

    def may_grow(self, polls: int, now: float) -> bool:
        """Whether one more poll without waiting may add to the batch, after
        ``polls`` of them in this turn: not while nothing waits, nor while the lock is
        being waited for (it would not be stored), nor past the limits above."""
        waiting = self._waiting
        if not waiting or polls >= BATCH_POLLS or now < self._lock_retry_at:
            return False
        if len(waiting) >= BATCH_POLL_MESSAGES:
            return False
        return not polls or sum(w.size for w in waiting) < BATCH_POLL_BYTES

    def flush(self, now: float) -> None:
        """Store what waits as one batch, unless the lock is being waited for."""
        if not self._waiting or now < self._lock_retry_at:
            return
        batch, self._waiting = self._waiting, []
        try:
            numbers = self._store.try_append([waiting.deliver for waiting in batch])
        except StoreError as exc:
            log.error("%s; %s refused with 451", exc, logs.counted(len(batch), "message"))
            self._refuse(batch, replies.WRITE_ERROR, now)
            return
        except Exception:
            log.exception(
                "bug in the store; %s refused with 451", logs.counted(len(batch), "message")
            )
            self._refuse(batch, replies.WRITE_ERROR, now)
            return
        if numbers is None:
            self._lock_busy(batch, now)
            return
        self._lock_retry_delay = LOCK_RETRY_MIN
        self._lock_retry_at = 0.0
        resolve = self._resolve
        info = log.isEnabledFor(logging.INFO)  # the line is made only if logged
        for waiting, number in zip(batch, numbers, strict=True):
            _release(waiting)
            envelope = waiting.deliver.envelope
            conn = waiting.conn
            conn.stored()
            self.delivered += 1
            if info:
                count = len(envelope.forward_paths)
                logs.info(
                    log,
                    f"delivered message {number} from <{envelope.reverse_path}> to "
                    f"{logs.counted(count, 'recipient')} for {conn.peer}",
                )
            resolve(conn, functools.partial(conn.session.delivered, number), now)

    def refuse_all(self, reply: replies.Reply, now: float) -> None:
        """Refuse every waiting message with ``reply`` (shutdown gave up on the lock)."""
        while self._waiting:  # a refusal may let a client finish another message
            batch, self._waiting = self._waiting, []
            self._refuse(batch, reply, now)

    def _lock_busy(self, batch: list[_Waiting], now: float) -> None:
        """The mailbox is locked by another process: wait, but not forever."""
        lock_wait = self._config.lock_wait
        expired = [w for w in batch if now - w.since >= lock_wait]
        if expired:
            log.warning(
                "mailbox locked for %.0f s; %s refused with 451",
                lock_wait,
                logs.counted(len(expired), "message"),
            )
            self._refuse(expired, replies.MAILBOX_BUSY, now)
            batch = [w for w in batch if now - w.since < lock_wait]
        self._waiting = batch + self._waiting
        self._lock_retry_at = now + self._lock_retry_delay
        self._lock_retry_delay = min(self._lock_retry_delay * 2, LOCK_RETRY_MAX)

    def _refuse(self, batch: list[_Waiting], reply: replies.Reply, now: float) -> None:
        for waiting in batch:
            _release(waiting)
            session = waiting.conn.session
            self._resolve(waiting.conn, functools.partial(session.delivery_failed, reply), now)


def _release(waiting: _Waiting) -> None:
    """Close the spool file of a message that was stored or refused."""
    body = waiting.deliver.body
    if not isinstance(body, bytes):
        body.close()
