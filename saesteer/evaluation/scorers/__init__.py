"""Toxicity scorers: each maps a list of texts to a toxicity in [0, 1], one float per text, in batches.

This is how RealToxicityPrompts and SASA evaluate a generation: every continuation gets a toxicity
score, then expected maximum toxicity and toxicity probability are computed over the samples.

Scorers (names for :func:`get_scorer`), one module per family:

- ``"default"`` = ``"tox-block"`` and ``"toxic-comment-classifier"`` (:mod:`.bilstm`): the Jigsaw-trained
  bidirectional LSTMs published as Keras weights on PyPI, run in torch (no TensorFlow); tox-block's
  outputs equal the real Keras model's to about 1e-7. The default.
- ``"profanity-check"`` (:mod:`.profanity`): ``alt-profanity-check`` (a linear SVM on bag of words); very
  fast, weaker.
- ``"detoxify"`` (:mod:`.detoxify`): the Detoxify transformer models (optional dependency; downloads its
  weights on first use, so it needs the network).
- ``"perspective"`` (:mod:`.perspective`): Google's Perspective API (needs ``PERSPECTIVE_API_KEY`` and the
  network); rate-limited, retried, and cached on disk so no text is ever sent twice.

Your own scorer: :func:`register_scorer` (:mod:`.registry`) makes ``get_scorer(name)`` and
``evaluate(..., scorer=name)`` build it.

Every scorer raises ValueError for entries that are not ``str``, returns an empty array for an empty
list, and raises ValueError if it produces NaN or a value outside [0, 1] (:mod:`.base`).
"""

# ruff: noqa: I001 - the family modules register their scorers on import, in the order of scorer_names()
from saesteer.evaluation.scorers.base import ToxicityScorer, check_scores, check_texts

# Importing a family module registers its scorers; this order is the order of scorer_names().
from saesteer.evaluation.scorers.bilstm import (
    BILSTM_VARIANTS,
    JIGSAW_LABELS,
    KERAS_DEFAULT_FILTERS,
    BiLSTMWeights,
    JigsawBiLSTMScorer,
    KerasTokenizer,
    load_bilstm_weights,
)
from saesteer.evaluation.scorers.profanity import ProfanityCheckScorer
from saesteer.evaluation.scorers.detoxify import DetoxifyScorer
from saesteer.evaluation.scorers.perspective import PERSPECTIVE_URL, PerspectiveScorer
from saesteer.evaluation.scorers.registry import get_scorer, register_scorer, scorer_names

__all__ = [
    "JIGSAW_LABELS",
    "KERAS_DEFAULT_FILTERS",
    "PERSPECTIVE_URL",
    "ToxicityScorer",
    "ProfanityCheckScorer",
    "KerasTokenizer",
    "BiLSTMWeights",
    "BILSTM_VARIANTS",
    "load_bilstm_weights",
    "JigsawBiLSTMScorer",
    "DetoxifyScorer",
    "PerspectiveScorer",
    "check_texts",
    "check_scores",
    "get_scorer",
    "register_scorer",
    "scorer_names",
]
