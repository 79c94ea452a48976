"""Framing: command lines (LineReader) and message data (DataReader), on their own."""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterable
from typing import BinaryIO

import pytest

from selsmtp.framing import MANY_DOT_LINES, DataReader, LineReader, LineStatus
from tests.scripts import body_bytes, splits, two_piece_splits

# -- LineReader ----------------------------------------------------------------


def lines_of(chunks: Iterable[bytes], limit: int = 512) -> list[bytes | LineStatus]:
    """Every line a LineReader cuts from ``chunks`` fed one after the other."""
    reader = LineReader(limit)
    buf = bytearray()
    found: list[bytes | LineStatus] = []
    for chunk in chunks:
        buf += chunk
        while (line := reader.maybe_next_line(buf)) is not None:
            found.append(line)
    return found


def test_a_crlf_line_comes_out_with_its_line_ending() -> None:
    assert lines_of([b"NOOP\r\n"]) == [b"NOOP\r\n"]


def test_a_bare_lf_ends_a_command_line() -> None:
    assert lines_of([b"NOOP\nQUIT\n"]) == [b"NOOP\n", b"QUIT\n"]


def test_a_bare_cr_does_not_end_a_command_line() -> None:
    assert lines_of([b"NO\rOP\r\n"]) == [b"NO\rOP\r\n"]


def test_an_unfinished_line_stays_in_the_buffer() -> None:
    reader = LineReader(512)
    buf = bytearray(b"NOOP\r\nHELO ex")
    assert reader.maybe_next_line(buf) == b"NOOP\r\n"
    assert reader.maybe_next_line(buf) is None
    assert buf == b"HELO ex"
    buf += b"ample\r\n"
    assert reader.maybe_next_line(buf) == b"HELO example\r\n"
    assert buf == b""


def test_lines_come_out_the_same_however_the_input_is_split() -> None:
    data = b"HELO a\r\nNOOP\nRSET\r\n" + b"X" * 600 + b"\r\nQUIT\r\n"
    expected = [b"HELO a\r\n", b"NOOP\n", b"RSET\r\n", LineStatus.TOO_LONG, b"QUIT\r\n"]
    for chunks in [*splits(data), *two_piece_splits(data)]:
        assert lines_of(chunks) == expected


@pytest.mark.parametrize(
    ("line", "accepted"),
    [
        (b"X" * 510 + b"\r\n", True),
        (b"X" * 511 + b"\n", True),
        (b"X" * 511 + b"\r\n", False),
        (b"X" * 512 + b"\n", False),
    ],
    ids=["512-crlf", "512-lf", "513-crlf", "513-lf"],
)
def test_a_line_may_be_512_bytes_with_its_line_ending(line: bytes, accepted: bool) -> None:
    for chunks in ([line], [line[i : i + 1] for i in range(len(line))]):
        expected = [line] if accepted else [LineStatus.TOO_LONG]
        assert lines_of([*chunks, b"NOOP\r\n"]) == [*expected, b"NOOP\r\n"]


def test_a_too_long_line_is_dropped_as_it_arrives() -> None:
    reader = LineReader(512)
    buf = bytearray()
    for _ in range(100):
        buf += b"X" * 1000
        assert reader.maybe_next_line(buf) is None
        assert len(buf) < 512
    buf += b"tail\r\nNOOP\r\n"
    assert reader.maybe_next_line(buf) is LineStatus.TOO_LONG
    assert reader.maybe_next_line(buf) == b"NOOP\r\n"


def test_a_too_long_line_ending_in_one_chunk_with_the_next_line() -> None:
    assert lines_of([b"Y" * 1000 + b"\r\nNOOP\r\n"]) == [LineStatus.TOO_LONG, b"NOOP\r\n"]


def test_the_search_resumes_where_it_stopped() -> None:
    reader = LineReader(512)
    buf = bytearray()
    for byte in b"ABCDEFGH":
        buf.append(byte)
        assert reader.maybe_next_line(buf) is None
    buf += b"\r\n"
    assert reader.maybe_next_line(buf) == b"ABCDEFGH\r\n"


# -- DataReader ----------------------------------------------------------------


def read_data(
    chunks: Iterable[bytes], max_size: int = 1 << 20, **kwargs: object
) -> tuple[bytes | None, bytes | None, DataReader]:
    """Feed ``chunks``: (the body or None if the end never came, what followed, reader)."""
    reader = DataReader(max_size, **kwargs)  # type: ignore[arg-type]
    buffer = b""
    ended = False
    for chunk in chunks:
        if ended:
            buffer += chunk
            continue
        rest = reader.feed(chunk)
        if rest is not None:
            ended = True
            buffer = rest
    if not ended:
        return None, None, reader
    body = None if reader.too_big else body_bytes(reader.body())
    return body, buffer, reader


def reference(stream: bytes) -> tuple[bytes, bytes] | None:
    """A line-at-a-time model of RFC 5321 §4.1.1.4 and §4.5.2: (body, rest) or None."""
    body: list[bytes] = []
    pos = 0
    while (end := stream.find(b"\r\n", pos)) >= 0:
        line, pos = stream[pos:end], end + 2
        if line == b".":
            return b"".join(body), stream[pos:]
        body.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
    return None


def test_a_message_ends_at_crlf_dot_crlf() -> None:
    body, rest, _ = read_data([b"Hello\r\nWorld\r\n.\r\nQUIT\r\n"])
    assert (body, rest) == (b"Hello\r\nWorld\r\n", b"QUIT\r\n")


def test_a_lone_dot_as_first_line_ends_an_empty_message() -> None:
    assert read_data([b".\r\nNOOP\r\n"])[:2] == (b"", b"NOOP\r\n")


def test_nothing_after_the_end_gives_an_empty_rest() -> None:
    assert read_data([b"x\r\n.\r\n"])[:2] == (b"x\r\n", b"")


def test_without_the_end_of_data_line_the_message_goes_on() -> None:
    assert read_data([b"x\r\n.\r", b"x\r\n"])[0] is None


SMUGGLING = [
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r\n.\r\r\n",
    b"\r.\r\n",
    b"\n.\r",
    b"\r\n .\r\n",
    b"\r\n.\x00\r\n",
]
SMUGGLING_IDS = [
    "lf-lf",
    "cr-cr",
    "lf-crlf",
    "crlf-lf",
    "crlf-cr-crlf",
    "cr-crlf",
    "lf-cr",
    "space-dot",
    "dot-nul",
]


@pytest.mark.parametrize("fake_end", SMUGGLING, ids=SMUGGLING_IDS)
def test_only_crlf_dot_crlf_ends_a_message(fake_end: bytes) -> None:
    data = b"one" + fake_end + b"MAIL FROM:<evil@x>\r\n.\r\n"
    expected = reference(data)
    assert expected is not None
    for chunks in [*splits(data), *two_piece_splits(data)]:
        body, rest, _ = read_data(chunks)
        assert (body, rest) == expected
        assert rest == b""
        assert body is not None
        assert b"MAIL FROM:<evil@x>\r\n" in body


@pytest.mark.parametrize(
    ("data", "body"),
    [
        (b"..x\r\n.\r\n", b".x\r\n"),
        (b"a\r\n..x\r\n.\r\n", b"a\r\n.x\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"...\r\n.\r\n", b"..\r\n"),
        (b".x\r\n.\r\n", b"x\r\n"),
        (b"a.b\r\n.\r\n", b"a.b\r\n"),
        (b"a\r\n.\r\r\n.\r\n", b"a\r\n\r\r\n"),
        (b"a\n..b\r\n.\r\n", b"a\n..b\r\n"),
        (b"..\r\n..\r\n.\r\n", b".\r\n.\r\n"),
    ],
    ids=[
        "first-line",
        "later-line",
        "dot-dot",
        "three-dots",
        "single-dot-text",
        "inner-dot",
        "dot-cr",
        "after-bare-lf",
        "consecutive",
    ],
)
def test_a_leading_dot_on_a_data_line_is_removed(data: bytes, body: bytes) -> None:
    for chunks in [*splits(data), *two_piece_splits(data)]:
        assert read_data(chunks)[:2] == (body, b"")


def test_the_end_of_data_line_is_found_when_split_at_every_boundary() -> None:
    data = b"a\r\n..b\r\nc\r\n.\r\nQUIT\r\n"
    for first in range(len(data) + 1):
        for second in range(first, len(data) + 1):
            chunks = [data[:first], data[first:second], data[second:]]
            assert read_data(chunks)[:2] == (b"a\r\n.b\r\nc\r\n", b"QUIT\r\n")


def test_random_data_reads_like_the_line_at_a_time_model() -> None:
    rng = random.Random(4410)
    alphabet = [b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b"\r\n.\r\n"]
    for _ in range(2000):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 6))))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        expected = reference(data)
        body, rest, _ = read_data(chunks)
        assert (None if body is None else (body, rest)) == expected, (data, cuts)


def test_data_thick_with_dot_lines_reads_like_the_model() -> None:
    # More than MANY_DOT_LINES dot lines in one read switch the reader to its bulk
    # path; the bytes must not change whichever path a read takes, or where it is cut.
    rng = random.Random(5510)
    lines = [b"..", b".x", b"...", b".\r", b".\n", b"", b"a", b"\r", b"a\n.", b"\n.\r"]  # never "."
    bulky = 0
    for _ in range(400):
        data = b"\r\n".join(rng.choice(lines) for _ in range(rng.randint(30, 120)))
        data += rng.choice([b"\r\n.\r\n", b"\r\n.\r\nQUIT\r\n", b"\r\n.\r", b""])
        expected = reference(data)
        end = len(data) if expected is None else len(data) - len(expected[1])
        bulky += data.count(b"\r\n.", 0, end) > MANY_DOT_LINES
        for chunks in splits(data, random_splits=4):
            body, rest, _ = read_data(chunks)
            assert (None if body is None else (body, rest)) == expected, (data, chunks)
    assert bulky > 300  # the data really took the bulk path (the model check is above)


def test_body_bytes_are_kept_untouched() -> None:
    payload = bytes(b for b in range(256) if b not in b"\r\n") + b"\r\n\xff\xfe\x80\xc3(\r\n"
    assert read_data([payload + b".\r\n"])[0] == payload


def test_a_body_of_exactly_the_limit_is_kept() -> None:
    data = b"x" * 1022 + b"\r\n"
    body, rest, reader = read_data([data + b".\r\nNOOP\r\n"], max_size=1024)
    assert (body, rest, reader.too_big, reader.size) == (data, b"NOOP\r\n", False, 1024)


def test_a_body_over_the_limit_is_dropped_but_read_to_its_end() -> None:
    data = b"x" * 1023 + b"\r\n"
    for chunks in splits(data + b".\r\nNOOP\r\n"):
        body, rest, reader = read_data(chunks, max_size=1024)
        assert (body, rest, reader.too_big) == (None, b"NOOP\r\n", True)


def test_the_size_counts_bytes_after_unstuffing() -> None:
    data = b"." * 1023 + b"\r\n"  # 1025 bytes sent, 1024 kept
    body, _, reader = read_data([data + b".\r\n"], max_size=1024)
    assert body == b"." * 1022 + b"\r\n"
    assert reader.size == 1024


def test_a_body_over_the_limit_keeps_nothing_in_memory() -> None:
    reader = DataReader(1024)
    for _ in range(1000):
        assert reader.feed(b"y" * 997 + b"\r\n.y") is None
        assert sum(map(len, reader._chunks)) <= 1024
        assert len(reader._carry) <= 6
    assert reader.too_big
    assert reader._chunks == []
    assert reader.feed(b"\r\n.\r\n") == b""
    assert reader.body() == b""


@pytest.fixture
def spools() -> list[io.BytesIO]:
    """Every spool file that :func:`spooler` made in this test."""
    return []


def spooler(spools: list[io.BytesIO]) -> Callable[[], BinaryIO]:
    def new_spool() -> BinaryIO:
        spools.append(io.BytesIO())
        return spools[-1]

    return new_spool


def test_a_body_past_the_spool_threshold_moves_to_a_spool_file(spools: list[io.BytesIO]) -> None:
    data = b"".join(b"line %d\r\n..dot\r\n" % i for i in range(50))
    expected = reference(data + b".\r\n")
    assert expected is not None
    for chunks in splits(data + b".\r\n"):
        reader = DataReader(1 << 20, spool_threshold=64, new_spool=spooler(spools))
        assert any(reader.feed(chunk) is not None for chunk in chunks)
        body = reader.body()
        assert isinstance(body, io.BytesIO)
        assert body.tell() == 0
        assert body.read() == expected[0]
    assert len(spools) == 8


def test_a_body_under_the_spool_threshold_stays_in_memory(spools: list[io.BytesIO]) -> None:
    body, _, _ = read_data([b"short\r\n.\r\n"], spool_threshold=64, new_spool=spooler(spools))
    assert body == b"short\r\n"
    assert spools == []


def test_a_spooled_body_that_grows_over_the_limit_closes_its_spool(
    spools: list[io.BytesIO],
) -> None:
    body, rest, reader = read_data(
        [b"z" * 100 + b"\r\n", b"z" * 2000 + b"\r\n.\r\n"],
        max_size=1024,
        spool_threshold=64,
        new_spool=spooler(spools),
    )
    assert (body, rest, reader.too_big) == (None, b"", True)
    assert [spool.closed for spool in spools] == [True]


def test_discard_closes_the_spool(spools: list[io.BytesIO]) -> None:
    reader = DataReader(1 << 20, spool_threshold=8, new_spool=spooler(spools))
    assert reader.feed(b"0123456789" * 5) is None
    reader.discard()
    assert [spool.closed for spool in spools] == [True]
    assert reader.body() == b""
