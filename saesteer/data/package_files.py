"""Files that travel inside the wheel (``saesteer.storage``): prompt CSVs and the project's SAEs.

In the repository they live in the top-level ``storage/`` folder, which setuptools maps to the
``saesteer.storage`` package (``package-dir`` in ``pyproject.toml``); :func:`storage_path` finds them the
same way in both cases, so nothing depends on the current folder or on the repository's location.
"""

from __future__ import annotations

import hashlib
from importlib.resources import files
from pathlib import Path

_CHUNK = 1 << 20


def storage_path(*parts: str) -> Path:
    """Path of a file or folder in ``saesteer.storage`` (``storage_path("prompts", "reference.csv")``).

    Raises:
        FileNotFoundError: the installed package holds no such file (a broken or partial install; the
            message names the path and the fix).
    """
    root = Path(str(files("saesteer.storage")))
    path = root.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from the installed saesteer package; reinstall it (pip install --force-reinstall "
            "saesteer) or, in the repository, restore storage/."
        )
    return path


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
