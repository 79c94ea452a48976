"""Parsing command lines: verbs, HELO names, MAIL/RCPT paths and their parameters."""

from __future__ import annotations

import pytest

from selsmtp import replies
from selsmtp.replies import Reply
from selsmtp.syntax import (
    MailFrom,
    SyntaxReply,
    Verb,
    decode_line,
    parse_helo,
    parse_mail,
    parse_path,
    parse_rcpt,
    split_command,
)


def refusal(call: object, *args: object, **kwargs: object) -> Reply:
    """The reply carried by the SyntaxReply that ``call(*args)`` raises."""
    with pytest.raises(SyntaxReply) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value.reply


# -- lines and verbs -------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "text"),
    [
        (b"NOOP\r\n", "NOOP"),
        (b"NOOP\n", "NOOP"),
        (b"NOOP", "NOOP"),
        (b"NOOP\r\r\n", "NOOP\r"),
        (b"HELO caf\xc3\xa9\r\n", "HELO caf\u00e9"),
        (b"HELO \xff\r\n", "HELO \udcff"),
    ],
    ids=["crlf", "lf", "no-ending", "cr-crlf", "utf8", "not-utf8"],
)
def test_decode_line_drops_the_line_ending_and_never_fails(line: bytes, text: str) -> None:
    assert decode_line(line) == text


@pytest.mark.parametrize(
    "text",
    ["HELO x", "helo x", "hElO x", "Helo x"],
    ids=["upper", "lower", "mixed", "title"],
)
def test_verbs_are_case_insensitive(text: str) -> None:
    assert split_command(text) == (Verb.HELO, "x")


@pytest.mark.parametrize(
    ("text", "argument"),
    [
        ("HELO   host  ", "host"),
        ("  HELO host", "host"),
        ("HELO\thost\t", "host"),
        ("MAIL FROM:    <a@b>   ", "FROM:    <a@b>"),
        ("NOOP", ""),
        ("NOOP   ", ""),
    ],
    ids=["spaces", "leading", "tabs", "inner-spaces-kept", "no-argument", "trailing-only"],
)
def test_whitespace_around_the_verb_and_argument_is_ignored(text: str, argument: str) -> None:
    assert split_command(text)[1] == argument


@pytest.mark.parametrize("text", ["", " ", "\t \t"], ids=["empty", "space", "tabs"])
def test_a_blank_line_is_500_bad_syntax(text: str) -> None:
    assert refusal(split_command, text) is replies.BAD_SYNTAX


@pytest.mark.parametrize(
    "text",
    ["FOO", "EHLOX host", "MAILFROM:<a@b>", "ma\u0131l FROM:<a@b>", "QU\u0130T", "\udcffNOOP"],
    ids=["unknown", "glued", "no-space", "dotless-i", "dotted-I", "not-utf8"],
)
def test_an_unknown_verb_is_none(text: str) -> None:
    assert split_command(text)[0] is None


# -- HELO ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["client.example", "[192.0.2.1]", "x", "b\u00fccher.example", "a" * 400],
    ids=["domain", "address-literal", "one-letter", "utf8", "long"],
)
def test_a_helo_name_is_any_single_token(name: str) -> None:
    assert parse_helo(name) == name


@pytest.mark.parametrize(
    "argument",
    ["", "two words", "tab\tinside", "nul\x00", "bell\x07", "del\x7f", "cr\r", "\udcff",
     "nbsp\u00a0x"],
    ids=["empty", "space", "tab", "nul", "bell", "del", "cr", "not-utf8", "unicode-space"],
)  # fmt: skip
def test_a_bad_helo_name_is_501(argument: str) -> None:
    assert refusal(parse_helo, argument) is replies.HELO_SYNTAX


# -- paths -----------------------------------------------------------------------

ACCEPTED_PATHS = [
    ("<a@b>", "a@b", []),
    ("a@b", "a@b", []),
    ("   <a@b>", "a@b", []),
    ("<postmaster>", "postmaster", []),
    ("<@x,@y:a@b>", "a@b", []),
    ("<@x:a@b>", "a@b", []),
    ("@x:a@b", "a@b", []),
    ("<a@b> SIZE=10  BODY=8BITMIME", "a@b", ["SIZE=10", "BODY=8BITMIME"]),
    ("a@b SIZE=10", "a@b", ["SIZE=10"]),
    ("<a@b>\tSMTPUTF8", "a@b", ["SMTPUTF8"]),
    ("<j\u00fcrgen@b\u00fccher.example>", "j\u00fcrgen@b\u00fccher.example", []),
    ("<a.b+c@[192.0.2.1]>", "a.b+c@[192.0.2.1]", []),
]


@pytest.mark.parametrize(
    ("text", "address", "params"),
    ACCEPTED_PATHS,
    ids=["brackets", "bare", "leading-space", "no-domain", "source-route", "one-hop-route",
         "bare-route", "params", "bare-with-param", "tab-param", "utf8", "literal"],
)  # fmt: skip
def test_a_path_is_accepted_and_reduced_to_its_mailbox(
    text: str, address: str, params: list[str]
) -> None:
    assert parse_path(text, replies.BAD_SENDER, allow_null=False) == (address, params)


REJECTED_PATHS = [
    "",
    "<>",
    "<a@b",
    "a@b>",
    "<<a@b>>",
    "<a@b>>",
    "<a<b@c>",
    "<a@b>x",
    "<a b@c>",
    "<a\x00@b>",
    "<a\t@b>",
    "<a@b\x7f>",
    "<a@\udcffb>",
    "<@a@b>",
    "<@x,@y:>",
    "<a@>",
    "<@b>",
    "@b",
]


@pytest.mark.parametrize(
    "text",
    REJECTED_PATHS,
    ids=["empty", "null", "unclosed", "unopened", "double", "extra-close", "inner-open",
         "glued-junk", "space", "nul", "tab", "del", "not-utf8", "route-no-colon",
         "route-to-nothing", "no-domain-after-at", "no-local-part", "bare-no-local-part"],
)  # fmt: skip
def test_a_malformed_path_is_refused_with_the_given_reply(text: str) -> None:
    assert refusal(parse_path, text, replies.BAD_RECIPIENT, allow_null=False) is (
        replies.BAD_RECIPIENT
    )


def test_the_null_path_is_accepted_only_when_allowed() -> None:
    assert parse_path("<>", replies.BAD_SENDER, allow_null=True) == ("", [])
    assert parse_path("<> SIZE=1", replies.BAD_SENDER, allow_null=True) == ("", ["SIZE=1"])
    assert refusal(parse_path, "<>", replies.BAD_RECIPIENT, allow_null=False) is (
        replies.BAD_RECIPIENT
    )


def _path(local: int, domain: int, *, route: str = "") -> str:
    return f"<{route}{'l' * local}@{'d' * domain}>"


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        (_path(64, 10), True),
        (_path(65, 10), False),
        (_path(64, 189), True),  # 1 + 64 + 1 + 189 + 1 = 256 bytes
        (_path(64, 190), False),
        (_path(1, 252), True),  # the longest domain that fits a 256-byte path
        (_path(1, 253), False),
        (_path(1, 256), False),
        ("l" * 64 + "@" + "d" * 189, True),  # counted as if bracketed
        ("l" * 64 + "@" + "d" * 190, False),
        ("l" * 64, True),
        ("l" * 65, False),
        (_path(10, 198, route="@" + "r" * 43 + ":"), True),  # the route counts too: 256
        (_path(10, 198, route="@" + "r" * 44 + ":"), False),
        ("<" + "\u00e9" * 32 + "@b>", True),  # 64 bytes of UTF-8
        ("<" + "\u00e9" * 32 + "x@b>", False),
    ],
    ids=["local-64", "local-65", "path-256", "path-257", "domain-252", "domain-253",
         "domain-256", "bare-path-256", "bare-path-257", "bare-local-64", "bare-local-65",
         "route-path-256", "route-path-257", "utf8-local-64-bytes", "utf8-local-65-bytes"],
)  # fmt: skip
def test_rfc_5321_length_limits_hold_at_and_just_past_the_limit(text: str, accepted: bool) -> None:
    if accepted:
        assert parse_path(text, replies.BAD_SENDER, allow_null=False)[0]
    else:
        assert refusal(parse_path, text, replies.BAD_SENDER, allow_null=False) is (
            replies.BAD_SENDER
        )


# -- MAIL FROM -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "parsed"),
    [
        ("FROM:<a@b>", MailFrom("a@b")),
        ("from:<a@b>", MailFrom("a@b")),
        ("From:a@b", MailFrom("a@b")),
        ("FROM : a@b", MailFrom("a@b")),
        ("FROM\t:\t<a@b>", MailFrom("a@b")),
        ("FROM:    <a@b>", MailFrom("a@b")),
        ("FROM:<>", MailFrom("")),
        ("FROM:<a@b> SIZE=1024", MailFrom("a@b", declared_size=1024)),
        ("FROM:<a@b> size=0", MailFrom("a@b", declared_size=0)),
        ("FROM:<a@b> BODY=7BIT", MailFrom("a@b")),
        ("FROM:<a@b> body=8bitmime", MailFrom("a@b")),
        ("FROM:<a@b> SMTPUTF8", MailFrom("a@b", smtputf8=True)),
        ("FROM:<> SIZE=5 BODY=8BITMIME smtputf8", MailFrom("", 5, True)),
    ],
    ids=["plain", "lower", "bare", "space-before-colon", "tabs", "spaces-after-colon",
         "null", "size", "size-zero", "body-7bit", "body-8bit-lower", "smtputf8", "all"],
)  # fmt: skip
def test_mail_from_is_parsed(argument: str, parsed: MailFrom) -> None:
    assert parse_mail(argument, 1024) == parsed


@pytest.mark.parametrize(
    ("argument", "reply"),
    [
        ("", replies.BAD_SENDER),
        ("FROM", replies.BAD_SENDER),
        ("FROM:", replies.BAD_SENDER),
        ("TO:<a@b>", replies.BAD_SENDER),
        ("FROMX:<a@b>", replies.BAD_SENDER),
        ("FROM:<a@b", replies.BAD_SENDER),
        ("FROM:<a b@c>", replies.BAD_SENDER),
        ("FROM:<a@b> SIZE=1025", replies.TOO_BIG),
        ("FROM:<a@b> SIZE=" + "9" * 20, replies.TOO_BIG),
        ("FROM:<a@b> SIZE=", replies.BAD_SIZE),
        ("FROM:<a@b> SIZE=-1", replies.BAD_SIZE),
        ("FROM:<a@b> SIZE=1k", replies.BAD_SIZE),
        ("FROM:<a@b> SIZE=\u0661\u0662", replies.BAD_SIZE),
        ("FROM:<a@b> SIZE=" + "1" * 21, replies.BAD_SIZE),
        ("FROM:<a@b> SIZE", replies.unsupported_option("SIZE")),
        ("FROM:<a@b> BODY=BINARYMIME", replies.unsupported_option("BODY=BINARYMIME")),
        ("FROM:<a@b> BODY", replies.unsupported_option("BODY")),
        ("FROM:<a@b> SMTPUTF8=yes", replies.unsupported_option("SMTPUTF8=yes")),
        ("FROM:<a@b> AUTH=<>", replies.unsupported_option("AUTH=<>")),
        ("FROM:<a@b> \u017fize=1", replies.unsupported_option("?ize=1")),
        ("FROM:<a@b> BODY=8B\u0131TMIME", replies.unsupported_option("BODY=8B?TMIME")),
    ],
    ids=["empty", "no-colon", "no-path", "to", "glued-keyword", "unclosed", "space",
         "size-over", "size-huge", "size-empty", "size-negative", "size-unit",
         "size-arabic-digits", "size-21-digits", "size-no-value", "body-binarymime",
         "body-no-value", "smtputf8-value", "unknown-param", "long-s-size",
         "dotless-i-body"],
)  # fmt: skip
def test_a_bad_mail_from_gets_its_reply(argument: str, reply: Reply) -> None:
    assert refusal(parse_mail, argument, 1024) == reply


# -- RCPT TO ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "address"),
    [
        ("TO:<a@b>", "a@b"),
        ("to:a@b", "a@b"),
        ("TO : <a@b>", "a@b"),
        ("TO:   a@b   ", "a@b"),
        ("TO:<@relay:a@b>", "a@b"),
        ("TO:<postmaster>", "postmaster"),
    ],
    ids=["plain", "lower-bare", "space-before-colon", "spaces", "source-route", "postmaster"],
)
def test_rcpt_to_is_parsed(argument: str, address: str) -> None:
    assert parse_rcpt(argument) == address


@pytest.mark.parametrize(
    ("argument", "reply"),
    [
        ("", replies.BAD_RECIPIENT),
        ("TO:", replies.BAD_RECIPIENT),
        ("TO:<>", replies.BAD_RECIPIENT),
        ("FROM:<a@b>", replies.BAD_RECIPIENT),
        ("TO:<a@b", replies.BAD_RECIPIENT),
        ("TO:a@b>", replies.BAD_RECIPIENT),
        ("TO:<a@b> NOTIFY=NEVER", replies.unsupported_option("NOTIFY=NEVER")),
        ("TO:<a@b> \udcff", replies.unsupported_option("?")),
    ],
    ids=["empty", "no-path", "null", "from", "unclosed", "unopened", "dsn-param",
         "not-utf8-param"],
)  # fmt: skip
def test_a_bad_rcpt_to_gets_its_reply(argument: str, reply: Reply) -> None:
    assert refusal(parse_rcpt, argument) == reply
