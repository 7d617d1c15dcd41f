"""The project's own SAEs, found by name: ``load_sae("smollm2-135m-res-15-4608")`` from any folder.

Registry data lives apart from the loading code, as SAELens keeps ``pretrained_saes.yaml``: the file
``storage/sae/registry.yaml`` (installed as ``saesteer/storage/sae/registry.yaml``) maps each name to its
folder, model, hook, width and the sha256 of each file. A file whose digest differs from its entry is
refused with its path: a shipped SAE is trusted by its content, never by its name alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from saesteer.data.package_files import sha256_file, storage_path

REGISTRY_FILE = ("sae", "registry.yaml")


class RegistryChecksumError(ValueError):
    """A shipped SAE file's sha256 differs from the one its registry entry pins."""


@dataclass(frozen=True)
class ProjectSAE:
    """One registry entry: ``name`` -> ``folder`` under ``storage/sae``, with what it encodes."""

    name: str
    folder: str
    model: str
    hook: str
    width: int
    architecture: str
    sha256: dict[str, str]
    k: int | None = None
    training_data: str = ""
    default: bool = False
    """The project's recommended SAE for its model (:func:`default_project_sae`); at most one per model."""

    @property
    def path(self) -> Path:
        """The SAE's folder (SAELens format: ``cfg.json`` + ``sae_weights.safetensors``)."""
        return storage_path("sae", self.folder)

    def verify(self) -> Path:
        """Check every listed file against its sha256 and return the folder.

        Raises:
            RegistryChecksumError: a file's digest differs (names the file and both digests).
        """
        folder = self.path
        for name, want in self.sha256.items():
            f = folder / name
            got = sha256_file(f) if f.exists() else "missing"
            if got != want:
                raise RegistryChecksumError(
                    f"{f} has sha256 {got}, but the registry entry {self.name!r} pins {want}: the file is damaged "
                    "or was replaced. Reinstall saesteer (pip install --force-reinstall saesteer), or load your own "
                    "folder with load_sae(PATH)."
                )
        return folder


@cache
def project_saes() -> dict[str, ProjectSAE]:
    """All entries of ``registry.yaml``, by name."""
    raw = yaml.safe_load(storage_path(*REGISTRY_FILE).read_text(encoding="utf-8")) or {}
    out = {}
    for name, entry in raw.items():
        out[name] = ProjectSAE(name=name, **entry)
    models = [e.model for e in out.values() if e.default]
    twice = sorted({m for m in models if models.count(m) > 1})
    if twice:
        raise ValueError(
            f"{storage_path(*REGISTRY_FILE)} marks several SAEs of {twice} as default; mark one per model."
        )
    return out


def project_sae(name: str) -> ProjectSAE:
    """The registry entry ``name``.

    Raises:
        KeyError: no such entry (the message lists the registered names).
    """
    saes = project_saes()
    if name not in saes:
        raise KeyError(f"no project SAE named {name!r}; registered: {sorted(saes)}")
    return saes[name]


def default_project_sae(model_name: str, width: int | None = None) -> ProjectSAE:
    """The project's SAE for ``model_name``: the entry marked ``default: true``, else the widest (with
    ``width``: the one of that width, the marked one first).

    Raises:
        ValueError: none is registered for that model / width (names what is, and how to pass your own).
    """
    found = [e for e in project_saes().values() if e.model == model_name and (width is None or e.width == width)]
    if not found:
        have = sorted(f"{e.name} ({e.model}, {e.width})" for e in project_saes().values())
        raise ValueError(
            f"The project ships no SAE for model {model_name!r}"
            + (f" of width {width}" if width else "")
            + f"; shipped: {have}. Pass an SAE folder or a SAELens release instead."
        )
    return max(found, key=lambda e: (e.default, e.width))
