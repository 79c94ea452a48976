#!/usr/bin/env python3
"""peers: the Python SMTP servers that tools/bench.py measures selsmtp against.

Usage::

    python tools/peers.py aiosmtpd --port 0 --mailbox FILE [--name NAME] [--no-fsync]
    python3.11 tools/peers.py smtpd --port 0 --mailbox FILE [--name NAME] [--no-fsync]

Both servers get the same handler, the fair peer of a durable selsmtp: every message
is appended to one file, opened once, as a record in selsmtp's ``cs4410`` format (so
``tools/flood.py --mailbox`` can check it), and the file is fsync'd before the
``250`` goes out. One write and one fsync per message: neither server batches.

``aiosmtpd`` needs the ``aiosmtpd`` package (``pip install 'selsmtp[bench]'``).
``smtpd`` is the standard library's module, which exists on Python 3.11 and older
only; its listen backlog is raised from 5 to 1024, and its per-connection
``socket.getfqdn()`` look-up is replaced by ``--name``.

Once listening, the first line on stdout is ``KIND listening on HOST:PORT``. SIGTERM
and SIGINT stop the server.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Run as a script, by any Python: selsmtp's record format comes from the repository.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from selsmtp.formats import crlf_to_lf, cs4410
from selsmtp.session import Envelope


class Mailbox:
    """Appends cs4410 records to one file, with an fsync per record."""

    def __init__(self, path: str, name: str, *, fsync: bool) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.name = name
        self.fsync = fsync
        self.number = 0

    def append(self, helo: str, sender: str, recipients: Sequence[str], body: bytes) -> int:
        """Store one message (``body`` with CRLF or LF line ends, the last line's
        included); its number."""
        self.number += 1
        envelope = Envelope(helo, sender, tuple(recipients))
        record = cs4410.head(self.number, envelope, self.name) + crlf_to_lf(body) + b"\n"
        view = memoryview(record)
        while view:
            view = view[os.write(self.fd, view) :]
        if self.fsync:
            os.fsync(self.fd)
        return self.number


def _address(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


def run_aiosmtpd(args: argparse.Namespace, mailbox: Mailbox) -> None:
    import asyncio

    from aiosmtpd.smtp import SMTP

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            content = envelope.original_content or envelope.content or b""
            mailbox.append(
                session.host_name or "",
                _address(envelope.mail_from or ""),
                [_address(r) for r in envelope.rcpt_tos],
                content,
            )
            return "250 OK"

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        options: dict[str, Any] = {}
        if args.tls_cert:
            import ssl

            # The same settings as selsmtp's: TLS 1.2 or newer, the same certificate.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(args.tls_cert, args.tls_key)
            options = {"tls_context": context, "require_starttls": True}
        server = await loop.create_server(
            lambda: SMTP(Handler(), hostname=args.name, enable_SMTPUTF8=True, **options),
            host=args.host,
            port=args.port,
            backlog=1024,
        )
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        host, port = server.sockets[0].getsockname()[:2]
        print(f"aiosmtpd listening on {host}:{port}", flush=True)
        await stop.wait()
        server.close()

    asyncio.run(serve())


def run_smtpd(args: argparse.Namespace, mailbox: Mailbox) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import asyncore
        import smtpd

    # Every new SMTPChannel looks up socket.getfqdn() for its greeting: a resolver
    # round trip per connection, and not the name asked for. Give it the name instead.
    socket.getfqdn = lambda name="": args.name

    class Channel(smtpd.SMTPChannel):
        def found_terminator(self) -> None:
            # process_message() is not told the HELO name: hand it over on the side.
            server.helo = self.seen_greeting
            super().found_terminator()

    class Server(smtpd.SMTPServer):
        channel_class = Channel
        helo = ""

        def process_message(
            self, peer: Any, mailfrom: str, rcpttos: list[str], data: bytes | str, **kwargs: Any
        ) -> str | None:
            assert isinstance(data, bytes)  # decode_data=False
            # smtpd hands over the data without the line end of its last line
            mailbox.append(self.helo, mailfrom, rcpttos, data + b"\n" if data else data)
            return None  # "250 OK"

    server = Server((args.host, args.port), None, decode_data=False)  # type: ignore[arg-type]
    server.listen(1024)  # smtpd listens with a backlog of 5: too few for the loads here
    assert server.socket is not None
    host, port = server.socket.getsockname()[:2]

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"smtpd listening on {host}:{port}", flush=True)
    # poll(), not select(): select() cannot watch descriptors past 1023.
    asyncore.loop(timeout=1.0, use_poll=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peers.py", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=("aiosmtpd", "smtpd"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mailbox", required=True)
    parser.add_argument("--name", default="peer")
    parser.add_argument("--no-fsync", action="store_true", help="skip the fsync (unsafe)")
    parser.add_argument("--tls-cert", help="aiosmtpd: offer STARTTLS (and require it)")
    parser.add_argument("--tls-key")
    args = parser.parse_args(argv)
    mailbox = Mailbox(args.mailbox, args.name, fsync=not args.no_fsync)
    try:
        if args.kind == "aiosmtpd":
            run_aiosmtpd(args, mailbox)
        else:
            run_smtpd(args, mailbox)
    except ImportError as exc:
        print(f"peers.py: {args.kind} is not available: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
