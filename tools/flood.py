#!/usr/bin/env python3
"""flood: load generator and integrity checker for SMTP servers on this machine.

Usage (from anywhere; only the standard library is needed)::

    python tools/flood.py --port 8765 --clients 50 --messages 100 --mailbox ./mailbox

Theory of operation
-------------------
Each process runs one ``selectors`` loop over non-blocking sockets, with no threads.
Every client is a *conversation*: a generator that yields the bytes to send and is
resumed with the next reply as ``(code, text)``. The loop does the I/O: it sends what
a conversation yields (whole, in random pieces, or one byte per ``send`` with
``--split``), cuts replies out of the input (multi-line ones included) and feeds them
back. A conversation that returns has finished its connection; the client then opens
a new one while it still has messages to send. Every wait for a reply is bounded by
``--timeout``, every client by ``--messages``, and the start of new messages by
``--duration``, so a run always ends.

With ``--tls`` or ``--starttls`` each connection runs its TLS on memory buffers
(``ssl.MemoryBIO``) inside the same loop; ``--auth USER:PASS`` adds AUTH PLAIN. By
default the server's certificate is not checked (a load tool pointed at a test server
with a self-signed certificate); ``--cafile FILE`` checks it against that CA and checks
the host name (``--host``), and a connection whose certificate fails ends with the
reason, e.g. ``TLS handshake failed: certificate verify failed: unable to get local
issuer certificate``.

``--processes P`` forks P such loops and spreads the clients over them; their results
are merged. Bodies are built from one pre-generated filler buffer by slicing, so no
per-byte Python loop runs anywhere: ``bytes.replace`` does the CRLF and dot-stuffing
work and ``hashlib`` the checksums.

Every message body starts with three header lines::

    Subject: flood TOKEN
    X-Flood-Token: TOKEN
    X-Flood-Sha256: SHA256 OF EVERYTHING AFTER THE BLANK LINE THAT FOLLOWS

TOKEN is ``RUN.CLIENT.MESSAGE`` (RUN is random per run), so a record can be traced
to the message that made it. The rest is filler: random text lines with 8-bit bytes,
lines that need dot-stuffing, and lines that look like mailbox headers. ``--size`` is
the body's length as stored (LF line ends, dots unstuffed).

With ``--mailbox PATH`` the mailbox is read afterwards under a shared lock and checked
(``--format`` cs4410, mbox or maildir): every acknowledged message must be there
exactly once, with the number its ``250`` gave, its sender, recipients and HELO
name, and a body whose length and checksum match; messages refused with an error
reply must not be there. The mailbox
itself is checked by :func:`selsmtp.read_mailbox`, the code behind
``python -m selsmtp.inbox check``, with gaps reported as its ``--strict`` does: whole
records, numbers unique and increasing with no gap, no torn tail. ``--save FILE``
keeps what is needed to run the check again later with ``--verify-only FILE``.

This tool is for load tests of servers on this machine: it refuses any address that
is not a loopback address.

Exit status: 0 if every reply was the one expected and every check passed, 1 if not,
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import errno
import hashlib
import ipaddress
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import resource
import selectors
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

# The repository root (the parent of tools/) holds the selsmtp package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from selsmtp import reader
from selsmtp.argtypes import fraction, non_negative_int, port_number, positive_float, positive_int

Reply = tuple[int, bytes]  # (code, the whole reply with its line ends); code 0: closed
Conversation = Generator[bytes, Reply, None]
#: yielded by a conversation after the 220 to STARTTLS: run the handshake, then resume
#: the conversation with TLS_UP (compared by identity, never sent)
STARTTLS_NOW = b"<starttls>"
TLS_UP: Reply = (220, b"TLS handshake done")

EOF_REPLY: Reply = (0, b"")  # the server closed the connection; b"" or why
TIMEOUT_REPLY: Reply = (-2, b"(no reply in time)")
#: error replies a session may get before the server closes it is 20 (SPEC §3); the
#: invalid commands of --bad-rate stay well under that
ERROR_BUDGET = 15
#: a client gives up after this many connections in a row without a 220 greeting
MAX_FRUITLESS_CONNECTIONS = 3
#: failures listed in full; the rest are only counted
MAX_LISTED = 50
RECV_SIZE = 256 * 1024
#: largest piece of a --split random send
MAX_PIECE = 64
#: messages built before the clock starts, per process: at most this many bytes ...
PREBUILD_BUDGET = 64 << 20
#: ... and this many messages (the rest are built when they are sent)
PREBUILD_COUNT = 50_000
#: how often deadlines are checked and progress is shown, in seconds
TICK = 0.1
PROGRESS_EVERY = 0.5
DELIVERED = re.compile(rb"delivered message (\d+)")
FLOOD_HEAD = re.compile(
    rb"Subject: flood (\S+)\nX-Flood-Token: (\S+)\nX-Flood-Sha256: ([0-9a-f]{64})\n\n"
)

#: Invalid commands sent with --bad-rate, as (command, expected code, what it tests).
#: Lines expecting 250 set up or undo the state the bad command needs.
MAIL_OK = (b"MAIL FROM:<bad-rate@flood.test>\r\n", 250, "MAIL")
RSET_OK = (b"RSET\r\n", 250, "RSET")
BAD_SEQUENCES: tuple[tuple[tuple[bytes, int, str], ...], ...] = (
    ((b"RCPT TO:<nobody@flood.test>\r\n", 503, "RCPT before MAIL"),),
    ((b"DATA\r\n", 503, "DATA before MAIL"),),
    (MAIL_OK, (b"DATA\r\n", 503, "DATA before RCPT"), RSET_OK),
    (MAIL_OK, (b"MAIL FROM:<again@flood.test>\r\n", 503, "nested MAIL"), RSET_OK),
    ((b"MAIL FROM:<has space@flood.test>\r\n", 501, "malformed sender"),),
    ((b"MAIL FROM:<unbalanced@flood.test\r\n", 501, "unbalanced sender"),),
    ((b"MAIL FROM:\r\n", 501, "MAIL without address"),),
    (MAIL_OK, (b"RCPT TO:<@>\r\n", 501, "malformed recipient"), RSET_OK),
    ((b"FLOODVERB now\r\n", 502, "unknown verb"),),
    ((b"HELO again.flood.test\r\n", 503, "duplicate HELO"),),
    ((b"EHLO again.flood.test\r\n", 503, "duplicate EHLO"),),
    ((b"\r\n", 500, "blank line"),),
    ((b"NOOP " + b"x" * 600 + b"\r\n", 500, "line too long"),),
)

#: Filler lines that test the server's (and the mailbox reader's) handling of bodies.
SPECIAL_LINES = (
    b".",
    b"..",
    b".leading dot",
    b"...",
    b"",
    b"",
    b" ",
    b"From: look-alike@example.com",
    b"To: look-alike@example.com",
    b"Number: 1",
    b"Received: from look.alike by look.alike (CS4410MP3)",
    b"From nobody Thu Jan  1 00:00:00 1970",
    b">From quoted",
    # A blank line, then the start of a record header that is not complete.
    b"\nReceived: from look.alike by look.alike (CS4410MP3)\nNumber: 1\nX-Not-A: record",
    "8-bit: caf\u00e9 \u2603 \u00fcber".encode(),
    b"not utf-8: \xff\xfe\x80",
)


def _printable_table() -> bytes:
    """Maps every byte to a filler byte: mostly printable ASCII, a few 8-bit bytes."""
    printable = bytes(range(0x20, 0x7F))
    high = bytes(range(0xA0, 0x100))
    table = bytearray(printable[i % len(printable)] for i in range(256))
    for i in range(0, 256, 23):
        table[i] = high[i % len(high)]
    return bytes(table)


FILLER_TABLE = _printable_table()


# -- options -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
    host: str
    port: int
    clients: int
    processes: int
    messages: int
    keep_open: bool
    size_min: int
    size_max: int
    seed: int
    recipients: int
    pipelining: bool
    split: str  # "none", "random" or "byte"
    split_clients: int  # clients (by index) that split their sends
    duration: float | None
    timeout: float
    bad_rate: float
    slow: int
    mailbox: str | None
    format: str | None  # None: cs4410, or with --verify-only the saved run's format
    json: bool
    save: str | None
    verify_only: str | None
    progress: bool
    tls: bool = False  # implicit TLS from the first byte (point --port at --tls-port)
    starttls: bool = False  # STARTTLS after EHLO, then EHLO again
    auth: tuple[str, str] | None = None  # AUTH PLAIN with this user and password
    cafile: str | None = None  # check the server's certificate and host name against it


def parse_size(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    try:
        size_min = int(low)
        size_max = int(high) if sep else size_min
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BYTES or MIN:MAX, not {text!r}") from None
    if size_min < 0 or size_max < size_min:
        raise argparse.ArgumentTypeError(f"bad size range {text!r}")
    return size_min, size_max


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flood.py",
        description="Load an SMTP server on this machine and check what it stored.",
        epilog="Loopback addresses only. Exit status 0 means every reply and every check passed.",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="server address, loopback only (%(default)s)")
    add("--port", type=port_number, help="server port (required unless --verify-only)")
    add("--clients", type=positive_int, default=10, help="concurrent clients (%(default)s)")
    add(
        "--processes",
        type=positive_int,
        default=1,
        help="processes to spread the clients over (%(default)s)",
    )
    add("--messages", type=non_negative_int, default=10, help="messages per client (%(default)s)")
    add("--keep-open", action="store_true", help="send all of a client's messages in one session")
    add(
        "--size",
        type=parse_size,
        default=(1024, 1024),
        metavar="BYTES|MIN:MAX",
        help="body size as stored, fixed or a seeded random range (1024)",
    )
    add("--seed", type=int, default=0, help="seed for sizes, filler and error mix (%(default)s)")
    add("--recipients", type=positive_int, default=1, help="recipients per message (%(default)s)")
    add(
        "--pipelining",
        action="store_true",
        help="send MAIL, RCPTs and DATA in one write when the server offers PIPELINING",
    )
    add(
        "--split",
        choices=("none", "random", "byte"),
        default="none",
        help="send every write in random small pieces, or one byte per send",
    )
    add(
        "--split-clients",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="only the first N clients split their writes (default: all)",
    )
    add(
        "--duration",
        type=positive_float,
        default=None,
        metavar="S",
        help="start no new message after S seconds; finish those under way",
    )
    add(
        "--timeout",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="seconds to wait for each reply (%(default)s)",
    )
    add(
        "--bad-rate",
        type=fraction,
        default=0.0,
        metavar="F",
        help="before a message, with probability F, send invalid commands and check "
        "their error replies",
    )
    add(
        "--slow",
        type=non_negative_int,
        default=0,
        metavar="K",
        help="K more clients that go idle after the greeting and must get 421 (timeout)",
    )
    add("--tls", action="store_true", help="implicit TLS (point --port at selsmtp's --tls-port)")
    add("--starttls", action="store_true", help="say STARTTLS after EHLO, then EHLO again")
    add(
        "--cafile",
        default=None,
        metavar="FILE",
        help="with --tls/--starttls: check the server's certificate against this CA (PEM) "
        "and its host name against --host; without it the certificate is NOT checked, "
        "so that self-signed test certificates work",
    )
    add("--auth", default=None, metavar="USER:PASS", help="AUTH PLAIN after EHLO")
    add("--mailbox", default=None, help="check this mailbox after the run")
    add(
        "--format",
        choices=reader.FORMATS,
        default=None,
        help="format of --mailbox (cs4410; with --verify-only, the one saved with --save)",
    )
    add("--json", action="store_true", help="print one JSON object instead of the report")
    add(
        "--save",
        default=None,
        metavar="FILE",
        help="save the acknowledged messages for a later --verify-only",
    )
    add(
        "--verify-only",
        default=None,
        metavar="FILE",
        help="send nothing: check --mailbox against a file saved with --save",
    )
    return parser


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify_only is None:
        if args.port is None:
            parser.error("--port is required")
        if not 0 < args.port < 65536:
            parser.error(f"--port must be 1-65535, not {args.port}")
        if not is_loopback(args.host):
            parser.error(
                f"--host {args.host} is not a loopback address; flood only loads "
                "servers on this machine"
            )
    elif args.mailbox is None and not _saved_mailbox(args.verify_only):
        parser.error("--verify-only needs --mailbox (or a saved file that names one)")
    if args.tls and args.starttls:
        parser.error("--tls and --starttls exclude each other")
    if args.cafile is not None and not (args.tls or args.starttls):
        parser.error("--cafile needs --tls or --starttls")
    if args.cafile is not None:
        try:
            tls_context(args.cafile)
        except (OSError, ssl.SSLError) as exc:
            parser.error(f"--cafile {args.cafile}: {exc}")
    auth = None
    if args.auth is not None:
        user, colon, password = args.auth.partition(":")
        if not colon or not user:
            parser.error("--auth takes USER:PASS")
        auth = (user, password)
    size_min, size_max = args.size
    split_clients = args.clients if args.split_clients is None else args.split_clients
    return Options(
        host=args.host,
        port=args.port or 0,
        clients=args.clients,
        processes=min(args.processes, args.clients + args.slow),
        messages=args.messages,
        keep_open=args.keep_open,
        size_min=size_min,
        size_max=size_max,
        seed=args.seed,
        recipients=args.recipients,
        pipelining=args.pipelining,
        split=args.split,
        split_clients=split_clients,
        duration=args.duration,
        timeout=args.timeout,
        bad_rate=args.bad_rate,
        slow=args.slow,
        mailbox=args.mailbox,
        format=args.format,
        json=args.json,
        save=args.save,
        verify_only=args.verify_only,
        progress=sys.stderr.isatty(),
        tls=args.tls,
        starttls=args.starttls,
        auth=auth,
        cafile=args.cafile,
    )


def _saved_mailbox(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as file:
            mailbox = json.load(file).get("mailbox")
    except (OSError, ValueError):
        return None
    return mailbox if isinstance(mailbox, str) else None


def is_loopback(host: str) -> bool:
    """True if ``host`` is a loopback address, or ``localhost`` naming only such addresses.

    Other names are refused without being looked up: no DNS query leaves the machine.
    """
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        pass
    if host.lower() not in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return False
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    addresses = {str(info[4][0]) for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses
    )


# -- messages ------------------------------------------------------------------


def make_filler(rng: random.Random, length: int) -> bytes:
    """``length`` or so bytes of LF-terminated text lines; no CR, no NUL."""
    text = rng.randbytes(length).translate(FILLER_TABLE)
    lines: list[bytes] = []
    pos = 0
    while pos < length:
        if rng.random() < 0.05:
            lines.append(rng.choice(SPECIAL_LINES))
        width = rng.randint(0, 120)
        lines.append(text[pos : pos + width])
        pos += width
    return b"\n".join(lines) + b"\n"


@dataclasses.dataclass(slots=True)
class Message:
    token: str
    sender: str  # "" for the null sender
    recipients: tuple[str, ...]
    size: int  # body length as stored
    sha256: str  # of the body after its flood header
    wire: bytes  # the data as sent after 354: dot-stuffed, CRLF, final ".\r\n"
    rcpt_lines: tuple[bytes, ...]  # the RCPT commands


class MessageFactory:
    """Builds message bodies by slicing one pre-generated filler buffer."""

    def __init__(self, opts: Options, rng: random.Random, run_id: str) -> None:
        self.opts = opts
        self.rng = rng
        self.run_id = run_id
        self.filler = make_filler(rng, max(1 << 20, opts.size_max + (64 << 10)))

    def build(self, client: int, index: int) -> Message:
        opts = self.opts
        rng = self.rng
        token = f"{self.run_id}.{client}.{index}"
        sender = "" if index % 17 == 16 else f"c{client}.m{index}@flood.test"
        recipients = tuple(f"r{i}.c{client}.m{index}@flood.test" for i in range(opts.recipients))
        size = (
            opts.size_min
            if opts.size_min == opts.size_max
            else rng.randint(opts.size_min, opts.size_max)
        )
        head = f"Subject: flood {token}\nX-Flood-Token: {token}\nX-Flood-Sha256: ".encode()
        rest_size = max(1, size - len(head) - 66)
        filler = self.filler
        start = rng.randrange(0, len(filler) - rest_size)
        start = filler.find(b"\n", start) + 1
        if start + rest_size > len(filler):
            start = 0
        rest = filler[start : start + rest_size]
        if not rest.endswith(b"\n"):
            rest = rest[:-1] + b"\n"
        digest = hashlib.sha256(rest).hexdigest()
        body = b"".join((head, digest.encode(), b"\n\n", rest))
        # RFC 5321 §4.5.2: a leading dot is doubled; the first line never starts with one.
        wire = body.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..") + b".\r\n"
        rcpt_lines = tuple(b"RCPT TO:<%s>\r\n" % r.encode() for r in recipients)
        return Message(token, sender, recipients, len(body), digest, wire, rcpt_lines)


# -- the client loop -----------------------------------------------------------


class Client:
    """One simulated client: at most one connection at a time."""

    __slots__ = (
        "conversation",
        "deadline",
        "events",
        "index",
        "messages_left",
        "next_message",
        "out",
        "out_offset",
        "rbuf",
        "sent_at",
        "slow",
        "sock",
        "split",
        "streak",
        "tls",
        "tls_bios",
        "tls_resume",
    )

    def __init__(self, index: int, messages: int, *, slow: bool, split: str) -> None:
        self.index = index
        self.slow = slow
        self.split = split
        self.messages_left = messages
        self.next_message = 0
        self.sock: socket.socket | None = None
        self.conversation: Conversation | None = None
        self.rbuf = bytearray()
        self.out: bytes | memoryview = b""
        self.out_offset = 0
        self.events = 0
        self.deadline = math.inf
        self.sent_at = 0.0  # when the last byte queued so far was handed to the kernel
        self.streak = 0  # connections in a row that got no 220 greeting
        self.tls: ssl.SSLObject | None = None  # once TLS has begun on this connection
        self.tls_bios: tuple[ssl.MemoryBIO, ssl.MemoryBIO] | None = None  # (in, out)
        self.tls_resume = False  # the handshake came from STARTTLS: resume the conversation


def tls_context(cafile: str | None) -> ssl.SSLContext:
    """The client side of TLS: with ``cafile``, the certificate and the host name are
    checked against it; without, nothing is checked (a load tool against test servers)."""
    if cafile is not None:
        return ssl.create_default_context(cafile=cafile)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Worker:
    """One process's share of the clients, driven by one selectors loop."""

    def __init__(
        self,
        opts: Options,
        run_id: str,
        worker: int,
        client_ids: Sequence[int],
        slow_ids: Sequence[int],
    ) -> None:
        self.opts = opts
        self.run_id = run_id
        self.rng = random.Random(opts.seed * 1_000_003 + worker)
        self.messages = MessageFactory(opts, self.rng, run_id)
        self.selector = selectors.DefaultSelector()
        self.tls_context = tls_context(opts.cafile)
        family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
        self.family = family
        self.address = socket.getaddrinfo(opts.host, opts.port, family, socket.SOCK_STREAM)[0][4]
        self.clients = [
            Client(
                i, opts.messages, slow=False, split=opts.split if i < opts.split_clients else "none"
            )
            for i in client_ids
        ] + [Client(opts.clients + i, 0, slow=True, split="none") for i in slow_ids]
        self.now = time.perf_counter()
        self.started = self.now
        self.finished = self.now
        self.stop_at = math.inf
        self.cpu = 0.0  # CPU seconds this process spent in the loop
        self.to_connect: list[Client] = []
        self.prebuilt: dict[int, list[Message]] = {}
        # results
        self.attempted = 0
        self.sent = 0
        self.acked = 0
        self.bytes = 0
        self.connections = 0
        self.latencies: list[float] = []
        self.codes: Counter[int] = Counter()
        self.failures: list[str] = []
        self.failure_count = 0
        self.bad_checked = 0
        self.bad_wrong = 0
        self.slow_ok = 0
        self.slow_failed = 0
        self.acked_messages: list[list[Any]] = []
        self.refused: list[list[Any]] = []
        self.unknown: list[str] = []

    # -- bookkeeping --

    def fail(self, client: Client, what: str) -> None:
        self.failure_count += 1
        if len(self.failures) < MAX_LISTED:
            self.failures.append(f"client {client.index}: {what}")

    def expect(self, client: Client, reply: Reply, code: int, what: str) -> bool:
        if reply[0] == code:
            return True
        if reply[0] == 0:
            why = f" ({reply[1].decode()})" if reply[1] else ""
            self.fail(client, f"connection closed{why} while waiting for the reply to {what}")
        elif reply is TIMEOUT_REPLY:
            self.fail(client, f"no reply to {what} within {self.opts.timeout:g} s")
        else:
            text = reply[1].decode("utf-8", "replace").strip().replace("\r\n", " | ")
            self.fail(client, f"{what}: expected {code}, got {text!r}")
        return False

    def out_of_time(self) -> bool:
        return self.now >= self.stop_at

    # -- conversations --

    def converse(self, client: Client) -> Conversation:
        """One connection's worth of a normal client's conversation."""
        opts = self.opts
        rng = self.rng
        reply = yield b""
        if not self.expect(client, reply, 220, "the greeting"):
            self._lose_slot(client)
            return
        client.streak = 0
        helo = f"flood-{self.run_id}-{client.index}"
        reply = yield f"EHLO {helo}\r\n".encode()
        if not self.expect(client, reply, 250, "EHLO"):
            self._lose_slot(client)
            return
        if opts.starttls:
            reply = yield b"STARTTLS\r\n"
            if not self.expect(client, reply, 220, "STARTTLS"):
                self._lose_slot(client)
                return
            reply = yield STARTTLS_NOW
            if not self.expect(client, reply, 220, "the TLS handshake"):
                self._lose_slot(client)
                return
            reply = yield f"EHLO {helo}\r\n".encode()
            if not self.expect(client, reply, 250, "EHLO after STARTTLS"):
                self._lose_slot(client)
                return
        if opts.auth is not None:
            user, password = opts.auth
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            reply = yield f"AUTH PLAIN {token}\r\n".encode()
            if not self.expect(client, reply, 235, "AUTH PLAIN"):
                self._lose_slot(client)
                return
        extensions = {
            line[4:].split(b" ", 1)[0].strip().upper() for line in reply[1].split(b"\n")[1:]
        }
        pipelining = opts.pipelining and b"PIPELINING" in extensions
        declare_size = b"SIZE" in extensions
        body_param = b" BODY=8BITMIME" if b"8BITMIME" in extensions else b""
        errors = 0
        first = True
        while client.messages_left > 0 and (first or opts.keep_open) and not self.out_of_time():
            first = False
            if opts.bad_rate and rng.random() < opts.bad_rate and errors < ERROR_BUDGET:
                for command, code, what in rng.choice(BAD_SEQUENCES):
                    reply = yield command
                    if code >= 400:
                        errors += 1
                        self.bad_checked += 1
                    if reply[0] != code:
                        if code >= 400:
                            self.bad_wrong += 1
                        self.expect(client, reply, code, what)
                        self._lose_slot(client)
                        return
            client.messages_left -= 1
            self.attempted += 1
            index = client.next_message
            client.next_message += 1
            queue = self.prebuilt.get(client.index)
            message = queue.pop() if queue else self.messages.build(client.index, index)
            size_param = b" SIZE=%d" % len(message.wire) if declare_size else b""
            mail = b"MAIL FROM:<%s>%s%s\r\n" % (message.sender.encode(), size_param, body_param)
            rcpts = message.rcpt_lines
            if pipelining:
                reply = yield b"".join((mail, *rcpts, b"DATA\r\n"))
                ok = self.expect(client, reply, 250, "MAIL (pipelined)")
                for _ in rcpts:
                    reply = yield b""
                    ok = self.expect(client, reply, 250, "RCPT (pipelined)") and ok
                reply = yield b""
                ok = self.expect(client, reply, 354, "DATA (pipelined)") and ok
                if not ok:
                    return
            else:
                reply = yield mail
                if not self.expect(client, reply, 250, "MAIL"):
                    return
                for rcpt in rcpts:
                    reply = yield rcpt
                    if not self.expect(client, reply, 250, "RCPT"):
                        return
                reply = yield b"DATA\r\n"
                if not self.expect(client, reply, 354, "DATA"):
                    return
            self.sent += 1
            self.bytes += len(message.wire)
            reply = yield message.wire
            if reply[0] == 250:
                self.latencies.append(time.perf_counter() - client.sent_at)
                self.acked += 1
                found = DELIVERED.search(reply[1])
                self.acked_messages.append(
                    [
                        message.token,
                        helo,
                        message.sender,
                        list(message.recipients),
                        message.size,
                        message.sha256,
                        int(found[1]) if found else None,
                    ]
                )
                continue
            self.expect(client, reply, 250, f"the end of data of {message.token}")
            if reply[0] >= 400:
                self.refused.append([message.token, reply[0]])
            else:
                self.unknown.append(message.token)
            return
        reply = yield b"QUIT\r\n"
        self.expect(client, reply, 221, "QUIT")

    def _lose_slot(self, client: Client) -> None:
        """A connection failed before its message began: count that message as failed,
        so that a server that always fails cannot keep a client reconnecting forever."""
        if client.messages_left > 0:
            client.messages_left -= 1
            self.attempted += 1

    def converse_slow(self, client: Client) -> Conversation:
        """An idle client: greeting, then nothing (or half a command); wants a 421."""
        reply = yield b""
        if not self.expect(client, reply, 220, "the greeting"):
            self.slow_failed += 1
            return
        if client.index % 2:
            reply = yield f"EHLO slow-{self.run_id}-{client.index}\r\n".encode()
            if not self.expect(client, reply, 250, "EHLO"):
                self.slow_failed += 1
                return
            reply = yield b"MAIL FROM:<slow"  # a line that is never finished
        else:
            reply = yield b""
        if self.expect(client, reply, 421, "the idle timeout"):
            self.slow_ok += 1
        else:
            self.slow_failed += 1

    # -- I/O --

    def connect(self, client: Client) -> None:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(self.address)
        self.connections += 1
        client.sock = sock
        client.rbuf.clear()
        client.out = b""
        client.out_offset = 0
        client.events = selectors.EVENT_READ
        client.deadline = self.now + self.opts.timeout
        client.streak += 1
        conversation = self.converse_slow(client) if client.slow else self.converse(client)
        client.conversation = conversation
        next(conversation)  # runs to the wait for the greeting
        self.selector.register(sock, selectors.EVENT_READ, client)
        if err not in (0, errno.EINPROGRESS):
            self.feed(client, (0, f"connect failed: {os.strerror(err)}".encode()))
        elif self.opts.tls:
            self._start_tls(client, resume=False)

    def _start_tls(self, client: Client, *, resume: bool) -> None:
        """Begin a TLS handshake on the client's connection (its ClientHello is queued)."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client.tls = self.tls_context.wrap_bio(
            incoming, outgoing, server_hostname=self.opts.host if self.opts.cafile else None
        )
        client.tls_bios = (incoming, outgoing)
        client.tls_resume = resume
        self._handshake(client)

    def _handshake(self, client: Client) -> bool:
        """Advance the handshake; True once done (False too after a failure, which
        has ended the conversation)."""
        assert client.tls is not None and client.tls_bios is not None
        try:
            client.tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        except ssl.SSLCertVerificationError as exc:
            reason = f"certificate verify failed: {exc.verify_message}"
            self.feed(client, (0, f"TLS handshake failed: {reason}".encode()))
            return False
        except ssl.SSLError as exc:
            self.feed(client, (0, f"TLS handshake failed: {exc.reason or exc}".encode()))
            return False
        hello = client.tls_bios[1].read()
        if hello:
            self._queue(client, hello)
        return done

    def close(self, client: Client) -> None:
        sock = client.sock
        if sock is None:
            return
        client.sock = None
        client.tls = client.tls_bios = None
        if client.conversation is not None:
            client.conversation.close()
            client.conversation = None
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)
        sock.close()
        client.deadline = math.inf
        if client.messages_left > 0 and client.streak >= MAX_FRUITLESS_CONNECTIONS:
            self.fail(
                client,
                f"gave up after {client.streak} connections in a row without a greeting; "
                f"{client.messages_left} messages not sent",
            )
            self.attempted += client.messages_left
            client.messages_left = 0
        if client.messages_left > 0 and not self.out_of_time():
            # Why not connect now: a connection that fails at once would recurse here.
            self.to_connect.append(client)

    def feed(self, client: Client, reply: Reply) -> None:
        """Hand a reply to the client's conversation and send what it answers."""
        conversation = client.conversation
        assert conversation is not None
        try:
            out = conversation.send(reply)
        except StopIteration:
            self.close(client)
            return
        if reply[0] == 0 or reply is TIMEOUT_REPLY:  # whatever it wanted, it is over
            self.close(client)
            return
        client.deadline = self.now + self.opts.timeout
        if out is STARTTLS_NOW:
            self._start_tls(client, resume=True)
        elif out:
            self.send(client, out)

    def send(self, client: Client, data: bytes) -> None:
        if client.tls is not None and client.tls_bios is not None:
            client.tls.write(data)
            data = client.tls_bios[1].read()
        self._queue(client, data)

    def _queue(self, client: Client, data: bytes) -> None:
        if client.out:
            data = bytes(client.out[client.out_offset :]) + data
        client.out = data
        client.out_offset = 0
        if client.split == "none":
            self._send_some(client, len(data))
        else:
            self._send_piece(client)

    def _send_piece(self, client: Client) -> None:
        size = 1 if client.split == "byte" else self.rng.randint(1, MAX_PIECE)
        self._send_some(client, size)

    def _send_some(self, client: Client, size: int) -> None:
        sock = client.sock
        assert sock is not None
        out = client.out
        offset = client.out_offset
        try:
            if offset == 0 and size >= len(out):
                sent = sock.send(out)
            else:
                sent = sock.send(memoryview(out)[offset : offset + size])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.feed(client, (0, f"send failed: {exc.strerror or exc}".encode()))
            return
        offset += sent
        if offset >= len(out):
            client.out = b""
            client.out_offset = 0
            client.sent_at = time.perf_counter()
            events = selectors.EVENT_READ
        else:
            client.out_offset = offset
            events = selectors.EVENT_READ | selectors.EVENT_WRITE
        if events != client.events and client.sock is not None:
            client.events = events
            self.selector.modify(client.sock, events, client)

    def on_writable(self, client: Client) -> None:
        client.deadline = self.now + self.opts.timeout
        if client.split == "none":
            self._send_some(client, len(client.out) - client.out_offset)
        else:
            self._send_piece(client)

    def on_readable(self, client: Client) -> None:
        sock = client.sock
        assert sock is not None
        try:
            data = sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.feed(client, (0, f"recv failed: {exc.strerror or exc}".encode()))
            return
        ended = not data
        if client.tls is not None:
            decrypted = self._decrypt(client, data)
            if decrypted is None:
                return
            data, ended = decrypted
        if ended and not data:
            self.feed(client, EOF_REPLY)
            return
        rbuf = client.rbuf
        rbuf += data
        codes = self.codes
        while client.sock is sock:
            reply = take_reply(rbuf)
            if reply is None:
                break
            codes[reply[0]] += 1
            self.feed(client, reply)
        if ended and client.sock is sock:
            self.feed(client, EOF_REPLY)

    def _decrypt(self, client: Client, data: bytes) -> tuple[bytes, bool] | None:
        """Ciphertext in; the plaintext and whether the stream ended, or None when
        there is nothing more to do with it (handshake under way, or failed)."""
        tls, bios = client.tls, client.tls_bios
        assert tls is not None and bios is not None
        if data:
            bios[0].write(data)
        else:
            bios[0].write_eof()
        if tls.version() is None:  # still shaking hands
            if not self._handshake(client) or client.sock is None:
                return None
            if tls.version() is None:
                if not data:
                    self.feed(client, EOF_REPLY)
                return None
            if client.tls_resume:
                client.tls_resume = False
                self.feed(client, TLS_UP)
                if client.sock is None:
                    return None
        chunks: list[bytes] = []
        while True:
            try:
                chunk = tls.read(RECV_SIZE)
            except ssl.SSLWantReadError:
                return b"".join(chunks), False
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b"".join(chunks), True
            except ssl.SSLError as exc:
                self.feed(client, (0, f"TLS failed: {exc.reason or exc}".encode()))
                return None
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)

    def prebuild(self) -> None:
        """Build the first messages of every client now, before the clock starts."""
        opts = self.opts
        normal = [c for c in self.clients if not c.slow]
        if not normal:
            return
        average = (opts.size_min + opts.size_max) / 2 * 1.1 + 200
        total = min(PREBUILD_COUNT, PREBUILD_BUDGET / average)
        each = min(opts.messages, int(total // len(normal)))
        for client in normal:
            built = [self.messages.build(client.index, k) for k in range(each)]
            built.reverse()  # popped from the end
            self.prebuilt[client.index] = built

    def run(self, progress: Any = None, slot: int = 0) -> dict[str, Any]:
        raise_descriptor_limit(len(self.clients) + 64)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_before = usage.ru_utime + usage.ru_stime
        self.now = self.started = time.perf_counter()
        if self.opts.duration is not None:
            self.stop_at = self.started + self.opts.duration
        self.to_connect = [c for c in self.clients if c.slow or c.messages_left > 0]
        select = self.selector.select
        next_tick = self.now + TICK
        next_progress = self.now + PROGRESS_EVERY
        while self.selector.get_map() or self.to_connect:
            if self.to_connect:
                starting, self.to_connect = self.to_connect, []
                for client in starting:
                    self.connect(client)
            events = select(max(0.0, next_tick - self.now))
            self.now = time.perf_counter()
            for key, mask in events:
                client = key.data
                if client.sock is None or client.sock is not key.fileobj:
                    continue
                if mask & selectors.EVENT_WRITE:
                    self.on_writable(client)
                if mask & selectors.EVENT_READ and client.sock is key.fileobj:
                    self.on_readable(client)
            if self.now >= next_tick:
                next_tick = self.now + TICK
                self._expire(self.now)
                if self.now >= next_progress:
                    next_progress = self.now + PROGRESS_EVERY
                    self._progress(progress, slot)
        self.finished = time.perf_counter()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu = usage.ru_utime + usage.ru_stime - cpu_before
        self._progress(progress, slot)
        self.selector.close()
        return self.results()

    def _expire(self, now: float) -> None:
        for client in self.clients:
            if client.sock is not None and client.deadline <= now:
                self.feed(client, TIMEOUT_REPLY)

    def _progress(self, progress: Any, slot: int) -> None:
        if progress is not None:
            progress[2 * slot] = self.acked
            progress[2 * slot + 1] = self.attempted
        elif self.opts.progress:
            elapsed = max(self.now - self.started, 1e-9)
            total = self.opts.clients * self.opts.messages
            sys.stderr.write(
                f"\rflood: {self.acked}/{total} acknowledged, {self.acked / elapsed:,.0f} msg/s"
                f", {self.failure_count} failures "
            )
            sys.stderr.flush()

    def results(self) -> dict[str, Any]:
        return {
            "attempted": self.attempted,
            "sent": self.sent,
            "acknowledged": self.acked,
            "bytes": self.bytes,
            "connections": self.connections,
            "latencies": self.latencies,
            "replies": dict(self.codes),
            "failures": self.failures,
            "failure_count": self.failure_count,
            "bad_checked": self.bad_checked,
            "bad_wrong": self.bad_wrong,
            "slow_ok": self.slow_ok,
            "slow_failed": self.slow_failed,
            "acked": self.acked_messages,
            "refused": self.refused,
            "unknown": self.unknown,
            "started": self.started,
            "finished": self.finished,
            "cpu": self.cpu,
        }


def take_reply(buf: bytearray) -> Reply | None:
    """Remove one complete reply (all its lines) from ``buf``, or return None."""
    pos = 0
    while True:
        end = buf.find(b"\n", pos)
        if end < 0:
            return None
        if end - pos < 4 or buf[pos + 3] != 0x2D:  # not "NNN-": the last line
            text = bytes(buf[: end + 1])
            del buf[: end + 1]
            code = text[:3]
            return (int(code) if code.isdigit() else -1), text
        pos = end + 1


def raise_descriptor_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# -- running and merging -------------------------------------------------------


def _share(count: int, worker: int, workers: int) -> list[int]:
    return list(range(worker, count, workers))


def _child(opts: Options, run_id: str, worker: int, barrier: Any, progress: Any, conn: Any) -> None:
    try:
        runner = Worker(
            opts,
            run_id,
            worker,
            _share(opts.clients, worker, opts.processes),
            _share(opts.slow, worker, opts.processes),
        )
        runner.prebuild()
        barrier.wait()
        conn.send(runner.run(progress, worker))
    except BaseException as exc:  # report it rather than leave the parent waiting
        barrier.abort()
        conn.send({"error": f"worker {worker}: {type(exc).__name__}: {exc}"})
        raise
    finally:
        conn.close()


def run_load(opts: Options, run_id: str) -> dict[str, Any]:
    """Run every client (in ``opts.processes`` processes) and return merged results."""
    if opts.processes == 1:
        runner = Worker(opts, run_id, 0, range(opts.clients), range(opts.slow))
        runner.prebuild()
        only = runner.run()
        if opts.progress:
            sys.stderr.write("\n")
        return merge([only])
    # fork starts fastest; where it is missing, spawn re-imports this file, which works
    # because everything runs under the __main__ guard.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context: Any = multiprocessing.get_context(method)
    barrier = context.Barrier(opts.processes + 1)  # the workers and this process
    progress = context.Array("q", 2 * opts.processes, lock=False)
    pipes: list[Any] = []
    processes: list[Any] = []
    for worker in range(opts.processes):
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(
            target=_child, args=(opts, run_id, worker, barrier, progress, sender), daemon=True
        )
        process.start()
        sender.close()
        pipes.append(receiver)
        processes.append(process)
    results: list[dict[str, Any]] = []
    waiting: list[Any] = list(pipes)
    total = opts.clients * opts.messages
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()  # every worker has built its messages; the clock starts now
    started = time.monotonic()
    acked = 0
    while waiting:
        ready: list[Any] = multiprocessing.connection.wait(waiting, timeout=PROGRESS_EVERY)
        for receiver in ready:
            try:
                results.append(receiver.recv())
            except EOFError:
                results.append({"error": "a worker process died without a result"})
            waiting.remove(receiver)
        if opts.progress:
            acked = sum(progress[0::2])
            rate = acked / max(time.monotonic() - started, 1e-9)
            sys.stderr.write(f"\rflood: {acked}/{total} acknowledged, {rate:,.0f} msg/s ")
            sys.stderr.flush()
    if opts.progress:
        acked = sum(result.get("acknowledged", 0) for result in results)
        sys.stderr.write(f"\rflood: {acked}/{total} acknowledged\n")
    for process in processes:
        process.join(5)
    return merge(results)


#: per-worker results that merge by adding up, and those that merge by concatenation
SUMMED = (
    "attempted", "sent", "acknowledged", "bytes", "connections", "failure_count",
    "bad_checked", "bad_wrong", "slow_ok", "slow_failed", "cpu",
)  # fmt: skip
JOINED = ("latencies", "acked", "refused", "unknown")


def merge(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from the workers' results (a failed worker's becomes a failure)."""
    merged: dict[str, Any] = {key: 0 for key in SUMMED}
    merged.update({key: [] for key in JOINED})
    merged["failures"] = []
    merged["replies"] = Counter()
    starts = []
    ends = []
    for result in results:
        if "error" in result:
            merged["failures"].append(result["error"])
            merged["failure_count"] += 1
            continue
        for key in SUMMED:
            merged[key] += result[key]
        for key in JOINED:
            merged[key].extend(result[key])
        merged["failures"].extend(result["failures"][: MAX_LISTED - len(merged["failures"])])
        merged["replies"].update(result["replies"])
        starts.append(result["started"])
        ends.append(result["finished"])
    merged["elapsed"] = max(ends) - min(starts) if starts else 0.0
    return merged


# -- checking the mailbox ------------------------------------------------------


@dataclasses.dataclass
class Verification:
    records: int = 0
    checked: int = 0  # acknowledged messages looked for
    found: int = 0  # ... found once and intact
    foreign: int = 0  # records not made by this run
    unknown_stored: int = 0  # messages whose outcome was unknown, found stored
    problems: list[str] = dataclasses.field(default_factory=list)


def verify(saved: dict[str, Any], parsed: reader.Mailbox) -> Verification:
    """Check a mailbox, as read by :func:`selsmtp.read_mailbox`, against a run's messages.

    ``saved`` is what ``--save`` writes: ``run_id``, ``acked`` (one list per
    acknowledged message: token, HELO name, sender, recipients, body size, body
    checksum, number), ``refused`` ([token, code]) and ``unknown`` (tokens). The
    mailbox's own problems (``parsed.problems``) are problems of the run too.
    """
    result = Verification()
    result.records = len(parsed.messages)
    result.problems.extend(f"mailbox: {problem}" for problem in parsed.problems)
    run_id = saved["run_id"]
    marker = f"flood {run_id}.".encode()
    by_token: dict[str, list[reader.Message]] = {}
    for message in parsed.messages:
        head = FLOOD_HEAD.match(message.raw)
        if head is None or not head[1].decode("ascii", "replace").startswith(run_id + "."):
            if marker in message.raw[:1024]:
                result.problems.append(
                    f"corrupt: {_record_at(message)}: its flood header lines are damaged"
                )
            else:
                result.foreign += 1
            continue
        token = head[1].decode("ascii", "replace")
        if head[2] != head[1]:
            result.problems.append(
                f"corrupt: {_record_at(message)}: token lines disagree ({token})"
            )
        by_token.setdefault(token, []).append(message)
    for token, helo, sender, recipients, size, sha256, number in saved["acked"]:
        result.checked += 1
        messages = by_token.pop(token, [])
        where = f"message {token} (acknowledged as number {number})"
        if not messages:
            result.problems.append(f"missing: {where} is not in the mailbox")
            continue
        if len(messages) > 1:
            places = ", ".join(f"number {m.number} at {m.where}" for m in messages)
            result.problems.append(f"duplicated: {where} is stored {len(messages)} times: {places}")
            continue
        message = messages[0]
        wrong = _compare(message, helo, sender, recipients, size, sha256, number)
        if wrong:
            result.problems.append(f"corrupt: {where}, {_record_at(message)}: " + "; ".join(wrong))
        else:
            result.found += 1
    refused = {token: code for token, code in saved["refused"]}
    unknown = set(saved["unknown"])
    for token, messages in by_token.items():
        for message in messages:
            where = f"message {token}, {_record_at(message)}"
            if token in refused:
                result.problems.append(f"stored although refused: {where} got {refused[token]}")
            elif token in unknown:
                result.unknown_stored += 1
            else:
                result.problems.append(f"unexpected: {where} was never acknowledged")
    return result


def _record_at(message: reader.Message) -> str:
    """``record N at offset O`` (or at its Maildir file)."""
    return f"record {message.number} at {message.where}"


def _compare(
    message: reader.Message,
    helo: str,
    sender: str,
    recipients: list[str],
    size: int,
    sha256: str,
    number: int | None,
) -> list[str]:
    wrong = []
    if number is not None and message.number != number:
        wrong.append(f"number {message.number}, not {number}")
    if message.helo_name != helo:
        wrong.append(f"HELO name {message.helo_name!r}, not {helo!r}")
    if message.sender != sender:
        wrong.append(f"sender {message.sender!r}, not {sender!r}")
    if message.recipients is not None and list(message.recipients) != recipients:
        wrong.append(f"recipients {list(message.recipients)}, not {recipients}")
    body = message.raw
    if len(body) != size:
        wrong.append(f"body of {len(body)} bytes, not {size}")
    head = FLOOD_HEAD.match(body)
    rest = body[head.end() :] if head else body
    if head is None or head[3].decode() != sha256 or hashlib.sha256(rest).hexdigest() != sha256:
        wrong.append("body checksum mismatch")
    return wrong


def saved_run(opts: Options, run_id: str, results: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "mailbox": os.path.abspath(opts.mailbox) if opts.mailbox else None,
        "format": opts.format or "cs4410",
        "acked": results["acked"],
        "refused": results["refused"],
        "unknown": results["unknown"],
    }


def verify_mailbox(
    path: str, saved: dict[str, Any], timeout: float, fmt: str = "cs4410"
) -> Verification:
    """Read the mailbox at ``path`` (in format ``fmt``) under its lock, check it as
    ``python -m selsmtp.inbox check`` does but with gaps reported, and :func:`verify`
    the run's messages in it."""
    try:
        box = reader.read_mailbox(
            path, fmt, allow_gaps=False, allow_foreign=True, lock_timeout=timeout
        )
    except (OSError, TimeoutError, reader.NotAMailbox) as exc:
        result = Verification()
        result.checked = len(saved["acked"])
        result.problems.append(f"mailbox: cannot read {path}: {exc}")
        return result
    return verify(saved, box)


# -- reporting -----------------------------------------------------------------


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of an ascending sequence (0.0 if empty)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summary(opts: Options, results: dict[str, Any], check: Verification | None) -> dict[str, Any]:
    latencies = sorted(results["latencies"])
    elapsed = results["elapsed"]
    rate = results["acknowledged"] / elapsed if elapsed > 0 else 0.0
    mb_rate = results["bytes"] / elapsed / 1e6 if elapsed > 0 else 0.0
    failures = list(results["failures"])
    failure_count = results["failure_count"]
    ok = failure_count == 0 and results["bad_wrong"] == 0 and results["slow_failed"] == 0
    if opts.messages and opts.clients and results["acknowledged"] == 0:
        ok = False
        failures.append("no message was acknowledged")
    report: dict[str, Any] = {
        "ok": ok,
        "clients": opts.clients,
        "processes": opts.processes,
        "messages_per_client": opts.messages,
        "keep_open": opts.keep_open,
        "pipelining": opts.pipelining,
        "split": opts.split,
        "size": [opts.size_min, opts.size_max],
        "recipients": opts.recipients,
        "attempted": results["attempted"],
        "sent": results["sent"],
        "acknowledged": results["acknowledged"],
        "failed": results["attempted"] - results["acknowledged"],
        "connections": results["connections"],
        "elapsed_s": round(elapsed, 4),
        "messages_per_s": round(rate, 1),
        "mb_per_s": round(mb_rate, 3),
        # flood's own CPU use during the run, as a share of one core per process: near
        # 100 means flood, not the server, may be what limits the rate
        "client_cpu_percent": round(
            results["cpu"] / elapsed / opts.processes * 100 if elapsed > 0 else 0.0, 1
        ),
        "bytes": results["bytes"],
        "latency_ms": {
            name: round(percentile(latencies, q) * 1000, 3)
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
        },
        "replies": {str(code): n for code, n in sorted(results["replies"].items())},
        "bad_commands": {"checked": results["bad_checked"], "wrong": results["bad_wrong"]},
        "slow_clients": {"got_421": results["slow_ok"], "failed": results["slow_failed"]},
        "failure_count": failure_count,
        "failures": failures,
        "verification": None,
    }
    if check is not None:
        report["verification"] = dataclasses.asdict(check)
        report["ok"] = report["ok"] and not check.problems
    return report


def print_report(report: dict[str, Any]) -> None:
    out = sys.stdout.write
    mode = "many per session" if report["keep_open"] else "one per connection"
    size = report["size"]
    size_text = str(size[0]) if size[0] == size[1] else f"{size[0]}-{size[1]}"
    out(
        f"flood: {report['clients']} clients x {report['messages_per_client']} messages "
        f"({mode}), {report['processes']} process(es), body {size_text} bytes, "
        f"{report['recipients']} recipient(s), pipelining {'on' if report['pipelining'] else 'off'}"
        f", split {report['split']}\n"
    )
    out(
        f"messages: {report['attempted']} attempted, {report['sent']} sent, "
        f"{report['acknowledged']} acknowledged, {report['failed']} failed "
        f"({report['connections']} connections)\n"
    )
    out(
        f"rate: {report['messages_per_s']:,.1f} messages/s, {report['mb_per_s']:.2f} MB/s "
        f"over {report['elapsed_s']:.2f} s (flood busy {report['client_cpu_percent']:.0f}% "
        "of a core per process)\n"
    )
    lat = report["latency_ms"]
    out(
        f"latency (end of data to 250): p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f} ms, "
        f"p99 {lat['p99']:.2f} ms, max {lat['max']:.2f} ms\n"
    )
    out("replies: " + ", ".join(f"{c} x{n}" for c, n in report["replies"].items()) + "\n")
    bad = report["bad_commands"]
    if bad["checked"]:
        out(f"invalid commands: {bad['checked']} checked, {bad['wrong']} wrong\n")
    slow = report["slow_clients"]
    if slow["got_421"] or slow["failed"]:
        out(f"slow clients: {slow['got_421']} got 421, {slow['failed']} did not\n")
    check = report["verification"]
    if check is not None:
        out(
            f"mailbox: {check['records']} records, {check['found']} of {check['checked']} "
            f"acknowledged messages found intact, {check['foreign']} from elsewhere, "
            f"{len(check['problems'])} problems\n"
        )
        for problem in check["problems"][:MAX_LISTED]:
            out(f"  {problem}\n")
        if len(check["problems"]) > MAX_LISTED:
            out(f"  ... and {len(check['problems']) - MAX_LISTED} more\n")
    if report["failure_count"] or report["failures"]:
        out(f"failures: {max(report['failure_count'], len(report['failures']))}\n")
        for failure in report["failures"]:
            out(f"  {failure}\n")
    out("OK\n" if report["ok"] else "FAILED\n")


def verify_only(opts: Options, saved_path: str) -> int:
    """--verify-only: check a mailbox against a run saved with --save; the exit status."""
    with open(saved_path, encoding="utf-8") as file:
        saved = json.load(file)
    path = opts.mailbox or saved["mailbox"]
    check = verify_mailbox(path, saved, opts.timeout, opts.format or saved.get("format", "cs4410"))
    if opts.json:
        print(json.dumps({"ok": not check.problems, **dataclasses.asdict(check)}))
    else:
        print(
            f"mailbox {path}: {check.records} records, {check.found} of {check.checked} "
            f"acknowledged messages found intact, {len(check.problems)} problems"
        )
        for problem in check.problems:
            print(f"  {problem}")
        print("OK" if not check.problems else "FAILED")
    return 0 if not check.problems else 1


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_options(argv)
    if opts.verify_only is not None:
        return verify_only(opts, opts.verify_only)
    run_id = os.urandom(4).hex()
    results = run_load(opts, run_id)
    saved = saved_run(opts, run_id, results)
    if opts.save:
        with open(opts.save, "w", encoding="utf-8") as file:
            json.dump(saved, file)
    check: Verification | None = None
    if opts.mailbox:
        check = verify_mailbox(opts.mailbox, saved, opts.timeout, saved["format"])
    report = summary(opts, results, check)
    if opts.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
