"""One server per mailbox, and a second record of the numbers given out.

The lock
--------
Two servers on one mailbox would give out the same numbers and overwrite each
other's state line, the commit marker crash recovery relies on. So each store, whatever
its format, holds an exclusive ``flock`` on a lock file for the whole life of the
process: ``PATH.selsmtp.lock`` beside a mailbox file, ``FOLDER/.selsmtp.lock`` in a
Maildir. A second instance tries again for :data:`WAIT` seconds (a predecessor that
was asked to stop may still be storing the messages it had received, SPEC §6) and
then gives up, naming the mailbox and the pid of the holder, which the lock file
records.

Why ``flock`` on a file of its own:

* not ``lockf`` on the mailbox: POSIX record locks belong to the process and vanish
  when it closes *any* descriptor of the file, and the mailbox's ``lockf`` lock is
  the one readers share and is released after every batch. On Linux, ``flock`` and
  ``lockf`` locks are independent, so this lock never meets a reader's.
* ``flock`` belongs to the open file, not to the process: a descriptor inherited by
  a forked child holds the same lock, so a later mode with a parent and forked
  workers shares this one lock and needs no second mechanism; and closing some
  other descriptor of the file never drops it.
* a file of its own, not the state file: it exists before anything else is opened,
  so the checks at start-up (format, damage) run under it and change nothing when
  they refuse; and deleting a damaged state file, as its error says to, leaves the
  lock (and the numbers it records, below) in place.

The lock file is never removed: removing it while another process waits on it would
let a third lock a new file at the same path.

The record
----------
The lock file also holds one line, rewritten in place: the holder's pid, the last
number given out, the reserve of numbers the last fsync'd state line promised, and
the boot it was written in. The store writes it after every state line (no fsync,
like the state line; fsync'd when the reserve grows and at a clean stop, when it is
the exact last number). It is the second, independent record of the numbers:

* with no state file (deleted, or deleted after the start-up refused a damaged one),
  numbers continue after the largest of the mailbox's numbers and this record's, so
  an emptied mailbox does not make them start again at 1;
* a state line older than this record (restored from a copy) is recognised, and
  numbers continue after the record's instead.

Within one boot the page cache makes the last number written exact, fsync'd or not;
after a reboot only the fsync'd reserve counts, and numbers continue after it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
import zlib

from selsmtp.durable import (
    Fsync,
    NotRegularFile,
    StartupError,
    State,
    StateFile,
    fsync_directory,
    is_blank,
    open_regular,
)

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import Final

#: the lock file beside a mailbox file is named after it with this suffix
LOCK_SUFFIX: Final = ".selsmtp.lock"
#: seconds a second instance waits for the lock before it gives up
WAIT: Final = 8.0
#: how often a waiting instance tries the lock again, in seconds
POLL: Final = 0.05

_MAGIC: Final = "selsmtp-lock"
_VERSION: Final = "1"
_SIZE: Final = 128


class Record:
    """The line in the lock file."""

    __slots__ = ("boot", "number", "pid", "reserved")

    def __init__(self, pid: int = 0, number: int = 0, reserved: int = 0, boot: str = "") -> None:
        self.pid = pid  #: the holder's process id (0: unknown)
        self.number = number  #: the last number given out (exact within ``boot``)
        self.reserved = reserved  #: no number past this was given out (fsync'd)
        self.boot = boot  #: the boot the line was written in

    def encode(self) -> bytes:
        words = [_MAGIC, _VERSION, str(self.pid), str(self.number), str(self.reserved)]
        text = " ".join([*words, self.boot or "-"])
        return f"{text} {zlib.crc32(text.encode()):08x}\n".encode().ljust(_SIZE, b" ")

    @classmethod
    def parse(cls, data: bytes) -> Record:
        """The record in ``data``; raises ``ValueError`` saying what is wrong."""
        text, _, crc = data.strip().decode("ascii", "replace").rpartition(" ")
        fields = text.split(" ")
        if fields[0] != _MAGIC or len(fields) != 6 or fields[1] != _VERSION:
            raise ValueError("it does not hold a selsmtp lock line")
        if crc != f"{zlib.crc32(text.encode()):08x}":
            raise ValueError("its checksum does not match (a torn or altered line)")
        try:
            pid, number, reserved = (int(field) for field in fields[2:5])
        except ValueError:
            raise ValueError("it holds a field that is not a number") from None
        return cls(pid, number, reserved, "" if fields[5] == "-" else fields[5])


class InstanceLock:
    """The exclusive ``flock`` on the lock file at ``path``, for the mailbox ``mailbox``.

    Raises :class:`StartupError` if another process holds it for ``wait`` seconds,
    or the lock file is not a regular file, cannot be opened, or is damaged.
    :attr:`record` is what the file said when the lock was taken (``None``: nothing).
    """

    def __init__(
        self, path: str, mailbox: str, *, fsync: Fsync = os.fsync, wait: float = WAIT
    ) -> None:
        self.path = path
        self._fsync = fsync
        self._durable_reserve = -1  # the reserve this process made durable last
        self._written: tuple[object, int, str] = ("", -1, "")  # the record now in the file
        try:
            created = not os.path.lexists(path)
            self.fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        except NotRegularFile as exc:
            raise StartupError(f"cannot use lock file: {exc}") from exc
        except OSError as exc:
            raise StartupError(f"cannot open lock file {path}: {exc.strerror or exc}") from exc
        try:
            if created:
                fsync_directory(os.path.dirname(path))
            self._take(mailbox, wait)
            self.record = self._read()
        except OSError as exc:
            self.close()
            raise StartupError(f"cannot use lock file {path}: {exc.strerror or exc}") from exc
        except BaseException:
            self.close()
            raise

    def claim(self) -> None:
        """Name this process as the holder, for an instance that comes next; the
        numbers stay as they were until the store records its own. Called once the
        start-up checks have passed, so that a refused start writes nothing."""
        known = self.record or Record()
        data = Record(os.getpid(), known.number, known.reserved, known.boot).encode()
        try:
            os.pwrite(self.fd, data, 0)
        except OSError as exc:
            raise StartupError(f"cannot use lock file {self.path}: {exc.strerror or exc}") from exc

    def _take(self, mailbox: str, wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StartupError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
            if time.monotonic() >= deadline:
                break
            # Why a poll: flock has no timeout, and a blocking flock cut short by
            # SIGALRM would be the only signal handler in the program.
            time.sleep(POLL)
        holder = self._holder()
        raise StartupError(
            f"mailbox {mailbox} is in use by another selsmtp "
            f"({'pid ' + str(holder) if holder else 'pid unknown'}); "
            f"still locked after {wait:g} s"
        )

    def _holder(self) -> int:
        try:
            return Record.parse(os.pread(self.fd, 2 * _SIZE, 0)).pid
        except (OSError, ValueError):
            return 0

    def _read(self) -> Record | None:
        data = os.pread(self.fd, 2 * _SIZE, 0)
        if is_blank(data):
            return None
        try:
            return Record.parse(data)
        except ValueError as exc:
            raise StartupError(
                f"lock file {self.path} is damaged: {exc}; delete it while no selsmtp runs "
                "on this mailbox (numbers then rest on the state file alone)"
            ) from None

    # -- the numbers -------------------------------------------------------------

    def floor(self, boot: str) -> int:
        """No number above this was given out before this start, as far as the record
        knows (0 if it knows nothing)."""
        record = self.record
        if record is None:
            return 0
        if boot and record.boot == boot:
            return record.number  # exact: written in this boot, visible in the page cache
        return max(record.number, record.reserved)

    def is_older(self, saved: State, boot: str) -> bool:
        """True if the state line ``saved`` is older than the record: it was restored
        from a copy, and numbers it does not know of were given out since."""
        record = self.record
        if record is None:
            return False
        if boot and record.boot == boot:
            return saved.number < record.number
        # After a reboot each line may be older than the last one written; but every
        # state line written since the record's reserve was made durable holds a
        # reserve at least as large (it is fsync'd first).
        return max(saved.number, saved.reserved) < record.reserved

    def save(self, number: int, reserved: int, boot: str, *, sync: bool) -> None:
        """Record ``number`` (and the durable ``reserved``); fsync'd if ``sync`` and the
        reserve changed. Raises ``OSError``."""
        if (number, reserved, boot) != self._written:  # a commit's second line changes none
            data = Record(os.getpid(), number, reserved, boot).encode()
            self._written = ("", -1, "")  # unknown until the write is whole
            if os.pwrite(self.fd, data, 0) != len(data):
                raise OSError(errno.EIO, "short write to the lock file")
            self._written = (number, reserved, boot)
        if sync and reserved != self._durable_reserve:
            self._fsync(self.fd)
            self._durable_reserve = reserved

    def close(self) -> None:
        """Release the lock (closing the file does)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def save_numbers(
    states: StateFile, lock: InstanceLock, state: State, boot: str, reserve: int, *, sync: bool
) -> None:
    """Write ``state`` to its state file, then ``lock``'s record of the numbers (the
    second record). A durable line (``sync``) that gives out numbers past its reserve
    reserves the next ``reserve`` too, so that they can be given out with no fsync of
    the record until they run out; if either write fails, nothing new is reserved."""
    reserved = state.reserved
    if sync and state.number > state.reserved:
        state.reserved = state.number + reserve
    try:
        states.save(state, sync=sync)
        lock.save(state.number, state.reserved, boot, sync=sync)
    except OSError:
        state.reserved = reserved  # not durable, so not reserved
        raise
