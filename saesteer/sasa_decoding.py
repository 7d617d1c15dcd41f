"""SASA decoding: re-weighting candidate next tokens by their toxicity margin at every step.

Ko et al., "Large Language Models can become Strong Self-Detoxifiers" (ICLR 2025). At each step the
candidates are the tokens that survive repetition penalty / temperature / top-k / top-p, capped at the
``max_candidates`` most likely. For each candidate v the context + v is embedded (final hidden state
after the final norm) in ONE batched forward of all candidates over the shared KV cache, and

    logits_v += sum_j beta_j * softmax_v(margin_j(context + v))     (reference rule, ``softmax``)
    logits_v += sum_j beta_j * margin_j(context + v)                (``raw`` variant)

with margin_j(x) = w_j . (x - m_j) > 0 on the non-toxic side of attribute j's subspace. The next token
is drawn from the adjusted candidate logits; the chosen candidate's cache row and logits become the
next step's, so the prefix is never re-run. beta = 0 for every attribute is plain decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.utilities.activation_functions import apply_softcap

from .checks import check_positive_int, check_strength
from .generation import DecodeState, Decoder, pick
from .sasa_subspace import Subspace, apply_final_norm, embedding_hook_name

MarginTransform = Literal["softmax", "raw"]


def select_cache_rows(cache: TransformerLensKeyValueCache, rows: Int[Tensor, " n"]) -> TransformerLensKeyValueCache:
    """A new KV cache holding ``rows`` of ``cache`` (repeat a row to fork it, pick rows to merge back)."""
    entries = [
        TransformerLensKeyValueCacheEntry(e.past_keys.index_select(0, rows.to(e.past_keys.device)),
                                          e.past_values.index_select(0, rows.to(e.past_values.device)))
        for e in cache.entries
    ]
    mask = cache.previous_attention_mask.index_select(0, rows.to(cache.previous_attention_mask.device))
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask)


@dataclass
class Attribute:
    """One attribute to steer away from: its subspace and strength."""

    subspace: Subspace
    beta: float

    def __post_init__(self) -> None:
        self.beta = check_strength("beta", self.beta)


class SASADecoder(Decoder):
    """The SASA token chooser for :func:`saesteer.generation.generate` (see module docstring)."""

    def __init__(
        self,
        attributes: Sequence[Attribute],
        *,
        max_candidates: int = 50,
        margin_transform: MarginTransform = "softmax",
    ) -> None:
        if not attributes:
            raise ValueError("SASADecoder needs at least one Attribute(subspace, beta).")
        if margin_transform not in ("softmax", "raw"):
            raise ValueError(f"margin_transform must be 'softmax' or 'raw', got {margin_transform!r}.")
        self.attributes = list(attributes)
        self.max_candidates = check_positive_int("max_candidates", max_candidates)
        self.margin_transform = margin_transform
        self._next_logits: Tensor | None = None
        self.last_margins: Tensor | None = None  # [batch, n_attributes] margins of the chosen tokens

    @property
    def active(self) -> bool:
        return any(a.beta > 0 for a in self.attributes)

    def check_model(self, model: HookedTransformer) -> None:
        for a in self.attributes:
            a.subspace.check_model(model)

    def bonus(self, margins: Float[Tensor, "batch cand n_attr"], valid: Tensor) -> Float[Tensor, "batch cand"]:
        """sum_j beta_j * T(margins_j), T = softmax over the valid candidates or identity."""
        betas = torch.tensor([a.beta for a in self.attributes], dtype=margins.dtype, device=margins.device)
        if self.margin_transform == "softmax":
            m = margins.masked_fill(~valid.unsqueeze(-1), float("-inf")).softmax(dim=1)
            m = m.nan_to_num(0.0)
        else:
            m = margins
        return (m * betas).sum(-1)

    def choose(self, state: DecodeState, logits: Float[Tensor, "batch vocab"]) -> Int[Tensor, " batch"]:
        if not self.active:
            self._next_logits = None
            return pick(logits, state.cfg, state.gen)
        if state.cache is None:
            raise ValueError("SASA decoding needs the KV cache; call generate(..., use_cache=True).")
        model = state.model
        batch = logits.shape[0]
        n_valid = int(torch.isfinite(logits).sum(-1).max())
        n_cand = min(self.max_candidates, n_valid)
        cand_logits, cand = logits.topk(n_cand, dim=-1)  # [B, C]
        valid = torch.isfinite(cand_logits)

        # one forward of every candidate over a fork of the shared cache
        rows = torch.arange(batch, device=logits.device).repeat_interleave(n_cand)
        forked = select_cache_rows(state.cache, rows)
        captured: dict[str, Tensor] = {}

        def grab(act: Tensor, hook) -> Tensor:
            captured["x"] = act
            return act

        hook = embedding_hook_name(model)
        with model.hooks(fwd_hooks=[(hook, grab)]):
            resid = model(cand.reshape(-1, 1), attention_mask=torch.ones_like(cand.reshape(-1, 1)),
                          past_kv_cache=forked, stop_at_layer=model.cfg.n_layers)
            normed = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
        hidden = apply_final_norm(model, captured["x"][:, -1])  # [B*C, d]
        margins = torch.stack([a.subspace.margin(hidden) for a in self.attributes], dim=-1)
        margins = margins.view(batch, n_cand, -1).float()
        adjusted = cand_logits + self.bonus(margins, valid)
        adjusted = adjusted.masked_fill(~valid, float("-inf"))
        full = torch.full_like(logits, float("-inf")).scatter(-1, cand, adjusted)
        chosen = pick(full, state.cfg, state.gen)

        idx = (cand == chosen.unsqueeze(-1)).float().argmax(-1)  # position of the chosen token among candidates
        keep = torch.arange(batch, device=logits.device) * n_cand + idx
        state.cache = select_cache_rows(forked, keep)
        self.last_margins = margins[torch.arange(batch), idx]
        next_logits = model.unembed(normed.index_select(0, keep))
        self._next_logits = apply_softcap(next_logits, model.cfg.output_logits_soft_cap)[:, -1]
        return chosen

    def advance(self, state: DecodeState, chosen: Int[Tensor, " batch"]) -> Float[Tensor, "batch vocab"]:
        if self._next_logits is None:
            return super().advance(state, chosen)
        out, self._next_logits = self._next_logits, None
        return out
