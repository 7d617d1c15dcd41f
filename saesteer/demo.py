"""``saesteer demo``: unsteered vs SASA vs SAE-steered continuations of challenging prompts, scored.

On the embedded default (SmolLM2-135M-Instruct and the project's own SAE) it learns or loads the SASA
subspace from the Kaggle insults data, finds toxicity latents in the SAE by contrast on the same
data, generates continuations of RealToxicityPrompts prompts with each method from the same seed, and
scores them with the default offline toxicity scorer. Writes ``figures/demo.csv`` and ``demo.html``.
"""

from __future__ import annotations

import html
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from saesteer.data.atomic import save_atomic, write_text_atomic
from saesteer.generation import generate
from saesteer.steering.decoder import DecoderArgs, Tier

METHODS = ("unsteered", "sasa", "sae", "sasa+sae")


@dataclass
class DemoConfig:
    """Everything the demo does, with the defaults of ``saesteer demo``."""

    model: str = "smollm2-135m"
    sae: str | None = None
    methods: tuple[str, ...] = METHODS
    beta: float = 20.0
    """SASA's beta in the demo (the method's default is 0, plain decoding). No SASA setting of the sweep stays
    within the 1.25 x perplexity budget (README, Results): beta 20 is the released notebook's order of
    magnitude, shown for composition, with no measurable effect on the tuning prompts."""
    tier: Tier = "constant"
    alpha: float = 0.05
    """Decoder steering at the sweep's choice for the ``constant`` tier (its least toxic setting within the
    PPL budget), which lowers EMT on the 260 held-back prompts of the reported table (README, Results)."""
    n_latents: int = DecoderArgs.n_latents
    n_prompts: int = 8
    prompts_file: str | None = None
    max_new_tokens: int = 24
    seed: int = 0
    sasa_samples: int = 1000
    contrast_samples: int = 400
    out_dir: str = "."
    scorer: str = "default"
    device: str = "cpu"
    top_p: float = 0.9
    temperature: float = 1.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}; unknown: {sorted(unknown)}.")
        for name in ("n_latents", "n_prompts", "max_new_tokens", "sasa_samples", "contrast_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and (name, v) != ("sasa_samples", -1)):
                raise ValueError(
                    f"{name} must be a positive integer{' (or -1: all)' * (name == 'sasa_samples')}; got {v!r}."
                )
        if self.prompts_file is not None and not Path(self.prompts_file).is_file():
            raise ValueError(f"prompts file {self.prompts_file!r} does not exist; pass a CSV with a 'prompt' column.")
        method_specs(self)  # strengths and tiers checked now, before any model loads


def say(msg: str) -> None:
    print(f"[saesteer demo] {msg}", file=sys.stderr, flush=True)


def demo_prompts(cfg: DemoConfig) -> list[str]:
    if cfg.prompts_file:  # validated and named on error (binary, empty, header-only, no prompt column)
        from saesteer.evaluation.prompt_sets import load_prompts

        return load_prompts(cfg.prompts_file)["prompt"].tolist()[: cfg.n_prompts]
    from saesteer.data.datasets import load_rtp_prompts

    prompts = load_rtp_prompts()
    rng = np.random.default_rng(cfg.seed)
    return [prompts[i] for i in rng.choice(len(prompts), size=min(cfg.n_prompts, len(prompts)), replace=False)]


def method_specs(cfg: DemoConfig) -> dict[str, str]:
    """The canonical :mod:`saesteer.steering.registry` spec of each demo method ("sae" is decoder-vector
    steering), built with :func:`~saesteer.steering.registry.method_spec` (which checks every value)."""
    from saesteer.steering.registry import method_spec

    sasa = method_spec("sasa", beta=cfg.beta)
    sae = method_spec("decoder", tier=cfg.tier, alpha=cfg.alpha, n_latents=cfg.n_latents)
    specs = {"unsteered": method_spec("unsteered"), "sasa": sasa, "sae": sae, "sasa+sae": sasa + sae}
    return {m: str(specs[m]) for m in cfg.methods}


def run_demo(cfg: DemoConfig) -> pd.DataFrame:
    """Run the demo and return one row per (prompt, method)."""
    from saesteer.data.assets import cache_dir
    from saesteer.data.datasets import load_insults
    from saesteer.evaluation.scorers import get_scorer
    from saesteer.models.loading import load_model
    from saesteer.sae.loading import load_sae
    from saesteer.sae.registry import default_project_sae
    from saesteer.steering.registry import build_method, get_method, parse_method, prepare_resources

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    say(f"loading {cfg.model} ...")
    prompts = demo_prompts(cfg)  # read (and checked) before the model loads
    model = load_model(cfg.model, device=cfg.device)
    specs = method_specs(cfg)
    needs_sae = any("sae" in get_method(c).needs for s in specs.values() for c in parse_method(s).components)
    sae = None
    if needs_sae:
        sae_name = cfg.sae or default_project_sae(cfg.model).name
        sae = load_sae(sae_name, model=model, device=cfg.device)
    resources = prepare_resources(
        model,
        list(specs.values()),
        sae=sae,
        sae_name=Path(sae_name).name if sae is not None else None,
        model_name=cfg.model,
        data=load_insults("train"),
        sasa_samples=cfg.sasa_samples,
        contrast_samples=cfg.contrast_samples,
        seed=cfg.seed,
        cache=cache_dir() / "demo",
        log=say,
    )
    runs = {m: build_method(spec, resources) for m, spec in specs.items()}
    steered = next((r.record["decoder_latents"] for r in runs.values() if "decoder_latents" in r.record), None)
    if steered is not None:
        diff = resources.contrast_table.set_index("latent")["diff"]
        say("toxicity latents steered: " + ", ".join(f"{i} (diff {diff[i]:.2f})" for i in steered))

    rows = []
    for method in cfg.methods:
        say(f"generating: {method} ({len(prompts)} prompts)")
        out = generate(
            model,
            prompts,
            steerers=runs[method].steerers,
            decoder=runs[method].decoder,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=True,
            seed=cfg.seed,
            top_p=cfg.top_p,
            temperature=cfg.temperature,
        )
        rows += [dict(prompt=p, method=method, continuation=c) for p, c in zip(prompts, out.texts)]
    df = pd.DataFrame(rows)
    say(f"scoring with the {cfg.scorer!r} toxicity scorer")
    df["toxicity"] = get_scorer(cfg.scorer).score(df["continuation"].tolist())
    df.attrs["seconds"] = time.time() - t0
    return df


def write_outputs(df: pd.DataFrame, cfg: DemoConfig) -> tuple[Path, Path]:
    """figures/demo.csv and figures/demo.html, each written to a temp file and renamed."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, html_path = out / "demo.csv", out / "demo.html"
    save_atomic(csv_path, lambda tmp: df.to_csv(tmp, index=False))
    wide = df.pivot(index="prompt", columns="method", values=["continuation", "toxicity"])
    methods = [m for m in cfg.methods]
    cells = []
    for prompt in wide.index:
        tds = "".join(
            f"<td><span class='tox' style='background:rgba(220,50,47,{wide.loc[prompt, ('toxicity', m)]:.2f})'>"
            f"{wide.loc[prompt, ('toxicity', m)]:.2f}</span> {html.escape(wide.loc[prompt, ('continuation', m)])}</td>"
            for m in methods
        )
        cells.append(f"<tr><td class='prompt'>{html.escape(prompt)}</td>{tds}</tr>")
    means = df.groupby("method")["toxicity"].mean()
    summary = "".join(f"<th>{m}<br><small>mean toxicity {means[m]:.3f}</small></th>" for m in methods)
    page = (
        "<!doctype html><meta charset='utf-8'><title>saesteer demo</title><style>"
        "body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:.4em;vertical-align:top}"
        "table{border-collapse:collapse}.prompt{font-style:italic;max-width:20em}.tox{padding:0 .3em}</style>"
        f"<h1>saesteer demo: {html.escape(cfg.model)}</h1><p>seed {cfg.seed}, beta {cfg.beta}, "
        f"tier {cfg.tier} alpha {cfg.alpha}, scorer {html.escape(cfg.scorer)}</p>"
        f"<table><tr><th>prompt</th>{summary}</tr>{''.join(cells)}</table>"
    )
    write_text_atomic(html_path, page)
    return csv_path, html_path


def print_table(df: pd.DataFrame, cfg: DemoConfig) -> None:
    for prompt, group in df.groupby("prompt", sort=False):
        print(f"\nPROMPT: {prompt}")
        for r in group.itertuples():
            print(f"  {r.method:>10}  [{r.toxicity:.2f}]  {r.continuation.strip()!r}")
    print("\nmean toxicity per method:")
    print(df.groupby("method", sort=False)["toxicity"].agg(["mean", "max"]).round(3).to_string())
