"""``"profanity-check"``: ``alt-profanity-check`` (a linear SVM on bag of words); very fast, weaker.

On the 6,594 Kaggle insults comments (``experiments/bench_scorers.py``) its ROC AUC is 0.820, against 0.865
for the tox-block BiLSTM (:mod:`saesteer.evaluation.scorers.bilstm`).
"""

from __future__ import annotations

import numpy as np

from saesteer.evaluation.scorers.base import _check_batch_size, _Scorer
from saesteer.evaluation.scorers.registry import register_scorer

__all__ = ["ProfanityCheckScorer"]


class ProfanityCheckScorer(_Scorer):
    """``profanity_check.predict_prob``: the probability of profanity from alt-profanity-check's linear SVM
    (calibrated) on a bag of words. Fast (~50k texts/s) but it sees words, not meaning."""

    name = "profanity-check"

    def __init__(self, batch_size: int = 4096) -> None:
        self.batch_size = _check_batch_size(batch_size)
        from profanity_check import predict_prob

        self._predict_prob = predict_prob

    def _score_batch(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self._predict_prob(texts), dtype=np.float64)


register_scorer("profanity-check", ProfanityCheckScorer, aliases=("profanity_check",))
