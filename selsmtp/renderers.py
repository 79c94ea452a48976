"""The records of a batch as :class:`~selsmtp.store.FileStore` writes them.

A :data:`Renderer` yields the bytes of one record (:mod:`selsmtp.formats` has the
formats; :func:`cs4410_renderer` and :func:`mbox_renderer` bind one to the server's
name). The store must know a part's length before it writes the commit marker, and
must not hold a large message in memory twice: :func:`render_part` measures every
record first, and keeps the pieces of an in-memory message but renders a spooled one
again, lazily, as it is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from selsmtp import formats
from selsmtp.session import Deliver

#: ``render(number, deliver, now)`` yields the bytes of one record
Renderer = Callable[[int, Deliver, float], Iterable[bytes]]


def render_part(
    render: Renderer, first: int, part: Sequence[Deliver], now: float
) -> tuple[list[Iterable[bytes]], list[int]]:
    """The records of ``part`` (numbered from ``first``) and their lengths.

    A spooled message is rendered twice, once to measure it and once, lazily, to
    write it, so that it never has to sit in memory whole."""
    records: list[Iterable[bytes]] = []
    lengths: list[int] = []
    for number, deliver in enumerate(part, first):
        body = deliver.body
        if isinstance(body, bytes):
            pieces = list(render(number, deliver, now))
            lengths.append(sum(map(len, pieces)))
            records.append(pieces)
        else:
            lengths.append(sum(map(len, render(number, deliver, now))))
            body.seek(0)
            records.append(render(number, deliver, now))
    return records, lengths


def cs4410_renderer(server_name: str) -> Renderer:
    def render(number: int, deliver: Deliver, now: float) -> Iterator[bytes]:
        return formats.cs4410_record(number, deliver.envelope, deliver.body, server_name)

    return render


def mbox_renderer(server_name: str) -> Renderer:
    def render(number: int, deliver: Deliver, now: float) -> Iterator[bytes]:
        return formats.mbox_record(number, deliver.envelope, deliver.body, server_name, now)

    return render
