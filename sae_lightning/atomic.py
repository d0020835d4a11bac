"""Crash-safe file writes shared by checkpoints and SAE exports: fsync, atomic replace, readable modes."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

DISK_FULL_ADVICE = "free space and resume with ckpt_path=<run>/checkpoints/last.ckpt"


def write_failed_message(what: str, path: Path, err: OSError, kept: str) -> str:
    """The one message for a failed write (a full disk, a quota, a read-only directory): what is kept, what to do."""
    return f"Could not write {what} {path} ({err}). Is the disk full? {kept}; {DISK_FULL_ADVICE}."


def fsync_file(path: str | Path) -> None:
    """Flush a file's data to the disk (a rename is only durable once its contents are)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (renames, new names) to the disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows: directories cannot be opened, renames are durable on their own
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF):  # filesystems that cannot sync a directory
            raise
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is set-and-return)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(path: str | Path) -> None:
    """Give `path` the mode a plain `open(path, "w")` would: 0666 minus the umask (0644 usually)."""
    os.chmod(path, (stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH)
             & ~current_umask())


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Atomically (re)write `path`: `write(<path>.tmp)`, fsync it, rename it over `path`, fsync the directory.

    A reader sees the old file or the new one, never a mix; on any failure the temporary is removed and
    the old file is untouched.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        make_readable(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing directories in one atomic step (Linux renameat2 RENAME_EXCHANGE).

    Returns False, having done nothing, where the system or filesystem cannot (the caller falls back).
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
