"""Options are checked at start-up (SPEC §2, §12): a real ``python -m selsmtp`` given a
timeout or a server name it cannot honour exits 2 with its usage, and never listens."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, WAIT, WireClient
from .processes import LISTENING, child_env, run_selsmtp

BAD = {
    "--timeout inf": ["--timeout", "inf"],
    "--timeout nan": ["--timeout", "nan"],
    "--timeout 1e400": ["--timeout", "1e400"],
    "--timeout -5": ["--timeout", "-5"],
    "--timeout 86401": ["--timeout", "86401"],
    "--name with LF": ["--name", "mx.test\nX-Injected: yes"],
    "--name with CR": ["--name", "mx\r"],
    "--name with a space": ["--name", "mx test"],
    "--name with a tab": ["--name", "mx\ttest"],
    "--name with a control byte": ["--name", "mx\x01test"],
    "--name empty": ["--name", ""],
    "--name of 256 bytes": ["--name", "a" * 256],
    "--name not UTF-8": ["--name", "mx\udcff"],  # the byte 0xff on the command line
}


@pytest.mark.parametrize("args", BAD.values(), ids=BAD.keys())
def test_a_bad_timeout_or_name_exits_2_with_usage(args: list[str], tmp_path: Path) -> None:
    result = run_selsmtp("--port", "0", "--mailbox", str(tmp_path / "mailbox"), *args)

    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("usage: selsmtp")
    assert f"argument {args[0]}:" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""  # it never said it was listening
    assert not (tmp_path / "mailbox").exists()


@pytest.mark.parametrize(
    "args", [["--timeout", "86400"], ["--timeout", "0.25"], ["--name", "[192.0.2.1]"]]
)
def test_a_sound_timeout_or_name_starts(args: list[str], tmp_path: Path) -> None:
    # --version exits 0 after the options are parsed, before anything listens
    result = run_selsmtp("--mailbox", str(tmp_path / "mailbox"), *args, "--version")
    assert result.returncode == 0, result.stderr


#: runs ``python -m selsmtp ARGS...`` on a machine whose host name is the first argument
#: (in a UTS namespace of its own, so the real one is untouched)
HOSTNAME_PRELUDE = """\
import runpy, socket, sys
socket.sethostname(sys.argv[1])
sys.argv = ["selsmtp", *sys.argv[2:]]
runpy.run_module("selsmtp", run_name="__main__", alter_sys=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="setting a host name needs root")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
@pytest.mark.parametrize(
    ("hostname", "name"),
    [("mx-1.example.org", "mx-1"), ("bad name", "localhost"), ("nl\nhost", "localhost")],
)
def test_without_name_the_short_host_name_is_used_if_fit(
    hostname: str, name: str, tmp_path: Path
) -> None:
    options = ["--port", "0", "--mailbox", str(tmp_path / "mailbox")]
    proc = subprocess.Popen(
        ["unshare", "--uts", sys.executable, "-c", HOSTNAME_PRELUDE, hostname, *options],
        cwd=REPO_ROOT,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], WAIT)
        assert readable, "selsmtp printed nothing"
        match = LISTENING.fullmatch(proc.stdout.readline().decode())
        assert match
        client = WireClient((match[1], int(match[2])))
        try:
            assert client.read_reply() == f"220 {name} SMTP CS4410MP3\r\n".encode()
        finally:
            client.close()
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, stderr.decode()[-2000:]
