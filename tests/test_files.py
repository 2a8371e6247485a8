"""Tests for lowrank._files: a file is replaced whole or not at all.

Oracles: the file system itself (contents, permissions from the umask, what is left in the
folder and beside it) after a write that succeeds and after one that fails half-way. (Folders:
tests/test_folders.py.)
"""

import os
import stat

import pytest

from lowrank._files import write_atomically, write_text_atomically


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    write_text_atomically(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_the_new_file_gets_the_permissions_of_a_plainly_created_one(tmp_path):
    previous = os.umask(0o022)
    try:
        write_text_atomically(tmp_path / "a.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o644


def test_a_failing_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old weights")

    def half_then_crash(temporary):
        temporary.write_bytes(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_crash)
    assert path.read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_atomically_removes_temporaries_left_by_killed_writers(tmp_path):
    stale = tmp_path / ".config.json.x1y2z3w4.tmp"
    stale.write_text("half")
    (tmp_path / ".other.json.x1y2z3w4.tmp").write_text("another file's")
    write_text_atomically(tmp_path / "config.json", "new")
    assert listing(tmp_path) == [".other.json.x1y2z3w4.tmp", "config.json"]
