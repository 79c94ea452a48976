"""The command line: options → Config, start-up errors → one line and exit 1, signals."""

from __future__ import annotations

import argparse
import logging
import resource
import signal
import socket
import sys
from collections.abc import Sequence

from selsmtp import __version__, logs
from selsmtp.argtypes import host_name, line_timeout, port_number, positive_float, positive_int
from selsmtp.config import FORMATS, MAX_TIMEOUT, ROTATING_FORMATS, Config, host_name_problem
from selsmtp.credfiles import load_credentials
from selsmtp.listeners import format_address
from selsmtp.server import Server
from selsmtp.store import StartupError

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import Final

log = logging.getLogger("selsmtp")

#: descriptors kept back from --max-connections for the listener, the mailbox,
#: spool files and the like
FD_RESERVE: Final = 32
#: seconds the last log lines may wait at exit for standard error to take them
EXIT_DRAIN: Final = 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selsmtp",
        description="A fast, durable SMTP server that appends every message to a mailbox.",
        # Why: add_argument makes a formatter each time (to check the metavar), and the
        # default one imports shutil to ask the terminal's width: about 2 ms of start-up
        # (measured). Help and errors get the default back (below).
        formatter_class=lambda prog: argparse.HelpFormatter(prog, width=80),
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add(
        "--port",
        type=port_number,
        default=8765,
        help="TCP port; 0 picks a free one (default: %(default)s)",
    )
    add(
        "--mailbox",
        default="./mailbox",
        help="the mailbox file, or folder for maildir (default: %(default)s)",
    )
    add("--format", choices=FORMATS, default="cs4410", help="mailbox format (default: %(default)s)")
    add(
        "--name",
        type=host_name,
        default=None,
        help="server name in replies, up to 255 bytes with no whitespace or control "
        "characters (default: the short host name)",
    )
    add(
        "--timeout",
        type=line_timeout,
        default=300.0,
        help=f"seconds a client may take to send each line, at most {MAX_TIMEOUT} "
        "(default: %(default)s)",
    )
    add(
        "--max-message-size",
        type=positive_int,
        default=33_554_432,
        metavar="BYTES",
        help="largest message accepted (default: %(default)s)",
    )
    add(
        "--max-recipients",
        type=positive_int,
        default=1000,
        metavar="N",
        help="recipients per message (default: %(default)s)",
    )
    add(
        "--max-connections",
        type=positive_int,
        default=1000,
        metavar="N",
        help="concurrent connections (default: %(default)s)",
    )
    add(
        "--rotate",
        type=positive_int,
        default=None,
        metavar="N",
        help="cs4410 and mbox: after every N messages, rename the mailbox file to "
        "MAILBOX.A-B and start a new one (default: never)",
    )
    add(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="(default: %(default)s)",
    )
    add("--tls-cert", metavar="FILE", help="PEM certificate chain: enables STARTTLS")
    add("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    add(
        "--tls-port",
        type=port_number,
        default=None,
        metavar="P",
        help="also listen here for implicit TLS (needs --tls-cert); 0 picks a free one",
    )
    add("--require-tls", action="store_true", help="refuse MAIL and AUTH before TLS (530)")
    add(
        "--auth",
        default="off",
        metavar="MODE",
        help="off (default), any (every login succeeds), or a FILE of user:password lines",
    )
    add("--auth-required", action="store_true", help="refuse MAIL before a successful AUTH")
    add(
        "--auth-allow-insecure",
        action="store_true",
        help="offer and accept AUTH before TLS (default: only under TLS)",
    )
    # Hidden: for tests and benchmarks, not for users.
    add("--lock-wait", type=positive_float, default=20.0, help=argparse.SUPPRESS)
    add("--no-fsync", action="store_true", help=argparse.SUPPRESS)
    add("--version", action="version", version=f"%(prog)s {__version__}")
    parser.formatter_class = argparse.HelpFormatter
    return parser


def fit_connections(wanted: int) -> int:
    """Raise the descriptor limit toward ``wanted`` + reserve; cap ``wanted`` to fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        capped = max(1, soft - FD_RESERVE)
        log.warning("descriptor limit is %d; serving at most %d connections", soft, capped)
        return capped
    return wanted


def default_name() -> str:
    """The short host name, or ``localhost`` if it is not fit for replies."""
    name = socket.gethostname().split(".")[0]
    return name if host_name_problem(name) is None else "localhost"


def check_tls_and_auth(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The TLS and AUTH options that need each other (SPEC §8); exit 2 otherwise."""
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert is None and args.tls_port is not None:
        parser.error("--tls-port needs --tls-cert and --tls-key")
    if args.tls_cert is None and args.require_tls:
        parser.error("--require-tls needs --tls-cert and --tls-key")
    if args.auth == "off" and (args.auth_required or args.auth_allow_insecure):
        parser.error("--auth-required and --auth-allow-insecure need --auth any or --auth FILE")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log_handler = logs.setup(args.log_level)
    if args.rotate is not None and args.format not in ROTATING_FORMATS:
        parser.error(f"--rotate applies to the {' and '.join(ROTATING_FORMATS)} formats only")
    check_tls_and_auth(parser, args)
    auth_users = None
    if args.auth not in ("off", "any"):
        try:
            auth_users = load_credentials(args.auth)
        except StartupError as exc:
            print(f"selsmtp: {exc}", file=sys.stderr)
            return 1
    config = Config(
        host=args.host,
        port=args.port,
        mailbox=args.mailbox,
        format=args.format,
        name=args.name or default_name(),
        timeout=args.timeout,
        max_message_size=args.max_message_size,
        max_recipients=args.max_recipients,
        max_connections=fit_connections(args.max_connections),
        rotate=args.rotate,
        log_level=args.log_level,
        lock_wait=args.lock_wait,
        fsync=not args.no_fsync,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_port=args.tls_port,
        require_tls=args.require_tls,
        auth=args.auth if auth_users is None else "file",
        auth_users=auth_users,
        auth_required=args.auth_required,
        auth_allow_insecure=args.auth_allow_insecure,
    )
    if not config.fsync:
        log.warning("--no-fsync: acknowledged messages can be lost in a crash (benchmarks only)")
    if config.auth != "off" and not config.starttls and not config.auth_allow_insecure:
        # Why: valid (as Postfix's smtpd_tls_auth_only), but clients then only say that
        # the server does not support AUTH.
        log.warning(
            "--auth without --tls-cert: AUTH is offered only under TLS, so never "
            "(add --tls-cert and --tls-key, or --auth-allow-insecure)"
        )
    try:
        server = Server(config)
    except StartupError as exc:
        log_handler.writer.drain(EXIT_DRAIN)
        print(f"selsmtp: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        log_handler.writer.drain(EXIT_DRAIN)
        where = format_address((config.host, config.port))
        print(f"selsmtp: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    stop = lambda signum, frame: server.request_stop()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # no KeyboardInterrupt can land mid-write
    signal.set_wakeup_fd(server.wakeup_fd, warn_on_full_buffer=False)
    print(f"selsmtp listening on {server.address}", flush=True)
    if server.tls_address is not None:
        print(f"selsmtp tls listening on {server.tls_address}", flush=True)
    log.info(
        "selsmtp %s listening on %s, mailbox %s (%s, message %d follows)",
        __version__,
        server.address,
        server.store.path,
        config.format,
        server.store.last_number + 1,
    )
    # Why flush here: the loop may wait long for its first event, and the start-up
    # line must be out when the server is ready (SPEC §7).
    server.after_turn = log_handler.writer.flush
    log_handler.writer.flush()
    try:
        server.serve_forever()
        count = server.delivered
        log.info("stopped; %s delivered", logs.counted(count, "message"))
    finally:
        log_handler.writer.drain(EXIT_DRAIN)
    return 0
