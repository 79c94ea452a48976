"""Helpers that drive a :class:`~selsmtp.session.Session` with bytes, as a client would.

* :func:`converse` feeds chunks of client bytes and returns what the server would put
  on the wire: every reply's bytes, and :data:`CLOSE_MARK` where the session closes.
  Each ``Deliver`` goes to a :class:`FakeStore`, whose answer (``delivered(n)`` or
  ``delivery_failed(4xx)``) is played at once, so pipelined input behind a message is
  answered in the same call, exactly as the server does after its store has answered.
* :func:`splits` cuts one input in many ways: whole, one byte at a time, and seeded
  random splittings.
* :func:`transcript` runs an input under every splitting from :func:`splits` and
  asserts that the replies, the stored messages and the final state never change; it
  returns that one :class:`Outcome` for the test to check against golden bytes.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, BinaryIO, Final, Literal, Protocol

from selsmtp import replies
from selsmtp.framing import Body
from selsmtp.replies import Reply
from selsmtp.session import Action, Close, Deliver, Envelope, Session, StartTLS, State

#: Where a ``Close`` action falls in the output of :func:`converse` (never valid SMTP).
CLOSE_MARK: Final = b"<close>"
#: Where a ``StartTLS`` action falls in the output of :func:`converse`.
STARTTLS_MARK: Final = b"<starttls>"


class MakeSession(Protocol):
    """The type of the ``make_session`` fixture: config overrides as keywords."""

    def __call__(
        self, *, new_spool: Callable[[], BinaryIO] | None = None, **overrides: Any
    ) -> Session: ...


Answer = Literal["stored", "busy", "failed"]
Message = tuple[Envelope, bytes]


def body_bytes(body: Body) -> bytes:
    """The bytes of a delivered body; a spooled body is read whole and closed."""
    if isinstance(body, bytes):
        return body
    try:
        return body.read()
    finally:
        body.close()


class FakeStore:
    """Stands in for the mailbox: stores every message, or refuses when told to.

    ``answers`` is consumed one per delivery: ``"stored"`` records the message and
    answers ``delivered(n)`` with the next number; ``"busy"`` and ``"failed"`` answer
    ``delivery_failed`` with the mailbox-busy or write-error 451. Once the answers run
    out, every message is stored.
    """

    REFUSALS: Final[dict[str, Reply]] = {
        "busy": replies.MAILBOX_BUSY,
        "failed": replies.WRITE_ERROR,
    }

    def __init__(self, answers: Iterable[Answer] = (), *, first_number: int = 1) -> None:
        self._answers: deque[Answer] = deque(answers)
        self.next_number = first_number
        #: (envelope, body) of every stored message, in the order they were stored
        self.messages: list[Message] = []
        #: (envelope, body) of every message the store refused
        self.refused: list[Message] = []

    def deliver(self, session: Session, deliver: Deliver) -> list[Action]:
        """Store (or refuse) ``deliver`` and return what the session answers to that."""
        message = (deliver.envelope, body_bytes(deliver.body))
        answer = self._answers.popleft() if self._answers else "stored"
        if answer != "stored":
            self.refused.append(message)
            return session.delivery_failed(self.REFUSALS[answer])
        self.messages.append(message)
        number = self.next_number
        self.next_number += 1
        return session.delivered(number)


def render(actions: Iterable[Action]) -> bytes:
    """Replies as wire bytes, ``Close`` as :data:`CLOSE_MARK` and ``StartTLS`` as
    :data:`STARTTLS_MARK`; no ``Deliver`` allowed."""
    out = bytearray()
    for action in actions:
        if isinstance(action, Reply):
            out += action.wire
        elif isinstance(action, Close):
            out += CLOSE_MARK
        elif isinstance(action, StartTLS):
            out += STARTTLS_MARK
        else:
            raise AssertionError(f"unexpected action {action!r}")
    return bytes(out)


def play(session: Session, actions: Iterable[Action], store: FakeStore) -> bytes:
    """Carry out ``actions`` in order; a ``Deliver`` is answered by ``store`` at once."""
    out = bytearray()
    pending: deque[Action] = deque(actions)
    while pending:
        action = pending.popleft()
        if isinstance(action, Deliver):
            pending.extendleft(reversed(store.deliver(session, action)))
        else:
            out += render([action])
    return bytes(out)


def converse(session: Session, *chunks: bytes, store: FakeStore | None = None) -> bytes:
    """Feed ``chunks`` to ``session`` one ``receive`` each; return the wire output.

    Deliveries go to ``store`` (a fresh :class:`FakeStore` that stores everything when
    none is given). ``b""`` as a chunk is the client closing its side.
    """
    store = FakeStore() if store is None else store
    out = bytearray()
    for chunk in chunks:
        out += play(session, session.receive(chunk), store)
    return bytes(out)


def splits(data: bytes, seed: int = 0, *, random_splits: int = 6) -> Iterator[list[bytes]]:
    """Ways to cut ``data`` into chunks: whole, one byte at a time, then seeded random cuts.

    Half of the random splittings cut at a few random points, half cut the whole input
    into pieces of one to seven bytes. The same ``seed`` and data give the same cuts.
    """
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(f"{seed}:{len(data)}")
    for round_ in range(random_splits):
        if len(data) < 2:
            return
        if round_ % 2 == 0:
            count = rng.randint(1, min(len(data) - 1, 12))
            cuts = sorted(rng.sample(range(1, len(data)), count))
        else:
            cuts, at = [], rng.randint(1, 7)
            while at < len(data):
                cuts.append(at)
                at += rng.randint(1, 7)
        yield [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def two_piece_splits(data: bytes) -> Iterator[list[bytes]]:
    """``data`` cut in two at every inner position."""
    for at in range(1, len(data)):
        yield [data[:at], data[at:]]


@dataclasses.dataclass
class Outcome:
    """What one run of a transcript produced."""

    #: the wire output: replies' bytes, with CLOSE_MARK where the session closed
    output: bytes
    #: the messages the store kept, with their bodies as bytes
    messages: list[Message]
    #: the messages the store refused
    refused: list[Message]
    #: the session's state at the end
    state: State
    #: the session of this run, to look at more closely (not compared)
    session: Session = dataclasses.field(compare=False, repr=False)

    @property
    def bodies(self) -> list[bytes]:
        return [body for _, body in self.messages]


def run(
    new_session: Callable[[], Session],
    chunks: Sequence[bytes],
    *,
    answers: Iterable[Answer] = (),
    eof: bool = False,
) -> Outcome:
    """One run: a fresh session and store, ``chunks`` fed in order, then maybe EOF."""
    session = new_session()
    store = FakeStore(answers)
    output = converse(session, *chunks, *([b""] if eof else []), store=store)
    return Outcome(output, store.messages, store.refused, session.state, session)


def cuts_of(chunks: Sequence[bytes]) -> list[int]:
    """The positions where ``chunks`` cut their input (for failure messages)."""
    positions, at = [], 0
    for chunk in chunks[:-1]:
        at += len(chunk)
        positions.append(at)
    return positions


def transcript(
    new_session: Callable[[], Session],
    data: bytes,
    *,
    answers: Iterable[Answer] = (),
    eof: bool = False,
    seed: int = 0,
    splittings: Callable[[bytes], Iterable[list[bytes]]] | None = None,
) -> Outcome:
    """Run ``data`` under every splitting and assert that nothing depends on the split.

    The replies, the stored and refused messages and the final state must be identical
    for the whole input, for one byte at a time and for the seeded random splittings
    (or for ``splittings(data)`` when given). Output after a close is a bug, so it is
    checked too. Returns the outcome of the run with the whole input.
    """
    answers = list(answers)
    expected = run(new_session, [data], answers=answers, eof=eof)
    assert_closes_last(expected.output)
    cuttings = splits(data, seed) if splittings is None else splittings(data)
    for chunks in cuttings:
        got = run(new_session, chunks, answers=answers, eof=eof)
        assert got == expected, f"the outcome changed when the input was cut at {cuts_of(chunks)}"
    return expected


def assert_closes_last(output: bytes) -> None:
    """A session closes at most once, and says nothing after closing."""
    assert output.count(CLOSE_MARK) <= 1, output
    if CLOSE_MARK in output:
        assert output.endswith(CLOSE_MARK), f"output after the close: {output!r}"


# -- building blocks for transcripts -----------------------------------------

#: A greeted session with one message's envelope, ready for DATA (``DATA`` not included).
ENVELOPE: Final = (
    b"HELO client.example\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\n"
)

#: The replies to :data:`ENVELOPE` with the test configuration's name.
ENVELOPE_REPLIES: Final = b"250 test.example\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"

#: The 354 reply, as bytes.
GO_AHEAD: Final = b"354 End data with <CR><LF>.<CR><LF>\r\n"


def message(
    body: bytes, *, sender: bytes = b"alice@example.org", rcpt: bytes = b"bob@example.net"
) -> bytes:
    """MAIL, RCPT, DATA, ``body`` and the end-of-data line (``body`` ends in CRLF or is empty)."""
    return b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n%s.\r\n" % (sender, rcpt, body)


def delivered(number: int) -> bytes:
    """The golden bytes of the 250 for message ``number``."""
    return b"250 2.0.0 Ok: delivered message %d\r\n" % number


#: Input that takes a fresh session to each state (DELIVERING: the store has not answered).
TO_STATE: Final[dict[State, bytes]] = {
    State.FRESH: b"",
    State.READY: b"HELO client.example\r\n",
    State.MAIL: b"HELO client.example\r\nMAIL FROM:<alice@example.org>\r\n",
    State.RCPT: ENVELOPE,
    State.DATA: ENVELOPE + b"DATA\r\npartial line\r\n",
    State.DELIVERING: ENVELOPE + b"DATA\r\nwhole message\r\n.\r\n",
    State.CLOSED: b"QUIT\r\n",
}


def session_in(new_session: Callable[[], Session], state: State) -> tuple[Session, list[Action]]:
    """A fresh session driven to ``state`` with raw ``receive`` (nothing is delivered).

    Returns the session and the actions it produced on the way; for ``DELIVERING`` the
    last of them is the ``Deliver`` the store has not answered yet.
    """
    session = new_session()
    actions = session.receive(TO_STATE[state]) if TO_STATE[state] else []
    assert session.state is state
    return session, actions
