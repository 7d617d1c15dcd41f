"""What every toxicity scorer is: the :class:`ToxicityScorer` protocol, its input and output checks, and the
shared batching ``score()``.

A scorer maps a list of texts to a toxicity in [0, 1], one float per text, in batches. Every scorer raises
ValueError for entries that are not ``str`` (:func:`check_texts`), returns an empty array for an empty list,
and raises ValueError if it produces NaN or a value outside [0, 1] (:func:`check_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["ToxicityScorer", "check_texts", "check_scores"]


@runtime_checkable
class ToxicityScorer(Protocol):
    """Anything with a ``name`` and a ``score(texts)`` returning one toxicity in [0, 1] per text."""

    name: str

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Return a float64 array of shape ``(len(texts),)`` with values in [0, 1]."""
        ...


def check_texts(texts: Sequence[str]) -> list[str]:
    """Return ``texts`` as a list, or raise ValueError if it is a bare string or holds a non-``str`` entry.

    An empty sequence is fine (scorers return an empty array for it).
    """
    if isinstance(texts, (str, bytes)):
        raise ValueError("score() takes a list of texts, not a single string; wrap it: score([text]).")
    try:
        out = list(texts)
    except TypeError:
        raise ValueError(f"score() takes a list of str; got {type(texts).__name__}.") from None
    bad = [i for i, t in enumerate(out) if not isinstance(t, str)]
    if bad:
        i = bad[0]
        raise ValueError(
            f"every text must be a str; texts[{i}] is {type(out[i]).__name__} ({out[i]!r:.60}) and {len(bad) - 1} "
            "more are not. Drop None/NaN entries or convert them with str() first."
        )
    return out


def check_scores(scores: Any, n: int, name: str) -> np.ndarray:
    """Return ``scores`` as a float64 array of shape ``(n,)``.

    Raises ValueError on a wrong shape, a NaN or infinite value, or a value outside [0, 1].
    """
    arr = np.asarray(scores, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(
            f"scorer {name!r} returned shape {arr.shape} for {n} texts; a scorer must return shape ({n},)."
        )
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(
            f"scorer {name!r} returned NaN/inf for texts at {bad[:5].tolist()}; check those texts and the scorer's "
            "model files (delete the cached files under $SAESTEER_HOME to fetch them again)."
        )
    out = np.flatnonzero((arr < 0) | (arr > 1))
    if out.size:
        raise ValueError(
            f"scorer {name!r} returned values outside [0, 1] (e.g. {arr[out[0]]!r} at {int(out[0])}); a toxicity "
            "scorer must return probabilities."
        )
    return arr


class _Scorer:
    """Shared ``score()``: validate texts, score them in batches of ``batch_size``, validate the scores."""

    name: str = "scorer"
    batch_size: int = 1024

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Toxicity in [0, 1] of each text (float64 array of shape ``(len(texts),)``)."""
        items = check_texts(texts)
        if not items:
            return np.zeros(0, dtype=np.float64)
        step = self.batch_size
        parts = [
            np.asarray(self._score_batch(items[i : i + step]), dtype=np.float64).reshape(-1)
            for i in range(0, len(items), step)
        ]
        return check_scores(np.concatenate(parts), len(items), self.name)

    def _score_batch(self, texts: list[str]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    return batch_size
