"""Fault tests for the durability promises of SPEC §5.3, §5.5 and §6.

Every fault here is real: a filesystem that really fills up (a size-limited tmpfs),
the real order of system calls as ``strace`` records them, ``kill -9`` at random
moments during a load, I/O errors and crashes injected into chosen system calls by
``strace --inject``, and start-up on a mailbox of real records a gigabyte long. The
server is ``python -m selsmtp`` in a child process wherever a crash is involved.

What is checked against the store's design (see the docstring of ``selsmtp/store.py``):
the state file ``PATH.selsmtp`` is the commit marker. It gets the batch's start and
end offsets ("pending") before the batch is written, and the committed length after
the mailbox is fsync'd, which is the one fsync a batch costs. Bytes past the start of
a batch that was being written when the process died are a torn tail, removed at the
next start-up with a log line saying so; the numbers of such a batch stay reserved.
(What a power cut can do to an unsynced state line is tested in tests/unit/test_store.py.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import (
    HELO,
    NAME,
    RECORD_HEAD,
    START_DATA,
    WAIT,
    ConnectionClosed,
    LockHolder,
    Record,
    WireClient,
    checked_body,
    delivered,
    read_mailbox,
    split_records,
    to_wire,
    transaction,
    verify_checked_body,
)
from .processes import SelsmtpProcess

pytestmark = pytest.mark.timeout(90)

DELIVERED = re.compile(rb"250 2\.0\.0 Ok: delivered message (\d+)\r\n")
WRITE_ERROR = b"451 4.3.0 Error: queue file write error\r\n"
OK = b"250 2.0.0 Ok\r\n"
SENDER = "a@example.org"
RECIPIENT = "b@example.org"
TORN = "torn tail"
#: quiet servers: a log line per delivery would fill the stderr pipe nobody reads
QUIET_LOG = ("--log-level", "warning")


def send_body(client: WireClient, body: bytes) -> bytes:
    """Send one transaction with a stored-form ``body``; return the reply to its data."""
    client.send(transaction(SENDER, [RECIPIENT], to_wire(body)))
    assert client.read_replies(3) == [b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n", START_DATA]
    return client.read_reply()


def record_bytes(number: int, body: bytes) -> bytes:
    """The exact cs4410 record (SPEC §5.1) of a message sent by :func:`send_body`."""
    head = (
        f"Received: from {HELO} by {NAME} (CS4410MP3)\nNumber: {number}\n"
        f"From: {SENDER}\nTo: {RECIPIENT}\n\n"
    )
    return head.encode() + body + b"\n"


def plain_body(length: int) -> bytes:
    """A stored-form body of exactly ``length`` bytes (at least 1), lines of 100 bytes."""
    assert length >= 1
    full, rest = divmod(length, 100)
    lines = [b"f" * 99 + b"\n"] * full
    if rest:
        lines.append(b"g" * (rest - 1) + b"\n")
    return b"".join(lines)


def stop(process: SelsmtpProcess) -> str:
    """SIGTERM, check the clean exit, return stderr."""
    process.signal(signal.SIGTERM)
    code, _, err = process.wait()
    assert code == 0, err
    assert "Traceback" not in err, err
    return err


Launch = Callable[[Path], SelsmtpProcess]


@pytest.fixture
def launch() -> Iterator[Launch]:
    """``launch(mailbox)``: a quiet ``python -m selsmtp``; killed at teardown if alive."""
    started: list[SelsmtpProcess] = []

    def start(mailbox: Path) -> SelsmtpProcess:
        process = SelsmtpProcess(mailbox, *QUIET_LOG)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def check_records(records: list[Record], acknowledged: dict[str, int]) -> dict[str, int]:
    """Every record intact, numbers strictly increasing, no message twice, and every
    acknowledged message there with the number its 250 gave. Returns token → number."""
    numbers = [record.number for record in records]
    assert numbers == sorted(set(numbers)), f"numbers not strictly increasing: {numbers}"
    stored: dict[str, int] = {}
    for record in records:
        token = verify_checked_body(record.body)
        assert token not in stored, f"{token} stored twice"
        stored[token] = record.number
    missing = {t: n for t, n in acknowledged.items() if stored.get(t) != n}
    assert not missing, f"acknowledged but missing or renumbered: {sorted(missing.items())[:10]}"
    return stored


# -- 1. a filesystem that really fills up -------------------------------------------

SMALL_FS_SIZE = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A folder on a freshly mounted 1 MiB tmpfs (unmounted at teardown)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    where = tmp_path / "small"
    where.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_SIZE}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("no mount command")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=WAIT, check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_disk_full_on_a_real_filesystem(small_fs: Path, launch: Launch) -> None:
    mailbox = small_fs / "mailbox"
    process = launch(mailbox)
    client = process.connect()
    other = process.connect()
    try:
        client.handshake()
        other.handshake()
        first = checked_body("first", 2_000)
        assert send_body(client, first) == delivered(1)

        # Leave 64 KiB free; then a 200 KB message cannot fit. The kernel takes part
        # of the record (a short write) before it says ENOSPC: nothing of it may stay.
        filler = small_fs / "filler"
        filler.write_bytes(b"\0" * (free_bytes(small_fs) - 64 * 1024))
        assert free_bytes(small_fs) == 64 * 1024
        before = mailbox.read_bytes()
        assert send_body(client, checked_body("too-big", 200_000)) == WRITE_ERROR
        assert mailbox.read_bytes() == before
        assert free_bytes(small_fs) == 64 * 1024  # the cut gave the pages back
        assert other.command(b"NOOP") == OK  # the server keeps serving others
        assert client.command(b"NOOP") == OK  # ... and this session goes on

        # A record that takes exactly the space left: the slack of the file's last
        # page plus every free page. It fits, and gets the next number.
        page = os.statvfs(small_fs).f_frsize
        room = free_bytes(small_fs) + (-len(before)) % page
        exact = plain_body(room - len(record_bytes(2, b"")))
        assert send_body(client, exact) == delivered(2)
        assert mailbox.read_bytes() == before + record_bytes(2, exact)
        assert free_bytes(small_fs) == 0

        # Now not even a tiny message fits.
        full = mailbox.read_bytes()
        assert send_body(other, b"tiny\n") == WRITE_ERROR
        assert mailbox.read_bytes() == full
        assert client.command(b"NOOP") == OK

        # Room again: the next message gets the next number, the file is whole.
        filler.unlink()
        last = checked_body("after", 5_000)
        assert send_body(client, last) == delivered(3)
        assert send_body(other, checked_body("other", 300)) == delivered(4)
    finally:
        client.close()
        other.close()
    err = stop(process)
    assert err.count("refused with 451") == 2, err
    records = read_mailbox(mailbox)
    assert [r.number for r in records] == [1, 2, 3, 4]
    assert [r.body for r in records][:3] == [first, exact, last]
    assert mailbox.read_bytes().startswith(full)


# -- 2. the order of effects, as strace sees it -------------------------------------


def strace_path() -> str:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    probe = subprocess.run(
        [strace, "-f", "-o", os.devnull, "true"], capture_output=True, timeout=WAIT, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.decode(errors='replace').strip()}")
    return strace


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (from /proc, no extra kernel options)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == parent:
            found.append(int(entry))
    return found


class TracedServer:
    """``strace ... python -m selsmtp``. Signals go to selsmtp itself, not to strace
    (strace outlives a SIGTERM sent to it, and the server would keep running)."""

    def __init__(self, mailbox: Path, strace_args: list[str]) -> None:
        self.process = SelsmtpProcess(
            mailbox, *QUIET_LOG, wrapper=[strace_path(), "-f", *strace_args]
        )
        children = child_pids(self.process.pid)
        assert len(children) == 1, children
        self.server_pid = children[0]

    def connect(self) -> WireClient:
        return self.process.connect()

    def stop(self) -> str:
        os.kill(self.server_pid, signal.SIGTERM)
        code, _, err = self.process.wait()
        assert code == 0, err
        return err

    def wait_killed(self) -> None:
        """The server died of an injected SIGKILL; strace ends with it."""
        code, _, _ = self.process.wait()
        assert code == -signal.SIGKILL, code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.server_pid, signal.SIGKILL)
        self.process.kill()


@pytest.fixture
def traced() -> Iterator[Callable[[Path, list[str]], TracedServer]]:
    """``traced(mailbox, strace_args)``: selsmtp under strace; killed at teardown."""
    started: list[TracedServer] = []

    def launch(mailbox: Path, strace_args: list[str]) -> TracedServer:
        server = TracedServer(mailbox, strace_args)
        started.append(server)
        return server

    yield launch
    for server in started:
        server.kill()


def unread_bytes(server_port: int, client_port: int) -> int:
    """Bytes a loopback client sent that the server process has not read yet: what its
    socket has not had acknowledged plus what waits in the server socket's queue."""
    pending = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local = int(fields[1].rpartition(":")[2], 16)
        remote = int(fields[2].rpartition(":")[2], 16)
        tx_queue, rx_queue = (int(value, 16) for value in fields[4].split(":"))
        if (local, remote) == (client_port, server_port):
            pending += tx_queue
        elif (local, remote) == (server_port, client_port):
            pending += rx_queue
    return pending


def wait_until_read(server_port: int, clients: list[WireClient]) -> None:
    """Wait (bounded) until the server has read everything these clients sent."""
    ports = [client.sock.getsockname()[1] for client in clients]
    deadline = time.monotonic() + WAIT
    while any(unread_bytes(server_port, port) for port in ports):
        assert time.monotonic() < deadline, "the server did not read what was sent"
        time.sleep(0.005)


@dataclasses.dataclass(frozen=True)
class Call:
    """One system call from the trace, on a descriptor that strace -y named."""

    index: int
    name: str
    path: str
    text: str  # the arguments after the descriptor, as strace printed them
    result: int


CALL = re.compile(
    r"^(?:\[pid\s+)?\d+\]?\s+(?P<name>\w+)\((?P<fd>\d+)<(?P<path>[^>]*)>(?P<text>.*)\)"
    r"\s+=\s+(?P<result>-?\d+)"
)
#: the state line: magic, version, last number, committed size, device, inode, pending...
STATE_LINE = re.compile(r'"selsmtp-state \d+ (\d+) (-?\d+) -?\d+ -?\d+ (-?\d+) ')
SENDS = ("sendto", "send", "sendmsg", "write", "writev")
WRITES = ("write", "writev", "pwrite64", "pwritev", "pwritev2")
SYNCS = ("fsync", "fdatasync")


def parse_trace(text: str) -> list[Call]:
    """The calls of an ``strace -f -y`` log, ``<unfinished ...>`` pieces joined."""
    unfinished: dict[str, str] = {}
    calls: list[Call] = []
    for raw in text.splitlines():
        pid, _, rest = raw.lstrip("[pid ").partition(" ")
        line = raw
        if raw.endswith("<unfinished ...>"):
            unfinished[pid] = raw[: -len("<unfinished ...>")].rstrip()
            continue
        resumed = re.match(r"\s*<\.\.\. \w+ resumed>(.*)$", rest)
        if resumed:
            line = unfinished.pop(pid, "") + resumed[1]
        match = CALL.match(line)
        if match:
            calls.append(
                Call(len(calls), match["name"], match["path"], match["text"], int(match["result"]))
            )
    return calls


def check_order_of_effects(calls: list[Call], mailbox: str) -> dict[int, int]:
    """For each ``delivered message N`` sent to a client, check what came before it.

    Returns N → the index of the mailbox write that carried record N.
    """
    state = mailbox + ".selsmtp"

    def state_line(call: Call) -> tuple[int, int, int]:
        match = STATE_LINE.search(call.text)
        assert match, f"not a state line: {call.text[:150]}"
        number, size, pending = map(int, match.groups())
        return number, size, pending

    sends = [
        (int(number), call.index)
        for call in calls
        if call.name in SENDS and ("socket:" in call.path or "TCP" in call.path)
        for number in re.findall(r"delivered message (\d+)\\r\\n", call.text)
    ]
    assert sends, "no 250 reply in the trace"
    carried: dict[int, int] = {}
    for number, sent in sends:
        writes = [
            c
            for c in calls[:sent]
            if c.name in WRITES and c.path == mailbox and f"Number: {number}\\n" in c.text
        ]
        assert len(writes) == 1, f"message {number}: mailbox writes {writes}"
        write = writes[0]
        assert write.result > 0, write
        carried[number] = write.index
        # the commit marker's first half: the batch's start offset, before the write
        marks = [c for c in calls[: write.index] if c.name in WRITES and c.path == state]
        assert marks, f"message {number}: no state written before its record"
        reserved, _, pending = state_line(marks[-1])
        assert pending >= 0 and reserved >= number, marks[-1]
        # then the mailbox fsync, the committed length (no fsync: see FileStore), the 250
        between = calls[write.index + 1 : sent]
        synced = next((c for c in between if c.name in SYNCS and c.path == mailbox), None)
        assert synced is not None, f"message {number}: 250 sent before the mailbox fsync"
        assert synced.result == 0, synced
        after_sync = calls[synced.index + 1 : sent]
        commit = next((c for c in after_sync if c.name in WRITES and c.path == state), None)
        assert commit is not None, f"message {number}: 250 sent before its commit was recorded"
        committed, size, pending = state_line(commit)
        assert pending == -1 and committed >= number and size > 0, commit
    return carried


def test_every_250_follows_its_write_and_its_fsync(
    traced: Callable[[Path, list[str]], TracedServer], tmp_path: Path
) -> None:
    mailbox = tmp_path / "mailbox"
    trace = tmp_path / "trace"
    syscalls = "write,writev,pwrite64,fsync,fdatasync,sendto,sendmsg,?send"
    server = traced(mailbox, ["-y", "-s", "1024", "-e", f"trace={syscalls}", "-o", str(trace)])
    one = server.connect()
    two = server.connect()
    try:
        one.handshake()
        two.handshake()
        # two messages one after the other in one session
        assert send_body(one, b"first\n") == delivered(1)
        assert send_body(one, b"second\n") == delivered(2)
        # two clients finish while a reader holds the lock: one batch, one fsync
        holder = LockHolder(mailbox, fcntl.LOCK_EX)
        try:
            for client, body in ((one, b"third\n"), (two, b"fourth\n")):
                client.send(transaction(SENDER, [RECIPIENT], to_wire(body)))
                assert client.read_replies(3)[-1] == START_DATA
            wait_until_read(server.process.port, [one, two])
        finally:
            holder.release()
        replies = sorted(client.read_reply() for client in (one, two))
        assert replies == [delivered(3), delivered(4)]
    finally:
        one.close()
        two.close()
    server.stop()

    calls = parse_trace(trace.read_text())
    carried = check_order_of_effects(calls, os.path.realpath(mailbox))
    assert sorted(carried) == [1, 2, 3, 4]
    assert carried[3] == carried[4], "the two messages finished together were not one batch"
    # one fsync per batch; the state file's only at the start (which reserves the
    # numbers these batches take) and at the clean stop
    syncs = [c.path for c in calls if c.name in SYNCS and c.path.endswith((".selsmtp", "mailbox"))]
    assert syncs.count(os.path.realpath(mailbox)) == 3
    assert syncs.count(os.path.realpath(mailbox) + ".selsmtp") == 2
    assert [r.number for r in read_mailbox(mailbox)] == [1, 2, 3, 4]


# -- 3. kill -9 at random moments -------------------------------------------------

CRASH_ROUNDS = 5
CRASH_CLIENTS = 10
#: body sizes, weighted toward small ones; the big ones are spooled and take long
#: enough to write that a kill can land in the middle of one
CRASH_SIZES = (1_000, 1_000, 4_000, 16_000, 64_000, 256_000, 1_000_000, 2_000_000)


class CrashLoad:
    """Client threads delivering checked bodies until the server goes away.

    ``acknowledged`` maps the token of every message that got its 250 to the number
    that 250 gave. A client ends quietly when the connection breaks; anything else
    (a wrong reply, a timeout) is kept in ``errors``.
    """

    def __init__(self, address: tuple[str, int], name: str, seed: int) -> None:
        self.acknowledged: dict[str, int] = {}
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(address, f"{name}c{i}", seed + i))
            for i in range(CRASH_CLIENTS)
        ]
        for thread in self._threads:
            thread.start()

    def _client(self, address: tuple[str, int], prefix: str, seed: int) -> None:
        rng = random.Random(seed)
        try:
            client = WireClient(address)
        except ConnectionRefusedError:
            return
        try:
            client.handshake()
            for i in range(10_000):
                token = f"{prefix}m{i}"
                reply = send_body(client, checked_body(token, rng.choice(CRASH_SIZES)))
                match = DELIVERED.fullmatch(reply)
                assert match, reply
                with self._lock:
                    self.acknowledged[token] = int(match[1])
        except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
            return  # the server was killed
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            client.close()

    def join(self) -> dict[str, int]:
        for thread in self._threads:
            thread.join(WAIT)
        assert not any(thread.is_alive() for thread in self._threads), "a client hung"
        if self.errors:
            raise self.errors[0]
        return self.acknowledged


def test_kill_9_at_random_moments_loses_nothing_acknowledged(
    tmp_path: Path, launch: Launch
) -> None:
    rng = random.Random(4410)
    mailbox = tmp_path / "mailbox"
    acknowledged: dict[str, int] = {}
    process = launch(mailbox)
    cut_at_start = False  # did the start-up of `process` remove a torn tail?
    seen_numbers = 0  # the largest number ever written, torn tails included
    cuts = []
    for round_ in range(CRASH_ROUNDS):
        load = CrashLoad(process.address, f"r{round_}", seed=1000 * round_)
        time.sleep(rng.uniform(0.2, 1.0))  # the random moment of the crash
        process.proc.kill()
        code, _, err = process.wait()
        assert code == -signal.SIGKILL
        assert (TORN in err) == cut_at_start, err
        new = load.join()
        assert min(new.values(), default=seen_numbers + 1) > seen_numbers, "a number repeated"
        acknowledged.update(new)

        crashed = mailbox.read_bytes()
        heads = RECORD_HEAD.finditer(crashed)
        seen_numbers = max((int(m["number"]) for m in heads), default=seen_numbers)
        process = launch(mailbox)
        recovered = mailbox.read_bytes()
        assert crashed.startswith(recovered), "start-up changed more than a torn tail"
        cut_at_start = len(recovered) < len(crashed)
        cuts.append(len(crashed) - len(recovered))
        check_records(split_records(recovered), acknowledged)

    assert len(acknowledged) >= 10 * CRASH_ROUNDS, "too little was delivered to prove much"
    client = process.connect()
    try:
        client.handshake()
        reply = send_body(client, checked_body("final", 500))
    finally:
        client.close()
    match = DELIVERED.fullmatch(reply)
    assert match and int(match[1]) > seen_numbers, reply
    acknowledged["final"] = int(match[1])
    err = stop(process)
    assert (TORN in err) == cut_at_start, err
    stored = check_records(read_mailbox(mailbox), acknowledged)
    print(
        f"\n{len(acknowledged)} acknowledged, {len(stored)} stored over {CRASH_ROUNDS} kills;"
        f" torn tails removed (bytes): {cuts}"
    )


# -- 3b. faults injected into chosen system calls --------------------------------


def first_message(launch: Launch, mailbox: Path) -> bytes:
    """Deliver message 1 with a plain server and stop it; return the mailbox bytes."""
    process = launch(mailbox)
    client = process.connect()
    try:
        client.handshake()
        assert send_body(client, b"acknowledged\n") == delivered(1)
    finally:
        client.close()
    stop(process)
    return mailbox.read_bytes()


#: a body written in more than one writev (the store writes a batch in chunks of 4 MiB;
#: the tests check that a first chunk really was written before the fault)
MULTI_CHUNK = 10_000_000


@pytest.mark.parametrize(
    ("fault", "size"),
    [
        # the mailbox fsync of message 2 fails: never retried into a 250
        ("-P {mailbox} -e trace=fsync -e inject=fsync:error=EIO:when=1", 100),
        # the state file's fsync fails when message 2 takes a new reserve of numbers
        # (the server's first batch; the first fsync of the line is the start's own)
        ("-P {mailbox}.selsmtp -e trace=fsync -e inject=fsync:error=EIO:when=2", 100),
        # the disk fills up after a first chunk of a large record was written
        ("-P {mailbox} -e trace=writev -e inject=writev:error=ENOSPC:when=2", MULTI_CHUNK),
        # an I/O error on the first write of message 2
        ("-P {mailbox} -e trace=writev -e inject=writev:error=EIO:when=1", 100),
    ],
    ids=["mailbox-fsync-EIO", "state-fsync-EIO", "ENOSPC-mid-record", "writev-EIO"],
)
def test_injected_io_error_gives_451_and_leaves_nothing(
    traced: Callable[[Path, list[str]], TracedServer],
    launch: Launch,
    tmp_path: Path,
    fault: str,
    size: int,
) -> None:
    mailbox = tmp_path / "mailbox"
    before = first_message(launch, mailbox)
    where = os.path.realpath(mailbox)
    server = traced(mailbox, ["-qq", "-o", os.devnull, *fault.format(mailbox=where).split()])
    client = server.connect()
    try:
        client.handshake()
        assert send_body(client, checked_body("failed", size)) == WRITE_ERROR
        assert mailbox.read_bytes() == before
        assert client.command(b"NOOP") == OK
        later = checked_body("later", 300)
        assert send_body(client, later) == delivered(2)
    finally:
        client.close()
    err = server.stop()
    assert "refused with 451" in err, err
    assert mailbox.read_bytes() == before + record_bytes(2, later)


@pytest.mark.parametrize(
    ("fault", "size"),
    [
        # killed between two chunks of a large record: half a record on disk
        ("-P {mailbox} -e trace=writev -e inject=writev:signal=SIGKILL:when=2", MULTI_CHUNK),
        # killed before the mailbox fsync: a whole record on disk, never committed
        ("-P {mailbox} -e trace=fsync -e inject=fsync:signal=SIGKILL:when=1", 5_000),
    ],
    ids=["mid-record", "record-looks-whole"],
)
def test_crash_mid_append_leaves_a_torn_tail_that_start_up_removes(
    traced: Callable[[Path, list[str]], TracedServer],
    launch: Launch,
    tmp_path: Path,
    fault: str,
    size: int,
) -> None:
    mailbox = tmp_path / "mailbox"
    before = first_message(launch, mailbox)
    where = os.path.realpath(mailbox)
    server = traced(mailbox, ["-qq", "-o", os.devnull, *fault.format(mailbox=where).split()])
    client = server.connect()
    try:
        client.handshake()
        client.send(transaction(SENDER, [RECIPIENT], to_wire(checked_body("cut", size))))
        assert client.read_replies(3)[-1] == START_DATA
        with pytest.raises(ConnectionClosed):
            client.read_reply()
    finally:
        client.close()
    server.wait_killed()
    crashed = mailbox.read_bytes()
    assert len(crashed) > len(before) and crashed.startswith(before), "no torn tail to test"
    assert b"Number: 2\n" in crashed

    process = launch(mailbox)
    assert mailbox.read_bytes() == before  # removed before the server listens
    client = process.connect()
    try:
        client.handshake()
        later = checked_body("later", 300)
        # number 2 may have been seen by a reader: it stays reserved
        assert send_body(client, later) == delivered(3)
    finally:
        client.close()
    err = stop(process)
    torn = [line for line in err.splitlines() if TORN in line]
    assert len(torn) == 1, err
    assert f" {len(crashed) - len(before)} bytes" in torn[0], torn
    assert mailbox.read_bytes() == before + record_bytes(3, later)


def append_under_lock(mailbox: Path, data: bytes) -> None:
    """Append ``data`` as another program would: under ``lockf(LOCK_EX)``. (Done in the
    test process: the server is another process, so the lock really excludes it.)"""
    fd = os.open(mailbox, os.O_WRONLY | os.O_APPEND)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def test_deferred_torn_tail_repair_keeps_what_another_program_appended(
    traced: Callable[[Path, list[str]], TracedServer], launch: Launch, tmp_path: Path
) -> None:
    mailbox = tmp_path / "mailbox"
    before = first_message(launch, mailbox)
    kill = "-e trace=writev -e inject=writev:signal=SIGKILL:when=2"
    server = traced(
        mailbox, ["-qq", "-o", os.devnull, "-P", os.path.realpath(mailbox), *kill.split()]
    )
    client = server.connect()
    try:
        client.handshake()
        client.send(transaction(SENDER, [RECIPIENT], to_wire(checked_body("cut", MULTI_CHUNK))))
        with pytest.raises(ConnectionClosed):
            client.read_replies(4)
    finally:
        client.close()
    server.wait_killed()
    assert mailbox.stat().st_size > len(before), "no torn tail to test"

    holder = LockHolder(mailbox, fcntl.LOCK_SH)  # a reader at the moment of the restart
    try:
        process = launch(mailbox)
    finally:
        holder.release()
    block = b"=====FOREIGN=====\nappended under the lock by another program\n"
    append_under_lock(mailbox, block)
    client = process.connect()
    try:
        client.handshake()
        later = checked_body("later", 300)
        assert send_body(client, later) == delivered(3)
    finally:
        client.close()
    stop(process)
    data = mailbox.read_bytes()
    assert data.startswith(before)
    assert data.endswith(record_bytes(3, later))
    assert block in data, "a block another program appended under the lock was cut away"


# -- 4. start-up time with a large mailbox ------------------------------------------


def write_mailbox(path: Path, size: int) -> int:
    """Write real cs4410 records (numbers 1, 2, ...) until the file is ``size`` bytes or
    a little more; return the last number. Nothing sparse: every byte is written."""
    body = checked_body("old", 4_000)
    head = (
        f"Received: from {HELO} by {NAME} (CS4410MP3)\nNumber: %d\n"
        f"From: {SENDER}\nTo: {RECIPIENT}\n\n"
    ).encode()
    number = written = 0
    with path.open("wb", buffering=8 << 20) as out:
        while written < size:
            chunk = b"".join(head % n + body + b"\n" for n in range(number + 1, number + 257))
            out.write(chunk)
            written += len(chunk)
            number += 256
    return number


def timed_start(launch: Launch, mailbox: Path) -> tuple[float, SelsmtpProcess]:
    since = time.monotonic()
    process = launch(mailbox)
    return time.monotonic() - since, process


def check_start_up_time(launch: Launch, tmp_path: Path, size: int) -> None:
    baseline, process = timed_start(launch, tmp_path / "empty")
    stop(process)
    mailbox = tmp_path / "mailbox"
    try:
        last = write_mailbox(mailbox, size)
        length = mailbox.stat().st_size
        timings = {}
        for case, expected in (("no state file", last + 1), ("state file", last + 2)):
            assert Path(f"{mailbox}.selsmtp").exists() == (case == "state file")
            timings[case], process = timed_start(launch, mailbox)
            client = process.connect()
            try:
                client.handshake()
                assert send_body(client, checked_body(case, 100)) == delivered(expected)
            finally:
                client.close()
            stop(process)
        with mailbox.open("rb") as tail:
            tail.seek(length)
            assert [r.number for r in split_records(tail.read())] == [last + 1, last + 2]
    finally:
        mailbox.unlink(missing_ok=True)
    print(
        f"\nstart-up with a {length / 1e6:.0f} MB mailbox ({last} records):"
        f" {timings['state file']:.3f} s with the state file,"
        f" {timings['no state file']:.3f} s without; empty mailbox {baseline:.3f} s"
    )
    assert timings["state file"] < 2.0
    assert timings["no state file"] < 2.0


def test_start_up_is_fast_with_a_50_mb_mailbox(launch: Launch, tmp_path: Path) -> None:
    check_start_up_time(launch, tmp_path, 50 << 20)


@pytest.mark.stress
@pytest.mark.timeout(300)
def test_start_up_is_fast_with_a_1_gb_mailbox(launch: Launch, tmp_path: Path) -> None:
    check_start_up_time(launch, tmp_path, 1 << 30)


def test_no_state_file_a_quoted_record_head_does_not_rewind_numbers(
    launch: Launch, tmp_path: Path
) -> None:
    mailbox = tmp_path / "mailbox"
    process = launch(mailbox)
    client = process.connect()
    try:
        client.handshake()
        assert send_body(client, b"one\n") == delivered(1)
        assert send_body(client, b"two\n") == delivered(2)
        # a message that quotes a mailbox record, e.g. a student mailing their mailbox
        quoting = checked_body("quote", 3_000_000) + (
            f"Received: from {HELO} by {NAME} (CS4410MP3)\nNumber: 1\nFrom: {SENDER}\n".encode()
        )
        assert send_body(client, quoting) == delivered(3)
    finally:
        client.close()
    stop(process)
    Path(f"{mailbox}.selsmtp").unlink()  # lost, or a mailbox from before state files

    process = launch(mailbox)
    client = process.connect()
    try:
        client.handshake()
        reply = send_body(client, b"four\n")
    finally:
        client.close()
    stop(process)
    assert reply == delivered(4)
