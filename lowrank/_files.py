"""Writing a file so that a crash never leaves a half-written one (framework-free).

One file: `write_atomically(path, write)` calls `write(temporary_path)` for a temporary file
in the same folder, flushes it to disk and renames it onto `path`. The rename is atomic on
POSIX and Windows, so a reader (or a process killed at any instant) sees the old file or the
new one, never a mix. The temporary file is removed when `write` fails, one left by a killed
writer is removed by the next write of the same file, and the new file gets the permissions
a plainly created file gets (0666 minus the umask), not the 0600 of a temporary file.

Writers of files in one folder take that folder's lock (`_locked`: `flock` on the parent, one
lowrank writer at a time, readers shared) and mark each temporary as a live writer's (`_hold`:
the kernel drops the mark when the writer dies), so that a live writer's temporary is never
taken for a stale one; `lowrank._folders` (folders that change as a unit) uses both. Windows:
no `flock` (a temporary of a live writer there may be taken for a stale one).
"""

import contextlib
import errno
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_NO_LOCKS = (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


# ---- locking: one lowrank writer per parent folder, readers shared ----------------------------


class _ParentLock:
    """This process's hold on one parent folder's flock (threads queue on `threads`)."""

    def __init__(self) -> None:
        self.threads = threading.RLock()
        self.fd: int | None = None
        self.exclusive = False
        self.depth = 0


_locks: dict[str, _ParentLock] = {}
_locks_guard = threading.Lock()


def _forget_locks() -> None:  # a forked child holds none of its parent's locks
    global _locks_guard
    _locks.clear()
    _locks_guard = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks)


def _flock(fd: int, exclusive: bool, wait_s: float | None) -> None:
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    if wait_s is None:
        fcntl.flock(fd, mode)
        return
    give_up, pause = time.monotonic() + wait_s, 0.001
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > give_up:
                raise TimeoutError(f"a save has held this folder's lock for {wait_s:g} s") from None
            time.sleep(pause)
            pause = min(2 * pause, 0.05)


@contextlib.contextmanager
def _locked(parent: Path, *, exclusive: bool, wait_s: float | None = None) -> Iterator[None]:
    """Hold the parent folder's lock (re-entrant within a thread; a nested exclusive request
    upgrades a shared hold). Where flock is missing or refused, nothing is locked."""
    key = os.path.realpath(parent)
    with _locks_guard:
        entry = _locks.setdefault(key, _ParentLock())
    with entry.threads:
        if entry.depth == 0:
            entry.fd = None
            if fcntl is not None:
                try:
                    entry.fd = os.open(parent, os.O_RDONLY)
                except OSError:
                    pass
            if entry.fd is not None:
                try:
                    _flock(entry.fd, exclusive, wait_s)
                except OSError as error:
                    os.close(entry.fd)
                    entry.fd = None
                    if error.errno not in _NO_LOCKS:
                        raise  # (a file system without locks: go on unlocked)
            entry.exclusive = exclusive
        elif exclusive and not entry.exclusive and entry.fd is not None:
            _flock(entry.fd, True, wait_s)
            entry.exclusive = True
        entry.depth += 1
        try:
            yield
        finally:
            entry.depth -= 1
            if entry.depth == 0 and entry.fd is not None:
                os.close(entry.fd)  # closing releases the flock
                entry.fd = None


def _hold(fd: int) -> None:
    """Take the flock of an open temporary: it marks the temporary as a live writer's, and
    the kernel drops it when the writer dies, however it dies."""
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _in_use(path: Path) -> bool:
    """Whether a live writer holds `path`'s flock (`_hold`). Without flock: False."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # (and with it the test lock just taken)
    return False


# ---- one file -----------------------------------------------------------------------------------


def _file_temporaries(folder: Path, name: str) -> list[Path]:
    """Temporary files `write_atomically` makes for `name` (".<name>.<8 random>.tmp")."""
    pattern = re.compile(re.escape(f".{name}.") + r"[a-z0-9_]{8}\.tmp")
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    return [folder / entry for entry in entries if pattern.fullmatch(entry)]


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write `path` through `write(temporary_path)`, then rename it into place. Returns `path`."""
    path = Path(path)
    with _locked(path.parent, exclusive=True):
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
        _hold(handle)  # marks the temporary as a live writer's
    temporary = Path(temporary)
    try:
        write(temporary)
        with open(temporary, "rb+") as written:  # on disk before the rename shows it
            os.fsync(written.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        with _locked(path.parent, exclusive=True):
            for stale in _file_temporaries(path.parent, path.name):  # from killed writers
                if stale != temporary and not _in_use(stale):
                    stale.unlink(missing_ok=True)
            os.replace(temporary, path)
        _fsync_folder(path.parent)
    finally:
        os.close(handle)
        temporary.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """`write_atomically` for a UTF-8 text file."""
    return write_atomically(path, lambda p: p.write_text(text, encoding="utf-8"))


def _fsync_folder(folder: Path) -> None:
    if sys.platform == "win32":  # pragma: no cover - folders cannot be opened there
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
