"""Word filtering: never generate a word from a banned list (the RealToxicityPrompts baseline).

Each banned word is tokenised in the forms it takes in running text (``word``, `` word``,
``Word``, `` Word``). A form of one token is always masked; for a form of several tokens the last
one is masked whenever the tokens generated just before it complete the rest of the form (Hugging
Face's ``bad_words_ids`` semantics). Combine it with any steering method through
``generate(..., logits_processors=[WordFilter(model, words)])``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer


class WordFilter:
    """A logits processor that sets the logits of tokens completing a banned word to -inf."""

    def __init__(self, model: HookedTransformer, words: Iterable[str]) -> None:
        words = [w.strip() for w in words if isinstance(w, str) and w.strip()]
        if not words:
            raise ValueError("WordFilter needs at least one non-empty word.")
        if model.tokenizer is None:
            raise ValueError("WordFilter needs a model with a tokenizer.")
        forms = {f for w in words for f in (w, " " + w, w.capitalize(), " " + w.capitalize())}
        seqs = {tuple(model.tokenizer.encode(f, add_special_tokens=False)) for f in forms}
        seqs.discard(())
        self.single = torch.tensor(sorted({s[0] for s in seqs if len(s) == 1}), dtype=torch.long)
        self.multi = sorted(s for s in seqs if len(s) > 1)

    def __call__(self, tokens: Int[Tensor, "batch pos"], logits: Float[Tensor, "batch vocab"]) -> Tensor:
        logits = logits.clone()
        if self.single.numel():
            logits[:, self.single.to(logits.device)] = float("-inf")
        for seq in self.multi:
            prefix = torch.tensor(seq[:-1], device=tokens.device)
            n = len(prefix)
            if tokens.shape[1] < n:
                continue
            hit = (tokens[:, -n:] == prefix).all(-1)
            logits[hit, seq[-1]] = float("-inf")
        return logits


@dataclass
class BannedWords:
    """A pipeline control: mask the words in ``words`` (see :class:`WordFilter`)."""

    words: list[str]

    def __post_init__(self) -> None:
        if isinstance(self.words, str) or not [w for w in self.words if isinstance(w, str) and w.strip()]:
            raise ValueError("BannedWords needs a list of words, e.g. BannedWords(['idiot', 'stupid']).")

    def processor(self, model: HookedTransformer) -> WordFilter:
        return WordFilter(model, self.words)
