"""Start-up stays fast: what ``python -m selsmtp`` loads before its first greeting keeps
clear of the modules that were measured to slow it down (see selsmtp/__init__.py)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO_ROOT

#: slow to import, and not needed to serve the default (cs4410) format
SLOW = {"dataclasses", "inspect", "typing", "shutil", "datetime", "tempfile", "selsmtp.maildir"}
#: OpenSSL's modules: only a server with a certificate or --auth FILE needs them
SLOW |= {"ssl", "_ssl", "hmac", "_hashlib"}

#: what the command line does before it listens, then every module loaded by then
PROBE = """
import sys
from selsmtp import cli
cli.build_parser().parse_args(["--port", "0"])
print(" ".join(sys.modules))
"""


def test_the_server_path_imports_no_slow_module() -> None:
    # -S -E: no site-packages or environment, so only selsmtp's own imports count.
    loaded = subprocess.run(
        [sys.executable, "-S", "-E", "-c", PROBE],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "selsmtp.server" in loaded
    assert SLOW & set(loaded) == set()
