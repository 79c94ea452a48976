"""The offsets index as :class:`~selsmtp.store.FileStore` keeps it, beside the mailbox.

The offsets index
-----------------
``PATH.selsmtp-index`` (:mod:`selsmtp.mailindex`) lists the offset, length and number
of every record this store wrote into the file, so that readers find exactly those
records even when a ``cs4410`` body holds look-alike record heads (SPEC §7). Its
entries are appended after the batch's fsync and before its commit is recorded, so
they never point at mail that is not on disk, and a batch that start-up or a failure
cuts loses its entries too. The index follows the file: it begins again (a header
naming the file, no entries) for a new file, one renamed away, one a consumer
emptied or others rewrote (its last entry's record head is no longer there), and it
is renamed along with a rotated file, or with a file a consumer renamed within the
mailbox's folder (``mv mailbox taken``: ``taken.selsmtp-index``). Another program's
records and the bytes the store writes to reach a record boundary are not listed.
The index costs one ``write`` per batch and no fsync of its own (it is fsync'd with
the state line); a failure to write it is logged and costs readers the index, never
mail.

:class:`StoreIndex` is that keeping: the store owns one, hands it the mailbox
descriptor it holds (which changes at a rotation or a rename), and calls it at the
steps of an append. Every method but :meth:`StoreIndex.open` logs a failure and
never raises: from then on, until a write works again, readers parse the mailbox.
"""

from __future__ import annotations

import logging
import os
import re

from selsmtp import mailindex
from selsmtp.durable import HEAD_BYTES, Fsync, NotRegularFile, StartupError, same_file

# Why the store's logger: these are the store's messages, and operators (and tests)
# filter on one name for them; selsmtp.rotation does the same.
log = logging.getLogger("selsmtp.store")


class StoreIndex:
    """The offsets index of the ``fmt`` mailbox at ``path`` (absolute), whose record
    heads ``number_pattern`` finds. ``writer`` is ``None`` while there is no index
    (it could not be opened)."""

    def __init__(
        self, path: str, fmt: str, number_pattern: re.Pattern[bytes], fsync: Fsync
    ) -> None:
        self.path = path
        self._format = fmt
        self._number_pattern = number_pattern
        self._fsync = fsync
        self.writer: mailindex.IndexWriter | None = None
        self._broken = False  # the last index write failed (said once)

    def open(self, fd: int) -> None:
        """Open the index and go on with it if it describes the mailbox file ``fd``;
        else begin it again. Without one (it cannot be opened), mail is stored all
        the same, and readers parse the mailbox; but something other than a regular
        file at its path is a :class:`StartupError` (SPEC §12)."""
        try:
            index = mailindex.IndexWriter(self.path, self._fsync)
        except NotRegularFile as exc:
            raise StartupError(f"cannot open offsets index: {exc}") from exc
        except OSError as exc:
            self._failed(mailindex.index_path(self.path), exc)
            return
        try:
            if index.adopt(self._format, os.fstat(fd)) and not self._holds_last(fd, index):
                index.reset(self._format, index.dev, index.ino)  # the file was rewritten
        except OSError as exc:
            index.close()
            self._failed(index.path, exc)
            return
        self.writer = index

    def ends_file(self, st: os.stat_result) -> bool:
        """True if the last record the index lists ends the file ``st`` (after
        :meth:`ready_for`, that record is known to be there)."""
        index = self.writer
        return (
            index is not None
            and index.describes(st.st_dev, st.st_ino)
            and bool(index.last)
            and index.end == st.st_size
        )

    def listed_end(self, st: os.stat_result) -> int | None:
        """Where the last record the index lists ends (0: none listed), if the index
        describes the file ``st``; else ``None``. After :meth:`ready_for` that record
        is known to be there."""
        index = self.writer
        if index is None or not index.describes(st.st_dev, st.st_ino):
            return None
        return index.end

    def ready_for(
        self, fd: int, st: os.stat_result, committed: int
    ) -> mailindex.IndexWriter | None:
        """The index, ready to list records appended at the end of the file ``st``
        (open as ``fd``; our last commit left the file ``committed`` bytes long): begun
        again if it describes another file (new, or renamed away) or one emptied or
        rewritten since its last entry. ``None`` if it cannot be written.

        No system call when the file is the one our last commit left (a pread when
        another program appended since)."""
        index = self.writer
        if index is None:
            return None
        try:
            if (
                not index.describes(st.st_dev, st.st_ino)
                or st.st_size < index.end
                or (st.st_size != committed and not self._holds_last(fd, index))
            ):
                index.reset(self._format, st.st_dev, st.st_ino)
        except OSError as exc:
            self._failed(index.path, exc)
            return None
        return index

    def list_records(
        self, index: mailindex.IndexWriter, start: int, lengths: list[int], first: int, sync: bool
    ) -> None:
        """List the records just committed at ``start`` (their ``lengths``, numbered
        from ``first``) in one write, and fsync it if ``sync`` (the state line was made
        durable for this commit). A failure costs readers the index, never mail."""
        entries = []
        for number, length in enumerate(lengths, first):
            entries.append(mailindex.IndexEntry(start, length, number))
            start += length
        try:
            index.append(entries)
            if sync:
                index.sync()
            self._broken = False
        except OSError as exc:
            self._failed(index.path, exc)

    def cut(self, length: int) -> None:
        """Records past ``length`` were cut from the current file: cut their entries."""
        index = self.writer
        if index is None:
            return
        try:
            index.truncate_to(length)
        except OSError as exc:
            self._failed(index.path, exc)

    def cut_rotated(self, target: str, fd: int, start: int) -> None:
        """A part of a failed batch is about to be cut from ``start`` on out of the file
        (``fd``) rotated to ``target``: cut its entries out of that file's index, so
        that readers keep the index for the records before it."""
        try:
            mailindex.cut(target, os.fstat(fd), start)
        except OSError as exc:
            self._failed(mailindex.index_path(target), exc)

    def rotated(self, target: str, fd: int, committed: int) -> None:
        """The mailbox was rotated to ``target``, and the file ``fd`` begun at the path
        (``committed``: as for :meth:`ready_for`): the index goes along with the old
        file, and a new one begins for the new file."""
        if self.writer is None:
            return
        try:
            self.writer.rename(target)
        except OSError as exc:
            log.error("cannot move the index of %s along to %s: %s", self.path, target, exc)
        self.ready_for(fd, os.fstat(fd), committed)

    def follows_rename(self, fd: int) -> None:
        """A consumer renamed the file ``fd`` away. If its new name is in the mailbox's
        folder (Linux names it in ``/proc/self/fd``), its index goes along, as at a
        rotation, so readers of the new name still tell records from look-alikes;
        else the index begins again for the next file, as it does anyway."""
        index = self.writer
        if index is None:
            return
        try:
            held = os.fstat(fd)
            moved = os.readlink(f"/proc/self/fd/{fd}")
            # Why compare the folders' identities, not their names: the kernel gives
            # the real path, which differs where the mailbox is reached by a symlink.
            here, there = os.stat(os.path.dirname(self.path)), os.stat(os.path.dirname(moved))
            if (
                not index.describes(held.st_dev, held.st_ino)
                or (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino)
                or not same_file(moved, fd)
            ):
                return
            index.rename(moved)
        except OSError as exc:
            log.info("the index of %s stays where it is: %s", self.path, exc)

    def sync(self) -> None:
        """Raises ``OSError`` (the store logs it with the state line's)."""
        if self.writer is not None:
            self.writer.sync()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _holds_last(self, fd: int, index: mailindex.IndexWriter) -> bool:
        """True if the last record ``index`` lists still begins where it says."""
        if not index.last:
            return True
        head = os.pread(fd, HEAD_BYTES, index.last_offset)
        found = self._number_pattern.search(head)
        return (
            found is not None
            and b"\n" not in head[: found.start()]
            and int(found.group(1)) == index.last
        )

    def _failed(self, path: str, exc: OSError) -> None:
        if not self._broken:  # once until it works again
            log.error("cannot write %s (%s); readers parse %s instead", path, exc, self.path)
        self._broken = True
