"""Atomic file and folder writes."""

from __future__ import annotations

import pytest

from anglekit._files import atomic_directory, atomic_file


def test_atomic_file_keeps_old_content_on_failure(tmp_path):
    """A write that fails mid-way leaves the old file whole and no temp file behind."""
    target = tmp_path / "out.json"
    with atomic_file(target) as f:
        f.write("old")
    with pytest.raises(RuntimeError), atomic_file(target) as f:
        f.write("half of the new")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_directory_replaces_the_whole_folder(tmp_path):
    """A successful block replaces the folder; files of the old one do not survive."""
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
