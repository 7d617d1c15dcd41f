"""Confidence intervals and paired differences for the detoxification metrics, by bootstrapping PROMPTS.

Percentile bootstrap over prompts: draw B resamples of the n prompts with replacement (each prompt
travels with all k of its generations), recompute the metric on each resample, and report the
``(1-level)/2`` and ``(1+level)/2`` quantiles of the B values (``np.quantile``, linear interpolation) as
the interval. Paired difference (method minus baseline): both runs hold the same prompts (and seeds);
every resample draws ONE prompt set and evaluates both runs on it, so ``Δ_b = m(method|I_b) - m(baseline|I_b)``
and the interval is the quantiles of the ``Δ_b`` (prompt-to-prompt variation shared by both runs cancels).

Metrics (:data:`METRICS`, as :func:`saesteer.evaluation.runner.summarize` defines them): with ``M_i`` the
maximum toxicity of prompt i's generations, ``exp_max_toxicity = mean_I M_i``, ``toxicity_prob =
mean_I [M_i >= threshold]``, ``mean_toxicity = (sum of toxicities in I) / (generations in I)``, and
``ppl`` = the mean over the generations in I of their per-text perplexity ``exp(nll / n_tokens)``,
leaving out texts without a token or with ``ppl >= max_ppl`` (DExperts' cap), i.e.
``sum_I S_i / sum_I C_i`` with ``S_i``, ``C_i`` the sum and count of prompt i's kept perplexities.
A resample in which no text has a perplexity gives NaN and is left out of the ppl quantiles.

Deterministic: the indices are ``np.random.default_rng(seed).integers(0, n, size=(B, n))``
(:func:`resample_indices`; drawn in blocks of rows for memory, which gives the very same matrix), and every
metric (and both runs of a paired difference) uses the same matrix. The defaults, B = 2000 and seed 0,
are what the runner's summaries (``<metric>_ci_low`` / ``_ci_high``) use.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float, Int

from saesteer.evaluation.metrics import DEFAULT_MAX_PPL

__all__ = [
    "DEFAULT_LEVEL",
    "DEFAULT_N_BOOT",
    "DEFAULT_SEED",
    "METRICS",
    "Interval",
    "PromptTable",
    "Resampling",
    "bootstrap_ci",
    "metric_replicates",
    "paired_difference",
    "paired_differences",
    "percentile_interval",
    "prompt_table",
    "resample_indices",
    "summary_intervals",
    "with_interval",
]

#: The metrics with an interval, in the order the summary lists them.
METRICS = ("exp_max_toxicity", "toxicity_prob", "mean_toxicity", "ppl")
DEFAULT_LEVEL = 0.95
DEFAULT_N_BOOT = 2000
DEFAULT_SEED = 0
#: Index entries drawn (and held) at once; more rows are drawn block by block from the same generator.
_BLOCK = 1 << 22


@dataclass(frozen=True)
class Interval:
    """A point estimate (on all prompts) and its percentile-bootstrap interval at ``level``."""

    estimate: float
    low: float
    high: float
    level: float = DEFAULT_LEVEL

    @property
    def width(self) -> float:
        return self.high - self.low

    def covers(self, value: float) -> bool:
        return bool(self.low <= value <= self.high)

    def format(self, digits: int = 3, signed: bool = False) -> str:
        """``"0.336 [0.250, 0.420]"`` (``signed``: ``"+0.012 [-0.030, +0.051]"``); ``"nan"`` if undefined."""
        if not math.isfinite(self.estimate):
            return "nan"
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        lo = f.format(self.low) if math.isfinite(self.low) else "nan"
        hi = f.format(self.high) if math.isfinite(self.high) else "nan"
        return f"{f.format(self.estimate)} [{lo}, {hi}]"

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class PromptTable:
    """What the metrics need from each prompt (rows in the runner's prompt order)."""

    prompt_ids: tuple[str, ...]
    seeds: Int[np.ndarray, " n_prompts"] | None
    n_gen: Int[np.ndarray, " n_prompts"]
    max_tox: Float[np.ndarray, " n_prompts"]
    tox_sum: Float[np.ndarray, " n_prompts"]
    ppl_sum: Float[np.ndarray, " n_prompts"] | None
    """Sum of the kept per-text perplexities (None: the frame has no nll / n_tokens columns)."""
    ppl_n: Int[np.ndarray, " n_prompts"] | None
    max_ppl: float | None

    @property
    def n_prompts(self) -> int:
        return len(self.prompt_ids)


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------


def _frame(run: Any, what: str = "run") -> pd.DataFrame:
    g = getattr(run, "generations", run)
    if not isinstance(g, pd.DataFrame):
        raise ValueError(f"{what}: pass an EvalResult or its generations DataFrame, got {type(run).__name__}.")
    return g


def _run_setting(run: Any, given: Any, key: str, default: Any) -> Any:
    """An explicit argument wins; else the EvalResult's own setting; else the runner's default."""
    if given is not None:
        return given
    settings = getattr(run, "settings", None) or {}
    if key == "toxic_threshold" and "toxic_threshold" in settings:
        return settings["toxic_threshold"]
    if key == "max_ppl" and isinstance(settings.get("fluency"), dict) and "max_ppl" in settings["fluency"]:
        return settings["fluency"]["max_ppl"]
    return default


def prompt_table(generations: pd.DataFrame, *, max_ppl: float | None = DEFAULT_MAX_PPL) -> PromptTable:
    """Per-prompt sufficient statistics of a generations frame (the runner's columns; ``prompt_id`` and
    ``toxicity`` required, ``prompt_index`` orders the prompts when present, ``seed`` is kept for pairing,
    ``nll`` + ``n_tokens`` give the perplexities)."""
    g = _frame(generations, "generations")
    missing = [c for c in ("prompt_id", "toxicity") if c not in g.columns]
    if missing:
        raise ValueError(
            f"the generations frame lacks the column(s) {missing}; pass EvalResult.generations "
            "(one row per generation: prompt_id, toxicity, nll, n_tokens, seed, ...)."
        )
    if g.empty:
        raise ValueError("no generations: the bootstrap needs at least one prompt.")
    key_col = "prompt_index" if "prompt_index" in g.columns else "prompt_id"
    if "sample" in g.columns:  # sums in one fixed order: the same numbers bit for bit whatever the row order
        g = g.sort_values([key_col, "sample"], kind="stable")
    tox = g["toxicity"].to_numpy(dtype=np.float64)
    if not np.isfinite(tox).all():
        raise ValueError("a toxicity score is NaN/inf; fix the scorer or drop that generation before bootstrapping.")
    codes, uniques = pd.factorize(g[key_col], sort=key_col == "prompt_index")
    n = len(uniques)
    ids = g["prompt_id"].astype(str).to_numpy()
    first = np.unique(codes, return_index=True)[1]  # the first row of each prompt
    if "prompt_index" in g.columns:
        per = pd.Series(ids).groupby(codes).nunique()
        if (per > 1).any():
            raise ValueError(
                f"prompt index {uniques[int(per.idxmax())]} holds several prompt ids; the frame is corrupt."
            )
    prompt_ids = tuple(ids[first])
    if len(set(prompt_ids)) != n:
        dup = pd.Series(prompt_ids)[pd.Series(prompt_ids).duplicated()].iloc[0]
        raise ValueError(f"prompt_id {dup!r} belongs to more than one prompt_index; prompt ids must be unique.")
    n_gen = np.bincount(codes, minlength=n).astype(np.int64)
    max_tox = np.full(n, -np.inf)
    np.maximum.at(max_tox, codes, tox)
    tox_sum = np.bincount(codes, weights=tox, minlength=n)
    seeds = None
    if "seed" in g.columns:
        s = g["seed"].to_numpy()
        if not (s == s[first][codes]).all():
            raise ValueError("a prompt's generations carry different seeds; the frame is not one evaluation's output.")
        seeds = s[first].astype(np.int64)
    ppl_sum = ppl_n = None
    if "nll" in g.columns and "n_tokens" in g.columns:
        nt = g["n_tokens"].to_numpy(dtype=np.float64)
        nll = g["nll"].fillna(0.0).to_numpy(dtype=np.float64)
        scored = nt > 0
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            ppl = np.where(scored, np.exp(nll / np.maximum(nt, 1)), np.nan)
        kept = scored if max_ppl is None else scored & (ppl < max_ppl)
        ppl_sum = np.bincount(codes, weights=np.where(kept, ppl, 0.0), minlength=n)
        ppl_n = np.bincount(codes, weights=kept.astype(np.float64), minlength=n).astype(np.int64)
    return PromptTable(prompt_ids, seeds, n_gen, max_tox, tox_sum, ppl_sum, ppl_n, max_ppl)


# ---------------------------------------------------------------------------------------------------
# resamples
# ---------------------------------------------------------------------------------------------------


def _check_boot(n_boot: int, level: float, seed: int) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot (bootstrap resamples) must be a positive int, got {n_boot!r}.")
    if not isinstance(level, (float, int)) or not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1 (0.95 for a 95% interval), got {level!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}.")


def _index_blocks(n_prompts: int, n_boot: int, seed: int) -> Iterator[Int[np.ndarray, "rows n_prompts"]]:
    """The rows of :func:`resample_indices`, a block at a time (the same numbers as one draw)."""
    rng = np.random.default_rng(seed)
    rows = max(1, _BLOCK // max(n_prompts, 1))
    for start in range(0, n_boot, rows):
        yield rng.integers(0, n_prompts, size=(min(rows, n_boot - start), n_prompts))


def resample_indices(
    n_prompts: int, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED
) -> Int[np.ndarray, "n_boot n_prompts"]:
    """The ``n_boot x n_prompts`` matrix of prompt positions the bootstrap draws (row b = resample b)."""
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, (int, np.integer)) or n_prompts < 1:
        raise ValueError(f"n_prompts must be a positive int, got {n_prompts!r}.")
    _check_boot(n_boot, 0.5, seed)
    return np.concatenate(list(_index_blocks(int(n_prompts), int(n_boot), int(seed))))


def metric_replicates(
    table: PromptTable,
    indices: Int[np.ndarray, "n_boot n_prompts"],
    *,
    toxic_threshold: float = 0.5,
) -> dict[str, Float[np.ndarray, " n_boot"]]:
    """Every metric of :data:`METRICS` on each resample (row of ``indices``); ``ppl`` only when the table
    has perplexities. ``indices = np.arange(n)[None]`` gives the point estimates."""
    idx = np.asarray(indices)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(
            f"indices must be a 2-d integer array (resamples x prompts), got shape {idx.shape}, {idx.dtype}."
        )
    if idx.size and (idx.min() < 0 or idx.max() >= table.n_prompts):
        raise ValueError(f"indices must lie in [0, {table.n_prompts}); the table has {table.n_prompts} prompts.")
    toxic: Bool[np.ndarray, " n_prompts"] = table.max_tox >= toxic_threshold
    out = {
        "exp_max_toxicity": table.max_tox[idx].mean(axis=1),
        "toxicity_prob": toxic[idx].mean(axis=1),
        "mean_toxicity": table.tox_sum[idx].sum(axis=1) / table.n_gen[idx].sum(axis=1),
    }
    if table.ppl_sum is not None and table.ppl_n is not None:
        num, den = table.ppl_sum[idx].sum(axis=1), table.ppl_n[idx].sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out["ppl"] = np.where(den > 0, num / np.maximum(den, 1), np.nan)
    return out


def percentile_interval(replicates: Float[np.ndarray, " n_boot"], level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The ``(1-level)/2`` and ``(1+level)/2`` quantiles of the finite replicates (NaN, NaN if none)."""
    r = np.asarray(replicates, dtype=np.float64).reshape(-1)
    r = r[np.isfinite(r)]
    if not r.size:
        return math.nan, math.nan
    lo, hi = np.quantile(r, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Resampling:
    """How an interval of this module is drawn (the keyword options of :func:`bootstrap_ci`,
    :func:`paired_difference` and :func:`paired_differences`); checked on construction.

    ``level``: the interval's coverage; ``n_boot`` resamples of the prompts drawn from ``seed``, or the
    given ``indices`` (rows = resamples of prompt positions) instead of the seeded draw; ``toxic_threshold``
    of ``toxicity_prob`` (None: the run's setting, else 0.5); ``max_ppl``: perplexities at or above it are
    left out of ``ppl``.
    """

    level: float = DEFAULT_LEVEL
    n_boot: int = DEFAULT_N_BOOT
    seed: int = DEFAULT_SEED
    toxic_threshold: float | None = None
    max_ppl: float | None = DEFAULT_MAX_PPL
    indices: Int[np.ndarray, "n_boot n_prompts"] | None = None

    def __post_init__(self) -> None:
        _check_boot(self.n_boot, self.level, self.seed)


def _replicates_all(
    tables: Sequence[PromptTable], r: Resampling, toxic_threshold: float
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """(point estimates, replicates) of each table, all on the same resamples."""
    n = tables[0].n_prompts
    ident = np.arange(n)[None]
    points = [metric_replicates(t, ident, toxic_threshold=toxic_threshold) for t in tables]
    if r.indices is not None:
        idx = np.asarray(r.indices)
        if idx.ndim != 2 or idx.shape[1] != n:
            raise ValueError(f"indices must have shape (n_boot, {n}) for {n} prompts, got {idx.shape}.")
        blocks: Any = [idx]
    else:
        blocks = _index_blocks(n, r.n_boot, r.seed)
    parts: list[dict[str, list[np.ndarray]]] = [{} for _ in tables]
    for block in blocks:
        for t, acc in zip(tables, parts):
            for key, v in metric_replicates(t, block, toxic_threshold=toxic_threshold).items():
                acc.setdefault(key, []).append(v)
    reps = [{key: np.concatenate(v) for key, v in acc.items()} for acc in parts]
    return points, reps


# ---------------------------------------------------------------------------------------------------
# one run, paired runs
# ---------------------------------------------------------------------------------------------------


def bootstrap_ci(run: Any, **options: Any) -> dict[str, Interval]:
    """Percentile-bootstrap intervals (over prompts) of each metric of one run (an EvalResult or its
    generations frame). ``options``: the fields of :class:`Resampling` (``level``, ``n_boot``, ``seed``,
    ``toxic_threshold``, ``max_ppl``, ``indices``), with its defaults."""
    r = Resampling(**options)
    thr = _run_setting(run, r.toxic_threshold, "toxic_threshold", 0.5)
    table = prompt_table(_frame(run), max_ppl=r.max_ppl)
    (point,), (reps,) = _replicates_all([table], r, thr)
    return {
        m: Interval(float(point[m][0]), *percentile_interval(reps[m], r.level), level=r.level)
        for m in METRICS
        if m in reps
    }


def _ids_text(ids: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(x) for x in list(ids)[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _align(method: PromptTable, baseline: PromptTable, names: tuple[str, str]) -> PromptTable:
    """``baseline`` reordered to ``method``'s prompt order, after checking that the two can be paired."""
    a, b = names
    ids_a, ids_b = set(method.prompt_ids), set(baseline.prompt_ids)
    only_a = [p for p in method.prompt_ids if p not in ids_b]
    only_b = [p for p in baseline.prompt_ids if p not in ids_a]
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} only in {a!r} ({_ids_text(only_a)})")
        if only_b:
            parts.append(f"{len(only_b)} only in {b!r} ({_ids_text(only_b)})")
        raise ValueError(
            f"runs {a!r} and {b!r} do not hold the same prompts: {'; '.join(parts)}. A paired difference needs both "
            "runs on the same prompt set: evaluate them with the same prompts (same --prompts / --n-prompts / "
            "--prompt-seed) and merge every shard of each (saesteer evaluate merge), or restrict both generations "
            "frames to their common prompt ids."
        )
    pos = {p: i for i, p in enumerate(baseline.prompt_ids)}
    pos_a = {p: i for i, p in enumerate(method.prompt_ids)}
    order = np.array([pos[p] for p in method.prompt_ids])
    if method.seeds is not None and baseline.seeds is not None:
        bad = [p for p, x, y in zip(method.prompt_ids, method.seeds, baseline.seeds[order]) if x != y]
        if bad:
            i = pos_a[bad[0]]
            raise ValueError(
                f"runs {a!r} and {b!r} generated {len(bad)} prompts with different seeds ({_ids_text(bad)}; e.g. "
                f"{bad[0]!r}: {int(method.seeds[i])} vs {int(baseline.seeds[order][i])}). Paired differences compare "
                "like with like: rerun one of them with the other's base seed (evaluate(seed=...), --seed)."
            )
    if not (method.n_gen == baseline.n_gen[order]).all():
        i = int(np.flatnonzero(method.n_gen != baseline.n_gen[order])[0])
        raise ValueError(
            f"runs {a!r} and {b!r} have different numbers of generations for prompt {method.prompt_ids[i]!r} "
            f"({int(method.n_gen[i])} vs {int(baseline.n_gen[order][i])}); the maximum toxicity depends on k, so "
            "evaluate both with the same k."
        )

    def take(x: np.ndarray | None) -> np.ndarray | None:
        return None if x is None else x[order]

    return PromptTable(
        prompt_ids=method.prompt_ids,
        seeds=take(baseline.seeds),
        n_gen=baseline.n_gen[order],
        max_tox=baseline.max_tox[order],
        tox_sum=baseline.tox_sum[order],
        ppl_sum=take(baseline.ppl_sum),
        ppl_n=take(baseline.ppl_n),
        max_ppl=baseline.max_ppl,
    )


def paired_difference(
    method: Any, baseline: Any, *, names: tuple[str, str] = ("method", "baseline"), **options: Any
) -> dict[str, Interval]:
    """Metric(method) - metric(baseline) per metric, with a paired percentile-bootstrap interval: each
    resample draws one prompt set (positions in ``method``'s prompt order) and evaluates both runs on it.

    Both runs (EvalResults or generations frames) must hold the same prompt ids, the same per-prompt seeds
    (checked when both frames carry ``seed``) and the same number of generations per prompt; ``names``
    label them in the error messages. ``options``: the fields of :class:`Resampling`, as for
    :func:`bootstrap_ci`.
    """
    r = Resampling(**options)
    thr_a = _run_setting(method, r.toxic_threshold, "toxic_threshold", 0.5)
    thr_b = _run_setting(baseline, r.toxic_threshold, "toxic_threshold", 0.5)
    if thr_a != thr_b:
        raise ValueError(
            f"runs {names[0]!r} and {names[1]!r} use different toxic thresholds ({thr_a} vs {thr_b}); "
            "pass toxic_threshold= to compare them at one threshold."
        )
    ta = prompt_table(_frame(method, names[0]), max_ppl=r.max_ppl)
    tb = _align(ta, prompt_table(_frame(baseline, names[1]), max_ppl=r.max_ppl), names)
    (pa, pb), (ra, rb) = _replicates_all([ta, tb], r, thr_a)
    out = {}
    for m in METRICS:
        if m in ra and m in rb:
            out[m] = Interval(float(pa[m][0] - pb[m][0]), *percentile_interval(ra[m] - rb[m], r.level), level=r.level)
    return out


def paired_differences(
    runs: Mapping[str, Any], baseline: str, *, methods: Sequence[str] | None = None, **options: Any
) -> dict[str, dict[str, Interval]]:
    """:func:`paired_difference` of each run in ``methods`` (default: every run but the baseline) minus
    ``runs[baseline]``, keyed by run name; ``options``: the fields of :class:`Resampling`."""
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not one of the runs; the runs are {sorted(map(str, runs))}.")
    names = [m for m in runs if m != baseline] if methods is None else list(methods)
    unknown = [m for m in names if m not in runs]
    if unknown:
        raise ValueError(f"methods {unknown} are not among the runs {sorted(map(str, runs))}.")
    return {m: paired_difference(runs[m], runs[baseline], names=(m, baseline), **options) for m in names}


def summary_intervals(
    generations: pd.DataFrame, *, toxic_threshold: float = 0.5, fluency: bool = True, **options: Any
) -> dict[str, float]:
    """The summary's interval entries: ``<metric>_ci_low`` / ``<metric>_ci_high`` for each of
    :data:`METRICS` (``ppl`` only with ``fluency``; NaN where the metric is undefined). ``options``: the
    other fields of :class:`Resampling`."""
    cis = bootstrap_ci(generations, toxic_threshold=toxic_threshold, **options)
    out: dict[str, float] = {}
    for m in METRICS:
        if m == "ppl" and not fluency:
            continue
        iv = cis.get(m)
        out[f"{m}_ci_low"] = iv.low if iv is not None else math.nan
        out[f"{m}_ci_high"] = iv.high if iv is not None else math.nan
    return out


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


#: Short names of the metrics whose paired differences tables report: ``d_<short>_<suffix>`` columns.
SHORT_NAMES = {"exp_max_toxicity": "emt", "toxicity_prob": "tox_prob"}


def difference_fields(diff: Mapping[str, Interval], suffix: str) -> dict[str, float]:
    """Flat record fields of a :func:`paired_difference` for EMT and Tox. Prob.: ``d_emt_<suffix>``,
    ``d_emt_<suffix>_ci_low``, ``d_emt_<suffix>_ci_high``, likewise ``d_tox_prob_<suffix>...``."""
    out: dict[str, float] = {}
    for metric, short in SHORT_NAMES.items():
        iv = diff[metric]
        key = f"d_{short}_{suffix}"
        out |= {key: iv.estimate, f"{key}_ci_low": iv.low, f"{key}_ci_high": iv.high}
    return out


def with_interval(value: Any, low: Any = None, high: Any = None, fmt: str = ".3f") -> str:
    """``value [low, high]`` formatted with ``fmt`` for a Markdown table: ``value`` alone where the interval is
    missing, "—" where the value is."""
    if _missing(value):
        return "—"
    if _missing(low) or _missing(high):
        return f"{value:{fmt}}"
    return f"{value:{fmt}} [{low:{fmt}}, {high:{fmt}}]"
