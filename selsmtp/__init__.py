"""selsmtp: a fast, durable, dependency-free SMTP server built on one selectors loop.

Start-up time is a target (the first greeting within 40 ms of process start), so the
modules that ``python -m selsmtp`` imports keep clear of slow imports (measured):

* no ``dataclasses``: the value classes are plain classes (:mod:`selsmtp.frozen`);
* no ``typing`` at run time: each module sets ``TYPE_CHECKING = False`` itself, which
  mypy reads as ``typing.TYPE_CHECKING``, and imports from ``typing`` under it
  (annotations are never evaluated, with ``from __future__ import annotations``).
"""

from selsmtp.config import Config
from selsmtp.session import Session

TYPE_CHECKING = False
if TYPE_CHECKING:
    from selsmtp.reader import read_mailbox

__version__ = "0.1.0"
__all__ = ["Config", "Session", "__version__", "read_mailbox"]


def __getattr__(name: str) -> object:
    # read_mailbox is imported when asked for: the server never reads mail back, and
    # the reader's imports (dataclasses, email) would slow its start-up.
    if name == "read_mailbox":
        from selsmtp.reader import read_mailbox

        return read_mailbox
    raise AttributeError(f"module 'selsmtp' has no attribute {name!r}")
