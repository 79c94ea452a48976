"""The mbox format (mboxrd, SPEC §5.2): bytes, quoting, dates, and reading it back.

The record is checked byte for byte, ``>From `` quoting under every split of a spooled
body, and an mbox written by :class:`FileStore` is read back with the stdlib's
``mailbox.mbox``. That reader does not undo mboxrd quoting, so :func:`unquote` does,
and the result must equal what the client sent (CRLF as LF) under the three header
lines selsmtp adds.
"""

from __future__ import annotations

import io
import logging
import mailbox
import multiprocessing
import random
import re
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest

from selsmtp import formats, store
from selsmtp.config import Config
from selsmtp.session import Deliver, Envelope
from selsmtp.store import FileStore, mbox_renderer
from tests.stores import die_in_the_middle_of_the_next_write

NAME = "mx.test"
NOW = 1_700_000_000.25  # Tue Nov 14 22:13:20 2023 UTC
ENVELOPE = Envelope("client.test", "alice@example.org", ("bob@example.net",))

#: bodies as a client sends them (CRLF), with the lines mboxrd must protect
TRICKY = {
    "from-line": b"From the start\r\nFrom: header-like\r\n",
    "quoted-from": b">From once\r\n>>From twice\r\n>>>From thrice\r\n",
    "not-from": b"Fromage\r\n From indented\r\nxFrom \r\nFrom\r\n>From\r\n",
    "dots": b".\r\n..\r\n.leading\r\n",
    "eight-bit": b"caf\xc3\xa9 \xff\xfe\x00\r\n\xe9t\xe9\r\n",
    "empty-lines": b"\r\n\r\n\r\nFrom after blanks\r\n\r\n",
    "no-trailing-newline": b"Subject: x\r\n\r\nno newline at the end",
    "empty": b"",
    "headers": b"Subject: hi\r\nFrom: eve@x\r\n\r\nFrom me\r\n",
}


def record(number: int, body: bytes | io.BytesIO, envelope: Envelope = ENVELOPE) -> bytes:
    return b"".join(formats.mbox_record(number, envelope, body, NAME, NOW))


def trace(number: int, envelope: Envelope = ENVELOPE) -> bytes:
    return formats.trace_header(number, envelope, NAME, NOW)


def unquote(message: bytes) -> bytes:
    """Undo mboxrd quoting (what Python's mailbox.mbox leaves to its caller)."""
    return re.sub(rb"(?m)^>(>*From )", rb"\1", message)


def expected_message(number: int, body: bytes) -> bytes:
    """What reading message ``number`` back must give: trace header, body with LF,
    and a final LF if the body had none (an mbox message ends with a line end)."""
    lf = body.replace(b"\r\n", b"\n")
    if lf and not lf.endswith(b"\n"):
        lf += b"\n"
    return trace(number) + lf


def deliver(body: bytes = b"hello\r\n", reverse_path: str = "alice@example.org") -> Deliver:
    return Deliver(Envelope("client.test", reverse_path, ("bob@example.net",)), body)


@pytest.fixture
def mbox_store(tmp_path: Path) -> Iterator[FileStore]:
    opened = FileStore(
        str(tmp_path / "mbox"),
        mbox_renderer(NAME),
        number_pattern=formats.MBOX_NUMBER,
        clock=lambda: NOW,
    )
    yield opened
    opened.close()


def read_back(path: Path) -> list[tuple[bytes, bytes]]:
    """(From_ line, message bytes) of each message, in file order, via mailbox.mbox."""
    box = mailbox.mbox(str(path), create=False)
    try:
        return [
            (box.get_message(key).get_from().encode(), box.get_bytes(key)) for key in box.iterkeys()
        ]
    finally:
        box.close()


# -- the record, byte for byte -----------------------------------------------------


def test_a_record_is_from_line_trace_header_message_and_a_blank_line() -> None:
    assert record(7, b"Subject: hi\r\n\r\nHello.\r\n") == (
        b"From alice@example.org Tue Nov 14 22:13:20 2023\n"
        b"Return-Path: <alice@example.org>\n"
        b"Received: from client.test by mx.test (CS4410MP3);\n"
        b"\tTue, 14 Nov 2023 22:13:20 +0000\n"
        b"X-Selsmtp-Number: 7\n"
        b"X-Original-To: bob@example.net\n"
        b"Subject: hi\n"
        b"\n"
        b"Hello.\n"
        b"\n"
    )


@pytest.mark.parametrize(
    ("tls", "user", "via"),
    [
        ("TLSv1.3 with cipher TLS_AES_256_GCM_SHA384", None,
         b"\twith ESMTPS (TLSv1.3 with cipher TLS_AES_256_GCM_SHA384);\n"),
        ("TLSv1.2 with cipher ECDHE-RSA-AES128-GCM-SHA256", "alice",
         b"\twith ESMTPSA (TLSv1.2 with cipher ECDHE-RSA-AES128-GCM-SHA256)\n"
         b"\t(authenticated user alice);\n"),
        (None, "bob", b"\twith ESMTPA (authenticated user bob);\n"),
        (None, "evil\r\nX-Injected: 1 (x)\\",
         b"\twith ESMTPA (authenticated user evil??X-Injected:?1??x??);\n"),
    ],
    ids=["tls", "tls-and-auth", "auth", "hostile-user"],
)  # fmt: skip
def test_the_received_line_notes_tls_and_the_authenticated_user(
    tls: str | None, user: str | None, via: bytes
) -> None:
    envelope = Envelope("client.test", "alice@example.org", ("bob@example.net",), tls, user)
    header = trace(7, envelope)
    assert header == (
        b"Return-Path: <alice@example.org>\n"
        b"Received: from client.test by mx.test (CS4410MP3)\n"
        + via
        + b"\tTue, 14 Nov 2023 22:13:20 +0000\n"
        b"X-Selsmtp-Number: 7\n"
        b"X-Original-To: bob@example.net\n"
    )
    # and the readers see through the with clause to the names and the date
    parsed = formats.trace.parse(header, 0, len(header))
    assert parsed is not None
    stored, end = parsed
    assert end == len(header)
    assert (stored.number, stored.helo_name, stored.server_name) == (7, "client.test", "mx.test")
    assert stored.date == datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
    assert stored.recipients == ("bob@example.net",)


def test_the_null_sender_is_mailer_daemon_in_the_from_line_and_empty_in_return_path() -> None:
    envelope = Envelope("c", "", ("postmaster@x",))
    data = record(1, b"x\r\n", envelope)
    assert data.startswith(b"From MAILER-DAEMON Tue Nov 14 22:13:20 2023\nReturn-Path: <>\n")


@pytest.mark.parametrize(
    ("body", "stored"),
    [
        (b"From x\r\n", b">From x\n"),
        (b">From x\r\n", b">>From x\n"),
        (b">>>>From x\r\n", b">>>>>From x\n"),
        (b"a\r\nFrom x\r\nb\r\n", b"a\n>From x\nb\n"),
        (b"From \r\n", b">From \n"),
        (b"From", b"From\n"),
        (b"Fromage\r\n", b"Fromage\n"),
        (b" From x\r\n", b" From x\n"),
        (b"> From x\r\n", b"> From x\n"),
        (b"x From y\r\n", b"x From y\n"),
        (b"from x\r\n", b"from x\n"),
        (b"From x", b">From x\n"),
        (b"a\rFrom x\r\n", b"a\rFrom x\n"),
        (b"a\nFrom x\r\n", b"a\n>From x\n"),
    ],
    ids=[
        "from",
        "quoted-once",
        "quoted-four-times",
        "mid-body",
        "from-space-only",
        "from-no-space",
        "fromage",
        "indented",
        "gt-space",
        "inside-a-line",
        "lower-case",
        "last-line-no-newline",
        "after-bare-cr",
        "after-bare-lf",
    ],
)
def test_mboxrd_quotes_every_line_matching_gt_star_from_space(body: bytes, stored: bytes) -> None:
    assert record(1, body) == record(1, b"")[:-1] + stored + b"\n"


def test_a_message_without_a_final_line_end_gets_one_before_the_blank_line() -> None:
    assert record(1, b"abc").endswith(b"X-Original-To: bob@example.net\nabc\n\n")


def test_an_empty_message_is_the_trace_header_and_the_blank_line() -> None:
    assert record(2, b"") == b"From alice@example.org Tue Nov 14 22:13:20 2023\n" + trace(2) + b"\n"


def test_header_lines_of_the_client_are_kept_as_they_are() -> None:
    body = b"Received: from elsewhere\r\nX-Selsmtp-Number: 999\r\nSubject: s\r\n\r\nb\r\n"
    assert record(3, body).endswith(trace(3) + body.replace(b"\r\n", b"\n") + b"\n")


@pytest.mark.parametrize(
    "now",
    [0.0, 1_700_000_000.25, 1_700_000_000.9999999, 951_782_400.0, 1_000_000_000.0, 4_102_444_799.0],
    ids=["epoch", "nov-2023", "just-before-a-second", "leap-day", "sept-2001", "end-2099"],
)
def test_dates_are_utc_asctime_and_rfc5322(now: float) -> None:
    asctime, rfc5322 = formats.dates(now)
    assert asctime == time.asctime(time.gmtime(now))
    assert rfc5322 == format_datetime(datetime.fromtimestamp(int(now), timezone.utc))
    assert rfc5322.endswith(" +0000")


def test_the_day_of_month_is_space_padded_as_asctime_does() -> None:
    assert formats.dates(1_700_000_000 - 10 * 86400)[0] == "Sat Nov  4 22:13:20 2023"


# -- quoting a body that arrives in pieces --------------------------------------------

QUOTING_BODIES = [
    *TRICKY.values(),
    b">>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>From deep\r\n",
    b"From " * 40 + b"\r\n" + b"\r\nFrom\r\n" * 20,
    b"F\r\nFr\r\nFro\r\nFrom\r\n>F\r\n>Fr\r\nFrom",
    b"\r\n".join(b">" * n + b"From " + b"x" * n for n in range(12)),
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 6, 7, 64], ids=lambda n: f"chunk-{n}")
@pytest.mark.parametrize("body", QUOTING_BODIES, ids=[f"body-{i}" for i in range(13)])
def test_a_spooled_body_is_quoted_exactly_as_in_memory(
    monkeypatch: pytest.MonkeyPatch, body: bytes, chunk: int
) -> None:
    monkeypatch.setattr(formats, "CHUNK", chunk)
    assert record(9, io.BytesIO(body)) == record(9, body)


def test_quoting_is_the_same_under_random_splits() -> None:
    rng = random.Random(4410)
    alphabet = [b"From ", b">", b"F", b"r", b"o", b"m", b" ", b"\n", b"x"]
    for _ in range(2000):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(40)))
        cuts = sorted(rng.sample(range(len(data) + 1), rng.randrange(min(6, len(data) + 1))))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        whole = formats.FROM_LINE.sub(rb">\g<0>", data)
        assert b"".join(formats.quote_from_lines(pieces)) == whole, (data, cuts)


def test_quoting_holds_back_at_most_a_partial_from() -> None:
    pieces = list(formats.quote_from_lines([b">" * 1000, b">" * 1000 + b"Fro", b"m x\n"]))
    assert pieces[0] == b">" * 1000
    assert pieces[1] == b">" * 1000  # "Fro" waits for the next piece
    assert b"".join(pieces) == b">" * 2001 + b"From x\n"


# -- a store in the mbox format, read back with mailbox.mbox --------------------------


def test_every_tricky_body_reads_back_exactly_with_mailbox_mbox(
    mbox_store: FileStore, tmp_path: Path
) -> None:
    bodies = list(TRICKY.values())
    assert mbox_store.try_append([deliver(body) for body in bodies]) == list(
        range(1, len(bodies) + 1)
    )
    assert mbox_store.try_append([deliver(bodies[0], "")]) == [len(bodies) + 1]

    messages = read_back(tmp_path / "mbox")

    assert len(messages) == len(bodies) + 1
    for number, (body, (from_line, message)) in enumerate(zip(bodies, messages, strict=False), 1):
        assert from_line == b"alice@example.org Tue Nov 14 22:13:20 2023"
        assert unquote(message) == expected_message(number, body), number
    assert messages[-1][0] == b"MAILER-DAEMON Tue Nov 14 22:13:20 2023"


def test_the_stdlib_parses_the_trace_header(mbox_store: FileStore, tmp_path: Path) -> None:
    mbox_store.try_append([deliver(b"Subject: hello\r\n\r\nbody\r\n")])

    box = mailbox.mbox(str(tmp_path / "mbox"), create=False)
    [message] = list(box)
    box.close()

    assert message["X-Selsmtp-Number"] == "1"
    assert message["Return-Path"] == "<alice@example.org>"
    assert message["Subject"] == "hello"
    assert message["Received"].startswith("from client.test by mx.test (CS4410MP3);")
    assert message.get_payload() == "body\n"


def test_a_spooled_message_is_stored_like_one_in_memory(
    mbox_store: FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(formats, "CHUNK", 5)
    body = b"".join(TRICKY.values()) + b"end\r\n"
    mbox_store.try_append([deliver(io.BytesIO(body)), deliver(body)])

    [(_, first), (_, second)] = read_back(tmp_path / "mbox")

    assert unquote(first) == expected_message(1, body)
    assert unquote(second) == expected_message(2, body)


def test_numbers_continue_across_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "mbox")
    first = store.open_store(Config(mailbox=path, format="mbox", name=NAME))
    assert first.try_append([deliver(), deliver()]) == [1, 2]
    first.close()

    second = store.open_store(Config(mailbox=path, format="mbox", name=NAME))
    assert second.last_number == 2
    assert second.try_append([deliver()]) == [3]
    second.close()

    box = mailbox.mbox(path, create=False)
    numbers = [int(m["X-Selsmtp-Number"]) for m in box]
    box.close()
    assert numbers == [1, 2, 3]


def test_without_a_state_file_the_last_number_is_found_and_look_alikes_are_not(
    tmp_path: Path, mbox_store: FileStore
) -> None:
    # A body that quotes a whole mbox message with a higher number: its From_ line is
    # quoted, so it cannot be taken for a separator.
    look_alike = b"From x Mon Jan  1 00:00:00 2024\r\n" + trace(999).replace(b"\n", b"\r\n")
    mbox_store.try_append([deliver(), deliver(look_alike)])
    mbox_store.close()
    (tmp_path / ("mbox" + store.STATE_SUFFIX)).unlink()

    reopened = FileStore(
        str(tmp_path / "mbox"), mbox_renderer(NAME), number_pattern=formats.MBOX_NUMBER
    )
    try:
        assert reopened.last_number == 2
        assert reopened.try_append([deliver()]) == [3]
    finally:
        reopened.close()


def test_open_store_picks_the_format(tmp_path: Path) -> None:
    config = Config(mailbox=str(tmp_path / "box"), format="mbox", name=NAME)
    opened = store.open_store(config)
    try:
        assert isinstance(opened, FileStore)
        opened.try_append([deliver()])
    finally:
        opened.close()
    assert (tmp_path / "box").read_bytes().startswith(b"From alice@example.org ")
    cs4410 = store.open_store(config.replace(mailbox=str(tmp_path / "other"), format="cs4410"))
    cs4410.close()
    maildir = store.open_store(config.replace(mailbox=str(tmp_path / "md"), format="maildir"))
    maildir.close()
    assert (tmp_path / "md" / "new").is_dir()


def _crash_in_the_middle_of_an_append(path: str) -> None:
    """Child process: store one message, then die with the second one all but written."""
    crashing = FileStore(path, mbox_renderer(NAME), number_pattern=formats.MBOX_NUMBER)
    crashing.try_append([deliver()])
    die_in_the_middle_of_the_next_write()
    crashing.try_append([deliver(b"From a torn message\r\n")])


def test_a_torn_tail_is_removed_at_start_up_and_the_mbox_stays_readable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "mbox"
    child = multiprocessing.get_context("spawn").Process(
        target=_crash_in_the_middle_of_an_append, args=(str(path),)
    )
    child.start()
    child.join(10)
    assert child.exitcode == 3
    assert len(read_back(path)) == 2  # the torn message looks like a message

    with caplog.at_level(logging.WARNING, logger="selsmtp.store"):
        reopened = FileStore(str(path), mbox_renderer(NAME), number_pattern=formats.MBOX_NUMBER)
    try:
        assert "torn tail" in caplog.text
        assert reopened.try_append([deliver()]) == [3]
    finally:
        reopened.close()
    numbers = [int(re.search(rb"X-Selsmtp-Number: (\d+)", m)[1]) for _, m in read_back(path)]  # type: ignore[index]
    assert numbers == [1, 3]
