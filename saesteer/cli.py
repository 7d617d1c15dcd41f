"""The ``saesteer`` command line: ``saesteer demo``, ``saesteer assets``, ``saesteer evaluate run|merge``."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from saesteer.demo import DemoConfig, print_table, run_demo, write_outputs

    cfg = DemoConfig(
        model=args.model, sae=args.sae, methods=tuple(args.methods.split(",")), beta=args.beta, tier=args.tier,
        alpha=args.alpha, n_latents=args.n_latents, n_prompts=args.n_prompts, prompts_file=args.prompts,
        max_new_tokens=args.max_new_tokens, seed=args.seed, sasa_samples=args.sasa_samples,
        out_dir=args.out_dir, scorer=args.scorer, device=args.device,
    )
    df = run_demo(cfg)
    print_table(df, cfg)
    csv_path, html_path = write_outputs(df, cfg)
    print(f"\nwrote {csv_path} and {html_path} ({df.attrs['seconds']:.0f} s)")
    return 0


def _assets(args: argparse.Namespace) -> int:
    from saesteer.data.assets import ensure_smollm2
    from saesteer.data.datasets import load_insults, load_rtp_prompts

    print(f"model folder: {ensure_smollm2()}")
    print(f"insults comments: {len(load_insults())}")
    print(f"RealToxicityPrompts prompts: {len(load_rtp_prompts())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from saesteer.demo import DemoConfig

    d = DemoConfig()
    p = argparse.ArgumentParser(prog="saesteer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="unsteered vs SASA vs SAE-steered continuations, scored for toxicity")
    demo.add_argument("--model", default=d.model, help="short name, TransformerLens name or HF folder")
    demo.add_argument("--sae", default=None, help="SAELens SAE folder (default: the project's shipped SAE)")
    demo.add_argument("--methods", default=",".join(d.methods), help="comma-separated subset of %(default)s")
    demo.add_argument("--beta", type=float, default=d.beta, help="SASA strength (default %(default)s)")
    demo.add_argument("--tier", default=d.tier, choices=["conditional", "proportional", "constant"])
    demo.add_argument("--alpha", type=float, default=d.alpha, help="decoder-steering strength (default %(default)s)")
    demo.add_argument("--n-latents", type=int, default=d.n_latents, help="toxicity latents to steer")
    demo.add_argument("--n-prompts", type=int, default=d.n_prompts)
    demo.add_argument("--prompts", default=None, help="CSV with a 'prompt' column (default: RealToxicityPrompts)")
    demo.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    demo.add_argument("--seed", type=int, default=d.seed)
    demo.add_argument("--sasa-samples", type=int, default=d.sasa_samples, help="texts to learn the subspace from")
    demo.add_argument("--scorer", default=d.scorer)
    demo.add_argument("--device", default=d.device)
    demo.add_argument("--out-dir", default=d.out_dir)
    demo.set_defaults(func=_demo)

    assets = sub.add_parser("assets", help="fetch the offline model and data into the cache")
    assets.set_defaults(func=_assets)

    ev = sub.add_parser("evaluate", add_help=False,
                        help="RealToxicityPrompts-style evaluation of a method (run, merge shards); --help for more")
    ev.add_argument("rest", nargs=argparse.REMAINDER)
    ev.set_defaults(func=_evaluate)
    return p


def _evaluate(args: argparse.Namespace) -> int:
    from saesteer.evaluation.runner import build_parser as evaluation_parser

    return run_parser(evaluation_parser(prog="saesteer evaluate"), args.rest)


def run_parser(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse ``argv`` and run the chosen sub-command; a ValueError becomes a one-line error and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["evaluate"]:  # its own parser, so that `saesteer evaluate --help` shows its options
        return _evaluate(argparse.Namespace(rest=argv[1:]))
    return run_parser(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
