"""Fixtures shared by every test directory: a configuration with tiny limits, and sessions.

Nothing here opens a socket or a file; the integration tests add their own fixtures in
``tests/integration/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import pytest

from selsmtp.config import Config
from selsmtp.session import Session

# Why: the helpers in tests/scripts.py assert on behalf of the tests; let pytest explain
# their failures as it does for asserts written in test modules.
pytest.register_assert_rewrite("tests.scripts")

if TYPE_CHECKING:
    from tests.scripts import MakeSession

#: The server name every test configuration uses; it shows up in the greeting and the 421s.
TEST_NAME = "test.example"


@pytest.fixture
def config() -> Config:
    """Tiny limits, so that every limit can be reached with a few bytes."""
    return Config(
        name=TEST_NAME,
        max_message_size=1024,
        max_recipients=3,
        max_errors=20,
        timeout=1.0,
    )


@pytest.fixture
def make_session(config: Config) -> MakeSession:
    """A factory of fresh sessions; keyword arguments override fields of ``config``.

    ``make_session()`` uses the fixture's config as is; ``make_session(max_errors=3)``
    replaces one limit; ``new_spool=io.BytesIO`` injects the spool factory.
    """

    def make(*, new_spool: Callable[[], BinaryIO] | None = None, **overrides: Any) -> Session:
        used = config.replace(**overrides) if overrides else config
        return Session(used, new_spool=new_spool)

    return make


@pytest.fixture
def mailbox_path(tmp_path: Path) -> Path:
    """Where a test's mailbox goes (the file is not created)."""
    return tmp_path / "mailbox"
