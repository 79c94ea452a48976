"""The cs4410 record (SPEC §5.1), byte for byte, from memory and from a spool file."""

from __future__ import annotations

import io
import itertools

import pytest

from selsmtp import formats
from selsmtp.session import Envelope


def record(number: int, envelope: Envelope, body: bytes | io.BytesIO) -> bytes:
    return b"".join(formats.cs4410_record(number, envelope, body, "test.example"))


ENVELOPE = Envelope("client.example", "alice@example.org", ("bob@example.net",))


def test_a_record_is_header_blank_line_body_with_lf_ends_and_a_blank_line() -> None:
    assert record(1, ENVELOPE, b"Subject: hi\r\n\r\nHello.\r\n") == (
        b"Received: from client.example by test.example (CS4410MP3)\n"
        b"Number: 1\n"
        b"From: alice@example.org\n"
        b"To: bob@example.net\n"
        b"\n"
        b"Subject: hi\n"
        b"\n"
        b"Hello.\n"
        b"\n"
    )


def test_every_recipient_gets_a_to_line_in_order_duplicates_kept() -> None:
    envelope = Envelope("c", "a@b", ("x@y", "w@z", "x@y"))
    assert record(42, envelope, b"x\r\n") == (
        b"Received: from c by test.example (CS4410MP3)\n"
        b"Number: 42\n"
        b"From: a@b\n"
        b"To: x@y\n"
        b"To: w@z\n"
        b"To: x@y\n"
        b"\n"
        b"x\n"
        b"\n"
    )


def test_the_null_sender_is_written_in_brackets() -> None:
    envelope = Envelope("c", "", ("postmaster",))
    assert b"\nFrom: <>\nTo: postmaster\n\n" in record(3, envelope, b"")


def test_an_empty_body_gives_the_header_and_the_closing_blank_line() -> None:
    assert record(7, ENVELOPE, b"") == (
        b"Received: from client.example by test.example (CS4410MP3)\n"
        b"Number: 7\n"
        b"From: alice@example.org\n"
        b"To: bob@example.net\n"
        b"\n"
        b"\n"
    )


@pytest.mark.parametrize(
    ("body", "written"),
    [
        (b"a\r\nb\r\n", b"a\nb\n"),
        (b"bare\rcr\r\n", b"bare\rcr\n"),
        (b"bare\nlf\r\n", b"bare\nlf\n"),
        (b"\r\r\n\n\r\n", b"\r\n\n\n"),
        (b"From: eve@x\r\nTo: mallory@y\r\n\r\n.\r\n", b"From: eve@x\nTo: mallory@y\n\n.\n"),
        (b"\xff\xfe\x00\xc3(\r\n", b"\xff\xfe\x00\xc3(\n"),
        (b"no final line end", b"no final line end"),
    ],
    ids=["crlf", "bare-cr", "bare-lf", "cr-runs", "client-headers", "eight-bit", "unterminated"],
)
def test_crlf_becomes_lf_and_every_other_byte_stays(body: bytes, written: bytes) -> None:
    header = formats.cs4410_header(1, ENVELOPE, "test.example")
    assert record(1, ENVELOPE, body) == header + written + b"\n"


def test_the_fast_crlf_conversion_agrees_with_replace_on_every_short_input() -> None:
    # Every string of up to 7 bytes over {a, CR, LF}: every way a CR can be bare,
    # paired, doubled or last.
    for length in range(8):
        for letters in itertools.product(b"a\r\n", repeat=length):
            data = bytes(letters)
            assert formats.crlf_to_lf(data) == data.replace(b"\r\n", b"\n"), data


def test_utf8_names_and_addresses_are_written_as_utf8() -> None:
    envelope = Envelope("b\u00fccher.example", "j\u00fcrgen@b\u00fccher.example", ("c@d",))
    assert record(1, envelope, b"").startswith(
        b"Received: from b\xc3\xbccher.example by test.example (CS4410MP3)\n"
        b"Number: 1\nFrom: j\xc3\xbcrgen@b\xc3\xbccher.example\n"
    )


BODIES = [
    b"",
    b"\r",
    b"\r\n",
    b"line one\r\nline two\r\n",
    b"ab\r\ncd\r\r\nef\n\r\r\n\r",
    bytes(range(256)) * 3,
    b"\r\n" * 50 + b"\r" * 7 + b"\n" * 3,
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 64], ids=lambda n: f"chunk-{n}")
@pytest.mark.parametrize("body", BODIES, ids=[f"body-{i}" for i in range(len(BODIES))])
def test_a_spooled_body_gives_the_same_bytes_as_in_memory(
    monkeypatch: pytest.MonkeyPatch, body: bytes, chunk: int
) -> None:
    monkeypatch.setattr(formats, "CHUNK", chunk)
    assert record(9, ENVELOPE, io.BytesIO(body)) == record(9, ENVELOPE, body)


def test_a_cr_at_the_end_of_a_spool_chunk_waits_for_the_next_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(formats, "CHUNK", 4)
    pieces = list(formats.lf_lines(io.BytesIO(b"abc\r\ndef\r")))
    assert b"".join(pieces) == b"abc\ndef\r"
    assert all(not piece.endswith(b"\r") for piece in pieces[:-1])


def test_the_number_pattern_finds_each_record_number() -> None:
    mailbox = record(1, ENVELOPE, b"a\r\n") + record(2, ENVELOPE, b"Number: 99\r\n")
    assert [int(m.group(1)) for m in formats.CS4410_NUMBER.finditer(mailbox)] == [1, 2]
