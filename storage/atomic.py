"""Putting a finished directory in place of another so that a crash at any instant (SIGKILL, power
loss) leaves the old one or the new one, never a mix: the store writer's last step, and
calibration's predictors.

A directory is written whole under a staging name beside its target (`<target>.partial-<pid>`,
which nothing loads), fsynced, then swapped in with one renameat2(RENAME_EXCHANGE): the target
never stops existing. Where the kernel or file system has no exchange, the old one is renamed
aside first (`<target>.old-<pid>`), which leaves a moment with no target at all; the old copy
is still whole there. A writer that was killed leaves its staging (and maybe old, and scratch)
dirs: `remove_stale` clears those of processes that no longer run.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from pathlib import Path

AT_FDCWD = -100
RENAME_EXCHANGE = 2
_STALE = re.compile(r"\.(partial|old|scratch)-(\d+)$")


def staging_dir(target: Path) -> Path:
    return target.with_name(f"{target.name}.partial-{os.getpid()}")


def scratch_dir(target: Path) -> Path:
    """Where the writer of `target` keeps temporary files of its own (remove_stale clears it too)."""
    return target.with_name(f"{target.name}.scratch-{os.getpid()}")


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then the directories, so a rename after it publishes data
    that is on disk."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for d in [*sorted(p for p in root.rglob("*") if p.is_dir()), root]:
        _fsync_dir(d)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap a and b in one step; False where renameat2 or RENAME_EXCHANGE is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a libc older than glibc 2.28, or not Linux
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete directory `new` at `target` (replacing what is there) and delete the old."""
    if target.exists() or target.is_symlink():
        if _exchange(new, target):
            shutil.rmtree(new, ignore_errors=True)  # `new` now names the old contents
        else:
            aside = target.with_name(f"{target.name}.old-{os.getpid()}")
            os.rename(target, aside)
            os.rename(new, target)
            shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(new, target)
    _fsync_dir(target.parent)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale(target: Path) -> list[Path]:
    """Delete the staging, scratch and set-aside dirs of `target` left by writers that no longer run; an
    old copy set aside by a writer killed between its two renames is put back first, when the
    target itself is missing. Returns what was removed or restored."""
    done = []
    if not target.parent.is_dir():
        return done
    for path in sorted(target.parent.glob(f"{target.name}.*-*")):
        m = _STALE.search(path.name)
        if m is None or path.name != f"{target.name}.{m.group(1)}-{m.group(2)}" or _running(int(m.group(2))):
            continue
        if m.group(1) == "old" and not target.exists():
            os.rename(path, target)  # the old copy is whole: only the swap was cut short
        else:
            shutil.rmtree(path, ignore_errors=True)
        done.append(path)
    return done
