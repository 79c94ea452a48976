"""tools/flood.py against a real ``python -m selsmtp`` process, and its integrity checks.

Each test runs flood.py as a subprocess, the way a person runs it, and reads its
``--json`` report. The last group plants faults in a copy of a mailbox that flood has
just checked (a record removed, one duplicated, one corrupted) and runs only the
verification again (``--verify-only``): flood must fail and name the message.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from selsmtp import reader

from .tls import CA, CERT, EXPIRED_CERT, EXPIRED_KEY, KEY

REPO_ROOT = Path(__file__).resolve().parents[2]
FLOOD = REPO_ROOT / "tools" / "flood.py"
#: generous bound for one flood run; the runs here take well under a second
RUN_TIMEOUT = 60


class SelsmtpProcess:
    """``python -m selsmtp --port 0`` in a subprocess, stopped with SIGTERM."""

    def __init__(self, mailbox: Path, *args: str) -> None:
        self.mailbox = mailbox
        self.process = subprocess.Popen(
            [sys.executable, "-m", "selsmtp", "--port", "0", "--mailbox", str(mailbox),
             "--name", "flood.test", "--log-level", "warning", *args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        if not line.startswith("selsmtp listening on "):
            self.process.kill()
            _, err = self.process.communicate(timeout=10)
            raise AssertionError(f"server did not start: {line!r} {err.decode()!r}")
        self.port = int(line.rsplit(":", 1)[1])

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=10)
        assert self.process.returncode == 0, err.decode()


@pytest.fixture(scope="module")
def flood_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SelsmtpProcess]:
    """One server for the module; every flood run has its own run id, so runs that
    share the mailbox check only their own messages."""
    server = SelsmtpProcess(tmp_path_factory.mktemp("flood") / "mailbox", "--timeout", "2")
    yield server
    server.stop()


@pytest.fixture
def start_process(tmp_path: Path) -> Iterator[Callable[..., SelsmtpProcess]]:
    started: list[SelsmtpProcess] = []

    def start(*args: str) -> SelsmtpProcess:
        server = SelsmtpProcess(tmp_path / f"mailbox{len(started)}", *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def flood(*args: str | Path) -> tuple[int, dict[str, Any], str]:
    """Run flood.py with ``args`` and ``--json``: (exit status, report, stderr)."""
    done = subprocess.run(
        [sys.executable, str(FLOOD), *map(str, args), "--json"],
        capture_output=True,
        timeout=RUN_TIMEOUT,
        cwd="/",  # flood must work from anywhere
    )
    stdout = done.stdout.decode()
    try:
        report = json.loads(stdout)
    except ValueError:
        raise AssertionError(f"no JSON report: {stdout!r} {done.stderr.decode()!r}") from None
    return done.returncode, report, done.stderr.decode()


def flood_against(server: SelsmtpProcess, *args: str | Path) -> tuple[int, dict[str, Any]]:
    status, report, _ = flood("--port", str(server.port), "--mailbox", server.mailbox, *args)
    return status, report


def assert_clean(status: int, report: dict[str, Any], messages: int) -> None:
    assert report["failures"] == []
    assert report["verification"]["problems"] == []
    assert status == 0
    assert report["ok"] is True
    assert report["attempted"] == report["sent"] == report["acknowledged"] == messages
    assert report["failed"] == 0
    assert report["verification"]["checked"] == report["verification"]["found"] == messages


# -- runs that must pass -------------------------------------------------------


def test_one_message_per_connection(flood_server: SelsmtpProcess) -> None:
    status, report = flood_against(flood_server, "--clients", "10", "--messages", "5")
    assert_clean(status, report, 50)
    assert report["connections"] == 50
    assert report["replies"]["220"] == 50
    assert report["replies"]["221"] == 50
    assert report["replies"]["354"] == 50
    assert report["replies"]["250"] == 50 * 4  # EHLO, MAIL, RCPT and the delivery
    assert set(report["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["max"]
    assert report["messages_per_s"] > 0 and report["mb_per_s"] > 0


def test_keep_open_pipelining_many_recipients_and_mixed_sizes(
    flood_server: SelsmtpProcess,
) -> None:
    status, report = flood_against(
        flood_server, "--clients", "10", "--messages", "5", "--keep-open", "--pipelining",
        "--recipients", "3", "--size", "200:20000", "--seed", "7",
    )  # fmt: skip
    assert_clean(status, report, 50)
    assert report["connections"] == 10
    assert report["replies"]["250"] == 10 + 50 * (1 + 3 + 1)


def test_byte_and_random_splits_on_a_few_clients(flood_server: SelsmtpProcess) -> None:
    status, report = flood_against(
        flood_server, "--clients", "4", "--messages", "2", "--size", "300", "--split", "byte",
        "--split-clients", "2", "--pipelining",
    )  # fmt: skip
    assert_clean(status, report, 8)
    status, report = flood_against(
        flood_server, "--clients", "3", "--messages", "3", "--size", "2000", "--split", "random",
        "--keep-open",
    )  # fmt: skip
    assert_clean(status, report, 9)


def test_invalid_commands_get_their_error_codes(flood_server: SelsmtpProcess) -> None:
    status, report = flood_against(
        flood_server, "--clients", "10", "--messages", "5", "--keep-open", "--bad-rate", "0.3",
        "--seed", "3",
    )  # fmt: skip
    assert_clean(status, report, 50)
    assert report["bad_commands"]["checked"] > 0
    assert report["bad_commands"]["wrong"] == 0
    assert set(report["replies"]) & {"500", "501", "502", "503"}


def test_two_processes_merge_their_results(flood_server: SelsmtpProcess) -> None:
    status, report = flood_against(
        flood_server, "--clients", "6", "--messages", "4", "--processes", "2", "--keep-open"
    )
    assert_clean(status, report, 24)
    assert report["processes"] == 2
    assert report["connections"] == 6


def test_slow_clients_get_the_timeout_421(flood_server: SelsmtpProcess) -> None:
    """The module's server times lines out after 2 s; flood waits up to 10 s for it."""
    status, report = flood_against(
        flood_server, "--clients", "2", "--messages", "2", "--slow", "2", "--timeout", "10"
    )
    assert_clean(status, report, 4)
    assert report["slow_clients"] == {"got_421": 2, "failed": 0}
    assert report["replies"]["421"] == 2


def test_duration_stops_new_messages(flood_server: SelsmtpProcess) -> None:
    status, report = flood_against(
        flood_server, "--clients", "2", "--messages", "5000", "--keep-open", "--duration",
        "0.3", "--size", "100",
    )  # fmt: skip
    assert status == 0, report["failures"]
    assert 0 < report["acknowledged"] < 10000
    assert report["acknowledged"] == report["attempted"]
    assert report["elapsed_s"] < 10


# -- runs that must fail -------------------------------------------------------


def test_messages_the_server_refuses_fail_the_run(
    start_process: Callable[..., SelsmtpProcess],
) -> None:
    server = start_process("--max-message-size", "3000")
    status, report = flood_against(
        server, "--clients", "4", "--messages", "5", "--size", "500:6000", "--seed", "1"
    )
    assert status == 1
    assert report["ok"] is False
    assert 0 < report["acknowledged"] < 20
    assert report["failed"] == 20 - report["acknowledged"]
    assert any("expected 250, got '552" in failure for failure in report["failures"])
    # Nothing refused is in the mailbox, and everything acknowledged is.
    assert report["verification"]["problems"] == []


def test_no_server_fails_quickly() -> None:
    status, report, _ = flood("--port", "1", "--clients", "2", "--messages", "3")
    assert status == 1
    assert report["acknowledged"] == 0
    assert report["attempted"] == 6  # each failed connection uses up one message
    assert "connection closed" in report["failures"][0]


def test_non_loopback_hosts_are_refused() -> None:
    done = subprocess.run(
        [sys.executable, str(FLOOD), "--host", "192.0.2.1", "--port", "25"],
        capture_output=True,
        timeout=RUN_TIMEOUT,
    )
    assert done.returncode == 2
    assert b"not a loopback address" in done.stderr


# -- planted faults ------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(
    flood_server: SelsmtpProcess, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, bytes, list[reader.Message], dict[str, Any]]:
    """A clean run saved with --save, and the mailbox bytes it was checked against."""
    folder = tmp_path_factory.mktemp("planted")
    results = folder / "run.json"
    status, report = flood_against(
        flood_server, "--clients", "3", "--messages", "4", "--save", results
    )
    assert_clean(status, report, 12)
    box = reader.read_mailbox(flood_server.mailbox, lock_timeout=10)
    assert box.data is not None
    data = box.data
    saved = json.loads(results.read_text())
    ours = {entry[0] for entry in saved["acked"]}
    records = [r for r in box if _token(r) in ours]
    assert len(records) == 12
    return results, data, records, saved


def _token(record: reader.Message) -> str | None:
    first = record.raw.split(b"\n", 1)[0]
    return first.removeprefix(b"Subject: flood ").decode() if first.startswith(b"Subject") else None


def body_offset(record: reader.Message) -> int:
    """Where a cs4410 record's body starts: it ends one LF before the record does."""
    return record.end - 1 - len(record.raw)


def verify_only(results: Path, mailbox: bytes, tmp_path: Path) -> tuple[int, dict[str, Any]]:
    copy = tmp_path / "mailbox-copy"
    copy.write_bytes(mailbox)
    status, report, _ = flood("--verify-only", results, "--mailbox", copy)
    return status, report


def test_verify_only_passes_on_the_untouched_mailbox(saved_run: Any, tmp_path: Path) -> None:
    results, data, _, _ = saved_run
    status, report = verify_only(results, data, tmp_path)
    assert (status, report["ok"], report["problems"]) == (0, True, [])
    assert report["found"] == report["checked"] == 12


def test_a_missing_record_is_named(saved_run: Any, tmp_path: Path) -> None:
    results, data, records, _ = saved_run
    gone = records[5]
    status, report = verify_only(results, data[: gone.offset] + data[gone.end :], tmp_path)
    assert status == 1
    token = _token(gone)
    assert f"missing: message {token} (acknowledged as number {gone.number})" in "\n".join(
        report["problems"]
    )
    assert any("gap" in problem for problem in report["problems"])
    assert report["found"] == 11


def test_a_duplicated_record_is_named(saved_run: Any, tmp_path: Path) -> None:
    results, data, records, _ = saved_run
    twice = records[2]
    copy = data[: twice.end] + data[twice.offset : twice.end] + data[twice.end :]
    status, report = verify_only(results, copy, tmp_path)
    assert status == 1
    problems = "\n".join(report["problems"])
    assert f"duplicated: message {_token(twice)}" in problems
    assert "stored 2 times" in problems
    assert f"duplicate: record number {twice.number} again" in problems


def test_a_corrupt_body_is_named(saved_run: Any, tmp_path: Path) -> None:
    results, data, records, _ = saved_run
    victim = records[7]
    where = body_offset(victim) + len(victim.raw) // 2
    flipped = data[:where] + bytes([data[where] ^ 0x01]) + data[where + 1 :]
    status, report = verify_only(results, flipped, tmp_path)
    assert status == 1
    (problem,) = report["problems"]
    assert problem.startswith(f"corrupt: message {_token(victim)}")
    assert "body checksum mismatch" in problem


def test_a_wrong_envelope_is_named(saved_run: Any, tmp_path: Path) -> None:
    results, data, records, _ = saved_run
    victim = records[1]
    header = data[victim.offset : body_offset(victim)]
    changed = header.replace(b"\nTo: r0.", b"\nTo: x0.", 1)
    assert changed != header
    copy = data[: victim.offset] + changed + data[body_offset(victim) :]
    status, report = verify_only(results, copy, tmp_path)
    assert status == 1
    (problem,) = report["problems"]
    assert problem.startswith(f"corrupt: message {_token(victim)}")
    assert "recipients" in problem


def test_a_torn_tail_is_named(saved_run: Any, tmp_path: Path) -> None:
    results, data, records, _ = saved_run
    last = records[-1]
    status, report = verify_only(results, data[: last.end - 10], tmp_path)
    assert status == 1
    problems = "\n".join(report["problems"])
    assert "torn-tail" in problems
    assert f"missing: message {_token(last)}" in problems


def test_verify_only_names_an_unreadable_mailbox(saved_run: Any, tmp_path: Path) -> None:
    results, _, _, _ = saved_run
    status, report, _ = flood("--verify-only", results, "--mailbox", tmp_path / "absent")
    assert status == 1
    assert "cannot read" in report["problems"][0]


def test_flood_runs_as_a_script_from_anywhere(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(FLOOD), "--help"],
        capture_output=True,
        timeout=RUN_TIMEOUT,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert done.returncode == 0
    assert b"--verify-only" in done.stdout


# -- TLS and AUTH ----------------------------------------------------------------


def test_starttls_and_auth(start_process: Callable[..., SelsmtpProcess]) -> None:
    server = start_process("--tls-cert", str(CERT), "--tls-key", str(KEY), "--auth", "any")
    status, report = flood_against(
        server, "--starttls", "--auth", "flood:pw", "--clients", "4", "--messages", "3",
        "--keep-open", "--split", "random",
    )  # fmt: skip
    assert_clean(status, report, 12)
    assert report["replies"]["220"] == 8  # the greeting and the 220 to STARTTLS
    assert report["replies"]["235"] == 4


def test_implicit_tls(start_process: Callable[..., SelsmtpProcess]) -> None:
    server = start_process("--tls-cert", str(CERT), "--tls-key", str(KEY), "--tls-port", "0")
    assert server.process.stdout is not None
    second = server.process.stdout.readline().decode()
    assert second.startswith("selsmtp tls listening on "), second
    tls_port = second.rpartition(":")[2].strip()
    status, report, _ = flood(
        "--port", tls_port, "--mailbox", server.mailbox, "--tls", "--clients", "4",
        "--messages", "3", "--pipelining",
    )  # fmt: skip
    assert_clean(status, report, 12)
    assert report["connections"] == 12


# -- checking the server's certificate ---------------------------------------------


def test_cafile_verifies_the_server_certificate(
    start_process: Callable[..., SelsmtpProcess],
) -> None:
    server = start_process("--tls-cert", str(CERT), "--tls-key", str(KEY))
    status, report = flood_against(
        server, "--starttls", "--cafile", CA, "--clients", "2", "--messages", "2"
    )
    assert_clean(status, report, 4)


def make_other_ca(folder: Path) -> Path:
    """A throwaway CA that signed nothing the server holds."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no throwaway CA to test with")
    pem = folder / "other-ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
         str(folder / "other-ca.key"), "-out", str(pem), "-days", "1",
         "-subj", "/CN=not the selsmtp test CA"],
        check=True, capture_output=True, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    return pem


def test_cafile_that_did_not_sign_the_certificate_fails_clearly(
    start_process: Callable[..., SelsmtpProcess], tmp_path: Path
) -> None:
    other = make_other_ca(tmp_path)
    server = start_process("--tls-cert", str(CERT), "--tls-key", str(KEY))
    status, report = flood_against(
        server, "--starttls", "--cafile", other, "--clients", "1", "--messages", "1"
    )
    assert status != 0
    assert report["ok"] is False
    assert report["acknowledged"] == 0
    problems = " ".join(report["failures"])
    assert "certificate verify failed" in problems, problems
    assert "unable to get local issuer certificate" in problems, problems


def test_cafile_refuses_an_expired_certificate(
    start_process: Callable[..., SelsmtpProcess],
) -> None:
    server = start_process("--tls-cert", str(EXPIRED_CERT), "--tls-key", str(EXPIRED_KEY))
    status, report = flood_against(
        server, "--starttls", "--cafile", CA, "--clients", "1", "--messages", "1"
    )
    assert status != 0
    problems = " ".join(report["failures"])
    assert "certificate has expired" in problems, problems


def test_without_cafile_the_certificate_is_not_checked(
    start_process: Callable[..., SelsmtpProcess],
) -> None:
    """The documented default: a self-signed or expired certificate is accepted."""
    server = start_process("--tls-cert", str(EXPIRED_CERT), "--tls-key", str(EXPIRED_KEY))
    status, report = flood_against(server, "--starttls", "--clients", "1", "--messages", "2")
    assert_clean(status, report, 2)


def test_cafile_needs_tls() -> None:
    done = subprocess.run(
        [sys.executable, str(FLOOD), "--port", "25", "--cafile", str(CA)],
        capture_output=True, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 2
    assert b"--cafile needs --tls or --starttls" in done.stderr
