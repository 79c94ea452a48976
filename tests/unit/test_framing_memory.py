"""DataReader's memory in real bytes: tiny pieces of message data cost about their size.

Measured with ``tracemalloc``: every block Python allocates while the reader holds the
data, against the data's length.
"""

from __future__ import annotations

import io
import random
import tracemalloc
from collections.abc import Iterator

import pytest

from selsmtp.framing import DataReader


def tiny_pieces(total: int, size: int) -> Iterator[bytes]:
    """``total`` bytes of 80-byte lines, cut into pieces of ``size`` bytes."""
    stream = (b"x" * 78 + b"\r\n") * (total // 80)
    return (stream[start : start + size] for start in range(0, len(stream), size))


def held_while_reading(reader: DataReader, pieces: Iterator[bytes]) -> tuple[int, int]:
    """(bytes allocated and still held after feeding ``pieces``, bytes fed)."""
    fed = 0
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for piece in pieces:
            assert reader.feed(piece) is None
            fed += len(piece)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return after - before, fed


@pytest.mark.parametrize("size", [1, 2, 7])
def test_tiny_pieces_are_held_in_about_their_own_size(size: int) -> None:
    reader = DataReader(1 << 30, spool_threshold=1 << 30)
    held, fed = held_while_reading(reader, tiny_pieces(200_000, size))
    # Each piece an object of its own: up to about 50 bytes apiece, 7 to 21 times the data.
    assert held < 1.5 * fed + 4096, f"{held} bytes held for {fed} bytes of data"
    assert reader.feed(b"\r\n.\r\n") == b""
    body = reader.body()
    assert isinstance(body, bytes) and len(body) == fed + 2


def test_a_mix_of_tiny_and_large_pieces_keeps_every_byte_in_order() -> None:
    rng = random.Random(10)
    data = bytearray()
    pieces: list[bytes] = []
    for n in range(3000):
        size = rng.choice([1, 2, 3, 500, 1023, 1024, 1025, 5000])
        chunk = bytes([0x61 + n % 26]) * size
        if n % 7 == 0:
            chunk += b"\r\n..dot\r\n"  # a dot to unstuff, across the readers' paths
        pieces.append(chunk)
        data += chunk
    expected = bytes(data).replace(b"\r\n..", b"\r\n.") + b"\r\n"
    for threshold in (1 << 30, 200_000):
        reader = DataReader(1 << 30, spool_threshold=threshold, new_spool=io.BytesIO)
        for piece in pieces:
            assert reader.feed(piece) is None
        assert reader.feed(b"\r\n.\r\nQUIT\r\n") == b"QUIT\r\n"
        body = reader.body()
        got = body if isinstance(body, bytes) else body.read() if body else None
        assert got == expected, threshold
