"""Properties that hold for every input: split invariance, one reply per command in
every state, no exception and well-formed replies on garbage, and bounded buffers."""

from __future__ import annotations

import random
import re

import pytest

from selsmtp import replies
from selsmtp.config import Config
from selsmtp.replies import Reply
from selsmtp.session import COMMAND_STATES, Action, Close, Deliver, Session, State
from selsmtp.syntax import Verb
from tests.scripts import (
    CLOSE_MARK,
    ENVELOPE,
    TO_STATE,
    Answer,
    FakeStore,
    MakeSession,
    converse,
    message,
    play,
    run,
    session_in,
    splits,
    transcript,
    two_piece_splits,
)

# -- split invariance over a corpus of whole conversations ---------------------------

CORPUS = {
    "two-messages-and-quit": (
        b"EHLO client.example\r\nMAIL FROM:<a@b> SIZE=10\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\n"
        b"DATA\r\nSubject: one\r\n\r\n..dot\r\n.\r\n"
        + message(b"two\r\n", sender=b"", rcpt=b"c@d")
        + b"QUIT\r\n"
    ),
    "smuggling-attempts": ENVELOPE
    + b"DATA\r\na\n.\nMAIL FROM:<x@y>\r\nb\r.\rc\n.\r\nd\r\n.\nDATA\r\ne\r\n.\r\r\n.\r\n"
    + b"NOOP\r\n",
    "errors-and-recovery": (
        b"MAIL FROM:<a@b>\r\n\r\nHELO\r\nHELO c\r\nRCPT TO:<a@b>\r\nMAIL FROM:<a b>\r\n"
        b"MAIL FROM:<a@b> FOO=1\r\nMAIL FROM:<a@b>\r\nDATA\r\nRCPT TO:<>\r\nRCPT TO:<c@d>\r\n"
        b"DATA x\r\nDATA\r\nok\r\n.\r\nXYZZY\r\n"
    ),
    "long-lines": b"NOOP " + b"x" * 700 + b"\r\nHELO c\n" + b"RCPT " + b"y" * 507 + b"\r\nQUIT\n",
    "too-big-then-small": ENVELOPE
    + b"DATA\r\n"
    + b"z" * 1100
    + b"\r\n.\r\n"
    + message(b"small\r\n"),
    "too-many-recipients": b"HELO c\r\nMAIL FROM:<a@b>\r\n"
    + b"RCPT TO:<r@x>\r\n" * 5
    + b"DATA\r\n.\r\n",
    "error-limit": b"HELO c\r\n" + b"FOO\r\n" * 25,
    "eight-bit-body": ENVELOPE + b"DATA\r\n\xff\xfe\x00\r\n\xc3(\r\n.\r\n",
    "bare-lf-commands": b"HELO c\nMAIL FROM:a@b\nRCPT TO:c@d\nDATA\nx\r\n.\r\nQUIT\n",
}


@pytest.mark.parametrize("data", CORPUS.values(), ids=CORPUS.keys())
def test_a_conversation_gives_the_same_outcome_cut_anywhere_in_two(
    make_session: MakeSession, data: bytes
) -> None:
    transcript(make_session, data, splittings=two_piece_splits)


@pytest.mark.parametrize("data", CORPUS.values(), ids=CORPUS.keys())
def test_a_conversation_gives_the_same_outcome_under_many_random_splits(
    make_session: MakeSession, data: bytes
) -> None:
    for seed in range(10):
        transcript(make_session, data, seed=seed)


@pytest.mark.parametrize("data", CORPUS.values(), ids=CORPUS.keys())
def test_a_conversation_gives_the_same_outcome_with_a_failing_store(
    make_session: MakeSession, data: bytes
) -> None:
    transcript(make_session, data, answers=["busy", "stored", "failed"])


# -- every state x every verb --------------------------------------------------------

COMMANDS: dict[Verb | None, bytes] = {
    Verb.HELO: b"HELO other.example\r\n",
    Verb.EHLO: b"EHLO other.example\r\n",
    Verb.MAIL: b"MAIL FROM:<carol@example.org>\r\n",
    Verb.RCPT: b"RCPT TO:<dave@example.net>\r\n",
    Verb.DATA: b"DATA\r\n",
    Verb.RSET: b"RSET\r\n",
    Verb.NOOP: b"NOOP\r\n",
    Verb.VRFY: b"VRFY dave\r\n",
    Verb.QUIT: b"QUIT\r\n",
    None: b"XYZZY\r\n",
}

F, R, M, T, D, C = State.FRESH, State.READY, State.MAIL, State.RCPT, State.DATA, State.CLOSED

#: (state, verb) -> (reply code, state after), for the states that read commands.
EXPECTED: dict[tuple[State, Verb | None], tuple[int, State]] = {
    (F, Verb.HELO): (250, R), (F, Verb.EHLO): (250, R), (F, Verb.MAIL): (503, F),
    (F, Verb.RCPT): (503, F), (F, Verb.DATA): (503, F), (F, Verb.RSET): (250, F),
    (F, Verb.NOOP): (250, F), (F, Verb.VRFY): (252, F), (F, Verb.QUIT): (221, C),
    (F, None): (502, F),
    (R, Verb.HELO): (503, R), (R, Verb.EHLO): (503, R), (R, Verb.MAIL): (250, M),
    (R, Verb.RCPT): (503, R), (R, Verb.DATA): (503, R), (R, Verb.RSET): (250, R),
    (R, Verb.NOOP): (250, R), (R, Verb.VRFY): (252, R), (R, Verb.QUIT): (221, C),
    (R, None): (502, R),
    (M, Verb.HELO): (503, M), (M, Verb.EHLO): (503, M), (M, Verb.MAIL): (503, M),
    (M, Verb.RCPT): (250, T), (M, Verb.DATA): (503, M), (M, Verb.RSET): (250, R),
    (M, Verb.NOOP): (250, M), (M, Verb.VRFY): (252, M), (M, Verb.QUIT): (221, C),
    (M, None): (502, M),
    (T, Verb.HELO): (503, T), (T, Verb.EHLO): (503, T), (T, Verb.MAIL): (503, T),
    (T, Verb.RCPT): (250, T), (T, Verb.DATA): (354, D), (T, Verb.RSET): (250, R),
    (T, Verb.NOOP): (250, T), (T, Verb.VRFY): (252, T), (T, Verb.QUIT): (221, C),
    (T, None): (502, T),
}  # fmt: skip

#: AUTH and STARTTLS need a configuration of their own: tests/unit/test_session_tls_auth.py
PAIRS = [(state, verb) for state in State for verb in COMMANDS if state in TO_STATE]


def pair_id(state: State, verb: Verb | None) -> str:
    return f"{state.name.lower()}-{verb.name.lower() if verb else 'unknown'}"


def test_the_expected_table_covers_every_command_state_and_verb() -> None:
    assert set(EXPECTED) == {(s, v) for s in COMMAND_STATES for v in COMMANDS}


@pytest.mark.parametrize(("state", "verb"), PAIRS, ids=[pair_id(s, v) for s, v in PAIRS])
def test_every_verb_in_every_state_answers_exactly_once(
    make_session: MakeSession, state: State, verb: Verb | None
) -> None:
    session, _ = session_in(make_session, state)
    actions = session.receive(COMMANDS[verb])
    if state in COMMAND_STATES:
        code, after = EXPECTED[state, verb]
    elif state is State.DATA:
        assert actions == []  # inside a message a command line is content
        assert session.state is State.DATA
        return
    elif state is State.DELIVERING:
        assert actions == []  # read only once the store has answered
        actions = session.delivered(1)[1:]
        code, after = EXPECTED[State.READY, verb]
    else:
        assert actions == []
        assert session.state is State.CLOSED
        return
    assert [action.code for action in actions if isinstance(action, Reply)] == [code]
    assert all(isinstance(action, Reply | Close) for action in actions)
    assert session.state is after
    assert (Close() in actions) == (after is State.CLOSED)


# -- garbage never raises ------------------------------------------------------------

TOKENS = [
    b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.\r\n", b"\r\n.", b".\r\n", b"\x00", b"\xff",
    b"\xc3", b" ", b"\t", b"<", b">", b"<>", b"@", b":", b"=", b"a@b", b"@x,@y:", b"HELO x",
    b"EHLO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"QUIT", b"RSET", b"NOOP", b"VRFY",
    b"SIZE=", b"BODY=8BITMIME", b"SMTPUTF8", b"9" * 30, b"x" * 300, b"y" * 700, b"\x1b[2J",
    b"\xed\xa0\x80", b"ma\xc4\xb1l",
]  # fmt: skip

PREFIXES = [b"", b"HELO fuzz\r\n", ENVELOPE, ENVELOPE + b"DATA\r\n"]

WELL_FORMED = re.compile(rb"([2-5]\d\d)([ -])[\x20-\x7e]*\r\n")


def assert_well_formed(output: bytes) -> None:
    """Wire replies only: printable lines, CRLF ends, continuations keep their code."""
    if output.endswith(CLOSE_MARK):
        output = output[: -len(CLOSE_MARK)]
    assert CLOSE_MARK not in output
    continued: bytes | None = None
    pos = 0
    while pos < len(output):
        match = WELL_FORMED.match(output, pos)
        assert match is not None, output[pos : pos + 80]
        code, separator = match.groups()
        assert continued in (None, code), output[pos : pos + 80]
        continued = code if separator == b"-" else None
        pos = match.end()
    assert continued is None, "a multi-line reply was left unfinished"


def assert_buffers_bounded(session: Session) -> None:
    """Outside a delivery, what the session holds of its input is bounded by the limits."""
    if session.state in COMMAND_STATES:
        assert len(session._buffer) < 512
    elif session.state is State.DATA:
        assert len(session._buffer) == 0
        assert session._data is not None
        assert len(session._data._carry) <= 6
        assert sum(map(len, session._data._chunks)) <= 1024
    elif session.state is State.CLOSED:
        assert len(session._buffer) == 0


def random_input(rng: random.Random) -> bytes:
    parts = [rng.choice(PREFIXES)]
    for _ in range(rng.randint(0, 40)):
        if rng.random() < 0.1:
            parts.append(rng.randbytes(rng.randint(1, 40)))
        else:
            parts.append(rng.choice(TOKENS))
    return b"".join(parts)


def random_chunks(rng: random.Random, data: bytes) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 8))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def test_random_garbage_never_raises_and_gets_well_formed_replies(
    make_session: MakeSession,
) -> None:
    rng = random.Random(20240229)
    for _ in range(5000):
        data = random_input(rng)
        answers: list[Answer] = [rng.choice(["stored", "busy", "failed"]) for _ in range(4)]
        whole = run(make_session, [data], answers=answers)
        session = make_session()
        store = FakeStore(answers)
        output = bytearray()
        for chunk in random_chunks(rng, data) if len(data) > 1 else [data]:
            output += converse(session, chunk, store=store)
            assert_buffers_bounded(session)
        ending = rng.choice(["none", "eof", "timed_out", "shut_down"])
        if ending == "eof":
            output += converse(session, b"", store=store)
        elif ending != "none":
            output += play(session, getattr(session, ending)(), store)
        assert_well_formed(bytes(output))
        if ending == "none":
            assert bytes(output) == whole.output, data
            assert store.messages == whole.messages, data


def test_every_byte_value_alone_on_a_line_is_answered(make_session: MakeSession) -> None:
    for byte in range(256):
        session = make_session()
        output = converse(session, b"HELO c\r\n" + bytes([byte]) + b"\r\nNOOP\r\n")
        assert_well_formed(output)
        assert output.endswith(b"250 2.0.0 Ok\r\n")


# -- bounded memory -------------------------------------------------------------------

FIVE_MB = 5 * 1024 * 1024


@pytest.mark.parametrize("size", [64 * 1024, 1000, 513], ids=["64k", "1000", "513"])
def test_a_endless_command_line_keeps_the_buffer_small(
    make_session: MakeSession, size: int
) -> None:
    session = make_session()
    session.receive(b"HELO c\r\n")
    piece = b"A" * size
    for _ in range(FIVE_MB // size):
        assert session.receive(piece) == []
        assert len(session._buffer) <= 512
    assert converse(session, b"\r\nNOOP\r\n") == (
        b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"
    )


def test_five_megabytes_in_one_chunk_leaves_nothing_buffered(make_session: MakeSession) -> None:
    session = make_session()
    assert session.receive(b"N" * FIVE_MB) == []
    assert len(session._buffer) <= 512
    assert converse(session, b"\nNOOP\n") == b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"


@pytest.mark.parametrize(
    "piece", [b"B" * 65536, b"line of data\r\n" * 4000], ids=["no-newline", "many-lines"]
)
def test_an_endless_message_keeps_memory_within_the_size_limit(
    make_session: MakeSession, piece: bytes
) -> None:
    session = make_session()
    converse(session, ENVELOPE + b"DATA\r\n")
    for _ in range(FIVE_MB // len(piece)):
        assert session.receive(piece) == []
        assert_buffers_bounded(session)
    assert converse(session, b"\r\n.\r\nNOOP\r\n") == (
        b"552 5.3.4 Error: message file too big\r\n250 2.0.0 Ok\r\n"
    )


def test_pipelined_input_waits_in_the_buffer_only_while_paused(make_session: MakeSession) -> None:
    session = make_session()
    actions = session.receive(ENVELOPE + b"DATA\r\n.\r\n" + b"NOOP\r\n" * 100)
    assert isinstance(actions[-1], Deliver)
    assert len(session._buffer) == 600
    assert len(session.delivered(1)) == 101
    assert len(session._buffer) == 0


def test_splits_yields_whole_bytewise_then_random_cuts() -> None:
    data = bytes(range(40))
    cuttings = list(splits(data, seed=3))
    assert cuttings[0] == [data]
    assert cuttings[1] == [bytes([b]) for b in data]
    assert len(cuttings) == 8
    assert all(b"".join(chunks) == data for chunks in cuttings)
    assert all(chunk for chunks in cuttings for chunk in chunks)
    assert cuttings == list(splits(data, seed=3))
    assert cuttings != list(splits(data, seed=4))


class ChattySession(Session):
    """A broken session whose output depends on how its input was cut."""

    def receive(self, data: bytes) -> list[Action]:
        return [*super().receive(data), replies.OK] if data else []


def test_the_transcript_helper_catches_split_dependent_output(config: Config) -> None:
    with pytest.raises(AssertionError, match="cut at"):
        transcript(lambda: ChattySession(config), b"NOOP\r\n")
