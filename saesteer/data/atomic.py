"""Atomic file writes: a file written here appears complete or not at all, never half-written.

Each helper writes to a hidden temp file in the target's own folder (so the rename stays on one disk),
flushes and fsyncs it, then moves it onto the target with ``os.replace``; on any error the temp file is
deleted and an existing target is left untouched.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Literal

__all__ = ["atomic_write", "save_atomic", "write_bytes_atomic", "write_text_atomic"]


def _default_permissions() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0666 less the umask (``mkstemp`` makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_beside(path: Path, suffix: str) -> tuple[int, Path]:
    """Create the parent folder if needed, then a hidden temp file next to ``path``; return (fd, temp path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    return fd, Path(name)


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        tmp.unlink()


def _commit(tmp: Path, path: Path, permissions: int | None) -> None:
    os.chmod(tmp, _default_permissions() if permissions is None else permissions)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str],
    mode: Literal["w", "wb"] = "w",
    encoding: str = "utf-8",
    *,
    permissions: int | None = None,
) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` for writing; when the ``with`` block ends normally, move it onto ``path``.

    Args:
        path: the file to (re)write. Its parent folder is created if missing.
        mode: ``"w"`` (text, ``encoding``) or ``"wb"`` (bytes).
        encoding: text encoding for ``mode="w"``; ignored for ``"wb"``.
        permissions: mode bits of the final file; default, those a plain ``open(path, "w")`` would give.

    If the block raises (or the write fails), the temp file is deleted, the exception propagates and an
    existing ``path`` keeps its old contents.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}.")
    if mode == "w":
        codecs.lookup(encoding)  # an unknown encoding fails here, before any file exists
    path = Path(path)
    fd, tmp = _temp_beside(path, ".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if mode == "wb" else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path, permissions)
    except BaseException:
        _discard(tmp)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """``Path(path).write_text(text, encoding)``, atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "w", encoding) as f:
        f.write(text)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """``Path(path).write_bytes(data)``, atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def save_atomic(
    path: str | os.PathLike[str], writer: Callable[[Path], object], *, permissions: int | None = None
) -> None:
    """Atomically create ``path`` with a library that insists on writing to a path itself.

    ``writer(tmp)`` must write the whole file to ``tmp`` (e.g. ``lambda p: df.to_csv(p, index=False)``,
    ``lambda p: torch.save(obj, p)``); it is then fsynced and moved onto ``path``. The temp name ends in
    ``path``'s own suffix, so libraries that look at the extension (pandas compression, ``np.save``'s
    ``.npy``) treat it like ``path``. If ``writer`` raises, the temp file is deleted and ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = _temp_beside(path, ".tmp" + path.suffix)
    try:
        os.close(fd)
        writer(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _commit(tmp, path, permissions)
    except BaseException:
        _discard(tmp)
        raise
