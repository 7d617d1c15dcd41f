"""One cached decoding step, ours against Hugging Face's, alone: the model forward of one new token per row over
a KV cache of ``--positions`` positions, without the generation loop around it (no sampling, no stopping checks),
so that what it measures is the forward: TransformerLens with saesteer's fixes and preallocated cache against
``AutoModelForCausalLM`` with its ``DynamicCache``, the same SmolLM2 weights, fp32 CPU. Ours twice: with
TransformerLens' attention bit for bit (``attn_implementation="eager"``, the default) and with one
``scaled_dot_product_attention`` call as HF's (``"sdpa"``: :func:`saesteer.models.fused_block.set_attn_implementation`).

Both caches hold the same prompt (random token ids, every position attended); ours is frozen (each step writes
the same next position), HF's is cropped back after each step, so every step does the same work. The two
forwards (eager, HF, sdpa) take turns ``--pairs`` times; each ratio is the median of the per-turn ratios (ours / HF), with its
distribution-free 95% interval (:func:`saesteer.benchmark.median_interval`), and each side's best and median time.

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
from pathlib import Path

import torch

import saesteer
from saesteer import benchmark as bench
from saesteer import experiment
from saesteer.data.atomic import write_text_atomic
from saesteer.experiment import seed_everything

REPO = Path(__file__).resolve().parents[1]


def ours_step(model, rows: int, positions: int, gen: torch.Generator):
    """A function running one cached one-token forward of ``model`` (a frozen preallocated cache: the same work
    at every call) and returning its last-position logits."""
    from saesteer.models.kv_cache import PreallocatedKVCache

    tokens = torch.randint(100, 1000, (rows, positions), generator=gen)
    new = torch.randint(100, 1000, (rows, 1), generator=gen)
    cache = PreallocatedKVCache.allocate(model.cfg, rows, positions + 1)
    model(tokens, attention_mask=torch.ones_like(tokens), past_kv_cache=cache)
    cache.frozen = True
    for entry in cache.entries:
        entry.frozen = True
    one = torch.ones_like(new)
    return lambda: model(new, attention_mask=one, past_kv_cache=cache)[:, -1]


def hf_step(hf, rows: int, positions: int, gen: torch.Generator):
    """The same for a Hugging Face model (its ``DynamicCache`` cropped back after each step)."""
    from transformers import DynamicCache

    tokens = torch.randint(100, 1000, (rows, positions), generator=gen)
    new = torch.randint(100, 1000, (rows, 1), generator=gen)
    cache = DynamicCache()
    hf(tokens, attention_mask=torch.ones_like(tokens), past_key_values=cache, use_cache=True)
    mask = torch.ones(rows, positions + 1, dtype=torch.long)

    def step():
        out = hf(new, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.crop(-1)
        return out.logits[:, -1]

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=experiment.DEFAULT_MODEL, help="short name or Hugging Face folder")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--positions", type=int, default=40, help="positions in the cache before the step")
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "figures" / "bench_step.json"))
    args = ap.parse_args()
    started = time.time()
    seed_everything(0, threads=args.threads)
    from transformers import AutoModelForCausalLM

    from saesteer.models.loading import load_model

    models = {impl: load_model(args.model, attn_implementation=impl) for impl in ("eager", "sdpa")}
    hf = AutoModelForCausalLM.from_pretrained(bench.hf_folder(args.model), dtype=models["eager"].cfg.dtype).eval()
    results = []
    with torch.no_grad():
        for rows in (int(b) for b in args.batches.split(",")):
            steps = {}
            for name in ("eager", "hf", "sdpa"):  # the same prompt and token for each
                gen = torch.Generator().manual_seed(rows)
                steps[name] = (
                    hf_step(hf, rows, args.positions, gen)
                    if name == "hf"
                    else ours_step(models[name], rows, args.positions, gen)
                )
            for fn in [*steps.values()] * 2:  # warm-up
                fn()
            times: dict[str, list[float]] = {name: [] for name in steps}
            for _ in range(args.pairs):
                for name, fn in steps.items():
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
            for impl in ("eager", "sdpa"):
                ratios = [a / b for a, b in zip(times[impl], times["hf"])]
                low, high, coverage = bench.median_interval(ratios)
                row = dict(
                    batch=rows,
                    attn_implementation=impl,
                    ours_best_ms=min(times[impl]) * 1e3,
                    ours_median_ms=statistics.median(times[impl]) * 1e3,
                    hf_best_ms=min(times["hf"]) * 1e3,
                    hf_median_ms=statistics.median(times["hf"]) * 1e3,
                    ratio_median=statistics.median(ratios),
                    ratio_low=low,
                    ratio_high=high,
                    ratio_coverage=coverage,
                    ratio_best=min(times[impl]) / min(times["hf"]),
                )
                results.append(row)
                print(
                    f"batch {rows} {impl}: ours {row['ours_median_ms']:.1f} ms, HF {row['hf_median_ms']:.1f} ms "
                    f"(medians); ours / HF {row['ratio_median']:.3f} [{low:.3f}, {high:.3f}] (paired median, "
                    f"{coverage:.0%} interval), best / best {row['ratio_best']:.3f}",
                    flush=True,
                )
    meta = dict(
        model=args.model,
        positions=args.positions,
        pairs=args.pairs,
        threads=args.threads,
        saesteer=str(Path(saesteer.__file__).resolve().parent),
        **bench.machine_meta(started),
    )
    write_text_atomic(Path(args.out), json.dumps(dict(meta=meta, results=results), indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
