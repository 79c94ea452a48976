"""Line deadlines (SPEC §4.6): which connection must be closed for silence, and when.

Theory of operation
-------------------
:class:`Deadlines` is a heap with at most one entry per connection. A connection
moves its own deadline later by changing its ``deadline`` attribute; nothing here is
told. When an entry comes due early (the connection has made progress since it was
pushed), it is pushed again with the current value, so a busy connection costs no
heap work at all. Whether a connection has an entry is kept in the connection's
``in_deadlines`` attribute, which belongs to this module: nothing else writes it (the
connection only sets it to ``False`` when it is made). A set of queued connections
here would keep the same record without touching the connection, but at about 65
bytes per connection it was a seventh of what an idle connection costs in all.

The entry of a connection that closes stays until it comes due; once such entries
are more than :data:`COMPACT_MIN` and the majority, the heap is rebuilt without them,
so a high rate of short connections does not keep thousands of dead ones alive for a
whole timeout.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import Final

    from selsmtp.connection import Connection as Timed  # a deadline, closed, ordered


#: the deadline of a connection that is not waiting for its client
NEVER: Final = math.inf
#: the heap is rebuilt once it holds more than this many entries of closed connections
#: and they are over half of it
COMPACT_MIN: Final = 1024


class Deadlines:
    """Every connection's line deadline, soonest first."""

    __slots__ = ("_dead", "_heap")

    def __init__(self) -> None:
        self._heap: list[tuple[float, Timed]] = []
        self._dead = 0  # entries in the heap whose connection is closed

    def __len__(self) -> int:
        return len(self._heap)

    def watch(self, conn: Timed) -> None:
        """Make sure ``conn``'s deadline is in the heap (no-op if it has an entry)."""
        if not conn.in_deadlines and conn.deadline != NEVER and not conn.closed:
            heapq.heappush(self._heap, (conn.deadline, conn))
            conn.in_deadlines = True

    def forget(self, conn: Timed) -> None:
        """``conn`` has closed: its entry, if any, is dead from now on."""
        if conn.in_deadlines:
            self._dead += 1

    def next_due(self) -> float:
        """When the soonest entry comes due (NEVER when there is none)."""
        return self._heap[0][0] if self._heap else NEVER

    def due(self, now: float) -> Iterator[Timed]:
        """The open connections whose deadline has passed; each leaves the heap."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, conn = heapq.heappop(heap)
            conn.in_deadlines = False
            if conn.closed:
                self._dead -= 1
            elif conn.deadline <= now:
                yield conn
            else:
                self.watch(conn)  # moved later since it was pushed

    def compact(self) -> None:
        """Drop the entries of closed connections once they are most of the heap."""
        if self._dead <= COMPACT_MIN or 2 * self._dead <= len(self._heap):
            return
        live = []
        for entry in self._heap:
            if entry[1].closed:
                entry[1].in_deadlines = False
            else:
                live.append(entry)
        heapq.heapify(live)
        self._heap = live
        self._dead = 0
