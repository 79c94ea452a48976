"""The SMTP conversation as a pure object: bytes in, actions out.

Theory of operation
-------------------
A :class:`Session` is one client's side of RFC 5321 as seen by a server. It knows no
sockets, files or clocks. The connection feeds it whatever bytes arrived
(:meth:`Session.receive`) and gets back a list of actions to carry out, in order:

* :class:`~selsmtp.replies.Reply`: send these bytes to the client;
* :class:`Deliver`: store this message, then call :meth:`Session.delivered` with its
  number (or :meth:`Session.delivery_failed` with a 4xx reply);
* :class:`Close`: close the connection once the replies before it are sent;
* :class:`StartTLS`: once the replies before it are sent, run a TLS handshake on the
  connection and call :meth:`Session.tls_started` when it is done (RFC 3207).

TLS itself is the transport's business (:mod:`selsmtp.transport`); the session only
knows whether it runs under TLS (:attr:`Session.tls`). From ``STARTTLS`` until
``tls_started()`` (state ``STARTTLS``) it discards every byte it is given, and drops
what was already buffered behind the command: plaintext pipelined behind STARTTLS is
never read as a command (the STARTTLS command-injection flaw, CVE-2011-0411). After
the handshake the session starts over: HELO/EHLO again, no AUTH remembered.

``AUTH`` (RFC 4954) runs its 334 challenges in state ``AUTH``, where each line is a
response, not a command. Those lines, and command lines that begin with ``AUTH``,
may be :data:`~selsmtp.auth.MAX_AUTH_LINE` bytes long when AUTH is on; every other
line (and, with ``--auth off``, every line) keeps the 512-byte limit.

After a ``Deliver`` the session is *paused* (state ``DELIVERING``): it keeps whatever
input arrives but does not read it until the store has answered, because the reply
to the message must come before the replies to any commands pipelined behind it
(RFC 2920). ``delivered()`` returns the 250 followed by those replies.

Which command may come when is one table, :data:`OUT_OF_ORDER`; the commands
themselves dispatch through :data:`HANDLERS`. A malformed command raises
``SyntaxReply`` inside its handler and is answered at the dispatch boundary, so
nothing a client sends can raise out of this module: an exception here is a bug.

The session moves a counter whenever one or more lines complete
(:attr:`Session.progress`) so that the connection, which owns the clock, can enforce
the per-line timeout of SPEC §4.6.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from selsmtp import auth, replies
from selsmtp.config import MAX_COMMAND_LINE, Config
from selsmtp.framing import Body, DataReader, LineReader, LineStatus
from selsmtp.frozen import Frozen, init_field
from selsmtp.replies import Reply
from selsmtp.syntax import (
    SyntaxReply,
    Verb,
    decode_line,
    parse_helo,
    parse_mail,
    parse_rcpt,
    split_command,
)

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import BinaryIO, Final


class State(enum.Enum):
    FRESH = enum.auto()  #: greeting sent, waiting for HELO/EHLO
    READY = enum.auto()  #: greeted, no transaction open
    MAIL = enum.auto()  #: MAIL accepted, waiting for RCPT
    RCPT = enum.auto()  #: at least one RCPT accepted
    DATA = enum.auto()  #: reading message data
    DELIVERING = enum.auto()  #: message handed to the store; input paused
    AUTH = enum.auto()  #: a 334 challenge sent; the next line is the client's response
    STARTTLS = enum.auto()  #: 220 to STARTTLS sent; input discarded until tls_started()
    CLOSED = enum.auto()  #: QUIT, 421 or timeout; nothing more is read

    # Why: Enum's own __hash__ runs Python code; members are singletons, so identity
    # hashing is equivalent and keeps the OUT_OF_ORDER look-up on every command cheap.
    __hash__ = object.__hash__


class Envelope(Frozen):
    """Who a message is from and to (RFC 5321 §2.3.1), the client's HELO name, and
    how it came: the TLS in use and the authenticated user, if any."""

    __slots__ = __match_args__ = ("helo_name", "reverse_path", "forward_paths", "tls", "auth_user")

    helo_name: str
    reverse_path: str  #: "" for the null sender <>
    forward_paths: tuple[str, ...]
    tls: str | None  #: "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384"; None: plaintext
    auth_user: str | None  #: who logged in with AUTH; None: nobody

    def __init__(
        self,
        helo_name: str,
        reverse_path: str,
        forward_paths: tuple[str, ...],
        tls: str | None = None,
        auth_user: str | None = None,
    ) -> None:
        init_field(self, "helo_name", helo_name)
        init_field(self, "reverse_path", reverse_path)
        init_field(self, "forward_paths", forward_paths)
        init_field(self, "tls", tls)
        init_field(self, "auth_user", auth_user)


class Deliver(Frozen):
    """Store ``body`` for ``envelope``; answer with ``delivered()`` or ``delivery_failed()``."""

    __slots__ = __match_args__ = ("envelope", "body")

    envelope: Envelope
    body: Body

    def __init__(self, envelope: Envelope, body: Body) -> None:
        init_field(self, "envelope", envelope)
        init_field(self, "body", body)


class Close(Frozen):
    """Close the connection after sending the replies that came before this action."""

    __slots__ = ()


class StartTLS(Frozen):
    """Send the replies before this action, then run a TLS handshake (server side) and
    call :meth:`Session.tls_started` when it succeeds."""

    __slots__ = ()


Action = Reply | Deliver | Close | StartTLS
CLOSE: Final = Close()
START_TLS: Final = StartTLS()

#: RFC 5321 §4.1.4 order rules: a (state, verb) pair listed here is refused with its
#: reply and changes nothing. Pairs not listed go to the verb's handler.
OUT_OF_ORDER: Final[dict[tuple[State, Verb], Reply]] = {
    (State.FRESH, Verb.MAIL): replies.NEED_HELO,
    (State.FRESH, Verb.RCPT): replies.NEED_HELO,
    (State.FRESH, Verb.DATA): replies.NEED_HELO,
    (State.READY, Verb.HELO): replies.DUPLICATE_HELO,
    (State.READY, Verb.EHLO): replies.DUPLICATE_HELO,
    (State.READY, Verb.RCPT): replies.NEED_MAIL,
    (State.READY, Verb.DATA): replies.NEED_MAIL,
    (State.MAIL, Verb.HELO): replies.DUPLICATE_HELO,
    (State.MAIL, Verb.EHLO): replies.DUPLICATE_HELO,
    (State.MAIL, Verb.MAIL): replies.NESTED_MAIL,
    (State.MAIL, Verb.DATA): replies.NEED_RCPT,
    (State.RCPT, Verb.HELO): replies.DUPLICATE_HELO,
    (State.RCPT, Verb.EHLO): replies.DUPLICATE_HELO,
    (State.RCPT, Verb.MAIL): replies.NESTED_MAIL,
    (State.MAIL, Verb.STARTTLS): replies.TRANSACTION_IN_PROGRESS,
    (State.RCPT, Verb.STARTTLS): replies.TRANSACTION_IN_PROGRESS,
    (State.FRESH, Verb.AUTH): replies.AUTH_NEEDS_EHLO,
    (State.MAIL, Verb.AUTH): replies.TRANSACTION_IN_PROGRESS,
    (State.RCPT, Verb.AUTH): replies.TRANSACTION_IN_PROGRESS,
}

#: Verbs answered 502 as unknown when their feature is off: STARTTLS without a
#: certificate, AUTH with ``--auth off``. Keyed by (starttls, auth) configured.
HIDDEN_VERBS: Final[dict[tuple[bool, bool], frozenset[Verb]]] = {
    (False, False): frozenset({Verb.STARTTLS, Verb.AUTH}),
    (False, True): frozenset({Verb.STARTTLS}),
    (True, False): frozenset({Verb.AUTH}),
    (True, True): frozenset(),
}

#: The recipients of a session with no transaction open. Shared, never appended to:
#: MAIL gives each transaction a list of its own (an idle session then costs one
#: list less, and a server holds thousands of them).
NO_PATHS: Final[list[str]] = []

#: States in which a command line is read and dispatched.
COMMAND_STATES: Final = frozenset({State.FRESH, State.READY, State.MAIL, State.RCPT})


class Session:
    """One SMTP conversation. See the module docstring for the protocol it speaks."""

    # Why slots: a server holds one session per connection, thousands at once.
    __slots__ = (
        "_auth_pending",
        "_buffer",
        "_config",
        "_data",
        "_hidden",
        "_lines",
        "_named",
        "_new_spool",
        "_shutting_down",
        "auth_user",
        "errors",
        "forward_paths",
        "helo_name",
        "peer_closed",
        "progress",
        "reverse_path",
        "state",
        "tls",
    )

    def __init__(self, config: Config, *, new_spool: Callable[[], BinaryIO] | None = None) -> None:
        self._config = config
        self._named = replies.named_replies(config.name, config.max_message_size)
        self._new_spool = new_spool
        self._buffer = bytearray()
        # Why not always: with --auth off AUTH is no command (502), and its line gets
        # no more room than any other (SPEC §3).
        self._lines = LineReader(
            MAX_COMMAND_LINE, None if config.auth == "off" else auth.MAX_AUTH_LINE
        )
        self._hidden = HIDDEN_VERBS[config.starttls, config.auth != "off"]
        #: during an AUTH exchange: the mechanism, and for LOGIN the user once given
        self._auth_pending: tuple[str, str | None] | None = None
        self._data: DataReader | None = None
        self._shutting_down = False
        self.state = State.FRESH
        self.helo_name: str | None = None
        self.reverse_path: str | None = None
        self.forward_paths: list[str] = NO_PATHS
        #: error replies (4xx/5xx) sent so far; at ``config.max_errors`` the session ends
        self.errors = 0
        self.progress = 0  #: grows whenever lines complete (by 1, however many)
        #: the client has closed its side (``receive(b"")``)
        self.peer_closed = False
        #: the TLS in use (see Envelope.tls); None before STARTTLS or implicit TLS
        self.tls: str | None = None
        #: who logged in with AUTH in this session
        self.auth_user: str | None = None

    # -- the interface ---------------------------------------------------------

    def start(self) -> list[Action]:
        """The greeting, to send as soon as the client connects."""
        return [self._named.greeting]

    def receive(self, data: bytes) -> list[Action]:
        """Take bytes from the client (``b""``: it closed its side) and return actions."""
        if not data:
            self.peer_closed = True
            if self.state is State.DATA and self._data is not None:
                self._data.discard()  # an unfinished message is lost; nothing was promised
            return []
        if self.state is State.CLOSED or self.peer_closed or self.state is State.STARTTLS:
            return []  # STARTTLS: plaintext behind the command is never read
        if self._data is not None and not self._buffer:
            # Why: message data is most of the bytes a server reads; straight to the
            # reader, it skips two copies through the input buffer.
            out: list[Action] = []
            if not self._read_data(data, out):
                return out
            return self._advance(out)
        self._buffer += data
        return self._advance([])

    def tls_started(self, version: str, cipher: str) -> list[Action]:
        """The transport finished a TLS handshake (after STARTTLS, or at once on the
        implicit-TLS port before :meth:`start`): the session starts over (RFC 3207 §4.2)."""
        if self.state not in (State.STARTTLS, State.FRESH):
            raise RuntimeError(f"no TLS handshake is expected in state {self.state.name}")
        self.tls = f"{version} with cipher {cipher}"
        self.state = State.FRESH
        self.helo_name = None
        self.auth_user = None
        self._reset_transaction()
        self._buffer.clear()
        self._lines.reset()
        self.progress += 1
        return []

    def delivered(self, number: int) -> list[Action]:
        """The pending message was stored as ``number``: its 250, then what was pipelined."""
        return self._resume(replies.delivered(number))

    def delivery_failed(self, reply: Reply = replies.WRITE_ERROR) -> list[Action]:
        """The pending message could not be stored: ``reply`` (a 4xx), then the rest."""
        return self._resume(reply)

    def timed_out(self) -> list[Action]:
        """The client took too long to send a line: 421, then close."""
        if self.state in (State.CLOSED, State.DELIVERING):
            return []
        return self._close_with(self._named.timeout)

    def shut_down(self) -> list[Action]:
        """The server is stopping: 421 and close, or, with a message being stored, after
        its reply."""
        if self.state is State.CLOSED:
            return []
        if self.state is State.DELIVERING:
            self._shutting_down = True
            return []
        return self._close_with(self._named.shutting_down)

    @property
    def paused(self) -> bool:
        """True while a message is being stored; the session reads no input meanwhile."""
        return self.state is State.DELIVERING

    @property
    def reading_data(self) -> bool:
        """True between 354 and the end-of-data line."""
        return self.state is State.DATA

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    # -- reading input ---------------------------------------------------------

    def _advance(self, out: list[Action]) -> list[Action]:
        buffer = self._buffer
        while buffer:
            if self.state is State.DATA:
                chunk = bytes(buffer)
                buffer.clear()
                if not self._read_data(chunk, out):
                    break
            elif self.state in COMMAND_STATES:
                line = self._lines.maybe_next_line(buffer)
                if line is None:
                    break
                self.progress += 1
                if line is LineStatus.TOO_LONG:
                    self._answer(out, replies.LINE_TOO_LONG)
                else:
                    assert isinstance(line, bytes)
                    self._command(line, out)
            elif self.state is State.AUTH:
                line = self._lines.maybe_next_line(buffer)
                if line is None:
                    break
                self.progress += 1
                self._auth_response(line, out)
            else:  # DELIVERING or CLOSED: input waits, or is ignored
                break
        return out

    def _read_data(self, chunk: bytes, out: list[Action]) -> bool:
        """Feed message data; True if the message ended (what followed is buffered)."""
        assert self._data is not None
        rest = self._data.feed(chunk)
        # Why not count them: a timeout needs only to know that a line ended, and
        # ``in`` stops at the first LF where a count would read all of a large chunk.
        if b"\n" in chunk:
            self.progress += 1
        if rest is None:
            return False
        self._buffer += rest
        self._end_of_data(out)
        return True

    def _command(self, line: bytes, out: list[Action]) -> None:
        verb: Verb | None = None
        try:
            verb, argument = split_command(decode_line(line))
            if verb is None or verb in self._hidden:
                reply = replies.UNKNOWN_COMMAND
            else:
                reply = OUT_OF_ORDER.get((self.state, verb)) or HANDLERS[verb](self, argument)
        except SyntaxReply as refusal:
            reply = refusal.reply
        self._answer(out, reply)
        if verb is Verb.QUIT and reply is replies.BYE:
            out.append(CLOSE)
        elif reply is replies.READY_FOR_TLS:
            out.append(START_TLS)

    def _answer(self, out: list[Action], reply: Reply) -> None:
        out.append(reply)
        if reply.is_error and self.state is not State.CLOSED:
            self.errors += 1
            if self.errors >= self._config.max_errors:
                out.extend(self._close_with(self._named.too_many_errors))

    def _close_with(self, reply: Reply) -> list[Action]:
        self.state = State.CLOSED
        self._buffer.clear()
        if self._data is not None:
            # Why: a timeout or shutdown can end a session mid-message; a spooled
            # message holds a temporary file that must be closed now, not at GC.
            self._data.discard()
            self._data = None
        self._reset_transaction()
        return [reply, CLOSE]

    def _end_of_data(self, out: list[Action]) -> None:
        reader = self._data
        assert reader is not None and self.helo_name is not None
        self._data = None
        if reader.too_big:
            self._reset_transaction()
            self.state = State.READY
            self._answer(out, replies.TOO_BIG)
            return
        assert self.reverse_path is not None
        envelope = Envelope(
            self.helo_name,
            self.reverse_path,
            tuple(self.forward_paths),
            self.tls,
            self.auth_user,
        )
        self._reset_transaction()
        body = reader.body()
        if body is None:  # its spool file failed: out of descriptors or disk
            self.state = State.READY
            self._answer(out, replies.WRITE_ERROR)
            return
        self.state = State.DELIVERING
        out.append(Deliver(envelope, body))

    def _resume(self, reply: Reply) -> list[Action]:
        if self.state is not State.DELIVERING:
            raise RuntimeError("no message is being delivered")
        self.state = State.READY
        out: list[Action] = []
        self._answer(out, reply)
        if self.state is State.CLOSED:
            return out
        if self._shutting_down:
            return out + self._close_with(self._named.shutting_down)
        return self._advance(out)

    def _reset_transaction(self) -> None:
        self.reverse_path = None
        self.forward_paths = NO_PATHS

    # -- the commands (RFC 5321 §4.1.1) -----------------------------------------

    def _helo(self, argument: str) -> Reply:
        self.helo_name = parse_helo(argument)
        self.state = State.READY
        return self._named.helo

    def _ehlo(self, argument: str) -> Reply:
        self.helo_name = parse_helo(argument)
        self.state = State.READY
        config = self._config
        return replies.ehlo(
            config.name,
            config.max_message_size,
            starttls=config.starttls and self.tls is None,
            auth=config.auth != "off"
            and (self.tls is not None or (config.auth_allow_insecure and not config.require_tls)),
        )

    def _mail(self, argument: str) -> Reply:
        if self._config.require_tls and self.tls is None:
            return replies.MUST_STARTTLS
        if self._config.auth_required and self.auth_user is None:
            return replies.AUTH_REQUIRED
        mail = parse_mail(argument, self._config.max_message_size)
        self.reverse_path = mail.reverse_path
        self.forward_paths = []
        self.state = State.MAIL
        return replies.MAIL_OK

    def _rcpt(self, argument: str) -> Reply:
        address = parse_rcpt(argument)
        if len(self.forward_paths) >= self._config.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        self.forward_paths.append(address)
        self.state = State.RCPT
        return replies.RCPT_OK

    def _data_command(self, argument: str) -> Reply:
        if argument:
            return replies.DATA_SYNTAX
        self._data = DataReader(
            self._config.max_message_size,
            spool_threshold=self._config.spool_threshold,
            new_spool=self._new_spool,
        )
        self.state = State.DATA
        return replies.START_DATA

    def _rset(self, argument: str) -> Reply:
        if argument:
            return replies.RSET_SYNTAX
        self._reset_transaction()
        self.state = State.FRESH if self.helo_name is None else State.READY
        return replies.OK

    def _noop(self, argument: str) -> Reply:
        return replies.OK  # RFC 5321 §4.1.1.9: an argument is allowed and ignored

    def _vrfy(self, argument: str) -> Reply:
        return replies.CANNOT_VRFY if argument else replies.VRFY_SYNTAX

    def _help(self, argument: str) -> Reply:
        return replies.HELP

    def _starttls(self, argument: str) -> Reply:
        if argument:
            return replies.STARTTLS_SYNTAX
        if self.tls is not None:
            return replies.TLS_ALREADY_ACTIVE
        self.state = State.STARTTLS
        self._buffer.clear()  # what was pipelined behind the command is never read
        self._lines.reset()
        return replies.READY_FOR_TLS

    # -- AUTH (RFC 4954) -----------------------------------------------------------

    def _auth(self, argument: str) -> Reply:
        config = self._config
        if self.auth_user is not None:
            return replies.ALREADY_AUTHENTICATED
        if self.tls is None and config.require_tls:
            return replies.MUST_STARTTLS
        if self.tls is None and not config.auth_allow_insecure:
            return replies.ENCRYPTION_REQUIRED
        mechanism, _, initial = argument.partition(" ")
        if not mechanism:
            return replies.AUTH_SYNTAX
        mechanism = mechanism.upper() if mechanism.isascii() else mechanism
        initial = initial.strip(" ")
        if mechanism == "PLAIN":
            if not initial:
                self._begin_auth("PLAIN", None)
                return replies.AUTH_CONTINUE
            return self._plain(b"" if initial == "=" else self._decode(initial))
        if mechanism == "LOGIN":
            if not initial:
                self._begin_auth("LOGIN", None)
                return replies.ASK_USERNAME
            # RFC 4954 §4: "=" is an initial response of zero length (no user name)
            user = b"" if initial == "=" else self._decode(initial)
            self._begin_auth("LOGIN", self._text(user))
            return replies.ASK_PASSWORD
        return replies.AUTH_MECHANISM

    def _begin_auth(self, mechanism: str, user: str | None) -> None:
        self._auth_pending = (mechanism, user)
        self._lines.long_lines = True
        self.state = State.AUTH

    def _auth_response(self, line: bytes | LineStatus, out: list[Action]) -> None:
        assert self._auth_pending is not None
        mechanism, user = self._auth_pending
        self._auth_pending = None
        self._lines.long_lines = False
        self.state = State.READY
        if line is LineStatus.TOO_LONG:
            self._answer(out, replies.AUTH_LINE_TOO_LONG)
            return
        assert isinstance(line, bytes)
        text = decode_line(line).strip(" \t")
        try:
            if text == "*":
                reply = replies.AUTH_ABORTED
            elif mechanism == "PLAIN":
                reply = self._plain(self._decode(text))
            elif user is None:
                self._begin_auth("LOGIN", self._text(self._decode(text)))
                reply = replies.ASK_PASSWORD
            else:
                reply = self._log_in(user, self._text(self._decode(text)))
        except SyntaxReply as refusal:
            reply = refusal.reply
        self._answer(out, reply)

    @staticmethod
    def _decode(text: str) -> bytes:
        data = auth.decode(text)
        if data is None:
            raise SyntaxReply(replies.BAD_BASE64)
        return data

    @staticmethod
    def _text(data: bytes) -> str:
        return data.decode("utf-8", "surrogateescape")

    def _plain(self, response: bytes) -> Reply:
        parsed = auth.parse_plain(response)
        if parsed is None:
            return replies.AUTH_FAILED
        return self._log_in(*parsed)

    def _log_in(self, user: str, password: str) -> Reply:
        config = self._config
        if not user:
            return replies.AUTH_FAILED
        if config.auth == "file":
            assert config.auth_users is not None
            if not config.auth_users.check(user, password):
                return replies.AUTH_FAILED
        self.auth_user = user
        return replies.AUTH_OK

    def _quit(self, argument: str) -> Reply:
        self._reset_transaction()
        self.state = State.CLOSED
        self._buffer.clear()
        return replies.BYE


HANDLERS: Final[dict[Verb, Callable[[Session, str], Reply]]] = {
    Verb.HELO: Session._helo,
    Verb.EHLO: Session._ehlo,
    Verb.MAIL: Session._mail,
    Verb.RCPT: Session._rcpt,
    Verb.DATA: Session._data_command,
    Verb.RSET: Session._rset,
    Verb.NOOP: Session._noop,
    Verb.VRFY: Session._vrfy,
    Verb.QUIT: Session._quit,
    Verb.HELP: Session._help,
    Verb.STARTTLS: Session._starttls,
    Verb.AUTH: Session._auth,
}
