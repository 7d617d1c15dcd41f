"""The three steering methods and what composes them.

- :mod:`~saesteer.steering.latent`: SAE latent steering, ``swap`` / ``clamp`` / ``weight`` (IBM).
- :mod:`~saesteer.steering.decoder`: SAE decoder-vector steering in three tiers (Breaking Bad Tokens).
- :mod:`~saesteer.steering.sasa` and :mod:`~saesteer.steering.sasa_subspace`: SASA (Ko et al., ICLR 2025),
  its arguments and decoder, and the toxic/non-toxic subspace it learns.
- :mod:`~saesteer.steering.word_filter`: the banned-words baseline.
- :mod:`~saesteer.steering.registry`: method names and spec strings -> built methods; each method's
  parameters come from its argument dataclass (:class:`SASA`, :class:`DecoderArgs`, :class:`LatentArgs`), and
  ``register_method`` adds your own.
"""

from saesteer.steering.decoder import DecoderArgs, DecoderSteering
from saesteer.steering.latent import LatentArgs, LatentSteering
from saesteer.steering.sasa import SASA, Attribute, SASADecoder
from saesteer.steering.sasa_subspace import Subspace, learn_subspace
from saesteer.steering.word_filter import BannedWords, WordFilter

__all__ = [
    "Attribute",
    "BannedWords",
    "DecoderArgs",
    "DecoderSteering",
    "LatentArgs",
    "LatentSteering",
    "SASA",
    "SASADecoder",
    "Subspace",
    "WordFilter",
    "learn_subspace",
]
