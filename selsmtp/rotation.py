"""Rotating a mailbox file (``--rotate N``): the ``PATH.A-B`` names, and the file steps.

The policy
----------
The file is renamed to ``PATH.A-B`` once it holds record number B, a multiple of N,
and a new file begins at the path. A is the number of the first record selsmtp wrote
into that file, so from a fresh start the names are ``PATH.1-32``, ``PATH.33-64``...
:class:`~selsmtp.store.FileStore` splits a batch that crosses a multiple of N there,
commits each part into its own file, and rotates between the parts, under the lock.

A consumer that empties the file does not change A or B: the name still says which
numbers selsmtp wrote into that file, and the records taken away are missing from it.
A consumer that renames the file away takes it out of the rotation: the file selsmtp
creates next at the path gets a new A, and is rotated at the next multiple of N. The
first number of the current file is kept in the state file, so all this holds across
restarts.

The steps (:func:`begin_next_file`)
-----------------------------------
The path is never missing and never names a half-made file:

1. create the new file as ``PATH.selsmtp-next`` (removing whatever was there, and
   opening it as :func:`~selsmtp.durable.open_regular` does, with ``O_EXCL``) and
   lock it;
2. *link* the current file to ``PATH.A-B`` (it has two names now);
3. rename the new file over the path.

Then the store fsyncs the folder and records the new file in the state file. A
rotation starts only once a commit has completed, so no batch is pending during one.
After a crash before step 3, ``PATH.selsmtp-next`` and maybe a ``PATH.A-B`` that names
the very file at the path are left: :func:`remove_leftovers` removes both at start-up,
and the rotation is simply done again. After a crash between step 3 and the state
update, the state names the old file: the file at the path is a new one, as if a
consumer had renamed the old one away. Nothing is lost and nothing is written twice.

The checks that the path and ``PATH.A-B`` name the file we hold use ``lstat``: a
symbolic link is never taken for the file it points to.

A rotation needs a file system with hard links. If one fails, the store logs it and
keeps using the current file; it tries again at the next append.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re

from selsmtp.durable import open_regular, same_file

TYPE_CHECKING = False  # not typing's: see selsmtp/__init__.py
if TYPE_CHECKING:
    from typing import Final

log = logging.getLogger("selsmtp.store")

#: the new file is made under this name, then renamed to the path
NEXT_SUFFIX: Final = ".selsmtp-next"
#: a rotated file's name, after the mailbox's own name
ROTATED_NAME: Final = re.compile(r"\.(\d+)-(\d+)")


def is_due(every: int, first: int, number: int) -> bool:
    """True if a file holding ``first`` to ``number`` must be rotated before the next
    number (it reached a multiple of ``every``); never if ``every`` is 0 or the file
    holds nothing of ours (``first`` < 1)."""
    return every > 0 and first > 0 and (first - 1) // every != number // every


def rotated_path(path: str, first: int, last: int) -> str:
    return f"{path}.{first}-{last}"


def begin_next_file(path: str, current: int, target: str) -> int:
    """Give the file open as ``current`` (now at ``path``) the name ``target`` and put a
    new, empty, locked file at ``path``; return its descriptor.

    Raises ``OSError`` having undone its steps: the path still names ``current``.
    """
    temporary = path + NEXT_SUFFIX
    # Whatever is at the temporary name (a leftover, or a link someone planted) is
    # removed, never opened: the new file is made with O_EXCL.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    fd = open_regular(temporary, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL)
    linked = False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            os.link(path, target)
            linked = True
        except FileExistsError:
            if not same_file(target, current):
                raise
            # else: left by a rotation cut short; it names the right file already
        if linked and not same_file(target, current):
            raise FileNotFoundError(f"{path} was moved away while rotating")
        os.rename(temporary, path)
    except BaseException:
        os.close(fd)
        for name in (temporary, target) if linked else (temporary,):
            with contextlib.suppress(OSError):
                os.unlink(name)
        raise
    return fd


def remove_leftovers(path: str, current: int, first: int, last: int) -> None:
    """Remove what a rotation cut short by a crash left (see the steps above)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path + NEXT_SUFFIX)
    if first > 0:
        stale = rotated_path(path, first, last)
        if same_file(stale, current):
            os.unlink(stale)
            log.warning("removed %s, left by a rotation cut short by a crash", stale)


def rotated_files(path: str) -> list[tuple[int, int, str]]:
    """The rotated files ``PATH.A-B`` beside ``path``, as (A, B, path), by A then B."""
    folder, name = os.path.split(os.path.abspath(path))
    found: list[tuple[int, int, str]] = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return found
    for entry in entries:
        match = ROTATED_NAME.fullmatch(entry, len(name)) if entry.startswith(name) else None
        if match:
            found.append((int(match[1]), int(match[2]), os.path.join(folder, entry)))
    found.sort()
    return found


def last_rotated_number(path: str) -> int:
    """The largest B of the rotated files ``PATH.A-B`` beside ``path`` (0 if none)."""
    return max((last for _, last, _ in rotated_files(path)), default=0)
