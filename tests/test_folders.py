"""Tests for lowrank._folders: a folder is replaced whole or not at all.

Oracles: the file system itself (contents, permissions from the umask, what is left in the
folder and beside it) after a write that succeeds and after one that fails half-way, with the
atomic exchange and with the portable fallback. (Real kills of a saving process:
tests/torch/test_crash_safety.py.)
"""

import os
import stat
import threading
import time

import pytest

from lowrank import _files, _folders
from lowrank._folders import reading_folder, write_folder_atomically


def writes(**files):
    """A write_into that puts `files` (name -> text) into the folder it is given."""

    def write_into(folder):
        for name, text in files.items():
            (folder / name).write_text(text)

    return write_into


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(params=["exchange", "rename-aside"])
def swap(request, monkeypatch):
    """Run a test with the atomic exchange and with the portable fallback."""
    if request.param == "rename-aside":
        monkeypatch.setattr(_folders, "_exchange", lambda first, second: False)
    return request.param


def test_a_folder_is_replaced_whole_and_leaves_no_temporary(tmp_path, swap):
    folder = tmp_path / "adapter"
    write_folder_atomically(folder, writes(config="1", weights="1"))
    write_folder_atomically(folder, writes(config="2", weights="2"))
    assert listing(folder) == ["config", "weights"]
    assert (folder / "config").read_text() == (folder / "weights").read_text() == "2"
    assert listing(tmp_path) == ["adapter"]


def test_entries_the_save_does_not_own_are_kept_and_owned_ones_dropped(tmp_path, swap):
    folder = tmp_path / "run"
    write_folder_atomically(folder, writes(config="1", head="1"), owns=["head"])
    (folder / "log.jsonl").write_text("step 1\n")
    (folder / "epoch-1").mkdir()
    (folder / "epoch-1" / "config").write_text("epoch")
    (folder / ".config.abcd1234.tmp").write_text("left by a killed write_atomically")
    log = open(folder / "log.jsonl", "a")  # a trainer still appending
    try:
        write_folder_atomically(folder, writes(config="2"), owns=["head"])
        log.write("step 2\n")
    finally:
        log.close()
    assert listing(folder) == ["config", "epoch-1", "log.jsonl"]  # the old head is gone
    assert (folder / "config").read_text() == "2"
    assert (folder / "log.jsonl").read_text() == "step 1\nstep 2\n"  # same file, still growing
    assert (folder / "epoch-1" / "config").read_text() == "epoch"
    assert listing(tmp_path) == ["run"]


def test_a_failing_write_into_leaves_the_old_folder(tmp_path, swap):
    folder = tmp_path / "adapter"
    write_folder_atomically(folder, writes(config="old", weights="old"))

    def half_then_crash(new):
        (new / "config").write_text("new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomically(folder, half_then_crash)
    assert (folder / "config").read_text() == "old"
    assert listing(tmp_path) == ["adapter"]


def test_permissions_are_those_of_plainly_made_files_and_folders(tmp_path, swap):
    previous = os.umask(0o027)
    try:
        write_folder_atomically(tmp_path / "new", writes(config="x"))
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "config").write_text("x")
    finally:
        os.umask(previous)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "new") == mode(tmp_path / "plain") == 0o750
    assert mode(tmp_path / "new" / "config") == mode(tmp_path / "plain" / "config") == 0o640
    # a folder that exists keeps its own permissions (a private one stays private)
    os.chmod(tmp_path / "new", 0o700)
    write_folder_atomically(tmp_path / "new", writes(config="y"))
    assert mode(tmp_path / "new") == 0o700


def test_a_link_or_a_file_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("x")
    for name in ("link", "file"):
        with pytest.raises(ValueError, match=f"{name} exists and is not a folder"):
            write_folder_atomically(tmp_path / name, writes(config="x"))
    assert listing(tmp_path / "real") == [] and (tmp_path / "file").read_text() == "x"
    assert listing(tmp_path) == ["file", "link", "real"]


def test_temporaries_of_a_killed_save_are_removed_by_the_next(tmp_path):
    folder = tmp_path / "adapter"
    write_folder_atomically(folder, writes(config="1"))
    for kind in ("new", "old", "trash"):  # what a save killed at various steps leaves
        stale = tmp_path / f".adapter.lowrank-{kind}-0123456789ab"
        stale.mkdir()
        (stale / "config").write_text("stale")
    (tmp_path / ".adapterx.lowrank-new-0123456789ab").mkdir()  # another folder's: kept
    write_folder_atomically(folder, writes(config="2"))
    assert listing(tmp_path) == [".adapterx.lowrank-new-0123456789ab", "adapter"]


def test_a_folder_left_aside_is_renamed_back_by_readers_and_writers(tmp_path):
    # a fallback swap killed between its two renames: no folder, the old version aside
    folder = tmp_path / "adapter"
    write_folder_atomically(folder, writes(config="old"))
    aside = tmp_path / ".adapter.lowrank-old-0123456789ab"
    os.rename(folder, aside)
    (tmp_path / ".adapter.lowrank-new-ba9876543210").mkdir()  # the new one, maybe incomplete
    with reading_folder(folder) as path:
        assert (path / "config").read_text() == "old"
    os.rename(folder, aside)
    write_folder_atomically(folder, writes(other="new"))  # the writer recovers, then keeps
    assert listing(folder) == ["config", "other"]  # what it does not own
    assert listing(tmp_path) == ["adapter"]


def test_several_folders_left_aside_are_refused_not_guessed(tmp_path):
    folder = tmp_path / "adapter"
    for token in ("0123456789ab", "ba9876543210"):
        (tmp_path / f".adapter.lowrank-old-{token}").mkdir()
    with pytest.raises(ValueError, match="several earlier versions"):
        with reading_folder(folder):
            pass
    with pytest.raises(ValueError, match="several earlier versions"):
        write_folder_atomically(folder, writes(config="x"))


def test_a_reader_sees_one_version_while_a_save_runs_and_waits_for_the_swap(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    write_folder_atomically(folder, writes(config="1", weights="1"))
    writing, swapping, release = (threading.Event() for _ in range(3))
    seen = []
    swap_in = _folders._swap_in

    def slow_write(new):
        (new / "config").write_text("2")
        writing.set()
        release.wait(10)
        (new / "weights").write_text("2")

    def slow_swap(new, target):  # runs with the lock held
        swapping.set()
        time.sleep(0.3)
        return swap_in(new, target)

    def read():
        with reading_folder(folder) as path:
            seen.append(((path / "config").read_text(), (path / "weights").read_text()))

    monkeypatch.setattr(_folders, "_swap_in", slow_swap)
    writer = threading.Thread(target=write_folder_atomically, args=(folder, slow_write))
    writer.start()
    writing.wait(10)
    read()  # while the new version is being written: the old one, whole
    release.set()
    swapping.wait(10)
    read()  # while it is swapped in: waits for the swap, then the new one, whole
    writer.join(10)
    assert seen == [("1", "1"), ("2", "2")]


def test_copy_tree_makes_plain_permissions(tmp_path):
    source = tmp_path / "private"
    source.mkdir(mode=0o700)
    (source / "a").write_text("a")
    os.chmod(source / "a", 0o600)
    previous = os.umask(0o022)
    try:
        _folders.copy_tree(source, tmp_path / "copy")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "copy").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "copy" / "a").stat().st_mode) == 0o644
    assert (tmp_path / "copy" / "a").read_text() == "a"


@pytest.mark.skipif(_files.fcntl is None, reason="needs flock")
def test_a_live_saves_temporary_is_not_taken_for_a_stale_one(tmp_path):
    folder = tmp_path / "adapter"
    write_folder_atomically(folder, writes(config="1"))
    live = tmp_path / ".adapter.lowrank-new-0123456789ab"  # another process, still writing
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    _files.fcntl.flock(fd, _files.fcntl.LOCK_EX)
    try:
        write_folder_atomically(folder, writes(config="2"))
        assert live.exists()
    finally:
        os.close(fd)  # that writer died
    write_folder_atomically(folder, writes(config="3"))
    assert listing(tmp_path) == ["adapter"]
