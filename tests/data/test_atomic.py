"""saesteer.data.atomic: complete files or none, no temp files left behind, old contents kept on failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from saesteer.data.atomic import (
    atomic_write,
    save_atomic,
    write_bytes_atomic,
    write_text_atomic,
)


class Boom(Exception):
    pass


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_text_round_trip(tmp_path):
    path = tmp_path / "a.json"
    text = '{"ünïcode": "ok"}\nsecond line\n'
    write_text_atomic(path, text)
    assert path.read_text(encoding="utf-8") == text
    assert _names(tmp_path) == ["a.json"]
    write_text_atomic(path, "replaced")  # overwriting an existing file
    assert path.read_text(encoding="utf-8") == "replaced"
    assert _names(tmp_path) == ["a.json"]


def test_text_encoding(tmp_path):
    path = tmp_path / "latin.txt"
    write_text_atomic(path, "café", encoding="latin-1")
    assert path.read_bytes() == b"caf\xe9"


def test_bytes_round_trip(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 3
    write_bytes_atomic(path, data)
    assert path.read_bytes() == data
    assert _names(tmp_path) == ["blob.bin"]


def test_context_manager_streams_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    with atomic_write(path) as f:
        for i in range(3):
            f.write(f"{i}\n")
        assert not path.exists()  # nothing visible at the target until the block ends
    assert path.read_text(encoding="utf-8") == "0\n1\n2\n"


@pytest.mark.parametrize("mode", ["w", "wb"])
def test_exception_in_block_keeps_old_file_and_leaves_no_temp(tmp_path, mode):
    path = tmp_path / "keep.txt"
    old = b"old contents\n"
    path.write_bytes(old)
    with pytest.raises(Boom), atomic_write(path, mode) as f:
        f.write("half" if mode == "w" else b"half")
        raise Boom
    assert path.read_bytes() == old
    assert _names(tmp_path) == ["keep.txt"]


def test_exception_in_block_creates_nothing(tmp_path):
    path = tmp_path / "new.txt"
    with pytest.raises(Boom), atomic_write(path) as f:
        f.write("partial")
        raise Boom
    assert _names(tmp_path) == []


def test_save_atomic_round_trip_and_suffix(tmp_path):
    path = tmp_path / "arr.npy"
    seen = []

    def writer(tmp: Path) -> None:
        seen.append(tmp)
        np.save(tmp, np.arange(5))  # np.save appends ".npy" unless the name already ends in it

    save_atomic(path, writer)
    (tmp,) = seen
    assert tmp.parent == tmp_path and tmp.name.startswith(".arr.npy.") and tmp.suffix == ".npy"
    assert np.array_equal(np.load(path), np.arange(5))
    assert _names(tmp_path) == ["arr.npy"]


def test_save_atomic_writer_raising_keeps_old_file(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n1,2\n")
    old = path.read_bytes()

    def writer(tmp: Path) -> None:
        tmp.write_text("a,b\n9,")  # half a file, then failure
        raise Boom

    with pytest.raises(Boom):
        save_atomic(path, writer)
    assert path.read_bytes() == old
    assert _names(tmp_path) == ["table.csv"]


def test_parent_folders_created(tmp_path):
    write_text_atomic(tmp_path / "x" / "y" / "t.txt", "t")
    write_bytes_atomic(tmp_path / "b" / "b.bin", b"b")
    save_atomic(tmp_path / "c" / "d" / "s.txt", lambda p: p.write_text("s"))
    assert (tmp_path / "x" / "y" / "t.txt").read_text() == "t"
    assert (tmp_path / "b" / "b.bin").read_bytes() == b"b"
    assert (tmp_path / "c" / "d" / "s.txt").read_text() == "s"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "default.txt", "x")  # like open(): 0666 & ~umask, not mkstemp's 0600
        save_atomic(tmp_path / "saved.txt", lambda p: p.write_text("x"))
        with atomic_write(tmp_path / "explicit.txt", permissions=0o600) as f:
            f.write("x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "default.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "saved.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "explicit.txt").stat().st_mode) == 0o600


def test_bad_mode_and_encoding_rejected_before_any_file(tmp_path):
    with pytest.raises(ValueError, match="mode"), atomic_write(tmp_path / "a", "a"):  # type: ignore[arg-type]
        pass
    with pytest.raises(LookupError), atomic_write(tmp_path / "b", encoding="no-such-codec"):
        pass
    assert _names(tmp_path) == []
