"""The offsets index file (selsmtp.mailindex): its format, loading it, and writing it,
on real files in tmp_path."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from selsmtp import mailindex
from selsmtp.mailindex import IndexEntry, IndexWriter

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def mailbox(tmp_path: Path) -> Path:
    path = tmp_path / "mailbox"
    path.write_bytes(b"x" * 1000)
    return path


@pytest.fixture
def writer(mailbox: Path) -> Iterator[IndexWriter]:
    one = IndexWriter(str(mailbox), os.fsync)
    yield one
    one.close()


def index_of(mailbox: Path) -> Path:
    return mailbox.with_name(mailbox.name + ".selsmtp-index")


def header(mailbox: Path, fmt: str = "cs4410") -> bytes:
    st = mailbox.stat()
    return b"selsmtp-index 1 %s %d %d\n" % (fmt.encode(), st.st_dev, st.st_ino)


def write_index(mailbox: Path, data: bytes) -> None:
    index_of(mailbox).write_bytes(data)


def load(mailbox: Path) -> list[IndexEntry] | None:
    return mailindex.load(str(mailbox), os.stat(mailbox))


# -- the format and load() ------------------------------------------------------


def test_the_index_is_the_mailbox_path_plus_a_suffix() -> None:
    assert mailindex.index_path("/var/mail/box") == "/var/mail/box.selsmtp-index"
    assert mailindex.index_path("/var/mail/box.1-32") == "/var/mail/box.1-32.selsmtp-index"


def test_an_entry_is_a_named_tuple_of_offset_length_number() -> None:
    entry = IndexEntry(10, 20, 3)
    assert (entry.offset, entry.length, entry.number) == (10, 20, 3)
    assert entry == (10, 20, 3)


@pytest.mark.parametrize("fmt", ["cs4410", "mbox"])
def test_load_reads_the_entries_of_an_index_naming_this_file(mailbox: Path, fmt: str) -> None:
    write_index(mailbox, header(mailbox, fmt) + b"0 100 1\n100 50 2\n200 800 7\n")

    assert load(mailbox) == [(0, 100, 1), (100, 50, 2), (200, 800, 7)]
    assert load(mailbox) == [IndexEntry(0, 100, 1), IndexEntry(100, 50, 2), IndexEntry(200, 800, 7)]


def test_a_header_alone_is_an_index_with_no_entries(mailbox: Path) -> None:
    write_index(mailbox, header(mailbox))
    assert load(mailbox) == []


def test_a_torn_last_line_is_ignored(mailbox: Path) -> None:
    write_index(mailbox, header(mailbox) + b"0 100 1\n100 5")
    assert load(mailbox) == [(0, 100, 1)]


def test_no_index_loads_as_none(mailbox: Path) -> None:
    assert load(mailbox) is None


def test_an_index_of_another_file_loads_as_none(mailbox: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"x" * 1000)
    write_index(mailbox, header(other) + b"0 100 1\n")
    assert load(mailbox) is None


@pytest.mark.parametrize(
    "bad_header",
    [
        b"selsmtp-index 1 maildir %d %d\n",
        b"selsmtp-index 2 cs4410 %d %d\n",
        b"selsmtp-state 1 cs4410 %d %d\n",
        b"selsmtp-index 1 cs4410 %d %d extra\n",
        b"selsmtp-index 1 cs4410 %d\n",
        b"",
    ],
    ids=["format", "version", "magic", "extra-field", "missing-field", "empty"],
)
def test_a_header_of_unknown_form_loads_as_none(mailbox: Path, bad_header: bytes) -> None:
    st = mailbox.stat()
    fields = bad_header.count(b"%d")
    line = bad_header % (st.st_dev, st.st_ino)[:fields]
    write_index(mailbox, line + b"0 100 1\n")
    assert load(mailbox) is None


@pytest.mark.parametrize(
    "entries",
    [
        b"100 50 2\n0 100 1\n",  # offsets go back
        b"0 100 1\n50 100 2\n",  # overlapping records
        b"0 100 2\n100 100 2\n",  # a number repeated
        b"0 100 2\n100 100 1\n",  # numbers go back
        b"0 0 1\n",  # an empty record
        b"0 1001 1\n",  # past the end of the file (a consumer emptied it)
        b"900 200 1\n",  # ends past the end of the file
        b"0 100\n",  # a field missing
        b"0 100 1 1\n",  # a field too many
        b"0 -100 1\n",  # a sign
        b"0 +100 1\n",
        b"0 1e2 1\n",
        b"0 \xd9\xa1 1\n",  # a digit that is not ASCII
        b"\n",  # an empty line
    ],
)
def test_entries_that_cannot_describe_the_file_load_as_none(mailbox: Path, entries: bytes) -> None:
    write_index(mailbox, header(mailbox) + entries)
    assert load(mailbox) is None


def test_the_index_of_a_file_a_consumer_emptied_is_stale(mailbox: Path) -> None:
    write_index(mailbox, header(mailbox) + b"0 100 1\n")
    assert load(mailbox) == [(0, 100, 1)]
    os.truncate(mailbox, 0)  # movemail
    assert load(mailbox) is None


def test_an_index_that_is_not_a_regular_file_loads_as_none(mailbox: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(header(mailbox) + b"0 100 1\n")
    index_of(mailbox).symlink_to(target)
    assert load(mailbox) is None  # never followed

    index_of(mailbox).unlink()
    os.mkfifo(index_of(mailbox))
    assert load(mailbox) is None  # and never waited on


def test_load_takes_the_stat_the_caller_took(mailbox: Path) -> None:
    write_index(mailbox, header(mailbox) + b"0 100 1\n")
    with open(mailbox, "rb") as held:
        st = os.fstat(held.fileno())
        os.rename(mailbox, mailbox.with_name("elsewhere"))  # renamed away after fstat
        assert mailindex.load(str(mailbox), st) == [(0, 100, 1)]


# -- IndexWriter ----------------------------------------------------------------


def test_reset_writes_the_header_and_append_the_entries(mailbox: Path, writer: IndexWriter) -> None:
    st = mailbox.stat()
    writer.reset("cs4410", st.st_dev, st.st_ino)
    writer.append([IndexEntry(0, 100, 1), IndexEntry(100, 50, 2)])
    writer.append([IndexEntry(160, 40, 3)])

    assert index_of(mailbox).read_bytes() == header(mailbox) + b"0 100 1\n100 50 2\n160 40 3\n"
    assert load(mailbox) == [(0, 100, 1), (100, 50, 2), (160, 40, 3)]
    assert (writer.end, writer.last) == (200, 3)
    assert writer.describes(st.st_dev, st.st_ino)


def test_append_is_one_write(
    mailbox: Path, writer: IndexWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = mailbox.stat()
    writer.reset("mbox", st.st_dev, st.st_ino)
    writes: list[int] = []
    real_write = os.write

    def counted(fd: int, data: bytes) -> int:
        writes.append(fd)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counted)
    writer.append([IndexEntry(10 * n, 10, n + 1) for n in range(100)])
    assert writes == [writer.fd]


def test_reset_begins_the_index_again(mailbox: Path, writer: IndexWriter, tmp_path: Path) -> None:
    st = mailbox.stat()
    writer.reset("cs4410", st.st_dev, st.st_ino)
    writer.append([IndexEntry(0, 100, 1)])
    os.rename(mailbox, tmp_path / "away")
    mailbox.write_bytes(b"y" * 10)
    st = mailbox.stat()

    writer.reset("cs4410", st.st_dev, st.st_ino)

    assert index_of(mailbox).read_bytes() == header(mailbox)
    assert load(mailbox) == []
    assert (writer.end, writer.last) == (0, 0)


def test_truncate_to_cuts_the_entries_past_a_length(mailbox: Path, writer: IndexWriter) -> None:
    st = mailbox.stat()
    writer.reset("cs4410", st.st_dev, st.st_ino)
    writer.append([IndexEntry(0, 100, 1), IndexEntry(100, 50, 2), IndexEntry(152, 48, 3)])

    writer.truncate_to(199)  # record 3 ends at 200: cut
    assert load(mailbox) == [(0, 100, 1), (100, 50, 2)]
    assert (writer.end, writer.last) == (150, 2)

    writer.truncate_to(150)  # nothing past it
    assert load(mailbox) == [(0, 100, 1), (100, 50, 2)]

    writer.truncate_to(0)
    assert index_of(mailbox).read_bytes() == header(mailbox)
    assert (writer.end, writer.last) == (0, 0)

    writer.append([IndexEntry(0, 10, 4)])  # and it goes on from there
    assert load(mailbox) == [(0, 10, 4)]


def test_truncate_to_reads_a_large_index_backwards(mailbox: Path, writer: IndexWriter) -> None:
    mailbox.write_bytes(b"x" * 10_000_000)
    st = mailbox.stat()
    writer.reset("cs4410", st.st_dev, st.st_ino)
    writer.append([IndexEntry(100 * n, 100, n + 1) for n in range(100_000)])
    assert index_of(mailbox).stat().st_size > 4 * (1 << 16)

    writer.truncate_to(100 * 99_000 + 50)  # cuts 1000 entries, in more than one chunk
    entries = load(mailbox)
    assert entries is not None
    assert len(entries) == 99_000
    assert entries[-1] == (100 * 98_999, 100, 99_000)
    assert (writer.end, writer.last) == (100 * 99_000, 99_000)

    writer.truncate_to(150)
    assert load(mailbox) == [(0, 100, 1)]


def test_adopt_goes_on_with_an_index_of_this_file(mailbox: Path, tmp_path: Path) -> None:
    write_index(mailbox, header(mailbox) + b"0 100 1\n100 50 2\n")
    writer = IndexWriter(str(mailbox), os.fsync)
    try:
        assert writer.adopt("cs4410", mailbox.stat())
        assert (writer.end, writer.last) == (150, 2)
        writer.append([IndexEntry(150, 10, 3)])
    finally:
        writer.close()
    assert load(mailbox) == [(0, 100, 1), (100, 50, 2), (150, 10, 3)]


def test_adopt_cuts_a_torn_last_line(mailbox: Path) -> None:
    write_index(mailbox, header(mailbox) + b"0 100 1\n100 5")
    writer = IndexWriter(str(mailbox), os.fsync)
    try:
        assert writer.adopt("cs4410", mailbox.stat())
        assert (writer.end, writer.last) == (100, 1)
        writer.append([IndexEntry(100, 50, 2)])
    finally:
        writer.close()
    assert load(mailbox) == [(0, 100, 1), (100, 50, 2)]


def test_adopt_of_a_header_alone_or_a_torn_first_entry(mailbox: Path) -> None:
    for text in (b"", b"0 10"):
        write_index(mailbox, header(mailbox) + text)
        writer = IndexWriter(str(mailbox), os.fsync)
        try:
            assert writer.adopt("cs4410", mailbox.stat())
            assert (writer.end, writer.last) == (0, 0)
        finally:
            writer.close()
        assert index_of(mailbox).read_bytes() == header(mailbox)


@pytest.mark.parametrize(
    "text",
    [
        b"",  # no index
        b"selsmtp-index 1 mbox %(dev)d %(ino)d\n0 100 1\n",  # another format
        b"selsmtp-index 1 cs4410 %(dev)d 1\n0 100 1\n",  # another file
        b"selsmtp-index 1 cs4410 %(dev)d %(ino)d\n0 2000 1\n",  # past the end: emptied
        b"selsmtp-index 1 cs4410 %(dev)d %(ino)d\n0 100 1\ngarbage\n",
        b"selsmtp-index 1 cs4410 %(dev)d %(ino)d\n" + b"9" * 300 + b"\n",
    ],
    ids=["none", "format", "file", "past-the-end", "garbage", "long-line"],
)
def test_adopt_resets_an_index_that_does_not_describe_the_file(mailbox: Path, text: bytes) -> None:
    st = mailbox.stat()
    write_index(mailbox, text % {b"dev": st.st_dev, b"ino": st.st_ino})
    writer = IndexWriter(str(mailbox), os.fsync)
    try:
        assert not writer.adopt("cs4410", st)
        assert (writer.end, writer.last) == (0, 0)
    finally:
        writer.close()
    assert index_of(mailbox).read_bytes() == header(mailbox)


def test_rename_takes_the_index_along_and_begins_a_new_one(
    mailbox: Path, writer: IndexWriter
) -> None:
    st = mailbox.stat()
    writer.reset("mbox", st.st_dev, st.st_ino)
    writer.append([IndexEntry(0, 1000, 1)])
    rotated = mailbox.with_name("mailbox.1-1")
    os.link(mailbox, rotated)
    os.unlink(mailbox)
    mailbox.write_bytes(b"")

    writer.rename(str(rotated))
    new = mailbox.stat()
    writer.reset("mbox", new.st_dev, new.st_ino)
    writer.append([IndexEntry(0, 10, 2)])  # a record that is not there yet

    assert mailindex.load(str(rotated), rotated.stat()) == [(0, 1000, 1)]
    assert index_of(mailbox).read_bytes() == header(mailbox, "mbox") + b"0 10 2\n"


def test_the_writer_refuses_an_index_that_is_not_a_regular_file(
    mailbox: Path, tmp_path: Path
) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious\n")
    index_of(mailbox).symlink_to(target)
    with pytest.raises(OSError):
        IndexWriter(str(mailbox), os.fsync)
    assert target.read_bytes() == b"precious\n"

    index_of(mailbox).unlink()
    os.mkfifo(index_of(mailbox))
    with pytest.raises(OSError):
        IndexWriter(str(mailbox), os.fsync)  # at once: no reader to wait for


def test_a_failed_append_leaves_the_index_as_it_was(
    mailbox: Path, writer: IndexWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = mailbox.stat()
    writer.reset("cs4410", st.st_dev, st.st_ino)
    writer.append([IndexEntry(0, 100, 1)])
    real_write = os.write

    def half_then_fail(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data[:5]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_fail)
    with pytest.raises(OSError):
        writer.append([IndexEntry(100, 100, 2)])
    monkeypatch.undo()

    assert index_of(mailbox).read_bytes() == header(mailbox) + b"0 100 1\n"
    assert (writer.end, writer.last) == (100, 1)
