"""One cached decoding step, ours against Hugging Face's, alone: the model forward of one new token per row over
a KV cache of ``--positions`` positions, without the generation loop around it (no sampling, no stopping checks),
so that what it measures is the forward: TransformerLens with saesteer's fixes and preallocated cache against
``AutoModelForCausalLM`` with its ``DynamicCache``, the same SmolLM2 weights, fp32 CPU. Ours twice: with
TransformerLens' attention bit for bit (``attn_implementation="eager"``, the default) and with one
``scaled_dot_product_attention`` call as HF's (``"sdpa"``: :func:`saesteer.models.fused_block.set_attn_implementation`).

Both caches hold the same prompt (random token ids, every position attended); ours is frozen (each step writes
the same next position), HF's is cropped back after each step, so every step does the same work. The forwards
(eager, HF, sdpa) take turns ``--pairs`` times; each ratio is the median of the per-turn ratios (ours / HF), with
its distribution-free interval (:func:`saesteer.benchmark.median_interval`), and each side's best and median time.

Then, for each ``--candidates`` count C, the forward of C new positions per row (the shape of SASA's candidate
forward, where every candidate is a row of every product; here plainly causal), ours (eager, sdpa) and HF's, each
against :func:`saesteer.benchmark.matmul_products` (the matrix products of b * C rows alone, SASA's "floor"),
taking turns ``--candidate-turns`` times: what a forward of those rows costs above its products in any
implementation, the reference for SASA's ratio to that floor in ``bench_peers.py``.

    python experiments/bench_step.py                     # writes figures/bench_step.json
    # the same forward of another checkout's saesteer (e.g. before a change), this script unchanged:
    git worktree add /tmp/step-before <commit> && \\
        PYTHONPATH=/tmp/step-before python experiments/bench_step.py --out figures/bench_step_before.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import saesteer
from saesteer import benchmark as bench
from saesteer import experiment
from saesteer.data.atomic import write_text_atomic
from saesteer.experiment import seed_everything

REPO = Path(__file__).resolve().parents[1]


def ours_step(model, rows: int, positions: int, gen: torch.Generator, new_positions: int = 1):
    """A function running one cached forward of ``new_positions`` new tokens per row through ``model`` (a frozen
    preallocated cache: the same work at every call) and returning its last-position logits (the only position
    unembedded, as HF's ``logits_to_keep=1``)."""
    from saesteer.models.kv_cache import PreallocatedKVCache

    tokens = torch.randint(100, 1000, (rows, positions), generator=gen)
    new = torch.randint(100, 1000, (rows, new_positions), generator=gen)
    cache = PreallocatedKVCache.allocate(model.cfg, rows, positions + new_positions)
    model(tokens, attention_mask=torch.ones_like(tokens), past_kv_cache=cache)
    cache.frozen = True
    for entry in cache.entries:
        entry.frozen = True
    one = torch.ones_like(new)
    if new_positions == 1:
        return lambda: model(new, attention_mask=one, past_kv_cache=cache)[:, -1]

    def step():
        resid = model(new, attention_mask=one, past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)
        return model.unembed(model.ln_final(resid[:, -1:]))[:, -1]

    return step


def hf_step(hf, rows: int, positions: int, gen: torch.Generator, new_positions: int = 1):
    """The same for a Hugging Face model (its ``DynamicCache`` cropped back after each step)."""
    from transformers import DynamicCache

    tokens = torch.randint(100, 1000, (rows, positions), generator=gen)
    new = torch.randint(100, 1000, (rows, new_positions), generator=gen)
    cache = DynamicCache()
    hf(tokens, attention_mask=torch.ones_like(tokens), past_key_values=cache, use_cache=True)
    mask = torch.ones(rows, positions + new_positions, dtype=torch.long)

    def step():
        out = hf(new, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.crop(-new_positions)
        return out.logits[:, -1]

    return step


def take_turns(fns: dict[str, Callable[[], object]], turns: int) -> dict[str, list[float]]:
    """Each function's wall times over ``turns`` rounds in which every function runs once, in order (after two
    warm-up rounds)."""
    for fn in [*fns.values()] * 2:
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(turns):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def paired_row(times: dict[str, list[float]], name: str, base: str) -> dict:
    """``name``'s times against ``base``'s, turn by turn: medians, bests, the median ratio and its interval."""
    ratios = [a / b for a, b in zip(times[name], times[base])]
    low, high, coverage = bench.median_interval(ratios)
    return dict(
        ours_best_ms=min(times[name]) * 1e3,
        ours_median_ms=statistics.median(times[name]) * 1e3,
        base_best_ms=min(times[base]) * 1e3,
        base_median_ms=statistics.median(times[base]) * 1e3,
        ratio_median=statistics.median(ratios),
        ratio_low=low,
        ratio_high=high,
        ratio_coverage=coverage,
        ratio_best=min(times[name]) / min(times[base]),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=experiment.DEFAULT_MODEL, help="short name or Hugging Face folder")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--positions", type=int, default=40, help="positions in the cache before the step")
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--candidates",
        default="10,50",
        help="also a forward of this many new positions per row (SASA's candidate forward's shape: every candidate "
        "a row of products), ours and HF's against the matrix products alone ('' for none)",
    )
    ap.add_argument("--candidate-turns", type=int, default=12)
    ap.add_argument("--out", default=str(REPO / "figures" / "bench_step.json"))
    args = ap.parse_args()
    started = time.time()
    seed_everything(0, threads=args.threads)
    from transformers import AutoModelForCausalLM

    from saesteer.models.loading import load_model

    models = {"eager": load_model(args.model)}
    try:
        models["sdpa"] = load_model(args.model, attn_implementation="sdpa")
    except TypeError:  # an older saesteer on PYTHONPATH (see above)
        print("this saesteer has no attn_implementation: eager only")
    hf = AutoModelForCausalLM.from_pretrained(bench.hf_folder(args.model), dtype=models["eager"].cfg.dtype).eval()
    results, candidate_results = [], []
    batches = [int(b) for b in args.batches.split(",")]
    with torch.no_grad():
        for rows in batches:
            steps = {}
            for name in ("eager", "hf", *models.keys() - {"eager"}):  # the same prompt and token for each
                gen = torch.Generator().manual_seed(rows)
                steps[name] = (
                    hf_step(hf, rows, args.positions, gen)
                    if name == "hf"
                    else ours_step(models[name], rows, args.positions, gen)
                )
            times = take_turns(steps, args.pairs)
            for impl in models:
                row = dict(batch=rows, attn_implementation=impl, **paired_row(times, impl, "hf"))
                results.append(row)
                print(
                    f"batch {rows} {impl}: ours {row['ours_median_ms']:.1f} ms, HF {row['base_median_ms']:.1f} ms "
                    f"(medians); ours / HF {row['ratio_median']:.3f} [{row['ratio_low']:.3f}, "
                    f"{row['ratio_high']:.3f}] (paired median, {row['ratio_coverage']:.0%} interval), best / best "
                    f"{row['ratio_best']:.3f}",
                    flush=True,
                )
        for rows, c in ((rows, int(c)) for rows in batches for c in args.candidates.split(",") if c):
            steps = {}
            for name in (*models, "hf"):
                gen = torch.Generator().manual_seed(rows)
                steps[name] = (
                    hf_step(hf, rows, args.positions, gen, c)
                    if name == "hf"
                    else ours_step(models[name], rows, args.positions, gen, c)
                )
            steps["products"] = bench.matmul_products(models["eager"], rows * c, rows)
            times = take_turns(steps, args.candidate_turns)
            for name in (*models, "hf"):
                row = dict(batch=rows, new_positions=c, forward=name, **paired_row(times, name, "products"))
                candidate_results.append(row)
                print(
                    f"batch {rows} x {c} new positions, {name}: {row['ours_median_ms']:.0f} ms, x{row['ratio_median']:.3f} "
                    f"[{row['ratio_low']:.3f}, {row['ratio_high']:.3f}] the matrix products alone "
                    f"({row['base_median_ms']:.0f} ms; paired median, {row['ratio_coverage']:.0%} interval)",
                    flush=True,
                )
    meta = dict(
        model=args.model,
        positions=args.positions,
        pairs=args.pairs,
        candidate_turns=args.candidate_turns,
        threads=args.threads,
        saesteer=str(Path(saesteer.__file__).resolve().parent),
        **bench.machine_meta(started),
    )
    out = dict(meta=meta, results=results, candidate_results=candidate_results)
    write_text_atomic(Path(args.out), json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
