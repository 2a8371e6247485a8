"""Replacing a folder as a unit: a crash never leaves a half-written one (framework-free).

(About 330 lines: the swap, its portable fallback and the recovery of what a killed save
left must be read together to see that every instant leaves a whole folder.)

A folder that must change as a unit (an adapter's config and weights, a report):
`write_folder_atomically(folder, write_into, owns=...)`.

1. `write_into(new)` fills a fresh sibling folder `new` (same file system, so renames work),
   and its files are fsynced. `new` is flock-ed by its writer until the end, so that another
   save can tell a live writer's temporary from one left by a killed writer (the kernel drops
   a dead process's locks).
2. Under the parent folder's lock (`flock` on the parent, held only for this step):
   - what killed saves left is dealt with: if the folder is missing but its last version was
     put aside by the portable swap (below), that version is renamed back; every temporary
     sibling (`.<name>.lowrank-*`) no live writer holds is deleted;
   - the entries of the old folder that the save does not own are carried into `new` as hard
     links (a copy where the file system has none): the trainer's `log.jsonl` or an
     `epoch-1/` next to the adapter files survive the save, and a file still open for
     appending keeps growing under both names. Owned entries are those `write_into` wrote,
     those in `owns` (a `trainable.safetensors` from an earlier save that this one no longer
     writes must not survive next to the new adapter), and the temporaries of owned files;
   - `new` and `folder` swap in one step: `renameat2(RENAME_EXCHANGE)` on Linux,
     `renamex_np(RENAME_SWAP)` on macOS. Elsewhere, and on file systems without an exchange,
     the portable fallback renames the old folder aside to `.<name>.lowrank-old-*` and `new`
     into place; a crash between those two renames leaves no folder but a complete old
     version aside, which readers (`reading_folder`) and the next writer rename back;
   - entries that appeared in the old folder meanwhile are moved into the new one, and the
     old folder is deleted (renamed to a `trash` sibling first, so that a half-deleted folder
     never bears a name that means "a complete version").

A kill at any instant therefore leaves the old folder or the new one, complete, plus
temporary siblings that the next save removes. `reading_folder(folder)` takes the parent's
lock shared while the loader reads, so lowrank never reads the config of one version and the
weights of another. Other programs (PEFT) read without the lock: a swap that happens between
their opening of the config and of the weights can still hand them a mix (or, with the
fallback, a missing folder), as with any two files they read.

The new folder gets the permissions of the folder it replaces (a private folder stays
private), or 0777 minus the umask when there was none, like a plainly made folder. A path
that is a symbolic link or a file is refused ("exists and is not a folder"): replacing it
would replace the link, not the folder it names. Windows: no `flock` (concurrent writers of
one folder are not serialised, and a temporary of a live writer there may be taken for a
stale one) and no exchange (the fallback is used; a folder with a file open in it cannot be
renamed there). A process whose working directory is the folder keeps the old, deleted one.
"""

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from lowrank._files import _fsync_folder, _hold, _in_use, _locked

LOCK_WAIT_S = 600.0  # a reader gives up on a folder locked this long by a writer


def _prefix(name: str) -> str:
    """How the temporary siblings of folder `name` begin (a long name is shortened, so that
    the siblings' names stay within the file system's limit)."""
    if len(name) > 120:
        name = f"{name[:80]}~{hashlib.sha256(os.fsencode(name)).hexdigest()[:16]}"
    return f".{name}.lowrank-"


def _siblings(folder: Path, kind: str) -> list[Path]:
    """The temporary siblings of `folder` of one kind ("new", "old", "trash") or all ("")."""
    start = _prefix(folder.name) + kind
    try:
        entries = os.listdir(folder.parent)
    except FileNotFoundError:
        return []
    return sorted(folder.parent / e for e in entries if e.startswith(start))


def _sibling_name(folder: Path, kind: str) -> Path:
    return folder.parent / f"{_prefix(folder.name)}{kind}-{secrets.token_hex(6)}"


def _fresh_sibling(folder: Path, kind: str) -> Path:
    while True:
        path = _sibling_name(folder, kind)
        try:
            os.mkdir(path, 0o777)  # the umask applies, as for any new folder
        except FileExistsError:
            continue
        return path


def _delete(folder: Path, path: Path) -> None:
    """Delete `path`, a sibling of `folder`, for good: first renamed to a `trash` sibling, so
    that a half-deleted folder never carries a name that means "a complete version"."""
    if not os.path.lexists(path):
        return
    trash = _sibling_name(folder, "trash")
    os.rename(path, trash)
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash)
    else:
        trash.unlink()


def _refuse_non_folder(folder: Path) -> None:
    if folder.is_symlink() or (os.path.lexists(folder) and not folder.is_dir()):
        what = "a symbolic link" if folder.is_symlink() else "a file"
        raise ValueError(
            f"{folder} exists and is not a folder ({what}); lowrank replaces folders as a "
            "unit and will not replace it: give the path of a folder"
        )


def _recover(folder: Path) -> None:
    """If `folder` is missing but a save put its last version aside (and was killed before
    renaming the new one in), rename that version back. Call with the lock held."""
    if os.path.lexists(folder):
        return
    aside = _siblings(folder, "old-")
    if len(aside) == 1:
        os.rename(aside[0], folder)
        _fsync_folder(folder.parent)
    elif len(aside) > 1:
        raise ValueError(
            f"{folder} is missing and several earlier versions of it were left aside by "
            f"interrupted saves: {[p.name for p in aside]}; rename the one to keep to {folder}"
        )


def _needs_recovery(folder: Path) -> bool:
    return not os.path.lexists(folder) and bool(_siblings(folder, "old-"))


def _link_tree(source: Path, target: Path) -> None:
    """Make `target` hold what `source` holds: hard links to its files (copies where links
    are impossible), the same symbolic links, folders made anew with the same permissions."""
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        os.mkdir(target)
        shutil.copymode(source, target)
        for entry in os.listdir(source):
            _link_tree(source / entry, target / entry)
    else:
        try:
            os.link(source, target, follow_symlinks=False)
        except OSError:
            shutil.copy2(source, target)


def copy_tree(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy folder `source` to a new folder `target`, contents only: what is made gets the
    permissions of newly made files and folders (not those of the source, e.g. a temporary
    folder's 0700)."""
    source, target = Path(source), Path(target)
    os.mkdir(target, 0o777)
    for entry in os.scandir(source):
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target / entry.name)
        elif entry.is_dir():
            copy_tree(entry.path, target / entry.name)
        else:
            shutil.copyfile(entry.path, target / entry.name)
    return target


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder below `folder`, then `folder` itself (cheap for carried
    files, which are on disk already: their new names are what must reach it)."""
    for entry in os.listdir(folder):
        path = folder / entry
        if path.is_symlink():
            continue
        if path.is_dir():
            _fsync_tree(path)
        else:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_folder(folder)


_EXCHANGE_FAILED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV)


def _exchange_linux(first: Path, second: Path) -> bool:
    """Swap two paths in one step with renameat2(RENAME_EXCHANGE); False if not possible."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in _EXCHANGE_FAILED:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _exchange_macos(first: Path, second: Path) -> bool:  # pragma: no cover - macOS only
    """Swap two paths in one step with renamex_np(RENAME_SWAP); False if not possible."""
    libc = ctypes.CDLL(None, use_errno=True)
    renamex_np = getattr(libc, "renamex_np", None)
    if renamex_np is None:
        return False
    renamex_np.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
    rename_swap = 0x2
    if renamex_np(os.fsencode(first), os.fsencode(second), rename_swap) == 0:
        return True
    code = ctypes.get_errno()
    if code in _EXCHANGE_FAILED:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing folders atomically where the system can; False where it cannot."""
    if sys.platform.startswith("linux"):
        return _exchange_linux(first, second)
    if sys.platform == "darwin":  # pragma: no cover
        return _exchange_macos(first, second)
    return False


def _swap_in(new: Path, folder: Path) -> Path | None:
    """Put `new` at `folder`; returns where the old folder now is (None: there was none)."""
    if not os.path.lexists(folder):
        os.rename(new, folder)
        return None
    if _exchange(new, folder):
        return new  # the old folder now has the temporary name
    aside = _sibling_name(folder, "old")
    os.rename(folder, aside)  # from here until the next rename, only `aside` holds a version
    try:
        os.rename(new, folder)
    except BaseException:
        os.rename(aside, folder)
        raise
    return aside


def _owned(name: str, owned: set[str]) -> bool:
    """Whether an entry of the old folder belongs to the save (is replaced or dropped)."""
    if name in owned:
        return True
    return any(
        re.fullmatch(re.escape(f".{o}.") + r"[a-z0-9_]{8}\.tmp", name) for o in owned
    )  # a temporary of an owned file left by a killed `write_atomically`


def write_folder_atomically(
    folder: str | os.PathLike,
    write_into: Callable[[Path], object],
    *,
    owns: Iterable[str] = (),
) -> Path:
    """Replace folder `folder` as a unit by what `write_into(new_folder)` writes; see the
    module docstring. Entries of the old folder that `write_into` did not write and that are
    not named in `owns` are kept. Returns `folder`; if `write_into` raises, `folder` is left
    as it was and the temporary folder is removed."""
    folder = Path(os.path.abspath(folder))
    if not folder.name:
        raise ValueError(f"cannot replace {folder}: give a folder below it")
    _refuse_non_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent, exclusive=True):
        new = _fresh_sibling(folder, "new")
        held = os.open(new, os.O_RDONLY)
        _hold(held)  # until the end: a live save's temporary is never taken for a stale one
    try:
        try:
            write_into(new)
            owned = set(os.listdir(new)) | set(owns)
            _fsync_tree(new)  # the slow part, before the lock
            with _locked(folder.parent, exclusive=True):  # only the swap holds the lock
                _recover(folder)
                _refuse_non_folder(folder)
                for stale in _siblings(folder, ""):  # left by killed saves
                    if stale != new and not _in_use(stale):
                        _delete(folder, stale)
                if folder.is_dir():
                    os.chmod(new, stat.S_IMODE(folder.stat().st_mode))  # keeps its mode
                    for entry in os.listdir(folder):
                        if not _owned(entry, owned):
                            _link_tree(folder / entry, new / entry)
                    _fsync_tree(new)  # cheap now: only the carried entries' new names
                old = _swap_in(new, folder)
                _fsync_folder(folder.parent)
                if old is not None:
                    for entry in os.listdir(old):  # appeared in the old folder meanwhile
                        if not _owned(entry, owned) and not os.path.lexists(folder / entry):
                            os.rename(old / entry, folder / entry)
                    _delete(folder, old)
        except BaseException:
            if os.path.lexists(new):  # unswapped, or (swapped) the old version
                shutil.rmtree(new, ignore_errors=True)
            raise
    finally:
        os.close(held)
    return folder


@contextlib.contextmanager
def reading_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Read `folder` as one version: a folder put aside by an interrupted save is renamed
    back first, and the parent's lock is held shared while the block runs, so no lowrank save
    swaps the folder in the middle of the reading."""
    folder = Path(os.path.abspath(folder))
    parent = folder.parent
    if not parent.is_dir():
        yield folder
        return
    if _needs_recovery(folder):
        try:
            with _locked(parent, exclusive=True, wait_s=LOCK_WAIT_S):
                _recover(folder)
        except PermissionError as error:
            aside = [p.name for p in _siblings(folder, "old-")]
            raise ValueError(
                f"{folder} is missing: a save was interrupted and its last complete version "
                f"is in {aside}, which cannot be renamed back here ({error.strerror})"
            ) from None
    with _locked(parent, exclusive=False, wait_s=LOCK_WAIT_S):
        yield folder
