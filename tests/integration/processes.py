"""``python -m selsmtp`` as a real child process, for the tests that need one."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .conftest import NAME, REPO_ROOT, WAIT, WireClient

LISTENING = re.compile(r"selsmtp listening on (127\.0\.0\.1|\[::1\]):(\d+)\n")

#: runs ``python -m selsmtp ARGS...`` after setting the resource limits given as JSON
#: in the first argument, e.g. RLIMIT_FSIZE (past it, writes fail with EFBIG as on a
#: full disk: CPython ignores SIGXFSZ) or RLIMIT_NOFILE
RLIMIT_PRELUDE = """\
import json, resource, runpy, sys
for name, limit in json.loads(sys.argv[1]).items():
    resource.setrlimit(getattr(resource, name), (limit, limit))
sys.argv = ["selsmtp", *sys.argv[2:]]
runpy.run_module("selsmtp", run_name="__main__", alter_sys=True)
"""


def selsmtp_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "selsmtp", *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.pop("PYTHONWARNINGS", None)
    return env


def run_selsmtp(*args: str) -> subprocess.CompletedProcess[str]:
    """Run selsmtp to completion (for start-up failures)."""
    return subprocess.run(
        selsmtp_command(*args),
        cwd=REPO_ROOT,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


class SelsmtpProcess:
    """A running ``python -m selsmtp --port 0`` and the address it announced.

    ``rlimits`` maps ``resource`` limit names to values set in the child before it
    starts; ``wrapper`` is a command to run it under (e.g. ``strace``).
    """

    def __init__(
        self,
        mailbox: Path,
        *args: str,
        rlimits: dict[str, int] | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.mailbox = mailbox
        args = ("--port", "0", "--mailbox", str(mailbox), "--name", NAME, *args)
        if rlimits:
            command = [sys.executable, "-c", RLIMIT_PRELUDE, json.dumps(rlimits), *args]
        else:
            command = selsmtp_command(*args)
        self.proc = subprocess.Popen(
            [*wrapper, *command],
            cwd=REPO_ROOT,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], WAIT)
        assert readable, "selsmtp printed nothing"
        self.first_line = self.proc.stdout.readline().decode()
        match = LISTENING.fullmatch(self.first_line)
        assert match, f"unexpected first line {self.first_line!r}"
        self.host = match[1].strip("[]")
        self.port = int(match[2])

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def connect(self) -> WireClient:
        return WireClient(self.address)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = WAIT) -> tuple[int, str, str]:
        """Wait for the exit; return its code, the rest of stdout and all of stderr."""
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out.decode(), err.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()
