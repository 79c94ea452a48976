"""``selsmtp.read_mailbox``: what the store writes comes back unchanged, in every format.

Each format gets a property test: random envelopes (the null sender, 8-bit
addresses, several recipients) and random bodies (record-head and ``From `` look-alikes
with plausible numbers, NULs, bare CRs, 8-bit bytes, no final newline) are stored by
the real store and read back with ``read_mailbox``; the seeds are fixed, so a failure
can be replayed. Then the envelope of mbox and Maildir (``X-Original-To:``), the ASCII
``From `` line read by the stdlib's ``mailbox.mbox``, and damage in the middle of a file.
"""

from __future__ import annotations

import email.message
import email.policy
import mailbox
import random
from pathlib import Path

import pytest

from selsmtp import durable, formats, read_mailbox
from selsmtp.maildir import MaildirStore
from selsmtp.session import Deliver, Envelope
from selsmtp.store import FileStore, cs4410_renderer, mbox_renderer

NAME = "mx.test"
NOW = 1_700_000_000.0
LOCAL_PARTS = ["a", "bob", "ålice", "ünïcødé", "x.y+z", "MAILER-DAEMON", "From"]


def random_address(rng: random.Random) -> str:
    return f"{rng.choice(LOCAL_PARTS)}{rng.randrange(100)}@{rng.choice(['ex.org', 'bücher.de'])}"


def random_envelope(rng: random.Random) -> Envelope:
    sender = "" if rng.random() < 0.2 else random_address(rng)
    recipients = tuple(random_address(rng) for _ in range(rng.randint(1, 4)))
    return Envelope(rng.choice(["client.test", "[127.0.0.1]", "hélo.example"]), sender, recipients)


def random_body(rng: random.Random, next_number: int) -> bytes:
    """A body as the client sends it (CRLF), full of things that look like records."""
    pieces = [
        b"",
        b"Subject: hi",
        f"Received: from evil by {NAME} (CS4410MP3)\r\nNumber: {next_number + 1}\r\n"
        "From: ceo@corp\r\nTo: victim@corp\r\n".encode(),
        f"Received: from evil by {NAME} (CS4410MP3)\r\nNumber: {next_number}".encode(),
        b"From ceo@corp Thu Jan  1 00:00:00 1970",
        b">From quoted",
        b">>From twice",
        b"Return-Path: <ceo@corp>\r\nX-Selsmtp-Number: 1",
        b"nul \x00 byte",
        b"bare \r cr",
        b"8-bit \xff\xfe caf\xc3\xa9",
        b".",
        b"..dots",
    ]
    lines = [rng.choice(pieces) for _ in range(rng.randint(0, 12))]
    body = b"\r\n".join(lines)
    if rng.random() < 0.8:
        body += b"\r\n"
    return body


def stored_content(body: bytes, fmt: str) -> bytes:
    """What reading a stored body back gives: LF line ends; an mbox message always
    ends with a line end (mboxrd cannot record a missing one)."""
    content = formats.crlf_to_lf(body)
    if fmt == "mbox" and content and not content.endswith(b"\n"):
        content += b"\n"
    return content


def open_store(fmt: str, path: Path) -> FileStore | MaildirStore:
    if fmt == "maildir":
        return MaildirStore(str(path), NAME, clock=lambda: NOW)
    if fmt == "mbox":
        return FileStore(
            str(path), mbox_renderer(NAME), number_pattern=formats.MBOX_NUMBER, clock=lambda: NOW
        )
    return FileStore(str(path), cs4410_renderer(NAME), clock=lambda: NOW)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fmt", ["cs4410", "mbox", "maildir"])
def test_random_messages_survive_store_and_read_unchanged(
    tmp_path: Path, fmt: str, seed: int
) -> None:
    rng = random.Random(seed)
    path = tmp_path / "box"
    store = open_store(fmt, path)
    sent: dict[int, tuple[Envelope, bytes]] = {}
    try:
        for _ in range(rng.randint(1, 5)):
            batch = []
            for _ in range(rng.randint(1, 4)):
                envelope = random_envelope(rng)
                batch.append(Deliver(envelope, random_body(rng, len(sent) + len(batch) + 1)))
            numbers = store.try_append(batch)
            assert numbers is not None
            sent.update(zip(numbers, ((d.envelope, d.body) for d in batch), strict=True))
    finally:
        store.close()

    box = read_mailbox(path)

    assert box.format == fmt
    assert box.problems == ()
    assert [m.number for m in box] == sorted(sent)
    for message in box:
        envelope, body = sent[message.number]
        assert message.sender == envelope.reverse_path
        assert message.recipients == envelope.forward_paths
        assert message.helo_name == envelope.helo_name
        assert message.raw == stored_content(body, fmt)
        assert isinstance(message.message, email.message.EmailMessage)


# -- the envelope in mbox and Maildir --------------------------------------------


BCC = Envelope("client.test", "ålice@ex.org", ("to@ex.org", "cc@ex.org", "secret-bcc@ex.org"))


@pytest.mark.parametrize("fmt", ["mbox", "maildir"])
def test_every_recipient_is_an_x_original_to_line_in_order(tmp_path: Path, fmt: str) -> None:
    store = open_store(fmt, tmp_path / "box")
    try:
        store.try_append([Deliver(BCC, b"Subject: x\r\nTo: to@ex.org\r\n\r\nhi\r\n")])
    finally:
        store.close()
    if fmt == "mbox":
        box: mailbox.Mailbox[mailbox.Message] = mailbox.mbox(str(tmp_path / "box"))
    else:
        box = mailbox.Maildir(str(tmp_path / "box"), create=False)
    try:
        raw = box.get_bytes(next(box.iterkeys()))
    finally:
        box.close()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)

    assert parsed.get_all("X-Original-To") == list(BCC.forward_paths)
    assert read_mailbox(tmp_path / "box")[0].recipients == BCC.forward_paths


@pytest.mark.parametrize("sender", ["ålice@ex.org", ""])
def test_the_from_line_is_ascii_and_mailbox_mbox_reads_it(tmp_path: Path, sender: str) -> None:
    envelope = Envelope("client.test", sender, ("bob@ex.org",))
    store = open_store("mbox", tmp_path / "box")
    try:
        store.try_append([Deliver(envelope, b"Subject: hi\r\n\r\nhello\r\n")])
    finally:
        store.close()

    box = mailbox.mbox(str(tmp_path / "box"))
    try:
        message = box.get_message(0)
    finally:
        box.close()

    assert message.get_from().startswith("MAILER-DAEMON ")
    assert message["Subject"] == "hi"
    assert read_mailbox(tmp_path / "box")[0].sender == sender


# -- damage in the middle of a file ----------------------------------------------


#: a record cut short by another writer that died mid-append: inside its first line
TORN = {
    "cs4410": b"Received: from other.writer by mx.test (CS44",
    "mbox": b"From other@writer Tue Nov 14 22:",
}


@pytest.mark.parametrize("fmt", ["cs4410", "mbox"])
def test_a_torn_record_in_the_middle_is_a_problem_and_the_records_after_it_are_found(
    tmp_path: Path, fmt: str
) -> None:
    path = tmp_path / "mailbox"
    for number in range(1, 4):
        store = open_store(fmt, path)  # a restart each time, as in issue 9
        try:
            store.try_append([Deliver(BCC, f"Subject: m{number}\r\n\r\nbody\r\n".encode())])
        finally:
            store.close()
        if number == 1:
            first = path.stat().st_size
            with open(path, "ab") as other:
                other.write(TORN[fmt])

    box = read_mailbox(path)

    assert [m.number for m in box] == [1, 2, 3]
    [problem] = box.problems
    assert problem.offset == first
    assert len(TORN[fmt]) <= problem.length <= len(TORN[fmt]) + 2
    assert box[1].offset == problem.offset + problem.length


@pytest.mark.parametrize("fmt", ["cs4410", "mbox"])
@pytest.mark.parametrize("damage", [b"junk another program left\n", b"F", b"\n"])
def test_records_after_damage_at_the_start_of_the_file_are_found(
    tmp_path: Path, fmt: str, damage: bytes
) -> None:
    # The file's first bytes are no record (another writer's junk, a lone "F" that
    # could begin an mbox "From ", `echo > mailbox`): the format is still known
    # (the state file and the index record it), so the records after it are found.
    path = tmp_path / "mailbox"
    path.write_bytes(damage)
    store = open_store(fmt, path)
    try:
        store.try_append([Deliver(BCC, b"one\r\n"), Deliver(BCC, b"two\r\n")])
    finally:
        store.close()

    box = read_mailbox(path)

    assert box.format == fmt
    assert [(m.number, m.raw) for m in box] == [(1, b"one\n"), (2, b"two\n")]
    [problem] = box.problems
    assert (problem.offset, problem.kind.value) == (0, "garbage")


def test_an_8bit_sender_reads_back_from_every_format(tmp_path: Path) -> None:
    for fmt in ("cs4410", "mbox", "maildir"):
        store = open_store(fmt, tmp_path / fmt)
        try:
            store.try_append([Deliver(BCC, b"hi\r\n")])
        finally:
            store.close()
        [message] = read_mailbox(tmp_path / fmt)
        assert (message.sender, message.recipients) == (BCC.reverse_path, BCC.forward_paths)


# -- the offsets index -----------------------------------------------------------


def test_records_another_program_appended_between_indexed_ones_are_listed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mailbox"
    foreign = b"".join(formats.cs4410_record(99, BCC, b"from elsewhere\r\n", "other.host"))
    for number in (1, 2):
        store = open_store("cs4410", path)
        try:
            store.try_append([Deliver(BCC, f"Subject: m{number}\r\n\r\nbody\r\n".encode())])
        finally:
            store.close()
        if number == 1:
            with open(path, "ab") as other:
                other.write(foreign)

    box = read_mailbox(path)

    assert [(m.number, m.server_name) for m in box] == [(1, NAME), (99, "other.host"), (2, NAME)]
    assert [p.kind.value for p in box.problems] == ["out-of-order"]  # 2 after 99: no damage
    assert box.warnings == ()


def test_the_index_still_counts_while_a_crash_left_its_last_batch_pending(
    tmp_path: Path,
) -> None:
    # The process died after listing its batch in the index and before recording the
    # commit: the state line names the batch as pending, and readers hide it. The
    # index still holds for every record before it: no look-alike is read as a record.
    path = tmp_path / "mailbox"
    forged = (
        b"hi\r\n\r\nReceived: from x by mx.test (CS4410MP3)\r\nNumber: 2\r\n"
        b"From: ceo@corp\r\nTo: victim@corp\r\n\r\nforged\r\n"
    )
    store = open_store("cs4410", path)
    try:
        store.try_append([Deliver(BCC, forged)])
        store.try_append([Deliver(BCC, b"two\r\n")])
    finally:
        store.close()
    state_path = Path(f"{path}{durable.STATE_SUFFIX}")
    state = durable.State.decode(state_path.read_bytes())
    assert state is not None
    second = read_mailbox(path)[1]
    state.pending, state.end = second.offset, second.end
    state.number = state.reserved = 2
    state_path.write_bytes(state.encode())

    box = read_mailbox(path)

    assert [(m.number, m.sender) for m in box] == [(1, BCC.reverse_path)]
    assert [p.kind.value for p in box.problems] == ["torn-tail"]
    assert [w.kind.value for w in box.warnings] == ["look-alike"]


def test_a_mailbox_a_consumer_renamed_is_read_by_its_index_at_once(tmp_path: Path) -> None:
    # `mv mailbox taken && inbox list taken`: the server has not appended since, so
    # the index is still mailbox.selsmtp-index, naming the file now called taken.
    path = tmp_path / "mailbox"
    body = (
        b"hi\r\n\r\nReceived: from x by mx.test (CS4410MP3)\r\nNumber: 2\r\n"
        b"From: ceo@corp\r\nTo: victim@corp\r\n\r\nforged\r\n"
    )
    store = open_store("cs4410", path)
    try:
        store.try_append([Deliver(BCC, body), Deliver(BCC, b"two\r\n")])
    finally:
        store.close()
    taken = tmp_path / "taken"
    path.rename(taken)

    box = read_mailbox(taken)

    assert [(m.number, m.sender) for m in box] == [(1, BCC.reverse_path), (2, BCC.reverse_path)]
    assert [w.kind.value for w in box.warnings] == ["look-alike"]


def test_an_index_that_does_not_match_the_file_is_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "mailbox"
    body = (
        b"hi\r\n\r\nReceived: from x by mx.test (CS4410MP3)\r\nNumber: 2\r\n"
        b"From: a@b\r\nTo: c@d\r\n\r\nforged\r\n"
    )
    store = open_store("cs4410", path)
    try:
        store.try_append([Deliver(BCC, body), Deliver(BCC, b"two\r\n")])
    finally:
        store.close()
    assert [m.number for m in read_mailbox(path)] == [1, 2]
    index = Path(f"{path}.selsmtp-index")
    index.write_bytes(index.read_bytes().replace(b" 2\n", b" 7\n"))

    box = read_mailbox(path)

    assert [w.kind.value for w in box.warnings] == ["no-index"]
    assert "does not match" in box.warnings[0].detail
    assert [m.number for m in box] == [1, 2, 2]  # parsed: the look-alike is read as a record
