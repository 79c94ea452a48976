"""How a stored message looks on disk, as bytes: one module per format, each holding
that format's renderer and its parser, so that every record head, ``From `` line and
trace line is written and matched in one place. No file access happens here.

* :mod:`~selsmtp.formats.cs4410`: selsmtp's own record (SPEC §5.1);
* :mod:`~selsmtp.formats.mbox`: mboxrd (SPEC §5.2);
* :mod:`~selsmtp.formats.maildir`: one file per message (SPEC §5.2);
* :mod:`~selsmtp.formats.trace`: the ``Return-Path:``, ``Received:``,
  ``X-Selsmtp-Number:`` and ``X-Original-To:`` lines above an mbox or Maildir
  message, and the dates;
* :mod:`~selsmtp.formats.lines`: bodies with CRLF as LF, in pieces.

The names below are the ones the stores use.
"""

from selsmtp.formats import cs4410, maildir, mbox, trace
from selsmtp.formats.lines import CHUNK, crlf_to_lf, lf_lines

CS4410_NUMBER = cs4410.NUMBER
MBOX_NUMBER = mbox.NUMBER
MAILDIR_NUMBER = maildir.NUMBER
FROM_LINE = mbox.FROM_LINE
cs4410_header = cs4410.head
cs4410_record = cs4410.record
mbox_record = mbox.record
maildir_message = maildir.message
trace_header = trace.header
dates = trace.dates
quote_from_lines = mbox.quote_from_lines

#: How a record of each single-file format begins (its first line's first bytes).
HEAD_STARTS = {"cs4410": cs4410.HEAD_START, "mbox": mbox.HEAD_START}

#: The formats, as ``--format`` names them.
FORMATS = ("cs4410", "mbox", "maildir")

__all__ = [
    "CHUNK",
    "CS4410_NUMBER",
    "FORMATS",
    "FROM_LINE",
    "HEAD_STARTS",
    "MAILDIR_NUMBER",
    "MBOX_NUMBER",
    "crlf_to_lf",
    "cs4410",
    "cs4410_header",
    "cs4410_record",
    "dates",
    "lf_lines",
    "maildir",
    "maildir_message",
    "mbox",
    "mbox_record",
    "quote_from_lines",
    "trace",
    "trace_header",
]
