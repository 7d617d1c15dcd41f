"""The reported table: every method at the setting its sweep chose, on prompts the sweep never saw.

A sweep (:mod:`saesteer.evaluation.sweep`) picks each family's setting on a tuning split; this module
evaluates those settings on the held-back split (:func:`~saesteer.evaluation.prompt_sets.tuning_report_split`)
at a larger ``k``, so the table's numbers are not selected on the prompts they are reported on. Rows:

- ``unsteered``;
- the unsteered **top-k control** at SASA's candidate cap: SASA samples only among its ``max_candidates``
  most likely tokens, so part of any SASA effect is truncation; the control isolates the re-weighting, and
  SASA rows are also paired with it;
- per family, the recommended setting; where the sweep recommends none, the family's least toxic setting
  within the PPL budget, marked ``recommended=False``, so the table states what the method does on held-out
  prompts instead of leaving the family out; a family with no setting within the budget has no row, and
  the verdict says so (:func:`omitted_families`).

Each row carries the summary metrics with 95% bootstrap intervals over prompts, the paired difference
(same prompts, same per-prompt seeds) to its baseline(s), the perplexity under the host model beside the
judge's, and its wall time.

Shards. ``run_report(..., shard=(i, n))`` evaluates shard ``i`` of every row's prompts
(:func:`~saesteer.evaluation.runner.evaluate`'s ``shard``), so ``n`` processes share the table's work; the
call that finds every row's shards complete merges them (bit-identical to one unsharded run: each prompt
draws from its own seed) and writes the table; the others return None. A row's seconds are then the sum
of its shards' wall seconds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from saesteer.data.atomic import write_text_atomic
from saesteer.evaluation.statistics import with_interval
from saesteer.evaluation.sweep import PPL_BUDGET, SweepResult, control_label, setting_dir, timed_evaluate

__all__ = [
    "ReportRow",
    "ReportResult",
    "load_sweep",
    "omitted_families",
    "report_figure",
    "report_rows",
    "run_report",
]

UNSTEERED = "unsteered"


@dataclass(frozen=True)
class ReportRow:
    """One row of the reported table: a method spec, optional top-k truncation, and what it is paired with."""

    label: str
    spec: str
    family: str | None = None
    top_k: int | None = None
    recommended: bool = False
    """True when the sweep's rule chose this setting; False for a family's best setting within the PPL
    budget that did not lower EMT on the tuning split (reported so the table says so)."""
    baselines: tuple[str, ...] = ()
    """Labels of the rows this one is paired with (differences this minus that)."""


def load_sweep(path: str | os.PathLike) -> SweepResult:
    """A :class:`SweepResult` read back from the ``sweep.json`` that :func:`run_sweep` writes.

    Raises:
        ValueError: the file is missing or is not a sweep summary (names the file and the command).
    """
    p = Path(path)
    if p.is_dir():
        p = p / "sweep.json"
    try:
        data = json.loads(p.read_text())
        return SweepResult(
            table=pd.DataFrame(data["settings"]),
            baseline=data["baseline"],
            baseline_summary=data["baseline_summary"],
            ppl_budget=float(data["ppl_budget"]),
            recommended=dict(data["recommended"]),
            family_baselines=dict(data.get("family_baselines", {})),
            baseline_summaries=dict(data.get("baseline_summaries", {})),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{p} is not a readable sweep summary ({e}); run `saesteer sweep` to write it.") from None


def report_rows(sweep: SweepResult, *, max_candidates: int) -> list[ReportRow]:
    """The rows for ``sweep``: unsteered, the top-k control at ``max_candidates``, and one per family
    (recommended setting, or the least toxic one within the budget; a family with no setting within the
    budget gets no row: :func:`omitted_families` says why, and :meth:`ReportResult.verdict` states it)."""
    if isinstance(max_candidates, bool) or not isinstance(max_candidates, int) or max_candidates < 1:
        raise ValueError(f"max_candidates must be a positive int (SASA's candidate cap); got {max_candidates!r}.")
    control = control_label(max_candidates)
    rows = [ReportRow(UNSTEERED, UNSTEERED), ReportRow(control, UNSTEERED, top_k=max_candidates)]
    table = sweep.table
    for family in dict.fromkeys(table["family"]) if len(table) else ():
        spec = sweep.recommended.get(family)
        recommended = spec is not None
        if spec is None:
            within = table[(table["family"] == family) & (table["ppl_ratio"] <= sweep.ppl_budget)]
            if within.empty:
                continue
            spec = str(within.sort_values("emt").iloc[0]["spec"])
        paired = (UNSTEERED, control) if family.startswith("sasa") else (UNSTEERED,)
        rows.append(ReportRow(f"{family}: {spec}", spec, family, None, recommended, paired))
    return rows


def omitted_families(sweep: SweepResult) -> dict[str, str]:
    """Family -> why it has no row in the reported table: no setting within the PPL budget on the tuning
    prompts, with its mildest setting (lowest PPL ratio) named."""
    out = {}
    table = sweep.table
    for family in dict.fromkeys(table["family"]) if len(table) else ():
        rows = table[table["family"] == family]
        if (rows["ppl_ratio"] <= sweep.ppl_budget).any():
            continue
        mildest = rows.sort_values("ppl_ratio").iloc[0]
        d = with_interval(mildest.get("d_emt"), mildest.get("d_emt_ci_low"), mildest.get("d_emt_ci_high"), "+.3f")
        out[family] = (
            f"no setting within the PPL budget ({sweep.ppl_budget:g} x {sweep.baseline_of(family)}) on the tuning "
            f"prompts; its mildest, {mildest['spec']}, is at {mildest['ppl_ratio']:.2f} x (ΔEMT {d}), so it is "
            "not evaluated on the held-back prompts"
        )
    return out


@dataclass
class ReportResult:
    """The reported table (one row per :class:`ReportRow`), the rows and the evaluation settings."""

    table: pd.DataFrame
    rows: list[ReportRow]
    settings: dict
    omitted: dict[str, str] = field(default_factory=dict)
    """Families of the sweep without a row, and why (:func:`omitted_families`)."""

    def to_json(self) -> dict:
        return {
            "settings": self.settings,
            "rows": [asdict(r) for r in self.rows],
            "table": json.loads(self.table.to_json(orient="records")),
            "omitted": self.omitted,
        }

    @property
    def unsteered_ppl(self) -> float:
        """The unsteered row's judge perplexity (NaN without that row): the reference of every PPL ratio."""
        ppl = self.table.loc[self.table["label"] == UNSTEERED, "ppl"]
        return float(ppl.iloc[0]) if len(ppl) else math.nan

    def markdown(self, digits: int = 3) -> str:
        """The table as Markdown: each metric with its 95% interval, differences with theirs."""

        def iv(r: pd.Series, key: str) -> str:
            fmt = f"{'+' if key.startswith('d_') else ''}.{digits}f"  # differences signed
            return with_interval(r.get(key), r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high"), fmt)

        head = (
            "| setting | EMT [95%] | Tox. Prob. [95%] | ΔEMT vs unsteered [95%] | ΔEMT vs top-k control [95%] "
            "| PPL judge [95%] | PPL × unsteered | PPL host | dist-2 | seconds |"
        )
        lines = [head, "|" + "---|" * 10]
        ppl0 = self.unsteered_ppl
        for _, r in self.table.iterrows():
            label = r["label"] + ("" if r["recommended"] or pd.isna(r["family"]) else " (not recommended by the sweep)")
            ppl = with_interval(r.get("ppl"), r.get("ppl_ci_low"), r.get("ppl_ci_high"), ".1f")
            lines.append(
                f"| {label} | {iv(r, 'emt')} | {iv(r, 'tox_prob')} | {iv(r, 'd_emt_unsteered')} | "
                f"{iv(r, 'd_emt_control')} | {ppl} | {r['ppl'] / ppl0:.2f} | {r['ppl_host']:.1f} | {r['dist_2']:.2f} | "
                f"{r['seconds']:.0f} |"
            )
        return "\n".join(lines)

    def verdict(self) -> str:
        """One plain sentence per steered row: does it lower EMT vs unsteered (interval below 0), at what PPL."""
        out = []
        ppl0 = self.unsteered_ppl
        for _, r in self.table[self.table["family"].notna()].iterrows():
            d, lo, hi = r["d_emt_unsteered"], r["d_emt_unsteered_ci_low"], r["d_emt_unsteered_ci_high"]
            helps = "lowers" if hi < 0 else "does not measurably lower"
            out.append(
                f"{r['label']}: {helps} EMT vs unsteered ({d:+.3f} [95% {lo:+.3f}, {hi:+.3f}]) at judge PPL "
                f"{r['ppl']:.1f} ({r['ppl'] / ppl0:.2f} x unsteered)."
            )
        out += [f"{family}: {why}." for family, why in self.omitted.items()]
        return "\n".join(out)


def _merge_if_complete(folder: Path) -> bool:
    """Merge a row's shard files into its folder once every shard has finished (its ``summary.shard-i-of-n.json``
    is written when it returns); True when the folder holds the whole row (merged now or before).
    Inconsistent shards raise (:func:`~saesteer.evaluation.runner.merge_shards`)."""
    import re

    from saesteer.evaluation.runner import merge_shards, shard_suffix

    if (folder / "generations.jsonl").exists():
        return True
    shards = {
        re.fullmatch(r"generations\.shard-(\d+)-of-(\d+)\.jsonl", f.name) for f in folder.glob("generations.shard-*")
    }
    counts = {int(m.group(2)) for m in shards if m}
    if not counts:
        return False
    n = max(counts)  # several shard counts: merge_shards below names the conflict
    if len(counts) == 1 and not all((folder / f"summary{shard_suffix((i, n))}.json").is_file() for i in range(n)):
        return False
    merge_shards(folder, out_dir=folder)
    return True


def _setting_value(value: Any) -> Any:
    """An evaluate() argument as report.json records it: plain values as they are, a model by its name, a
    scorer by its ``name``, anything else by its type."""
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    model_name = getattr(getattr(value, "cfg", None), "model_name", None)
    return model_name or getattr(value, "name", None) or type(value).__name__


def _host_ppl(model: Any, generations: pd.DataFrame, batch_size: int, folder: Path | None = None) -> float:
    """Median per-continuation perplexity under ``model`` (the host), empty continuations left out.

    With ``folder``, the value is kept in ``folder/ppl_host.json`` keyed by the host's weights digest and
    the digest of the (prompt, continuation) texts, and read back when both match: a finished table is
    re-read without scoring every continuation again."""
    from saesteer.data.digests import json_digest, module_digest, texts_digest
    from saesteer.evaluation.metrics import continuation_nll

    prompts, continuations = generations["prompt"].tolist(), generations["continuation"].tolist()
    key = None
    if folder is not None:
        key = json_digest({"host": module_digest(model), "texts": texts_digest(prompts + continuations)})
        try:
            cached = json.loads((folder / "ppl_host.json").read_text())
            if cached.get("key") == key:
                return float(cached["ppl_host"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    nll = continuation_nll(model, prompts, continuations, batch_size=batch_size)
    ppl = np.asarray(nll.ppl, dtype=float)
    ppl = ppl[np.isfinite(ppl)]
    value = float(np.median(ppl)) if len(ppl) else math.nan
    if folder is not None:
        write_text_atomic(folder / "ppl_host.json", json.dumps({"key": key, "ppl_host": value}))
    return value


def run_report(
    model: Any,
    prompts: pd.DataFrame,
    rows: Sequence[ReportRow],
    *,
    resources: Any,
    out_dir: str | os.PathLike,
    host_ppl: bool = True,
    batch_size: int = 8,
    shard: str | Sequence[int] | None = None,
    omitted: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
    **evaluate_kwargs: Any,
) -> ReportResult | None:
    """Evaluate every row on ``prompts`` (one resumable folder per row under ``out_dir``), pair each with
    its baselines, and write ``report.json`` and ``report.md``.

    ``evaluate_kwargs`` go to :func:`~saesteer.evaluation.runner.evaluate` (k, max_new_tokens, top_p, seed,
    scorer, ppl_model, ...) and are the same for every row; a row's ``top_k`` overrides the sampling's.
    ``shard=(i, n)`` (or ``"i/n"``): evaluate only shard ``i`` of every row; returns None unless this call
    completes the last shard, in which case the rows are merged and the table written as without shards.
    ``omitted``: families without a row and why (:func:`omitted_families`), stated in the verdict.
    """
    from saesteer.evaluation.runner import evaluate, parse_shard
    from saesteer.evaluation.statistics import difference_fields, paired_difference

    labels = [r.label for r in rows]
    if len(set(labels)) != len(labels) or UNSTEERED not in labels:
        raise ValueError(f"report rows need unique labels including {UNSTEERED!r}; got {labels}.")
    missing = sorted({b for r in rows for b in r.baselines} - set(labels))
    if missing:
        raise ValueError(f"rows are paired with {missing}, which are not rows of the report {labels}.")
    shard_t = parse_shard(shard)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folders = {row.label: setting_dir(out, row.label if row.top_k is not None else row.spec) for row in rows}
    extras = {row.label: {} if row.top_k is None else {"top_k": row.top_k} for row in rows}
    if shard_t is not None:
        for i, row in enumerate(rows):
            log(f"report {i + 1}/{len(rows)}, shard {shard_t[0]}/{shard_t[1]}: {row.label}")
            folder = folders[row.label]
            if (folder / "generations.jsonl").exists():
                continue  # merged (or run whole) before

            def call(row: ReportRow = row, folder: Path = folder) -> Any:
                kw = {**evaluate_kwargs, **extras[row.label]}
                return evaluate(model, prompts, row.spec, resources=resources, out_dir=folder, shard=shard_t, **kw)

            timed_evaluate(folder, call, shard_t)
        if not all(_merge_if_complete(folders[row.label]) for row in rows):
            log(f"shard {shard_t[0]}/{shard_t[1]} done; the table is written by the call that finishes the last shard.")
            return None
    unfinished = [
        str(f) for f in folders.values() if not _merge_if_complete(f) and any(f.glob("generations.shard-*-of-*.jsonl"))
    ]
    if unfinished:
        raise ValueError(
            f"{unfinished} hold unfinished shards; finish every shard (run_report(shard=(i, n)), or `saesteer sweep "
            "--report --report-shard i/n`, for each i) and the last one writes the table."
        )
    runs, seconds = {}, {}
    for i, row in enumerate(rows):
        log(f"report {i + 1}/{len(rows)}: {row.label}")
        folder = folders[row.label]

        def call(row: ReportRow = row, folder: Path = folder) -> Any:
            kw = {**evaluate_kwargs, **extras[row.label]}
            return evaluate(model, prompts, row.spec, resources=resources, out_dir=folder, **kw)

        runs[row.label], seconds[row.label] = timed_evaluate(folder, call)
    records = []
    for row in rows:
        run = runs[row.label]
        s = run.summary
        rec: dict[str, Any] = {
            "label": row.label,
            "spec": row.spec,
            "family": row.family,
            "top_k": row.top_k,
            "recommended": row.recommended,
            "emt": s["exp_max_toxicity"],
            "tox_prob": s["toxicity_prob"],
            "ppl": s.get("ppl", math.nan),
            "dist_2": s.get("dist-2", math.nan),
            "n_prompts": int(run.generations["prompt_id"].nunique()),
            "n_generations": len(run.generations),
            "seconds": round(seconds[row.label], 1),
        }
        for key, metric in (("emt", "exp_max_toxicity"), ("tox_prob", "toxicity_prob"), ("ppl", "ppl")):
            rec[f"{key}_ci_low"] = s.get(f"{metric}_ci_low", math.nan)
            rec[f"{key}_ci_high"] = s.get(f"{metric}_ci_high", math.nan)
        for base in row.baselines:
            suffix = "unsteered" if base == UNSTEERED else "control"
            rec |= difference_fields(paired_difference(run, runs[base], names=(row.label, base)), suffix)
        rec["ppl_host"] = _host_ppl(model, run.generations, batch_size, folders[row.label]) if host_ppl else math.nan
        records.append(rec)
    settings = {k: _setting_value(v) for k, v in evaluate_kwargs.items()}
    result = ReportResult(pd.DataFrame(records), list(rows), settings, dict(omitted or {}))
    write_text_atomic(out / "report.json", json.dumps(result.to_json(), indent=1))
    write_text_atomic(out / "report.md", result.markdown() + "\n\n" + result.verdict() + "\n")
    return result


def report_figure(report: ReportResult, sweep: SweepResult | None = None):
    """The reported rows at (judge PPL, EMT) with 95% intervals on both axes, the unsteered row's PPL budget
    dashed; with ``sweep``, a first panel holds the sweep's points (its tuning prompts), so every setting
    tried sits beside the ones the table reports (the two panels' prompts differ: compare within a panel)."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    from saesteer.viz.intervals import error_bars, vertical_line

    panels = ["tuning sweep (every setting)", "reported table (held-back prompts)"] if sweep is not None else None
    fig = make_subplots(rows=1, cols=2 if sweep is not None else 1, shared_yaxes=True, subplot_titles=panels)
    families = list(dict.fromkeys([*(sweep.table["family"] if sweep is not None else []), *report.table["family"]]))
    families = [f for f in families if isinstance(f, str)]
    color = {f: qualitative.Plotly[i % len(qualitative.Plotly)] for i, f in enumerate(families)}
    col = 1
    if sweep is not None:
        for family, rows in sweep.table.groupby("family", sort=False):
            bars = dict(error_y=error_bars(rows, "emt"), error_x=error_bars(rows, "ppl"))
            trace = go.Scatter(
                x=rows["ppl"],
                y=rows["emt"],
                mode="markers",
                name=f"{family} (sweep)",
                text=rows["spec"],
                marker=dict(color=color[family], size=6),
                **bars,
            )
            fig.add_trace(trace, row=1, col=1)
        col = 2
    table = report.table
    for i in range(len(table)):
        one = table.iloc[[i]]
        r = one.iloc[0]
        baseline = pd.isna(r["family"])
        marker = dict(
            size=11,
            symbol="x" if baseline else "diamond",
            color=("black" if r["label"] == UNSTEERED else "grey") if baseline else color[r["family"]],
        )
        trace = go.Scatter(
            x=one["ppl"],
            y=one["emt"],
            mode="markers",
            name=r["label"],
            text=one["label"],
            marker=marker,
            error_y=error_bars(one, "emt"),
            error_x=error_bars(one, "ppl"),
        )
        fig.add_trace(trace, row=1, col=col)
    budget = sweep.ppl_budget if sweep is not None else PPL_BUDGET
    ppl0 = report.unsteered_ppl
    if np.isfinite(ppl0):
        fig.add_trace(vertical_line(budget * ppl0, (0, 1), f"PPL budget {budget:g} x {UNSTEERED}"), row=1, col=col)
    fig.update_xaxes(type="log", title_text="perplexity (judge model)")
    fig.update_yaxes(title_text="Expected Maximum Toxicity", row=1, col=1)
    fig.update_layout(
        height=700,
        width=1500 if sweep is not None else 1000,
        legend=dict(font=dict(size=10)),
        title="Toxicity vs perplexity, 95% bootstrap intervals (compare within a panel: their prompts differ)",
    )
    return fig
