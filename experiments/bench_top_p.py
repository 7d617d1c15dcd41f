"""Nucleus (top-p) filtering: the value sort of :func:`saesteer.generation.top_p_filter` against Hugging Face's
index sort (the same bits, checked here too), on real next-token logits of the model.

The logits are the last position's of ``--rows`` prompts (the prompts of :func:`saesteer.benchmark.batch_prompts`),
the time is this process' CPU seconds, best of ``--repeats`` calls, 1 thread.

    python experiments/bench_top_p.py              # writes figures/bench_top_p.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from saesteer import benchmark as bench
from saesteer import experiment
from saesteer.data.atomic import write_text_atomic
from saesteer.experiment import seed_everything

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=experiment.DEFAULT_MODEL, help="short name or Hugging Face folder")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(REPO / "figures" / "bench_top_p.json"))
    args = ap.parse_args()
    started = time.time()
    seed_everything(0, threads=1)
    from saesteer.generation import _top_p_by_index, last_logits, top_p_filter
    from saesteer.models.loading import load_model
    from saesteer.models.tokens import tokenize

    model = load_model(args.model)
    tokens, mask, _ = tokenize(model, bench.batch_prompts(args.rows), side="left")
    logits = last_logits(model, tokens, mask, None).float()
    same = torch.equal(top_p_filter(logits, args.top_p), _top_p_by_index(logits, args.top_p))
    index_s = bench.best_of(lambda: _top_p_by_index(logits, args.top_p), args.repeats, "cpu")
    value_s = bench.best_of(lambda: top_p_filter(logits, args.top_p), args.repeats, "cpu")
    result = dict(
        rows=args.rows,
        vocab=logits.shape[-1],
        top_p=args.top_p,
        index_sort_ms=index_s * 1e3,
        value_sort_ms=value_s * 1e3,
        ratio=index_s / value_s,
        bit_identical=same,
    )
    print(
        f"{args.rows} rows x {logits.shape[-1]} logits, top-p {args.top_p}: index sort {index_s * 1e3:.1f} ms, "
        f"value sort {value_s * 1e3:.1f} ms (x{index_s / value_s:.1f}); identical: {same}"
    )
    meta = dict(model=args.model, repeats=args.repeats, **bench.machine_meta(started))
    write_text_atomic(Path(args.out), json.dumps(dict(meta=meta, result=result), indent=2))


if __name__ == "__main__":
    main()
