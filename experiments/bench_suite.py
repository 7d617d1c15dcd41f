"""Timing benchmarks of every steering method and of the offline jobs, as per-token cost ratios in one run.

Rows (each the best of ``--repeats`` runs; sampling with top-p, fixed length, EOS ignored):

- generation at batch 1 and 8: unsteered; each SAE intervention (swap, clamp, weight and the three
  decoder tiers); SASA with 10 and 50 candidates and with all candidates that survive top-p (batch 1
  only, capped at ``--all-cap``: the candidate fork of the KV cache grows as batch x candidates x
  length); the reference-style loop that re-runs the whole prefix at every token
  (``generate(..., use_cache=False)``, batch 1);
- feature scoring (``score_latents`` on the shipped alignment/reference prompts), per 1,000 tokens;
- SASA subspace learning (``learn_subspace`` on Kaggle insults comments), per 1,000 texts.

``x unsteered`` is the row's cost per token divided by unsteered generation's cost per token at the
same batch size (generation rows), or at batch 8 (scoring and subspace rows, which process batches of
8 texts): how many generated tokens one token of that work costs. Peak memory: the highest resident
set size sampled while the row ran (``/proc/self/statm`` every 5 ms), and the process peak
(``resource.getrusage``).

    python experiments/bench_suite.py                         # SmolLM2-135M, the shipped SAE
    python experiments/bench_suite.py --new-tokens 16 --repeats 1 --batches 1

Writes ``figures/bench_suite.json`` and prints a markdown table. The prompts, timer, memory sampler and
steering settings are :mod:`saesteer.benchmark`'s (shared with ``bench_generation.py``); the SAE is
:func:`saesteer.experiment.project_or_random_sae`'s.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from saesteer import experiment
from saesteer.benchmark import (
    PeakRSS,
    batch_prompts,
    best_of,
    fmt,
    machine_meta,
    markdown_table,
    random_subspace,
    steering_settings,
)
from saesteer.data.atomic import write_text_atomic
from saesteer.experiment import Say, logger, project_or_random_sae, seed_everything
from saesteer.generation import Decoder, generate
from saesteer.steering.sasa import Attribute, SASADecoder

REPO = Path(__file__).resolve().parents[1]  # only for the default --out: this repository's figures/
say = logger("bench_suite")


class CandidateCounter(Decoder):
    """Wraps a decoder and records how many candidates survive the sampling filters at each step."""

    def __init__(self, inner: Decoder) -> None:
        self.inner = inner
        self.counts: list[int] = []

    def choose(self, state, logits):
        self.counts.append(int(torch.isfinite(logits).sum(-1).max()))
        return self.inner.choose(state, logits)

    def advance(self, state, chosen):
        return self.inner.advance(state, chosen)


def measure(fn, repeats: int) -> tuple[float, float]:
    """(best seconds of ``repeats`` runs, peak RSS MB while they ran)."""
    with PeakRSS() as peak:
        sec = best_of(fn, repeats)
    return sec, peak.peak_mb


def count_tokens(model, texts, max_length=128) -> int:
    from saesteer.models.tokens import tokenize

    n = 0
    for i in range(0, len(texts), 64):
        _, mask, n_bos = tokenize(model, texts[i : i + 64], side="right", max_length=max_length)
        n += int(mask.sum()) - n_bos * mask.shape[0]
    return n


# ---------------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------------


def run_suite(
    model,
    sae,
    *,
    new_tokens: int = 32,
    batches=(1, 8),
    repeats: int = 2,
    top_p: float = 0.9,
    all_cap: int = 1024,
    subspace_texts: int = 200,
    reference: bool = True,
    sasa_all: bool = True,
    scoring: bool = True,
    subspace: bool = True,
    log: Say = say,
) -> list[dict]:
    """Run every row on ``model``/``sae`` and return one dict per row (see the module docstring)."""
    rows: list[dict] = []
    sub = random_subspace(model)
    kw = dict(max_new_tokens=new_tokens, do_sample=True, top_p=top_p, seed=0, stop_at_eos=False)
    settings = steering_settings(model, sae)
    base: dict[int, float] = {}

    def add(name, batch, unit, n_units, sec, peak, tokens=None, vs_batch=None, **extra):
        per_tok = sec / tokens if tokens else None
        ref = base.get(vs_batch if vs_batch is not None else batch)
        row = dict(
            setting=name,
            batch=batch,
            unit=unit,
            seconds=sec,
            seconds_per_unit=sec / n_units,
            tok_per_s=(tokens / sec) if tokens else None,
            vs_unsteered=(per_tok / ref) if (per_tok and ref) else None,
            peak_rss_mb=peak,
            **extra,
        )
        rows.append(row)
        ratio = f"x{row['vs_unsteered']:.2f}" if row["vs_unsteered"] is not None else ""
        log(
            f"{name:>26} batch {batch}: {sec:8.2f} s  {row['seconds_per_unit']:.4g} s/{unit}  {ratio}  "
            f"peak {peak:.0f} MB"
        )

    for b in batches:
        prompts = batch_prompts(b)
        generate(model, prompts, max_new_tokens=2, do_sample=False)  # warm-up
        n = b * new_tokens
        for name, extra in settings.items():
            sec, peak = measure(lambda: generate(model, prompts, **kw, **extra), repeats)
            if name == "unsteered":
                base[b] = sec / n
            add(name, b, "token", n, sec, peak, tokens=n)
        for cap in (10, 50):
            dec = CandidateCounter(SASADecoder([Attribute(sub, 10.0)], max_candidates=cap))
            sec, peak = measure(lambda: generate(model, prompts, decoder=dec, **kw), repeats)
            add(
                f"sasa-{cap}",
                b,
                "token",
                n,
                sec,
                peak,
                tokens=n,
                mean_candidates=min(cap, sum(dec.counts) / len(dec.counts)),
            )
        if sasa_all and b == 1:
            dec = CandidateCounter(SASADecoder([Attribute(sub, 10.0)], max_candidates=all_cap))
            sec, peak = measure(lambda: generate(model, prompts, decoder=dec, **kw), 1)
            counts = [min(c, all_cap) for c in dec.counts]
            add(
                f"sasa-all (top-p {top_p}, cap {all_cap})",
                b,
                "token",
                n,
                sec,
                peak,
                tokens=n,
                mean_candidates=sum(counts) / len(counts),
                max_candidates=max(dec.counts),
            )
        if reference and b == 1:
            sec, peak = measure(lambda: generate(model, prompts, use_cache=False, **kw), 1)
            add("reference loop (no cache)", b, "token", n, sec, peak, tokens=n)

    vs = 8 if 8 in base else max(base) if base else None
    if scoring:
        from saesteer.sae.alignment import score_latents, target_prompts

        align, ref = target_prompts("non-toxic")
        n_tok = count_tokens(model, align) + count_tokens(model, ref)
        sec, peak = measure(lambda: score_latents(model, sae, align, ref, batch_size=8), 1)
        add(
            "feature scoring (score_latents)",
            8,
            "1k tokens",
            n_tok / 1000,
            sec,
            peak,
            tokens=n_tok,
            vs_batch=vs,
            n_texts=len(align) + len(ref),
        )
    if subspace:
        from saesteer.data.datasets import LabelledTexts, load_insults
        from saesteer.steering.sasa_subspace import learn_subspace

        data = load_insults("train")
        tox = [t for t, y in zip(data.texts, data.labels) if y > 0][: subspace_texts // 2]
        clean = [t for t, y in zip(data.texts, data.labels) if y == 0][: subspace_texts - len(tox)]
        texts = tox + clean
        labelled = LabelledTexts(texts, [1.0] * len(tox) + [0.0] * len(clean), source="insults")
        n_tok = count_tokens(model, texts, max_length=model.cfg.n_ctx)
        sec, peak = measure(lambda: learn_subspace(model, labelled, batch_size=8, progress=False), 1)
        add(
            "subspace learning (learn_subspace)",
            8,
            "1k texts",
            len(texts) / 1000,
            sec,
            peak,
            tokens=n_tok,
            vs_batch=vs,
            n_texts=len(texts),
        )
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table ("-" where a row has no tokens or no unsteered row to compare with)."""
    header = "setting | batch | s per unit | tok/s | × unsteered (per token) | peak RSS MB".split(" | ")
    lines = []
    for r in rows:
        extra = f" ({r['mean_candidates']:.0f} cand.)" if "mean_candidates" in r else ""
        per_unit = f"{r['seconds_per_unit']:.4g} s/{r['unit']}"
        tps, vs = fmt(r["tok_per_s"], ".3g"), fmt(r["vs_unsteered"], ".2f")
        lines.append((r["setting"] + extra, r["batch"], per_unit, tps, vs, f"{r['peak_rss_mb']:.0f}"))
    return markdown_table(header, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    experiment.add_model_sae_arguments(ap)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--all-cap", type=int, default=1024, help="most candidates for the sasa-all row (memory bound)")
    ap.add_argument("--subspace-texts", type=int, default=200)
    ap.add_argument("--skip", default="", help="comma list of: reference,sasa-all,scoring,subspace")
    ap.add_argument("--out", default=str(REPO / "figures" / "bench_suite.json"))
    args = ap.parse_args()
    seed_everything(0, threads=args.threads)
    from saesteer.models.loading import load_model

    t0 = time.time()
    model = load_model(args.model)
    loaded = project_or_random_sae(model, args.sae, model_name=args.model, log=say)
    sae, sae_note = loaded.sae, loaded.note
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    rows = run_suite(
        model,
        sae,
        new_tokens=args.new_tokens,
        batches=[int(x) for x in args.batches.split(",")],
        repeats=args.repeats,
        top_p=args.top_p,
        all_cap=args.all_cap,
        subspace_texts=args.subspace_texts,
        reference="reference" not in skip,
        sasa_all="sasa-all" not in skip,
        scoring="scoring" not in skip,
        subspace="subspace" not in skip,
    )
    meta = dict(
        model=args.model,
        sae=sae_note,
        d_sae=int(sae.cfg.d_sae),
        hook=str(sae.cfg.metadata.hook_name),
        new_tokens=args.new_tokens,
        top_p=args.top_p,
        threads=args.threads,
        device="cpu",
        process_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        wall_seconds=time.time() - t0,
        **machine_meta(t0),
    )
    print(
        f"\nSAE: {sae_note} (d_sae {meta['d_sae']}); process peak RSS {meta['process_peak_rss_mb']:.0f} MB; "
        f"load average {meta['load_average'][0]:.1f} on {meta['cpu_count']} CPUs\n"
    )
    print(markdown(rows))
    out = Path(args.out)
    write_text_atomic(out, json.dumps(dict(meta=meta, results=rows), indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
