"""Tokenising batches of texts for TransformerLens models, with padding and masks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer


def check_texts(texts: Sequence[str], what: str = "prompts") -> list[str]:
    """A non-empty list of strings, or a ValueError that says what was wrong."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError(f"The list of {what} is empty; pass at least one string.")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"All {what} must be str; entries {bad[:5]} are not.")
    return texts


def pad_id(model: HookedTransformer) -> int:
    """The tokenizer's pad id, falling back to eos then 0 (padding is always masked out)."""
    tok = model.tokenizer
    if tok is None:
        return 0
    for cand in (tok.pad_token_id, tok.eos_token_id):
        if cand is not None:
            return int(cand)
    return 0


def pad_sequences(
    seqs: Sequence[Tensor], pad: int, side: Literal["left", "right"] = "left", device=None
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Stack 1-d token tensors into [batch, max_len] with ``pad`` and a 0/1 attention mask."""
    n = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        tokens[i, sl] = s
        mask[i, sl] = 1
    return tokens.to(device), mask.to(device)


def tokenize(
    model: HookedTransformer,
    texts: Sequence[str],
    *,
    prepend_bos: bool | None = None,
    side: Literal["left", "right"] = "left",
    max_length: int | None = None,
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], int]:
    """Tokens, attention mask and the number of BOS tokens prepended (0 or 1) for ``texts``.

    Each text is tokenised alone with ``model.to_tokens`` (TransformerLens' own BOS handling), then
    padded on ``side``; texts longer than ``max_length`` keep their first ``max_length`` tokens.
    """
    texts = check_texts(texts)
    if model.tokenizer is None:
        raise ValueError("The model has no tokenizer; pass token ids instead of strings.")
    bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
    seqs = [model.to_tokens(t, prepend_bos=bos, truncate=False)[0].cpu() for t in texts]
    if max_length is not None:
        seqs = [s[:max_length] for s in seqs]
    if any(len(s) == 0 for s in seqs):
        raise ValueError("A text tokenised to zero tokens; drop empty texts or set prepend_bos=True.")
    tokens, mask = pad_sequences(seqs, pad_id(model), side, device=model.cfg.device)
    return tokens, mask, int(bool(bos))
