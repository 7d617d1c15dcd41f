"""``"detoxify"``: the Detoxify transformer models (optional dependency; downloads its weights on first use,
so it needs the network)."""

from __future__ import annotations

import numpy as np

from saesteer.evaluation.scorers.base import _check_batch_size, _Scorer
from saesteer.evaluation.scorers.registry import register_scorer

__all__ = ["DetoxifyScorer"]


class DetoxifyScorer(_Scorer):
    """Detoxify (Hanu & Unitary; ``pip install detoxify``): the ``label`` output of its transformer model.

    ``model_type`` is ``"original"`` (BERT, Jigsaw 2018), ``"unbiased"`` (RoBERTa, Jigsaw 2019) or
    ``"multilingual"`` (XLM-R). Detoxify downloads its checkpoint on first use, so it needs the network.
    """

    def __init__(
        self, model_type: str = "original", label: str = "toxicity", batch_size: int = 32, device: str = "cpu"
    ) -> None:
        try:
            from detoxify import Detoxify
        except ImportError as exc:
            raise ImportError("DetoxifyScorer needs the detoxify package: pip install detoxify") from exc
        self.batch_size = _check_batch_size(batch_size)
        self.label = label
        self.name = f"detoxify-{model_type}" if label == "toxicity" else f"detoxify-{model_type}:{label}"
        try:
            self._model = Detoxify(model_type, device=device)
        except Exception as exc:  # network, hub or checkpoint errors
            raise RuntimeError(
                f"Detoxify({model_type!r}) could not load its checkpoint ({type(exc).__name__}: {exc}); it downloads "
                "the weights on first use, so run once with network access, or use get_scorer('default') offline."
            ) from exc

    def _score_batch(self, texts: list[str]) -> np.ndarray:
        out = self._model.predict(texts)
        if self.label not in out:
            raise ValueError(f"Detoxify has no label {self.label!r}; pick one of {sorted(out)}.")
        return np.asarray(out[self.label], dtype=np.float64).reshape(-1)


register_scorer("detoxify", DetoxifyScorer)
