"""The protocol core is sans-IO (STYLE §2.1): its modules import no sockets, files,
clocks, selectors, signals or threads. Parsed with ``ast``, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import selsmtp

PACKAGE = Path(selsmtp.__file__).parent

PURE_MODULES = ["session", "framing", "syntax", "replies", "formats", "config", "frozen", "auth"]
#: the files of the pure modules (a package is its __init__ and its modules)
PURE_FILES = [m for m in PURE_MODULES if m != "formats"] + [
    f"formats/{name}" for name in ("__init__", "cs4410", "mbox", "maildir", "trace", "lines")
]

FORBIDDEN = {"socket", "selectors", "os", "fcntl", "time", "select", "signal", "threading"}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import name` may import the module pkg.name: count both.
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
        ):
            found.add("__import__")
    return found


@pytest.mark.parametrize("module", PURE_FILES)
def test_a_pure_module_imports_no_io(module: str) -> None:
    imports = imported_modules(PACKAGE / f"{module}.py")
    roots = {name.partition(".")[0] for name in imports}
    assert roots & (FORBIDDEN | {"__import__", "importlib"}) == set()


@pytest.mark.parametrize("module", PURE_FILES)
def test_a_pure_module_imports_only_pure_selsmtp_modules(module: str) -> None:
    imports = imported_modules(PACKAGE / f"{module}.py")
    ours = {name.split(".")[1] for name in imports if name.startswith("selsmtp.")}
    assert ours <= set(PURE_MODULES) - {module}


def test_the_checker_sees_every_form_of_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os.path\nfrom time import monotonic\ndef f():\n    import socket\n"
        "from . import relative\n__import__('fcntl')\n",
        encoding="utf-8",
    )
    assert imported_modules(sample) == {
        "os.path",
        "time",
        "time.monotonic",
        "socket",
        "__import__",
    }
