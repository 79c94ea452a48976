"""The mailbox file: locked, group-committed, durable appends, and rotation.

Theory of operation
-------------------
The mailbox file is opened once, as one raw descriptor, and kept open
(:mod:`selsmtp.mailboxfile`: POSIX record locks vanish when the process closes *any*
descriptor of the file; the start-up checks below read it once before that
descriptor exists). Something other than a regular file at the path is never opened
for writing nor followed: at start-up that is a :class:`StartupError`, while running
a :class:`StoreError` (451) for the batch, and the next batch looks again. A batch of
finished messages is stored by :meth:`FileStore.try_append`:

1. take the exclusive lock with ``lockf(LOCK_EX | LOCK_NB)``; if a reader holds it,
   return ``None`` at once (the loop never blocks; the caller tries again later);
2. check with ``lstat`` that the path itself still names the file we hold (a consumer
   may have renamed it away; then the file is created again at the path, and its
   folder fsync'd; a folder fsync that failed is done again at the next attempt);
3. render the batch and measure it, then write the commit marker to the state file:
   the batch starts at the file's length and ends ``length`` bytes later, and its
   numbers are taken;
4. write every record of the batch through the raw descriptor (``writev``, looping
   over short writes), and ``fsync`` the file: the one fsync a batch costs;
5. list the batch's records in the offsets index (one ``write``, see below), record
   the new committed length in the state file, and release the lock. Only now may
   the caller send the 250 replies.

If a write or an fsync fails, the file is cut back to its length before the batch
while the lock is still held, and :class:`StoreError` is raised: nothing partial is
left for a reader to see, and nothing is acknowledged. (If even ``ftruncate`` fails,
the batch stays pending as after a crash, readers hide it, its numbers stay taken,
and it is cut before the next append.) A batch holding more than
:data:`PART_BYTES` of message data is committed in parts (steps 3-5 each), so that
its rendered records never all sit in memory at once; a failed part takes the
parts before it back too. A crash between two parts keeps the parts committed
before it, whose 250s had not gone out: their clients send them again, and they are
stored twice (what SMTP prefers to a loss). The parts of a batch split by rotation
are the same.

The state file
--------------
``PATH.selsmtp`` (:class:`~selsmtp.durable.StateFile`) holds one short line: the last
number given out, the mailbox length after the last commit, the identity (device,
inode) of that file, the first number selsmtp wrote into it, while a batch is being
written the offsets it starts and ends at, the numbers reserved, and the boot of the
machine. It makes numbers continue across restarts without reading the mailbox, and
it is the commit marker of SPEC §5.5.

Why the line needs no fsync per batch: after a crash of the process alone, the page
cache still holds the last line written, fsync'd or not. It says a batch was being
written only if its fsync had not finished, so no 250 went out, and the bytes past
the batch's start are a torn tail, removed at start-up (whole or not), unless they
reach past where the batch would have ended, or no record head of ours begins where
it did (a consumer emptied the file since): then another program wrote them while
we were down, and nothing is cut (see "Record boundaries"). Bytes past the
committed length with no batch in progress were appended by another program under
the lock and are kept. This crash rule exists once, as
:func:`~selsmtp.durable.pending_verdict`: the readers hide exactly the bytes it cuts.

After a reboot (a power cut), the line may be any one written since its last fsync,
older than the mailbox, and start-up reads it as a lower bound: a line that is fsync'd
reserves the next :data:`RESERVED_NUMBERS` numbers, and no number past the reserve is
given out before a line reserving it is fsync'd. :mod:`selsmtp.recovery` says how a
start settles the numbers and a pending batch after a crash or a reboot.

The line is also fsync'd whenever the file is not the one it describes (a new file,
or one emptied by a consumer), so that a pending batch it names is in this file.

A reader that empties the mailbox (movemail) or renames it away needs no help from
us: the next batch sees the new length or the new file, and the numbers go on.

Start-up
--------
Every check that can refuse the mailbox runs before any file is created or changed;
then the mailbox is opened and recovered (:mod:`selsmtp.recovery`).

Record boundaries
-----------------
Each record begins at a record boundary, whatever the file holds (SPEC §7). If another
program left the file ending elsewhere, its bytes are kept, and the batch begins with
the one or two LFs that put its first record after a blank line
(:mod:`selsmtp.boundaries`): counted in its length and its commit, and cut with it.

The offsets index
-----------------
``PATH.selsmtp-index`` lists the offset, length and number of every record this store
wrote into the file, appended after the batch's fsync and before its commit is
recorded (step 5), and cut with a batch that is cut; :mod:`selsmtp.storeindex` keeps
it and says how it follows the file.

Rotation
--------
With ``rotate=N``, a batch that crosses a multiple of N is split there: each part is
committed (steps 3-5) into its own file, and between the parts the file is renamed to
``PATH.A-B`` (its index to ``PATH.A-B.selsmtp-index``) and a new one begins, under the
lock (:mod:`selsmtp.rotation` has the policy and the crash analysis). If a later part
fails, the parts already committed are cut back too (and their entries out of the
rotated file's index), so a batch is stored whole or not at all; their numbers stay
reserved, as a rotated file's name already covers them.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import time
from collections.abc import Callable, Sequence

from selsmtp import formats, instance, recovery, rotation
from selsmtp.boundaries import DAMAGE_WINDOW as DAMAGE_WINDOW
from selsmtp.boundaries import Boundaries
from selsmtp.config import Config
from selsmtp.durable import (
    MAX_IOV,
    STATE_SUFFIX,
    WRITE_CHUNK,
    Fsync,
    NotRegularFile,
    StartupError,
    State,
    StateFile,
    StoreError,
    boot_id,
    fsync_directory,
    write_all,
    write_pieces,
)
from selsmtp.mailboxfile import MailboxFile
from selsmtp.recovery import SCAN_OVERLAP as SCAN_OVERLAP
from selsmtp.renderers import Renderer, cs4410_renderer, mbox_renderer, render_part
from selsmtp.session import Deliver
from selsmtp.storeindex import StoreIndex

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import Final

    from selsmtp.durable import Store

__all__ = [
    "MAX_IOV",
    "STATE_SUFFIX",
    "WRITE_CHUNK",
    "FileStore",
    "Renderer",
    "StartupError",
    "StoreError",
    "cs4410_renderer",
    "fsync_directory",
    "mbox_renderer",
    "open_store",
    "write_all",
]

log = logging.getLogger("selsmtp.store")

#: how far past the last number a durable state line reserves numbers; the line is
#: fsync'd again only when they run out (about once per this many messages)
RESERVED_NUMBERS: Final = 1000
#: the most message data one commit renders in memory (its records are measured
#: before the commit marker is written); a larger batch becomes several commits
PART_BYTES: Final = 16 << 20


def _no_fsync(fd: int) -> None:
    pass


class FileStore:
    """A single-file mailbox (``cs4410`` or ``mbox``) with group commit and rotation.

    ``render(number, deliver, now)`` yields the bytes of one record; ``number_pattern``
    finds record numbers in the file when the state file is lost; ``rotate=N`` rotates
    the file after every N numbers; ``clock`` gives ``now``, once per batch;
    ``format`` (by default, from ``number_pattern``) is what the state line records
    and the format guard checks; ``instance_wait`` is how long to wait for another
    process's instance lock (:mod:`selsmtp.instance`). Raises :class:`StartupError`
    if the mailbox, its state file or its lock file cannot be used (not a regular
    file, damaged, in another format, locked by another selsmtp).
    """

    def __init__(
        self,
        path: str,
        render: Renderer,
        *,
        fsync: bool = True,
        rotate: int | None = None,
        number_pattern: re.Pattern[bytes] = formats.CS4410_NUMBER,
        clock: Callable[[], float] = time.time,
        boot: str | None = None,
        format: str | None = None,
        instance_wait: float = instance.WAIT,
    ) -> None:
        self.path = os.path.abspath(path)
        self.state_path = self.path + STATE_SUFFIX
        if format is None:  # the format the records of ``render`` are in
            format = "mbox" if number_pattern is formats.MBOX_NUMBER else "cs4410"
        self.format = format
        self._fsync: Fsync = os.fsync if fsync else _no_fsync
        self._index = StoreIndex(self.path, format, number_pattern, self._fsync)
        self._boundaries = Boundaries(self.path, format, self._index)
        self._render = render
        self._rotate = rotate or 0
        self._number_pattern = number_pattern
        self._clock = clock
        self._file = MailboxFile(self.path)
        self._states: StateFile | None = None
        self._state = State()
        self._torn = False  # a crash left a batch unfinished; repair before appending
        self._torn_size = -1  # the mailbox's length when that was found
        self._boot = boot_id() if boot is None else boot
        self._ready = False  # recovered: the state in memory is the mailbox's
        self._instance: instance.InstanceLock | None = None
        # Start-up checks first, and each refusal leaves every file as it was.
        try:
            self._instance, saved = recovery.checked_start(
                self.path, format, fsync=self._fsync, wait=instance_wait
            )
        except StartupError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise StartupError(_cannot("open mailbox", self.path, exc)) from exc
        try:
            self._file.open()
            self._states = StateFile(self.state_path, self._fsync)
        except OSError as exc:
            self.close()
            raise StartupError(_cannot("open mailbox", self.path, exc)) from exc
        try:
            self._index.open(self._file.fd)
        except StartupError:
            self.close()
            raise
        try:
            self._recover(saved)
        except OSError as exc:
            self.close()
            raise StartupError(_cannot("recover mailbox", self.path, exc)) from exc
        self._ready = True

    @property
    def last_number(self) -> int:
        return self._state.number

    def close(self) -> None:
        """Record the exact last number durably (no reservation to skip at the next
        start), then close every descriptor."""
        state = self._state
        if self._ready and not self._torn and state.pending < 0 and self._states is not None:
            self._ready = False
            state.reserved = state.number
            try:
                self._save_state(sync=True)  # the line, then the lock file's record
                self._index.sync()
            except OSError:
                log.error("cannot update %s", self.state_path, exc_info=True)
        self._index.close()
        self._file.close()
        if self._states is not None:
            self._states.close()
        if self._instance is not None:
            self._instance.close()  # last: another instance may start from here on

    # -- appending ---------------------------------------------------------------

    def try_append(self, batch: Sequence[Deliver]) -> list[int] | None:
        """Store every message of ``batch`` in one write and one fsync per file (per
        :data:`PART_BYTES` of message data).

        Returns their numbers, in order, or ``None`` if another process holds the
        lock (nothing was done; try again later). Raises :class:`StoreError` if the
        mailbox could not be opened or locked, or the write, the fsync or the state
        update failed; the mailbox is then as it was before.
        """
        try:
            if not self._lock():
                return None
        except NotRegularFile as exc:
            raise StoreError(f"cannot append: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
        try:
            return self._append_locked(batch, self._clock())
        finally:
            self._file.release()

    def _append_locked(self, batch: Sequence[Deliver], now: float) -> list[int]:
        try:
            if self._torn:
                self._repair_locked()
        except OSError as exc:
            raise StoreError(f"cannot append to {self.path}: {exc.strerror or exc}") from exc
        if self._rotation_due():
            self._try_rotate()
        before = self._state.copy()
        done: list[tuple[int, int]] = []  # (descriptor, start) of each part stored
        numbers: list[int] = []
        while len(numbers) < len(batch):
            size = _part_size(batch, len(numbers))
            if self._rotate:  # up to the next multiple of N, where the file rotates
                size = min(size, self._rotate - self._state.number % self._rotate)
            try:
                start = self._append_part(batch[len(numbers) : len(numbers) + size], now)
            except OSError as exc:
                if done:
                    self._take_back(done, before)
                raise StoreError(f"cannot append to {self.path}: {exc.strerror or exc}") from exc
            done.append((self._file.fd, start))
            numbers.extend(range(self._state.number - size + 1, self._state.number + 1))
            if self._rotation_due():
                self._try_rotate()
        return numbers

    def _append_part(self, part: Sequence[Deliver], now: float) -> int:
        """Append ``part`` to the current file as one commit; return where it started.

        Raises ``OSError``; the file and the numbers are then as they were."""
        fd = self._file.fd
        st = os.fstat(fd)
        start = st.st_size
        state = self._state
        number, first = state.number, state.first
        # The state line is made durable when what it last made durable stops being
        # true: numbers past the reservation, or a file that is not the one the line
        # describes (new, or emptied by a consumer).
        sync = (
            number + len(part) > state.reserved
            or (st.st_dev, st.st_ino) != (state.dev, state.ino)
            or start < state.size
        )
        index = self._index.ready_for(fd, st, state.size)
        fixup = self._boundaries.fixup(fd, st, state)
        try:
            records, lengths = render_part(self._render, number + 1, part, now)
            length = len(fixup) + sum(lengths)
            # The commit marker: the batch starts at ``start`` and ends at ``end``,
            # and its numbers are taken. No fsync (see "The state file" above).
            state.dev, state.ino, state.size, state.pending = st.st_dev, st.st_ino, start, start
            state.end = start + length
            state.number = number + len(part)
            if state.first < 0:
                state.first = number + 1
            self._save_state(sync=sync)
            pieces = itertools.chain([fixup], itertools.chain.from_iterable(records))
            written = write_pieces(fd, pieces)
            if written != length:
                raise OSError(errno.EIO, f"wrote {written} bytes of a {length}-byte batch")
            self._fsync(fd)
            if index is not None:
                self._index.list_records(index, start + len(fixup), lengths, number + 1, sync)
            state.size, state.pending, state.end = start + written, -1, -1
            self._save_state(sync=False)
        except OSError:
            self._roll_back(start, number, first)
            raise
        self._boundaries.committed(st, start + written)
        return start

    def _roll_back(self, start: int, number: int, first: int) -> None:
        """Cut the file back to ``start`` and the numbers back to ``number`` (or, if the
        cut fails, keep the numbers: :meth:`_cut_failed`)."""
        if self._cut(self._file.fd, start):
            self._index.cut(start)
        state = self._state
        if not self._torn:
            state.number, state.first, state.size, state.pending = number, first, start, -1
            state.end = -1
        self._save_state_or_log()

    def _cut(self, fd: int, start: int) -> bool:
        """Cut the file ``fd`` back to ``start``; False if ``ftruncate`` failed. An fsync
        that fails after it is logged only: the cut is in the file, and the next fsync
        that succeeds makes it durable before any 250."""
        try:
            os.ftruncate(fd, start)
        except OSError:
            if fd == self._file.fd:
                self._cut_failed(start)
            else:
                log.critical("cannot cut a failed batch out of %s", self.path, exc_info=True)
            return False
        try:
            self._fsync(fd)
        except OSError:
            log.critical("cannot make the cut of %s durable", self.path, exc_info=True)
        return True

    def _cut_failed(self, start: int) -> None:
        """A failed batch could not be cut out of the current file from
        ``start`` on. Its numbered records may stay there, so its numbers stay taken;
        its bytes are pending, as after a crash, and are cut before the next append
        (:meth:`_repair_locked`) or at the next start."""
        log.critical(
            "cannot cut %s back to %d bytes; its numbers stay taken, and the cut is tried "
            "again before the next append",
            self.path,
            start,
            exc_info=True,
        )
        state = self._state
        state.pending = start
        state.end = self._torn_size = os.fstat(self._file.fd).st_size
        self._torn = True

    def _take_back(self, done: list[tuple[int, int]], before: State) -> None:
        """A later part of a split batch failed: cut back the parts already stored."""
        for fd, start in reversed(done):
            target = self._file.rotated_to(fd)
            if target is not None:  # its index went along: cut the part's entries
                self._index.cut_rotated(target, fd, start)
            self._cut(fd, start)
        starts = [start for fd, start in done if fd == self._file.fd]
        if starts:
            self._index.cut(starts[0])
        state = self._state
        if self._torn:  # a part stays in the file for now: its numbers stay taken
            pass
        elif done[0][0] == self._file.fd:  # no rotation in between: as before the batch
            state.number, state.first, state.size = before.number, before.first, done[0][1]
        else:  # the numbers stay reserved; this file began in the batch and is empty
            state.first, state.size = -1, 0
        self._save_state_or_log()

    def _save_state(self, *, sync: bool) -> None:
        """Write the state line. A durable line that gives out numbers past the
        reservation reserves the next ones too: they can then be given out with no
        fsync of the line until they run out."""
        assert self._states is not None and self._instance is not None
        instance.save_numbers(
            self._states, self._instance, self._state, self._boot, RESERVED_NUMBERS, sync=sync
        )

    def _save_state_or_log(self) -> None:
        try:
            self._save_state(sync=True)
        except OSError:
            log.error("cannot update %s", self.state_path, exc_info=True)

    # -- rotation ----------------------------------------------------------------

    def _rotation_due(self) -> bool:
        return rotation.is_due(self._rotate, self._state.first, self._state.number)

    def _try_rotate(self) -> None:
        """Rename the current file to PATH.A-B and begin a new one (the lock is held).

        Never raises: a failure is logged, and the current file stays in use."""
        state = self._state
        target = rotation.rotated_path(self.path, state.first, state.number)
        try:
            self._file.rotate(target)
        except OSError as exc:
            log.error("cannot rotate %s to %s: %s; trying again later", self.path, target, exc)
            return
        fd = self._file.fd
        log.info("rotated %s to %s", self.path, target)
        self._index.rotated(target, fd, state.size)
        state.first, state.size, state.pending = -1, 0, -1
        try:
            st = os.fstat(fd)
            state.dev, state.ino = st.st_dev, st.st_ino
            fsync_directory(os.path.dirname(self.path))
            self._save_state(sync=True)
        except OSError:
            # The new file is in place; if this is lost, a restart sees a file that
            # is not the state's and starts a new A for it, which is right.
            log.error("rotated %s, but cannot record it durably", self.path, exc_info=True)

    # -- locking -----------------------------------------------------------------

    def _lock(self) -> bool:
        """Take the exclusive lock on the file now at the path, or return False."""
        while True:
            if not self._file.try_lock():
                return False
            if self._file.at_path():
                return True
            # A consumer renamed the mailbox away: follow the path, not the old file.
            log.info("mailbox %s was moved away; starting a new file", self.path)
            self._index.follows_rename(self._file.fd)
            self._file.let_go()  # also drops the lock on the old file
            self._state.first = -1  # none of our records are in the new file

    # -- start-up ----------------------------------------------------------------

    def _recover(self, saved: State | None) -> None:
        """Find the last number, and remove a torn tail left by a crash."""
        assert self._instance is not None
        self._state = recovery.recovered_state(
            self._file.fd,
            saved,
            path=self.path,
            fmt=self.format,
            boot=self._boot,
            instance=self._instance,
            number_pattern=self._number_pattern,
        )
        self._save_state(sync=True)
        if self._state.pending < 0:
            return
        # A batch was being written when the process died. Its numbers stay reserved
        # (a reader may have seen them), and its bytes, whole or not, never got a 250.
        self._torn = True
        self._torn_size = os.fstat(self._file.fd).st_size
        if not self._lock():
            log.warning(
                "mailbox %s is locked; its torn tail is removed at the next append", self.path
            )
            return
        try:
            self._repair_locked()
        finally:
            self._file.unlock()

    def _repair_locked(self) -> None:
        """Cut away what an append cut short by a crash left (the lock is held)."""
        recovery.repair_torn_tail(
            self._file.fd,
            self._state,
            self._torn_size,
            path=self.path,
            number_pattern=self._number_pattern,
            fsync=self._fsync,
            cut_index=self._index.cut,
        )
        self._save_state(sync=True)
        self._torn = False


def _cannot(what: str, path: str, exc: OSError) -> str:
    """The one line a start-up failure says."""
    if isinstance(exc, NotRegularFile):
        return f"cannot {what}: {exc}"
    return f"cannot {what} {exc.filename or path}: {exc.strerror or exc}"


def _part_size(batch: Sequence[Deliver], first: int) -> int:
    """How many messages of ``batch`` from ``first`` on one commit takes: at least one,
    and no more than :data:`PART_BYTES` of message data held in memory."""
    size = count = 0
    for deliver in batch[first:]:
        if isinstance(deliver.body, bytes):  # a spooled body is read as it is written
            size += len(deliver.body)
        if count and size > PART_BYTES:
            break
        count += 1
    return count


def open_store(config: Config) -> Store:
    """The mailbox of ``config``, in its format. Raises :class:`StartupError`."""
    if config.format == "maildir":
        # Why here: only a Maildir server needs the module; the others start faster.
        from selsmtp.maildir import MaildirStore

        return MaildirStore(config.mailbox, config.name, fsync=config.fsync)
    if config.format == "mbox":
        return FileStore(
            config.mailbox,
            mbox_renderer(config.name),
            fsync=config.fsync,
            rotate=config.rotate,
            number_pattern=formats.MBOX_NUMBER,
            format="mbox",
        )
    return FileStore(
        config.mailbox, cs4410_renderer(config.name), fsync=config.fsync, rotate=config.rotate
    )
