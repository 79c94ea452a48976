"""Where the next record may begin in a mailbox file others may write to as well.

Record boundaries
-----------------
Each record begins at a record boundary, whatever the file holds (SPEC §7): at its
start, after a blank line, or where our own last record (per the index) ends. If
another program left the file ending elsewhere (a record it died writing), its bytes
are kept, and the batch is written after the fewest LFs (one or two) that put the
first record after a blank line, with a warning naming the damaged region (from the
end of the last whole record, as well as the index and the last record head tell, to
the end of the file). Only the pending batch of the state file is ever cut, and the
LFs are part of the batch: counted in its length and its commit, cut with it by a
failure or by crash recovery, so a crash right after them cuts nothing of another
program's. The end of the file is read (two bytes) only when it is not where our last
commit left it: at the first append after a start, or after another program wrote.

:class:`Boundaries` keeps that one fact (where our last commit ended the file) and
works out the LFs; :class:`~selsmtp.store.FileStore` writes them as the first bytes
of a commit.
"""

from __future__ import annotations

import logging
import os

from selsmtp import formats

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import Final

    from selsmtp.durable import State
    from selsmtp.storeindex import StoreIndex

# Why the store's logger: these are the store's messages, and operators (and tests)
# filter on one name for them; selsmtp.rotation does the same.
log = logging.getLogger("selsmtp.store")

#: how far back from the end of the file a damaged region is looked for
DAMAGE_WINDOW: Final = 1 << 16
#: a record begins after a blank line, with its format's first line
RECORD_STARTS: Final = {name: b"\n\n" + start for name, start in formats.HEAD_STARTS.items()}


class Boundaries:
    """The record boundaries of the ``fmt`` mailbox at ``path``, whose records
    ``index`` lists."""

    def __init__(self, path: str, fmt: str, index: StoreIndex) -> None:
        self.path = path
        self._format = fmt
        self._index = index
        #: (dev, ino, length) of the file where our last commit ended it: a boundary
        self._at = (-1, -1, -1)

    def committed(self, st: os.stat_result, end: int) -> None:
        """A commit of ours ended the file ``st`` at ``end``: a record may begin there."""
        self._at = (st.st_dev, st.st_ino, end)

    def fixup(self, fd: int, st: os.stat_result, state: State) -> bytes:
        """The bytes to write before the next record so that it begins at a record
        boundary in the file ``st`` (open as ``fd``; ``state`` is the store's, for
        where its last commit ended a file the index does not describe): none if
        the file is empty, ends with a blank line or with the last record the index
        lists; else a LF or two, and a warning saying where the damage is.

        No system call when the file ends where our last commit left it. Raises
        ``OSError``."""
        size = st.st_size
        if size == 0 or self._at == (st.st_dev, st.st_ino, size):
            return b""
        # Our own last record (checked by StoreIndex.ready_for) ends the file: it ends
        # with no blank line when its body had no final LF, and is a boundary all the
        # same.
        if self._index.ends_file(st):
            return b""
        # A file of one LF (``echo > mailbox``) does not end with a blank line: a
        # record after it would follow no "\n\n", and a parser would not find it.
        tail = (b"\0\0" + os.pread(fd, 2, max(0, size - 2)))[-2:]
        if tail == b"\n\n":
            self._at = (st.st_dev, st.st_ino, size)
            return b""
        fixup = b"\n" if tail.endswith(b"\n") else b"\n\n"
        offset, exact = self._damage_start(fd, st, state)
        log.warning(
            "%s does not end where a record may begin: damaged region at offset %d, "
            "length %d%s (a record another program left cut short?); kept as it is, "
            "and %d byte(s) written so that the next record begins after a blank line",
            self.path,
            offset,
            size - offset,
            "" if exact else " at least",
            len(fixup),
        )
        return fixup

    def _damage_start(self, fd: int, st: os.stat_result, state: State) -> tuple[int, bool]:
        """Where the last whole record of the file ``st`` ends, as well as we can tell
        (and whether that is exact): past the last record listed in the index, at the
        start of the last record head that follows a blank line after it."""
        known = self._index.listed_end(st)  # checked by ready_for: our last record is there
        if known is None:
            same = (st.st_dev, st.st_ino) == (state.dev, state.ino)
            known = min(state.size, st.st_size) if same else 0
        window = max(known, st.st_size - DAMAGE_WINDOW)
        data = os.pread(fd, st.st_size - window, window)
        found = data.rfind(RECORD_STARTS[self._format])
        if found >= 0:
            return window + found + 2, True
        return window, window == known
