"""Writing files so that a crash never leaves a half-written one (framework-free).

`write_atomically(path, write)` calls `write(temporary_path)` for a temporary file in the same
folder, flushes it to disk, and renames it onto `path`: the rename is atomic on POSIX and
Windows, so a reader (or a process killed at any instant) sees the old file or the new one,
never a mix. The temporary file is removed when `write` fails, and the new file gets the
permissions a plainly created file would get (0666 minus the umask), not the 0600 of a
temporary file.
"""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write `path` through `write(temporary_path)`, then rename it into place. Returns `path`."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(temporary)
    try:
        write(temporary)
        with open(temporary, "rb+") as written:  # on disk before the rename makes it visible
            os.fsync(written.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """`write_atomically` for a UTF-8 text file."""
    return write_atomically(path, lambda p: p.write_text(text, encoding="utf-8"))
