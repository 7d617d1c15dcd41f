"""The wheel holds every subpackage and every shipped file; the README's public names import from where it
says; the project's SAEs are found by name and trusted by their sha256."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_subpackage_is_packaged():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "saesteer").rglob("__init__.py")}
    found.add("saesteer.storage")
    assert listed == found, f"pyproject packages {sorted(listed)} vs subpackages on disk {sorted(found)}"


def test_package_data_covers_every_shipped_file():
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["saesteer.storage"]
    tracked = subprocess.run(["git", "ls-files", "storage"], cwd=ROOT, capture_output=True, text=True, check=True)
    files = [Path(f).relative_to("storage").as_posix() for f in tracked.stdout.split()]
    assert files, "git ls-files found nothing under storage/"
    missed = [f for f in files if f != "__init__.py" and not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not missed, f"files under storage/ that the wheel would not carry: {missed}"


def test_readme_public_names_import():
    """Every ``ss.<name>`` and ``from saesteer.x import y`` in the README's code blocks resolves."""
    import importlib

    import saesteer as ss

    text = (ROOT / "README.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))
    assert code
    for attr in sorted(set(re.findall(r"\bss\.([A-Za-z_][\w.]*)", code))):
        obj = ss
        for part in attr.split("."):
            assert hasattr(obj, part), f"README uses ss.{attr}, but {part!r} is not there"
            obj = getattr(obj, part)
    for module, names in re.findall(r"^from (saesteer[\w.]*) import ([\w, ]+)$", code, flags=re.M):
        mod = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(mod, name), f"README: from {module} import {name} fails"


def test_project_sae_by_name_and_checksum(tmp_path, monkeypatch):
    import shutil

    from saesteer.sae import registry

    entry = registry.project_sae("smollm2-135m-res-15-4608")
    assert entry.verify() == entry.path and entry.width == 4608 and entry.hook == "blocks.15.hook_resid_post"
    assert registry.default_project_sae("smollm2-135m").model == "smollm2-135m"
    with pytest.raises(KeyError, match="registered"):
        registry.project_sae("nope")
    with pytest.raises(ValueError, match="ships no SAE for model 'gpt2'"):
        registry.default_project_sae("gpt2")
    # a damaged copy is refused with its path
    copy = tmp_path / entry.folder
    shutil.copytree(entry.path, copy)
    with open(copy / "cfg.json", "a") as f:
        f.write(" ")
    monkeypatch.setattr(registry, "storage_path", lambda *parts: tmp_path.joinpath(*parts[1:]))
    with pytest.raises(registry.RegistryChecksumError, match=re.escape(str(copy / "cfg.json"))):
        entry.verify()


def test_default_project_sae_is_the_marked_one_and_only_one_per_model(tmp_path, monkeypatch):
    from saesteer.sae import registry

    entry = {"model": "m", "hook": "blocks.0.hook_resid_post", "architecture": "topk", "sha256": {}}
    yaml_text = "a: {folder: a, width: 8, %s}\nb: {folder: b, width: 4, default: true, %s}\n" % (
        (", ".join(f"{k}: {v}" for k, v in entry.items()),) * 2
    )
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "registry.yaml").write_text(yaml_text)
    monkeypatch.setattr(registry, "storage_path", lambda *parts: tmp_path.joinpath(*parts))
    registry.project_saes.cache_clear()
    try:
        assert registry.default_project_sae("m").name == "b"  # marked, though narrower
        assert registry.default_project_sae("m", width=8).name == "a"
        (tmp_path / "sae" / "registry.yaml").write_text(yaml_text.replace("width: 8,", "width: 8, default: true,"))
        registry.project_saes.cache_clear()
        with pytest.raises(ValueError, match="several SAEs of \\['m'\\] as default"):
            registry.project_saes()
    finally:
        registry.project_saes.cache_clear()


def test_every_registered_sae_matches_its_entry():
    """Each shipped SAE's files match their sha256, and its cfg.json says the width and hook its entry says."""
    import json

    from saesteer.sae import registry

    assert len(registry.project_saes()) >= 2
    for entry in registry.project_saes().values():
        cfg = json.loads((entry.verify() / "cfg.json").read_text())
        assert cfg["d_sae"] == entry.width and cfg["metadata"]["hook_name"] == entry.hook, entry.name
        assert cfg["metadata"]["model_name"] == entry.model and cfg.get("k") == entry.k, entry.name
