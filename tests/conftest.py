"""Shared pytest setup: tests never reach the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The English corpus of this project's development machines and CI (plain text, one sentence a line);
# a user of the package passes their own (saesteer.data.datasets.english_corpus).
SHARED_ENGLISH = Path(__file__).resolve().parents[2] / "shared" / "data" / "english"
if SHARED_ENGLISH.is_dir():
    os.environ.setdefault("SAESTEER_TEXT_DATA", str(SHARED_ENGLISH))


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "assets: uses real files fetched from PyPI into the saesteer cache; skipped when they cannot be fetched",
    )
    config.addinivalue_line(
        "markers",
        "notebook: executes experiments/quickstart.ipynb in a Jupyter kernel (minutes); deselect with -m 'not notebook'",
    )
