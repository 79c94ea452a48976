"""Start-up of a mailbox file: the checks, the last number, and a torn tail to cut.

:class:`~selsmtp.store.FileStore` runs :func:`checked_start`, opens the mailbox, and
asks :func:`recovered_state` for the state to go on with, which it then makes durable;
while that state names a batch as pending (a crash cut it short), the store takes the
lock and calls :func:`repair_torn_tail`, at start-up or before its next append. The
functions here read the file through the store's descriptor and never open it (the
process's POSIX lock would go with the first close), and raise ``OSError``.

The checks
----------
In this order, so that a refusal changes no file: the format guard reads the path
(:func:`~selsmtp.durable.check_format`); the instance lock is taken
(:mod:`selsmtp.instance`: one server per mailbox, and a second record of the numbers);
the state line is read, a damaged one refused; the guard runs again with the format
the line records. Only then are the mailbox and the state file opened (created if
missing) and recovered. A line that knows the mailbox file (its device and inode)
settles its format: the first record is looked at only without one, as another
program may have written into a file a consumer emptied (SPEC §7 keeps those bytes).

Without a state line
--------------------
The mailbox is scanned for the highest record number (:func:`scan_highest_number`),
and numbers continue after the largest of that, the last rotated file's and the lock
file's record (:mod:`selsmtp.instance`: an emptied mailbox holds no numbers). A state
line older than the lock file's record (restored from a copy) is set aside in the
same way, as if missing.

After a crash of the process
----------------------------
The line is exactly the last one written (the page cache holds it, fsync'd or not).
A batch it names as pending never got a 250: the crash rule
(:func:`~selsmtp.durable.pending_verdict`) says whether its bytes are ours to cut, or
another program's to keep.

After a reboot
--------------
After a reboot (a power cut), the line may be any one written since its last fsync,
older than the mailbox, whose acknowledged records were all fsync'd. Start-up knows
this case by the boot named in the line, and reads the line as a lower bound:

* a batch it names as pending stays if all of its bytes are in the file (its 250 may
  have gone out); if not, it is cut only if a record head of ours still starts
  there, since a consumer may have emptied the file and another program written
  into it since;
* numbers continue after the reserve of the last fsync'd line, because the records
  of numbers given out since may have been taken away by a consumer. A line that is
  fsync'd reserves the next :data:`~selsmtp.store.RESERVED_NUMBERS` numbers, no
  number past the reserve is given out before a line reserving it is fsync'd (a
  failed fsync reserves nothing), and every start fsyncs the line it read, whose
  reserve may have been in the page cache only. So an unclean reboot can leave a gap,
  never a repeat; a clean stop records the exact number as the reserve, and leaves
  none.
"""

from __future__ import annotations

import logging
import os
import re

from selsmtp import formats, rotation
from selsmtp.durable import (
    HEAD_BYTES,
    STATE_SUFFIX,
    Fsync,
    StartupError,
    State,
    check_format,
    pending_verdict,
    read_state,
)
from selsmtp.instance import LOCK_SUFFIX, InstanceLock

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Final


# Why the store's logger: these are the store's messages, and operators (and tests)
# filter on one name for them; selsmtp.rotation does the same.
log = logging.getLogger("selsmtp.store")

#: the start-up scan reads chunks that overlap by this much, so a record header
#: cut by a chunk boundary is seen whole in one of them
SCAN_OVERLAP: Final = 8192


def checked_start(
    path: str, fmt: str, *, fsync: Fsync, wait: float
) -> tuple[InstanceLock, State | None]:
    """The checks before the ``fmt`` mailbox at ``path`` is opened (see "The checks"):
    return the instance lock, taken (waiting up to ``wait`` seconds for another
    process's), and the state line saved (``None``: none). Raises
    :class:`~selsmtp.durable.StartupError` or ``OSError``; no file has then changed,
    and the lock is not held."""
    # A state line may know the file (a consumer emptied it, another program wrote
    # into it since): its first record decides only once the line is read.
    check_format(path, fmt, None, by_content=not os.path.lexists(path + STATE_SUFFIX))
    lock = InstanceLock(path + LOCK_SUFFIX, path, fsync=fsync, wait=wait)
    try:
        saved = read_state(path + STATE_SUFFIX)
        check_format(path, fmt, saved)
        lock.claim()
    except (StartupError, OSError):
        lock.close()
        raise
    return lock, saved


def recovered_state(
    fd: int,
    saved: State | None,
    *,
    path: str,
    fmt: str,
    boot: str,
    instance: InstanceLock,
    number_pattern: re.Pattern[bytes],
) -> State:
    """The state to go on with for the ``fmt`` mailbox at ``path``, open as ``fd``,
    whose state line held ``saved`` (``None``: none) in the boot ``boot``; leftovers
    of a rotation cut short are removed. The caller makes it durable next. If its
    ``pending`` is set, a torn tail may be left: :func:`repair_torn_tail`."""
    if saved is not None and instance.is_older(saved, boot):
        log.warning(
            "%s is older than the numbers recorded in %s (restored from a copy?); "
            "its commit marker is ignored, and numbers continue after %d",
            path + STATE_SUFFIX,
            instance.path,
            instance.floor(boot),
        )
        saved = None
    if saved is None:
        return _state_without_line(fd, path, fmt, boot, instance, number_pattern)
    saved.format = fmt
    rotation.remove_leftovers(path, fd, saved.first, saved.number)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (saved.dev, saved.ino):
        saved.first = -1  # not the file the state knows: a new one
    if not saved.boot or saved.boot != boot:
        # The line may be older than the mailbox: any line written since its last
        # fsync can be the one that survived. Settle the batch it names as pending
        # (the crash rule, durable.pending_verdict), and the numbers.
        verdict = _verdict(saved, fd, st, number_pattern, rebooted=True)
        if verdict == "whole":  # its fsync may have finished and its 250 gone out
            saved.size, saved.pending, saved.end = saved.end, -1, -1
        elif verdict == "not-ours":  # emptied and written again since
            saved.size, saved.pending, saved.end = st.st_size, -1, -1
        _numbers_after_reboot(saved, path, boot, instance)
    # Once per start, the line is made durable (by the caller): it may exist only in
    # the page cache (written by a process of this boot that died), and its reserve
    # must survive a power cut before this process gives out any number it covers.
    saved.boot = boot
    return saved


def _numbers_after_reboot(saved: State, path: str, boot: str, instance: InstanceLock) -> None:
    """The machine restarted since the state line was written."""
    # Numbers given out since the line was written may be in records anywhere
    # past it, or taken away by a consumer: only the reserve of the last fsync'd
    # line bounds them. After a clean stop it is the exact last number.
    saved.reserved = max(saved.reserved, instance.floor(boot))
    if saved.reserved > saved.number:
        log.warning(
            "the machine restarted since %s was last made durable; numbers continue "
            "after its reserve, %d",
            path + STATE_SUFFIX,
            saved.reserved,
        )
        saved.number = saved.reserved


def _state_without_line(
    fd: int,
    path: str,
    fmt: str,
    boot: str,
    instance: InstanceLock,
    number_pattern: re.Pattern[bytes],
) -> State:
    state = State()
    state.boot, state.format = boot, fmt
    state.number = max(
        scan_highest_number(fd, number_pattern),
        rotation.last_rotated_number(path),
        instance.floor(boot),  # an emptied mailbox holds no numbers
    )
    if state.number:
        log.info("no state file; the last number of %s is %d", path, state.number)
        head = os.pread(fd, formats.CHUNK, 0)
        found = number_pattern.search(head)
        state.first = int(found.group(1)) if found else -1
    st = os.fstat(fd)
    state.dev, state.ino, state.size = st.st_dev, st.st_ino, st.st_size
    rotation.remove_leftovers(path, fd, state.first, state.number)
    return state


def _verdict(
    state: State, fd: int, st: os.stat_result, number_pattern: re.Pattern[bytes], *, rebooted: bool
) -> str:
    """:func:`~selsmtp.durable.pending_verdict` on ``state`` and the file ``fd``."""
    return pending_verdict(
        state, st, rebooted, lambda offset: os.pread(fd, HEAD_BYTES, offset), number_pattern
    )


def repair_torn_tail(
    fd: int,
    state: State,
    torn_size: int,
    *,
    path: str,
    number_pattern: re.Pattern[bytes],
    fsync: Fsync,
    cut_index: Callable[[int], None],
) -> None:
    """Cut away what an append cut short by a crash left in the mailbox ``fd`` (the
    lock is held), if the crash rule says it is ours: the batch ``state`` names as
    pending, found when the file was ``torn_size`` bytes long. ``cut_index(offset)``
    cuts the index's entries from there on. Then no batch is pending in ``state``,
    and the caller makes it durable."""
    st = os.fstat(fd)
    verdict = _verdict(state, fd, st, number_pattern, rebooted=False)
    if verdict in ("none", "not-ours"):
        # The file was emptied or replaced since: nothing of ours is left in it,
        # and whatever another program wrote there since is kept.
        pass
    elif st.st_size != torn_size:
        # Another program appended after the torn tail while we waited for the
        # lock. Cutting would destroy its records, so the tail stays, and says so.
        log.error(
            "kept a torn tail of %d bytes at offset %d of %s: another program appended after it",
            torn_size - state.pending,
            state.pending,
            path,
        )
    elif verdict == "appended":
        # More than the batch could have written: another program appended after
        # it while we were down. Only bytes provably ours are cut (SPEC §7), so the
        # tail stays, and the next record begins after a blank line
        # (selsmtp.boundaries).
        log.error(
            "kept a torn tail of at most %d bytes at offset %d of %s: another "
            "program appended %d bytes or more after it",
            state.end - state.pending,
            state.pending,
            path,
            st.st_size - state.end,
        )
    else:
        os.ftruncate(fd, state.pending)
        fsync(fd)
        cut_index(state.pending)
        log.warning(
            "removed a torn tail of %d bytes from %s (an append cut short by a crash)",
            st.st_size - state.pending,
            path,
        )
    state.pending = state.end = -1
    state.size = os.fstat(fd).st_size


def scan_highest_number(fd: int, number_pattern: re.Pattern[bytes]) -> int:
    """The highest record number anywhere in the mailbox ``fd`` (0 if none).

    Why the whole file and not just its tail: a body may quote a record head with
    a lower number, and the last real head can be far back (a large last
    message); taking the maximum never gives out a number twice. A quoted head
    with a higher number only leaves a gap. This runs only when the state file is
    lost, through the one descriptor the store owns, at about half a second per
    gigabyte.
    """
    size = os.fstat(fd).st_size
    highest = 0
    start = 0
    while start < size:
        chunk = os.pread(fd, min(formats.CHUNK + SCAN_OVERLAP, size - start), start)
        for match in number_pattern.finditer(chunk):
            highest = max(highest, int(match.group(1)))
        start += formats.CHUNK
    return highest
