"""Fixtures shared by the unit tests of the file store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from selsmtp.store import FileStore
from tests.stores import store_options


@pytest.fixture
def mailbox(tmp_path: Path) -> Path:
    return tmp_path / "mailbox"


@pytest.fixture
def open_store(mailbox: Path) -> Iterator[Callable[..., FileStore]]:
    """``open_store(fmt="cs4410", path=mailbox, **options)``; every store is closed at
    teardown. (test_store.py has its own, taking a renderer.)"""
    opened: list[FileStore] = []

    def open_one(fmt: str = "cs4410", path: Path = mailbox, **options: Any) -> FileStore:
        opened.append(FileStore(str(path), **store_options(fmt), **options))
        return opened[-1]

    yield open_one
    for one in opened:
        one.close()
