"""``python -m selsmtp.inbox``: list, show, follow and check a selsmtp mailbox.

Usage::

    python -m selsmtp.inbox list PATH           one line per message
    python -m selsmtp.inbox show PATH N         message number N as the client sent it
    python -m selsmtp.inbox follow PATH         each new message's line as it arrives
    python -m selsmtp.inbox check PATH          exit 0 if the mailbox is sound, else 1

All three formats are understood (``cs4410``, ``mbox``, ``maildir``); the format is
told by the path unless ``--format`` names it: a folder with ``new/`` and ``cur/`` is a
Maildir; a file has the format selsmtp recorded for it (offsets index, state file),
else one that starts with ``From `` is an mbox, one that starts with a
``Received: from ... (CS4410MP3)`` line is a cs4410 mailbox, and an empty file is an
empty mailbox.

A mailbox file is read under a shared ``fcntl.lockf`` lock, held only while its bytes
are read (never while they are parsed or printed); ``follow`` is
:mod:`selsmtp.follow`'s. What a mailbox holds, and what is wrong with it, is
:func:`selsmtp.read_mailbox`'s to say.

Exit status: 0 for success, 1 for a problem found by ``check``, a message ``show``
does not find, a path that is not a mailbox or cannot be read; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

from selsmtp import reader
from selsmtp.argtypes import non_negative_int, positive_float, positive_int
from selsmtp.durable import NotRegularFile
from selsmtp.follow import DEFAULT_LOCK_TIMEOUT, Stopper, make_follower
from selsmtp.reader import Mailbox, Message, NotAMailbox
from selsmtp.rotation import rotated_files

PROG: Final = "python -m selsmtp.inbox"
#: seconds between two looks at a followed mailbox
DEFAULT_INTERVAL: Final = 0.25
#: a summary line names at most this many recipients, then counts the rest
SHOWN_RECIPIENTS: Final = 5

# -- summaries -----------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: characters that are not printable (control
    and format characters, tabs, line ends) are written as ``\\t``, ``\\x1b``, ``\\u202e``."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def summary_fields(message: Message) -> list[str]:
    """The columns of a summary line: number, date (UTC), sender, recipients, size, subject."""
    recipients = message.recipients
    if recipients is None:
        shown = "-"
    else:
        shown = ",".join(recipients[:SHOWN_RECIPIENTS])
        if len(recipients) > SHOWN_RECIPIENTS:
            shown += f",+{len(recipients) - SHOWN_RECIPIENTS} more"
    subject = message.subject
    return [
        "-" if message.number is None else str(message.number),
        "-" if message.date is None else message.date.strftime("%Y-%m-%d %H:%M:%S"),
        "-" if message.sender is None else message.sender or "<>",
        shown,
        str(message.size),
        "-" if subject is None else subject,
    ]


def summary_line(message: Message) -> str:
    """One tab-separated line, safe to print on a terminal."""
    return "\t".join(printable(field) for field in summary_fields(message))


def summary_json(message: Message) -> str:
    fields: dict[str, Any] = {
        "number": message.number,
        "date": None if message.date is None else message.date.isoformat(),
        "sender": message.sender,
        "recipients": None if message.recipients is None else list(message.recipients),
        "size": message.size,
        "subject": message.subject,
        "format": message.format,
        "where": message.where,
    }
    return json.dumps(fields)


# -- the commands --------------------------------------------------------------


def _error(text: str) -> None:
    sys.stderr.write(f"{PROG}: {text}\n")
    sys.stderr.flush()


def _load(args: argparse.Namespace, path: str | None = None, *, strict: bool = False) -> Mailbox:
    return reader.read_mailbox(
        args.path if path is None else path,
        args.format,
        allow_gaps=not strict,
        allow_foreign=not strict,
        lock_timeout=args.lock_timeout,
    )


def cmd_list(args: argparse.Namespace) -> int:
    render = summary_json if args.json else summary_line
    out = sys.stdout
    for message in _load(args):
        out.write(render(message) + "\n")
    out.flush()
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    box = _load(args)
    found = [m for m in box if m.number == args.number]
    if not found and box.format in ("cs4410", "mbox", None):
        # It may have been rotated away to PATH.A-B, with A <= N <= B.
        for first, last, name in rotated_files(args.path):
            if first <= args.number <= last:
                with contextlib.suppress(OSError, NotAMailbox):
                    older = _load(args, name, strict=False)
                    found = [m for m in older if m.number == args.number]
                    if found:
                        box = older
                        _error(f"message {args.number} is in the rotated file {name}")
                        break
    if not found:
        _error(f"{args.path}: no message number {args.number}")
        return 1
    if len(found) > 1:
        _error(
            f"{box.path}: number {args.number} is stored {len(found)} times; "
            f"showing the first, at {found[0].where}"
        )
    sys.stdout.buffer.write(box.stored(found[0]) if args.raw else found[0].raw)
    sys.stdout.buffer.flush()
    return 0


def describe(box: Mailbox) -> str:
    """``cs4410 mailbox, 3 messages, numbers 1-3``, ``mbox, ...``, ``Maildir, ...`` or
    ``empty mailbox``."""
    count = len(box)
    if box.format is None or (count == 0 and not box.problems):
        return "empty mailbox" if box.format is None else f"empty {box.format} mailbox"
    kind = {"maildir": "Maildir", "mbox": "mbox"}.get(box.format, f"{box.format} mailbox")
    text = f"{kind}, {count} message{'' if count == 1 else 's'}"
    numbers = [m.number for m in box if m.number is not None]
    if numbers:
        low, high = min(numbers), max(numbers)
        text += f", number {low}" if low == high else f", numbers {low}-{high}"
    if len(numbers) < count:
        text += f", {count - len(numbers)} without a number"
    return text


def cmd_check(args: argparse.Namespace) -> int:
    box = _load(args, strict=args.strict)
    out = sys.stdout
    for problem in sorted(box.problems + box.warnings, key=lambda p: p.offset):
        out.write(f"{args.path}: {problem}\n")
    count = len(box.problems)
    if count:
        out.write(f"{args.path}: {count} problem{'' if count == 1 else 's'} in {describe(box)}\n")
    else:
        out.write(f"{args.path}: ok: {describe(box)}\n")
    out.flush()
    return 1 if count else 0


def cmd_follow(args: argparse.Namespace) -> int:
    follower = make_follower(args.path, args.format, _error, args.lock_timeout)
    render = summary_json if args.json else summary_line
    count: int | None = args.count
    printed = 0
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    out = sys.stdout
    with Stopper() as stopper:
        try:
            messages = follower.start(from_start=args.all)
            while True:
                for message in messages:
                    out.write(render(message) + "\n")
                    out.flush()
                    printed += 1
                    if count is not None and printed >= count:
                        return 0
                if stopper.stopped:
                    return 0
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                wait = args.interval if deadline is None else min(args.interval, deadline - now)
                stopper.wait(wait)
                if stopper.stopped:
                    return 0
                messages = follower.poll()
        finally:
            follower.close()
    if count is not None:
        _error(f"{args.path}: {printed} of {count} messages within {args.timeout:g} s")
        return 1
    return 0


# -- the command line ----------------------------------------------------------


COLUMNS: Final = """\
Each message is one line of tab-separated columns: NUMBER, DATE (UTC), SENDER,
RECIPIENTS, SIZE, SUBJECT: SENDER and RECIPIENTS are the envelope (mbox and Maildir
keep it in Return-Path and X-Original-To). "-" stands for what a record does not
tell: cs4410 records carry no date; a message that selsmtp did not write has no
NUMBER, and no envelope. SIZE is the length in bytes of the message
as `show` prints it. The null sender is "<>"; characters a terminal would act on are
escaped (\\t, \\x1b, ...)."""


FOLLOW_DESCRIPTION: Final = """\
Print each new message's line as it arrives, like tail -f, until SIGINT or SIGTERM
(exit 0). The mailbox is polled every --interval seconds, as there is no portable
way to be told of a change. A consumer that empties the file or renames it away, and
rotation to PATH.A-B, are followed. No message number is printed twice, and a message
only once it is whole. Mail that a consumer takes away between two looks is not seen."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Read a selsmtp mailbox (cs4410, mbox or Maildir), also while the server "
        "writes to it: mailbox files are read under a shared lockf lock.",
        epilog="Exit status: 0 success, 1 problems found or an error, 2 bad arguments.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("path", metavar="PATH", help="the mailbox file, or the Maildir folder")
    common.add_argument(
        "--format",
        choices=reader.FORMATS,
        default=None,
        help="the mailbox format (default: told by the path: a folder with new/ and cur/ "
        "is a Maildir; a file has the format selsmtp recorded for it, else one starting "
        "with 'From ' is an mbox, one starting with a "
        "'Received: from ... (CS4410MP3)' line a cs4410 mailbox)",
    )
    common.add_argument(
        "--lock-timeout",
        type=positive_float,
        default=DEFAULT_LOCK_TIMEOUT,
        metavar="S",
        help="give up if the mailbox stays locked this long (%(default)g s)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    formatter = argparse.RawDescriptionHelpFormatter

    listing = commands.add_parser(
        "list",
        parents=[common],
        help="one line per message",
        description="Print one line per message, in the order stored (Maildir: by number).",
        epilog=COLUMNS,
        formatter_class=formatter,
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line instead")
    listing.set_defaults(run=cmd_list)

    show = commands.add_parser(
        "show",
        parents=[common],
        help="print message N as the client sent it",
        description="Print message number N as the client sent it, with LF line ends: a "
        "cs4410 body as stored (CRLF was stored as LF, so the two cannot be told apart "
        "any more); an mbox or Maildir message without the Return-Path, Received and "
        "X-Selsmtp-Number lines selsmtp added, and in mbox with the >From quoting undone. "
        "A number rotated away to PATH.A-B is looked for there.",
    )
    show.add_argument("number", metavar="N", type=non_negative_int, help="the message number")
    show.add_argument(
        "--raw", action="store_true", help="print the stored record instead, as it is on disk"
    )
    show.set_defaults(run=cmd_show)

    follow = commands.add_parser(
        "follow",
        parents=[common],
        help="print each new message's line as it arrives, until interrupted",
        description=FOLLOW_DESCRIPTION,
        epilog=COLUMNS,
        formatter_class=formatter,
    )
    follow.add_argument("--all", action="store_true", help="print the messages already there first")
    follow.add_argument("--json", action="store_true", help="one JSON object per line instead")
    follow.add_argument(
        "--count", type=positive_int, default=None, metavar="N", help="exit after N messages"
    )
    follow.add_argument(
        "--timeout",
        type=positive_float,
        default=None,
        metavar="S",
        help="exit after S seconds: 0, or 1 if --count messages were not printed by then",
    )
    follow.add_argument(
        "--interval",
        type=positive_float,
        default=DEFAULT_INTERVAL,
        metavar="S",
        help="seconds between two looks (%(default)g)",
    )
    follow.set_defaults(run=cmd_follow)

    check = commands.add_parser(
        "check",
        parents=[common],
        help="verify the mailbox; exit 0 if sound, 1 if not",
        description="Verify the mailbox: whole records, no bytes outside them anywhere in "
        "the file, no torn tail (selsmtp's state file PATH.selsmtp is read too: it knows "
        "of an append cut short by a crash that looks whole), numbers unique and "
        "increasing. One line per problem, with its offset (or Maildir file), length and "
        "number, then a summary line; exit 1 if there is one. Warnings leave the exit "
        "status 0: a cs4410 body that holds a record-head look-alike (selsmtp's readers "
        "go by the store's offsets index, PATH.selsmtp-index, but other readers may be "
        "fooled), or no usable index (the file is parsed instead). Gaps in the numbering "
        "are normal (a crash or a failed write leaves numbers unused, consumers take mail "
        "away) and reported only with --strict.",
    )
    check.add_argument(
        "--strict",
        action="store_true",
        help="also report gaps in the numbering, and mbox/Maildir messages selsmtp did not write",
    )
    check.set_defaults(run=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except NotAMailbox as exc:
        _error(str(exc))
        return 1
    except TimeoutError as exc:
        _error(f"{args.path}: {exc}")
        return 1
    except KeyboardInterrupt:  # Ctrl-C in list, show or check (follow handles its own)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (``... | head``): not an error of ours.
        # Point stdout at /dev/null so that the interpreter's last flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    except NotRegularFile as exc:
        _error(f"cannot read {exc.filename}: it is {exc.strerror}, not a regular file")
        return 1
    except OSError as exc:
        name = exc.filename if exc.filename is not None else args.path
        _error(f"cannot read {name}: {exc.strerror or exc}")
        return 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
