"""TLS and AUTH through ``python -m selsmtp`` as a real process: the readiness lines,
start-up errors, the clients people use (swaks, curl, msmtp), and no password in any
log line."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import smtplib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import HELO, NAME, WAIT, read_mailbox
from .processes import REPO_ROOT, SelsmtpProcess, run_selsmtp
from .tls import CA, CERT, EXPIRED_KEY, KEY, client_context

pytestmark = pytest.mark.timeout(120)

PASSWORD = "pw-Zq81-never-logged"
TLS_ARGS = ("--tls-cert", str(CERT), "--tls-key", str(KEY), "--tls-port", "0")


class TLSProcess(SelsmtpProcess):
    """selsmtp with TLS; reads the second readiness line too."""

    def __init__(self, mailbox: Path, *args: str) -> None:
        super().__init__(mailbox, *TLS_ARGS, *args)
        assert self.proc.stdout is not None
        self.second_line = self.proc.stdout.readline().decode()
        prefix = "selsmtp tls listening on 127.0.0.1:"
        assert self.second_line.startswith(prefix), self.second_line
        self.tls_port = int(self.second_line[len(prefix) :])

    def stop(self) -> str:
        """SIGTERM, wait for exit 0; return stderr."""
        self.signal(signal.SIGTERM)
        code, _, err = self.wait()
        assert code == 0, err
        return err


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(f"# test users\nalice:{PASSWORD}\nbob:hunter2\n")
    return path


@pytest.fixture
def tls_server(tmp_path: Path, users: Path) -> Iterator[TLSProcess]:
    process = TLSProcess(tmp_path / "mailbox", "--auth", str(users), "--log-level", "debug")
    yield process
    process.kill()


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} is not installed (apt-get install -y {program}; .ci/run does)")
    return path


def run_client(*command: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        command, input=stdin, capture_output=True, timeout=WAIT * 3, check=False, cwd=REPO_ROOT
    )


# -- start-up ---------------------------------------------------------------------------


def test_the_tls_readiness_line_follows_the_first(tls_server: TLSProcess) -> None:
    assert tls_server.first_line.startswith("selsmtp listening on 127.0.0.1:")
    assert tls_server.tls_port not in (0, tls_server.port)
    with smtplib.SMTP_SSL(
        "localhost", tls_server.tls_port, timeout=WAIT, context=client_context()
    ) as client:
        assert client.noop()[0] == 250
    tls_server.stop()


def test_certificate_files_may_be_symlinks(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").symlink_to(CERT)
    (tmp_path / "key.pem").symlink_to(KEY)
    process = SelsmtpProcess(
        tmp_path / "mailbox", "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(KEY)
    )
    try:
        with smtplib.SMTP("localhost", process.port, timeout=WAIT) as client:
            client.starttls(context=client_context())
            assert client.ehlo(HELO)[0] == 250
    finally:
        process.kill()


@pytest.mark.parametrize(
    ("cert", "key", "says"),
    [
        ("missing.pem", str(KEY), "--tls-cert {tmp}/missing.pem: No such file or directory"),
        ("{tmp}", str(KEY), "--tls-cert {tmp}: not a regular file"),
        (str(CERT), "{tmp}/missing.key", "--tls-key {tmp}/missing.key: No such file"),
        (str(CERT), str(EXPIRED_KEY), "cannot be used"),
        (str(KEY), str(KEY), "cannot be used"),
    ],
    ids=["missing-cert", "folder", "missing-key", "mismatched", "not-a-certificate"],
)
def test_unusable_certificate_files_exit_1_with_one_line(
    tmp_path: Path, cert: str, key: str, says: str
) -> None:
    cert = cert.format(tmp=tmp_path)
    if cert == "missing.pem":
        cert = str(tmp_path / cert)
    key = key.format(tmp=tmp_path)
    result = run_selsmtp(
        "--port", "0", "--mailbox", str(tmp_path / "mailbox"), "--tls-cert", cert, "--tls-key", key
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("selsmtp: ")
    assert says.format(tmp=tmp_path) in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "No such file or directory"),
        ("alice\n", "line 1 is not user:password"),
        ("# nobody\n", "no users"),
        ("bob:ok\nalice hunter2-secret\n", "line 2 is not user:password"),
        (":hunter2-secret\n", "line 1 is not user:password"),
        ("alice:\udcff\n", "not UTF-8"),
    ],
    ids=["missing", "no-colon", "empty", "space-not-colon", "no-user", "not-utf8"],
)
def test_an_unusable_users_file_exits_1_with_one_line(
    tmp_path: Path, content: str | None, says: str
) -> None:
    users = tmp_path / "users"
    if content is not None:
        users.write_bytes(content.encode("utf-8", "surrogateescape"))
    result = run_selsmtp("--port", "0", "--mailbox", str(tmp_path / "mb"), "--auth", str(users))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr
    assert "secret" not in result.stderr  # a malformed line may hold a password


@pytest.mark.parametrize(
    "args",
    [
        ["--tls-port", "0"],
        ["--tls-cert", str(CERT)],
        ["--require-tls"],
        ["--auth-required"],
        ["--auth-allow-insecure"],
    ],
    ids=["tls-port-alone", "cert-without-key", "require-tls-alone", "auth-required-alone",
         "insecure-alone"],
)  # fmt: skip
def test_options_that_need_others_exit_2(tmp_path: Path, args: list[str]) -> None:
    result = run_selsmtp("--port", "0", "--mailbox", str(tmp_path / "mb"), *args)
    assert result.returncode == 2
    assert "usage:" in result.stderr


# -- no password in any log line ------------------------------------------------------------


def test_a_password_never_reaches_a_log_line(tls_server: TLSProcess) -> None:
    for password in (PASSWORD, PASSWORD + "-wrong"):
        for mechanism in ("PLAIN", "LOGIN"):
            with smtplib.SMTP("localhost", tls_server.port, timeout=WAIT) as client:
                client.starttls(context=client_context())
                client.ehlo(HELO)
                client.user, client.password = "alice", password
                try:
                    code, _ = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
                except smtplib.SMTPAuthenticationError as refusal:
                    code = refusal.smtp_code
                assert code == (235 if password == PASSWORD else 535)
                if code == 235:
                    client.sendmail("a@example.org", ["b@example.org"], b"Subject: s\r\n\r\nx\r\n")
    err = tls_server.stop()
    assert "authenticated as 'alice'" in err  # the debug log did run
    secrets = [PASSWORD, base64.b64encode(PASSWORD.encode()).decode()]
    secrets.append(base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode())
    for secret in secrets:
        assert secret not in err
        assert secret[:12] not in err
    assert len(read_mailbox(tls_server.mailbox)) == 2


# -- the clients people use -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "mechanism"),
    [("--tls", "PLAIN"), ("--tls", "LOGIN"), ("--tlsc", "PLAIN"), ("--tlsc", "LOGIN")],
)
def test_swaks(tls_server: TLSProcess, mode: str, mechanism: str) -> None:
    swaks = need("swaks")
    port = tls_server.tls_port if mode == "--tlsc" else tls_server.port
    result = run_client(
        swaks, "--server", "127.0.0.1", "--port", str(port), mode,
        "--auth", mechanism, "--auth-user", "alice", "--auth-password", PASSWORD,
        "--from", "a@example.org", "--to", "b@example.org", "--helo", HELO,
        "--body", "swaks over TLS",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout.decode()[-2000:]
    [record] = read_mailbox(tls_server.mailbox)
    assert b"swaks over TLS" in record.body


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
def test_curl(tls_server: TLSProcess, scheme: str) -> None:
    curl = need("curl")
    port = tls_server.tls_port if scheme == "smtps" else tls_server.port
    result = run_client(
        curl, "--silent", "--show-error", "--ssl-reqd", "--cacert", str(CA),
        f"{scheme}://127.0.0.1:{port}/{HELO}", "--user", f"alice:{PASSWORD}",
        "--mail-from", "a@example.org", "--mail-rcpt", "b@example.org", "--upload-file", "-",
        stdin=b"Subject: curl\r\n\r\ncurl over TLS\r\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    [record] = read_mailbox(tls_server.mailbox)
    assert record.body == b"Subject: curl\n\ncurl over TLS\n"
    assert record.helo == HELO


def test_curl_with_a_wrong_password_fails(tls_server: TLSProcess) -> None:
    curl = need("curl")
    result = run_client(
        curl, "--silent", "--show-error", "--ssl-reqd", "--cacert", str(CA),
        f"smtp://127.0.0.1:{tls_server.port}", "--user", "alice:wrong",
        "--mail-from", "a@example.org", "--mail-rcpt", "b@example.org", "--upload-file", "-",
        stdin=b"Subject: no\r\n\r\nno\r\n",
    )  # fmt: skip
    assert result.returncode != 0
    assert b"535" in result.stderr or b"Login denied" in result.stderr
    assert read_mailbox(tls_server.mailbox) == []


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_msmtp_as_the_readme_configures_it(
    tls_server: TLSProcess, tmp_path: Path, tls: str
) -> None:
    msmtp = need("msmtp")
    config = tmp_path / "msmtprc"
    port = tls_server.tls_port if tls == "implicit" else tls_server.port
    config.write_text(
        "account selsmtp\n"
        "host localhost\n"
        f"port {port}\n"
        "tls on\n"
        f"tls_starttls {'off' if tls == 'implicit' else 'on'}\n"
        f"tls_trust_file {CA}\n"
        "auth on\n"
        "user alice\n"
        f"password {PASSWORD}\n"
        "from a@example.org\n"
        f"domain {HELO}\n"
        "account default : selsmtp\n"
    )
    config.chmod(0o600)
    result = run_client(
        msmtp, "-C", str(config), "b@example.org", stdin=b"Subject: msmtp\n\nmsmtp over TLS\n"
    )
    assert result.returncode == 0, result.stderr.decode()
    [record] = read_mailbox(tls_server.mailbox)
    assert record.body.endswith(b"msmtp over TLS\n")
    assert record.name == NAME


# -- review of issue 11: what the tests above leave open ----------------------------------


def test_a_tls_port_in_use_is_named_in_the_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_selsmtp(
            "--port", "0", "--mailbox", str(tmp_path / "mb"), *TLS_ARGS[:4], "--tls-port", str(port)
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port} (--tls-port): " in result.stderr, result.stderr
    assert result.stdout == ""


def test_the_users_file_may_be_a_symlink_but_not_a_fifo(tmp_path: Path, users: Path) -> None:
    fifo = tmp_path / "users.fifo"
    os.mkfifo(fifo)
    result = run_selsmtp("--port", "0", "--mailbox", str(tmp_path / "mb"), "--auth", str(fifo))
    assert result.returncode == 1  # at once: run_selsmtp's timeout would fail a hang
    assert result.stderr == f"selsmtp: --auth {fifo}: not a regular file\n"
    link = tmp_path / "users.link"
    link.symlink_to(users)
    process = SelsmtpProcess(tmp_path / "mailbox", "--auth", str(link), "--auth-allow-insecure")
    try:
        with smtplib.SMTP("localhost", process.port, timeout=WAIT) as client:
            client.ehlo(HELO)
            assert client.login("alice", PASSWORD)[0] == 235
    finally:
        process.kill()


def test_no_password_reaches_a_log_line_whatever_the_auth_exchange_does(
    tls_server: TLSProcess,
) -> None:
    # Beyond the logins above: a bad base64 response, a response too long, a cancel,
    # the password given as the user name, and clients that close in the middle of
    # AUTH (after the user, and half-way through the password line), at debug level.
    b64 = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
    exchanges = [
        ["AUTH LOGIN", b64("alice"), b64(PASSWORD) + "!"],
        ["AUTH PLAIN", b64(f"\0alice\0{PASSWORD}") * 400],
        ["AUTH LOGIN", b64("alice"), "*"],
        ["AUTH LOGIN", b64(PASSWORD), b64(PASSWORD)],
        ["AUTH PLAIN " + b64(f"{PASSWORD}\0alice\0{PASSWORD}")],
        ["AUTH LOGIN " + b64("alice")],  # then closes at the password prompt
    ]
    for lines in exchanges:
        client = smtplib.SMTP("localhost", tls_server.port, timeout=WAIT)
        try:
            client.starttls(context=client_context())
            client.ehlo(HELO)
            for line in lines:
                code, _ = client.docmd(line)
            assert code != 235
        finally:
            client.close()  # no QUIT: it would be read as a response to a 334
    client = smtplib.SMTP("localhost", tls_server.port, timeout=WAIT)
    try:
        client.starttls(context=client_context())
        client.ehlo(HELO)
        assert client.docmd("AUTH LOGIN", b64("alice"))[0] == 334
        assert client.sock is not None
        client.sock.sendall(b64(PASSWORD)[:-2].encode())  # no line end: then gone
    finally:
        client.close()
    err = tls_server.stop()
    assert err.count("closed (") >= len(exchanges) + 1, err  # every connection logged
    for secret in (PASSWORD, b64(PASSWORD), b64(f"\0alice\0{PASSWORD}")):
        for piece in (secret, secret[:12], secret[-12:]):
            assert piece not in err, piece


def test_a_key_with_a_passphrase_is_one_line_naming_the_key_and_never_a_prompt(
    tmp_path: Path,
) -> None:
    # Without this, OpenSSL asked for the passphrase on the terminal: start-up hung
    # in a terminal, and printed the prompt twice and a wrong cause without one.
    openssl = need("openssl")
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        [openssl, "pkey", "-in", str(KEY), "-aes256", "-passout", "pass:secret",
         "-out", str(encrypted)],
        check=True, capture_output=True, timeout=WAIT,
    )  # fmt: skip
    result = run_selsmtp(
        "--port", "0", "--mailbox", str(tmp_path / "mb"),
        "--tls-cert", str(CERT), "--tls-key", str(encrypted),
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        f"selsmtp: --tls-key {encrypted}: encrypted with a passphrase; selsmtp needs the "
        "key without one (openssl pkey -in KEY -out PLAIN.key)\n"
    )
    assert result.stdout == ""


@pytest.mark.parametrize("more", [[], ["--auth-allow-insecure"]], ids=["never", "insecure"])
def test_auth_that_can_never_be_offered_is_said_at_start_up(
    tmp_path: Path, more: list[str]
) -> None:
    # The user of issue 11 who runs `--auth any` without a certificate would otherwise
    # meet smtplib's "SMTP AUTH extension not supported by server" with no hint why.
    process = SelsmtpProcess(tmp_path / "mailbox", "--auth", "any", *more)
    try:
        with smtplib.SMTP("localhost", process.port, timeout=WAIT) as client:
            client.ehlo(HELO)
            assert client.has_extn("auth") == bool(more)
        process.signal(signal.SIGTERM)
        code, _, err = process.wait()
    finally:
        process.kill()
    assert code == 0, err
    warning = "--auth without --tls-cert: AUTH is offered only under TLS, so never"
    assert (warning in err) != bool(more), err
