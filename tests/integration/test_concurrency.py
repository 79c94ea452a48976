"""Many clients at once: every message stored once, whole, never interleaved."""

from __future__ import annotations

import random
import re
import selectors
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from selsmtp.config import Config
from selsmtp.deliveries import BATCH_POLL_BYTES, BATCH_POLL_MESSAGES
from selsmtp.session import Deliver
from selsmtp.store import open_store

from .conftest import (
    HELO,
    WAIT,
    RunningServer,
    WireClient,
    checked_body,
    ehlo_reply,
    greeting,
    make_config,
    read_mailbox,
    to_wire,
    transaction,
    verify_checked_body,
)

DELIVERED = re.compile(rb"250 2\.0\.0 Ok: delivered message (\d+)\r\n")


def run_clients(running: RunningServer, plans: list[list[bytes]], timeout: float) -> dict[str, int]:
    """One thread per plan; each connects, waits until all are connected, then sends
    its messages (stored-form bodies) pipelined in one go and QUIT.

    Returns the number each message's token was stored as, checking every reply.
    """
    start = threading.Barrier(len(plans), timeout=timeout)
    numbers: dict[str, int] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(bodies: list[bytes]) -> None:
        try:
            connection = WireClient(running.address)
            try:
                start.wait()
                connection.send(
                    f"EHLO {HELO}\r\n".encode()
                    + b"".join(
                        transaction("a@example.org", ["b@example.org"], to_wire(body))
                        for body in bodies
                    )
                    + b"QUIT\r\n"
                )
                transcript = connection.read_until_closed(timeout)
            finally:
                connection.close()
            got = [int(n) for n in DELIVERED.findall(transcript)]
            expected = greeting() + ehlo_reply()
            for number in got:
                expected += (
                    b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
                    + b"250 2.0.0 Ok: delivered message %d\r\n" % number
                )
            assert transcript == expected + b"221 2.0.0 Bye\r\n", transcript[-300:]
            assert len(got) == len(bodies)
            with lock:
                for body, number in zip(bodies, got, strict=True):
                    numbers[verify_checked_body(body)] = number
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(plan,)) for plan in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    if errors:
        raise errors[0]
    return numbers


def check_mailbox(mailbox: Path, numbers: dict[str, int]) -> None:
    """Every message once, whole, numbered 1..N in file order, as its client was told."""
    records = read_mailbox(mailbox)
    assert [r.number for r in records] == list(range(1, len(numbers) + 1))
    stored = {verify_checked_body(r.body): r.number for r in records}
    assert len(stored) == len(records)  # no token twice
    assert stored == numbers


@pytest.mark.timeout(60)
def test_thirty_clients_with_300_kb_messages_at_once(server: RunningServer, mailbox: Path) -> None:
    plans = [[checked_body(f"client{i:02d}", 300_000)] for i in range(32)]

    numbers = run_clients(server, plans, timeout=WAIT * 3)

    assert sorted(numbers.values()) == list(range(1, 33))
    check_mailbox(mailbox, numbers)


@pytest.mark.timeout(60)
def test_clients_pipelining_several_messages_of_mixed_sizes(
    start_server: Callable[..., RunningServer], mailbox: Path
) -> None:
    # A low spool threshold sends the larger bodies through temporary files.
    running = start_server(spool_threshold=64 * 1024)
    rng = random.Random(7)
    plans = [
        [
            checked_body(f"c{i:02d}m{j}", rng.choice([10, 2_000, 70_000, 400_000]))
            for j in range(rng.randrange(1, 5))
        ]
        for i in range(30)
    ]

    numbers = run_clients(running, plans, timeout=WAIT * 3)

    total = sum(len(plan) for plan in plans)
    assert sorted(numbers.values()) == list(range(1, total + 1))
    check_mailbox(mailbox, numbers)


@pytest.mark.stress
@pytest.mark.timeout(600)
def test_stress_many_clients_many_messages(
    start_server: Callable[..., RunningServer], mailbox: Path
) -> None:
    running = start_server(spool_threshold=256 * 1024)
    rng = random.Random(11)
    plans = [
        [
            checked_body(f"s{i:03d}m{j}", rng.choice([10, 5_000, 300_000, 2_000_000]))
            for j in range(rng.randrange(1, 6))
        ]
        for i in range(300)
    ]

    numbers = run_clients(running, plans, timeout=300)

    total = sum(len(plan) for plan in plans)
    assert sorted(numbers.values()) == list(range(1, total + 1))
    check_mailbox(mailbox, numbers)


class HeldPoll(selectors.DefaultSelector):
    """The server's selector, steerable. While ``gate`` is clear the loop waits
    (``holding`` set) before its next poll; a waiting poll (with ``every_poll``, every
    poll) that finds more than ``limit`` sockets ready reports only the first
    ``limit``, as if the others became ready while those were being served."""

    def __init__(self, *, limit: int = 1, every_poll: bool = False) -> None:
        super().__init__()
        self.limit = limit
        self.every_poll = every_poll
        self.gate = threading.Event()
        self.gate.set()
        self.holding = threading.Event()
        self.split = 0

    def hold(self, client: WireClient) -> None:
        """Have the loop wait at the gate: ``client``, in message data, sends a byte
        (a turn of the loop, and no reply), and the next poll waits."""
        self.gate.clear()
        client.send(b"x")
        assert self.holding.wait(WAIT)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout != 0 and not self.gate.is_set():
            self.holding.set()
            self.gate.wait(WAIT)
        events = super().select(timeout)
        if len(events) > self.limit and (timeout != 0 or self.every_poll):
            self.split += 1
            return events[: self.limit]
        return events


class RecordingStore:
    """The mailbox's own store, noting the size of every batch it is asked to append."""

    def __init__(self, config: Config) -> None:
        self.real = open_store(config)
        self.path = self.real.path
        self.batches: list[int] = []

    @property
    def last_number(self) -> int:
        return self.real.last_number

    def try_append(self, batch: Sequence[Deliver]) -> list[int] | None:
        self.batches.append(len(batch))
        return self.real.try_append(batch)

    def close(self) -> None:
        self.real.close()


def steered_server(
    start_server: Callable[..., RunningServer], mailbox: Path, poll: HeldPoll
) -> tuple[RunningServer, RecordingStore]:
    store = RecordingStore(make_config(mailbox))
    return start_server(server_options={"selector": poll, "store": store}), store


def clients_in_data(running: RunningServer, count: int) -> list[WireClient]:
    """``count`` clients, each past its 354: what they send next is message data."""
    clients = []
    for _ in range(count):
        clients.append(WireClient(running.address))
        clients[-1].handshake()
        for line in (b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.org>", b"DATA"):
            clients[-1].command(line)
    return clients


def finish_while_held(poll: HeldPoll, clients: list[WireClient], data: bytes) -> list[bytes]:
    """Every client sends ``data``, the rest of its message and its end, while the loop
    waits at the gate; then the loop goes on. Each client's reply; all are closed."""
    try:
        poll.hold(clients[0])
        for client in clients:
            client.send(data)
        poll.gate.set()
        return [client.read_reply() for client in clients]
    finally:
        for client in clients:
            client.close()


def test_a_message_finished_while_the_turn_runs_joins_its_batch(
    start_server: Callable[..., RunningServer], mailbox: Path
) -> None:
    poll = HeldPoll()
    server, store = steered_server(start_server, mailbox, poll)
    # both ends arrive while the loop waits: its poll reports one of them
    replies = finish_while_held(poll, clients_in_data(server, 2), b"line\r\n.\r\n")

    assert poll.split >= 1
    assert all(DELIVERED.fullmatch(reply) for reply in replies), replies
    assert store.batches == [2]  # the other end, found by an extra poll, joined the batch


@pytest.mark.parametrize(
    ("size", "batches"),
    [(100, [3]), (BATCH_POLL_BYTES // 2 + 1024, [2, 1])],  # two large ones pass the limit
    ids=["small-messages-poll-on", "large-messages-poll-once"],
)
def test_extra_polls_gather_small_messages_but_only_one_more_large_one(
    start_server: Callable[..., RunningServer], mailbox: Path, size: int, batches: list[int]
) -> None:
    poll = HeldPoll(every_poll=True)
    server, store = steered_server(start_server, mailbox, poll)
    data = b"y" * (size - 4) + b"\r\n.\r\n"
    replies = finish_while_held(poll, clients_in_data(server, 3), data)

    assert all(DELIVERED.fullmatch(reply) for reply in replies), replies
    assert store.batches == batches


def test_extra_polls_stop_once_the_batch_holds_enough_messages(
    start_server: Callable[..., RunningServer], mailbox: Path
) -> None:
    # ten ends a poll: 10, then 10 more by an extra poll (20, past the limit), then 5
    assert 10 < BATCH_POLL_MESSAGES <= 20
    poll = HeldPoll(limit=10, every_poll=True)
    server, store = steered_server(start_server, mailbox, poll)
    replies = finish_while_held(poll, clients_in_data(server, 25), b"short\r\n.\r\n")

    assert all(DELIVERED.fullmatch(reply) for reply in replies), replies
    assert store.batches == [20, 5]
