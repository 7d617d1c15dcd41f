"""Time every offline toxicity scorer on 10,000 texts, and check how well each separates insults.

Texts: English sentences sampled from ``saesteer.data.datasets.english_corpus()`` (``--english`` files or
folders; by default ``$SAESTEER_TEXT_DATA``, else the corpus saesteer fetches once) mixed with
the Kaggle insults comments (``saesteer.data.datasets.load_insults``; skipped if it cannot be fetched),
shuffled with a fixed seed. For each scorer: load time, scoring time for all texts, texts/s, and, when
the insults set is available, ROC AUC of the score against the insult labels (all 6,594 comments).

    .venv/bin/python experiments/bench_scorers.py            # 10,000 texts, all offline scorers
    .venv/bin/python experiments/bench_scorers.py --n 2000 --scorers default profanity-check

Target: the default scorer scores 10,000 texts in <= 10 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from saesteer.data.datasets import english_corpus
from saesteer.evaluation.scorers import get_scorer
from saesteer.experiment import logger, seed_everything

OFFLINE = ["default", "toxic-comment-classifier", "profanity-check"]
say = logger("bench_scorers")


def english_sentences(paths: list[str] | None, n: int, seed: int) -> list[str]:
    """``n`` sentences sampled without replacement from ``english_corpus(paths)`` (None: its default corpus)."""
    lines = list(english_corpus(paths or None))
    if len(lines) < n:
        raise ValueError(
            f"the English corpus has {len(lines)} sentences, fewer than the {n} requested; "
            f"pass --n {len(lines)} or more text with --english."
        )
    return random.Random(seed).sample(lines, n)


def insults() -> tuple[list[str], np.ndarray] | None:
    """The Kaggle insults comments and 0/1 labels, or None if they cannot be loaded."""
    try:
        from saesteer.data.datasets import load_insults

        data = load_insults("all")
    except Exception as exc:  # no registry access, or the loader is missing
        say(f"insults comments unavailable ({type(exc).__name__}: {exc}); using English sentences only")
        return None
    return list(data.texts), np.asarray(data.labels)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (probability a random positive outscores a random negative, ties count half)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    pos = labels > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="texts to score (default 10,000)")
    parser.add_argument("--insult-share", type=float, default=0.3, help="share of the texts taken from insults")
    parser.add_argument(
        "--english",
        action="append",
        default=[],
        help="text file or folder of *.txt, one sentence a "
        "line (repeatable; default: english_corpus()'s: $SAESTEER_TEXT_DATA, else the fetched corpus)",
    )
    parser.add_argument("--scorers", nargs="+", default=OFFLINE, help=f"scorer names (default {OFFLINE})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    seed_everything(args.seed, threads=args.threads)

    labelled = insults()
    n_ins = min(int(args.n * args.insult_share), len(labelled[0])) if labelled else 0
    texts = english_sentences(args.english, args.n - n_ins, args.seed)
    if n_ins:
        texts += random.Random(args.seed).sample(labelled[0], n_ins)
    random.Random(args.seed + 1).shuffle(texts)
    words = sum(len(t.split()) for t in texts)
    print(
        f"{len(texts)} texts ({n_ins} insults comments), {words / len(texts):.1f} words on average; "
        f"torch threads: {torch.get_num_threads()}"
    )
    print(f"{'scorer':28s} {'load s':>7s} {'score s':>8s} {'texts/s':>9s} {'insults AUC':>12s}")
    for name in args.scorers:
        start = time.perf_counter()
        scorer = get_scorer(name)
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        scores = scorer.score(texts)
        took = time.perf_counter() - start
        auc = f"{roc_auc(labelled[1], scorer.score(labelled[0])):.4f}" if labelled else "-"
        print(
            f"{scorer.name:28s} {loaded:7.2f} {took:8.2f} {len(texts) / took:9.0f} {auc:>12s}"
            f"   (mean score {scores.mean():.3f}, share > 0.5: {(scores > 0.5).mean():.3f})"
        )


if __name__ == "__main__":
    main()
