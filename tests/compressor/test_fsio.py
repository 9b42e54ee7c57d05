"""The one atomic-write helper set (compressor/format/fsio.py) that every layer above
numba_kernels uses: whole files and whole folders, or nothing, and no temporaries left."""

from __future__ import annotations

import os

import pytest

from compressor.format.fsio import atomic_directory, write_atomic


def _names(d):
    return sorted(os.listdir(d))


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.json"
    write_atomic(p, "old")
    write_atomic(p, b"\x00new")
    assert p.read_bytes() == b"\x00new" and _names(tmp_path) == ["a.json"]


def test_a_failed_folder_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(str(tmp_path), "model") as tmp:
            os.mkdir(tmp)
            (tmp_path / os.path.basename(tmp) / "half.bin").write_bytes(b"x")
            raise RuntimeError("builder died")
    assert _names(tmp_path) == []


def test_the_first_folder_wins_unless_replace(tmp_path):
    for content in ("first", "second"):
        with atomic_directory(str(tmp_path), "model") as tmp:
            os.mkdir(tmp)
            with open(os.path.join(tmp, "w.txt"), "w") as f:
                f.write(content)
    assert (tmp_path / "model" / "w.txt").read_text() == "first" and _names(tmp_path) == ["model"]
    with atomic_directory(str(tmp_path), "model", replace=True) as tmp:
        os.mkdir(tmp)
        with open(os.path.join(tmp, "w.txt"), "w") as f:
            f.write("third")
    assert (tmp_path / "model" / "w.txt").read_text() == "third" and _names(tmp_path) == ["model"]


def test_a_file_in_the_way_is_an_error_not_a_silent_keep(tmp_path):
    (tmp_path / "model").write_text("not a folder")
    with pytest.raises(OSError):
        with atomic_directory(str(tmp_path), "model") as tmp:
            os.mkdir(tmp)
    assert _names(tmp_path) == ["model"]
