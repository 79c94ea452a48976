"""Options are checked at start-up (SPEC §2, §12): a real ``python -m selsmtp`` given a
timeout or a server name it cannot honour exits 2 with its usage, and never listens."""

from __future__ import annotations

from pathlib import Path

import pytest

from .processes import run_selsmtp

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
