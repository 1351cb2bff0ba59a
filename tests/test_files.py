"""The one atomic-write helper: a file is written whole or left as it was, with no temporary file left."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fedbench.data.sources import write_npz_atomic
from fedbench.files import file_sha256, write_atomic, write_bytes_atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    write_bytes_atomic(path, b"old")

    def half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]


def test_npz_written_atomically_reads_back_and_leaves_nothing_else(tmp_path):
    """numpy appends .npz to a file name without it: the helper must write through the open file."""
    path = tmp_path / "d.npz"
    write_npz_atomic(path, x=np.arange(6, dtype=np.uint8).reshape(2, 3), y=np.array([1, 0]))
    with np.load(path) as d:
        assert d["x"].tolist() == [[0, 1, 2], [3, 4, 5]] and d["y"].tolist() == [1, 0]
    assert [p.name for p in tmp_path.iterdir()] == ["d.npz"]


def test_file_sha256_is_hashlib_of_the_bytes(tmp_path):
    data = bytes(range(256)) * 5000  # more than one 1 MiB chunk
    (tmp_path / "b").write_bytes(data)
    assert file_sha256(tmp_path / "b") == hashlib.sha256(data).hexdigest()
