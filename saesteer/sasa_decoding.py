"""SASA decoding: re-weighting candidate next tokens by their toxicity margin at every step.

Ko et al., "Large Language Models can become Strong Self-Detoxifiers" (ICLR 2025). At each step the
candidates are the tokens that survive repetition penalty / temperature / top-k / top-p, capped at the
``max_candidates`` most likely. For each candidate v the context + v is embedded (final hidden state
after the final norm) in ONE batched forward of all candidates over the shared KV cache, and

    logits_v += sum_j beta_j * softmax_v(margin_j(context + v))     (reference rule, ``softmax``)
    logits_v += sum_j beta_j * margin_j(context + v)                (``raw`` variant)

with margin_j(x) = w_j . (x - m_j) > 0 on the non-toxic side of attribute j's subspace. The next token
is drawn from the adjusted candidate logits; the chosen candidate's keys/values and logits become the
next step's, so the prefix is never re-run. beta = 0 for every attribute is plain decoding.

Candidate forward. Embedding the C candidates of a row means C single-token forwards over the same
prefix. The ``"fork"`` path does exactly that: it copies the cache to b*C rows (``select_cache_rows``),
which costs O(b*C*L) memory traffic per layer and step. The ``"shared"`` path (default where exact)
never copies the cache: it feeds the C candidates as C query positions of ONE sequence per row, and
TransformerLens hooks make each candidate behave exactly as the single next token would:

1. attention: candidate j attends to the prefix and itself only (``hook_attn_scores`` gets the
   attention module's IGNORE value, -inf, at the other candidates' keys, so the softmax is unchanged);
2. positions: every candidate gets the next token's position. Rotary: the candidates' queries and keys
   are re-rotated by the module's own ``apply_rotary`` under the mask ``[prefix, 1, 0, ..., 0]`` (TL
   reads positions off the mask's cumsum, so all C get the next position); on models prepared by
   :func:`saesteer.tl_fixes.apply_mask_sharing` (``load_model``) they are rotated under that mask in the
   first place (:func:`saesteer.tl_fixes.rotary_position_mask`), no re-rotation; absolute embeddings:
   every candidate gets the next position's ``hook_pos_embed``;
3. afterwards the cache holds C new entries per layer; only the chosen candidate's is kept, so the cache
   equals the fork path's.

Architectures whose forward is not per-position-exact under this trick (ALiBi, relative position bias,
local attention windows, attention sinks, dynamic NTK rope, log-n scaling, QK norm or QKV clipping
before rotary, non-causal attention, other attention classes) fall back to ``"fork"`` under ``"auto"``
(see :func:`shared_forward_unsupported`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.components import Attention, GroupedQueryAttention
from transformer_lens.utilities.activation_functions import apply_softcap

from .checks import check_positive_int, check_strength
from .generation import DecodeState, Decoder, pick
from .hooks import forward_positions
from .sasa_subspace import Subspace, apply_final_norm, embedding_hook_name
from .tl_fixes import rotary_position_mask, rotary_supports_position_mask

MarginTransform = Literal["softmax", "raw"]
CandidateForward = Literal["auto", "shared", "fork"]


def select_cache_rows(cache: TransformerLensKeyValueCache, rows: Int[Tensor, " n"]) -> TransformerLensKeyValueCache:
    """A new KV cache holding ``rows`` of ``cache`` (repeat a row to fork it, pick rows to merge back)."""
    entries = [
        TransformerLensKeyValueCacheEntry(e.past_keys.index_select(0, rows.to(e.past_keys.device)),
                                          e.past_values.index_select(0, rows.to(e.past_values.device)))
        for e in cache.entries
    ]
    mask = cache.previous_attention_mask.index_select(0, rows.to(cache.previous_attention_mask.device))
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask)


def shared_forward_unsupported(model: HookedTransformer) -> str | None:
    """Why the shared-prefix candidate forward would not equal the forked one on ``model`` (None: it would)."""
    cfg = model.cfg
    if cfg.positional_embedding_type not in ("standard", "shortformer", "rotary"):
        return f"positional_embedding_type={cfg.positional_embedding_type!r}"
    attns = [getattr(block, "attn", None) for block in model.blocks]
    odd = next((a for a in attns if type(a) not in (Attention, GroupedQueryAttention)), None)
    if odd is not None:
        return f"attention module {type(odd).__name__}"
    rotary = cfg.positional_embedding_type == "rotary"  # q/k are re-rotated from hook_q/hook_k: nothing may follow
    flags = {
        "non-causal attention": cfg.attention_dir != "causal"
        or any(getattr(a, "_attention_dir_override", None) not in (None, "causal") for a in attns),
        "local attention": getattr(cfg, "use_local_attn", False) or any(a.attn_type != "global" for a in attns),
        "attention sinks": getattr(cfg, "use_attention_sinks", False),
        "dynamic NTK rope": getattr(cfg, "use_dynamic_ntk_rope", False),
        "log-n attention scaling": getattr(cfg, "use_logn_attn", False),
        "QK norm before rotary": rotary and any(getattr(a, "q_norm", None) is not None for a in attns),
        "QKV clipping before rotary": rotary and getattr(cfg, "clip_qkv", None) is not None,
    }
    return next((name for name, on in flags.items() if on), None)


@dataclass
class Attribute:
    """One attribute to steer away from: its subspace and strength."""

    subspace: Subspace
    beta: float

    def __post_init__(self) -> None:
        self.beta = check_strength("beta", self.beta)


class SASADecoder(Decoder):
    """The SASA token chooser for :func:`saesteer.generation.generate` (see module docstring).

    ``candidate_forward``: ``"shared"`` (one sequence of C candidates per row over the uncopied cache),
    ``"fork"`` (b*C single-token rows over copies of the cache, ``max_rows`` rows per forward if set),
    or ``"auto"`` (shared where :func:`shared_forward_unsupported` finds nothing, else fork).
    """

    def __init__(
        self,
        attributes: Sequence[Attribute],
        *,
        max_candidates: int = 50,
        margin_transform: MarginTransform = "softmax",
        candidate_forward: CandidateForward = "auto",
        max_rows: int | None = None,
    ) -> None:
        if not attributes:
            raise ValueError("SASADecoder needs at least one Attribute(subspace, beta).")
        if margin_transform not in ("softmax", "raw"):
            raise ValueError(f"margin_transform must be 'softmax' or 'raw', got {margin_transform!r}.")
        if candidate_forward not in ("auto", "shared", "fork"):
            raise ValueError(f"candidate_forward must be 'auto', 'shared' or 'fork', got {candidate_forward!r}.")
        self.attributes = list(attributes)
        self.max_candidates = check_positive_int("max_candidates", max_candidates)
        self.margin_transform = margin_transform
        self.candidate_forward = candidate_forward
        self.max_rows = None if max_rows is None else check_positive_int("max_rows", max_rows)
        self._next_logits: Tensor | None = None
        self.last_margins: Tensor | None = None  # [batch, n_attributes] margins of the chosen tokens

    @property
    def active(self) -> bool:
        return any(a.beta > 0 for a in self.attributes)

    def check_model(self, model: HookedTransformer) -> None:
        for a in self.attributes:
            a.subspace.check_model(model)
        self.forward_mode(model)

    def forward_mode(self, model: HookedTransformer) -> Literal["shared", "fork"]:
        """The candidate forward used on ``model``; explicit ``"shared"`` on an unsupported model raises."""
        if self.candidate_forward == "fork":
            return "fork"
        reason = shared_forward_unsupported(model)
        if reason is not None and self.candidate_forward == "shared":
            raise ValueError(f"candidate_forward='shared' cannot be exact on this model ({reason}); "
                             "use 'auto' or 'fork'.")
        return "fork" if reason is not None else "shared"

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

        # shared appends to the cache, and gives the C candidates C positions first (the last of them must
        # exist: near n_ctx, fork)
        shared = (self.forward_mode(model) == "shared" and not state.cache.frozen  # (a host sync: asked last)
                  and int(state.cache.previous_attention_mask.sum(-1).max()) + n_cand <= model.cfg.n_ctx)
        forward = self._shared if shared else self._fork
        hidden, normed, keep, undo = forward(model, state.cache, cand)  # [B, C, d] each
        try:
            margins = torch.stack([a.subspace.margin(apply_final_norm(model, hidden)) for a in self.attributes],
                                  dim=-1).float()
            adjusted = cand_logits + self.bonus(margins, valid)
            adjusted = adjusted.masked_fill(~valid, float("-inf"))
            full = torch.full_like(logits, float("-inf")).scatter(-1, cand, adjusted)
            chosen = pick(full, state.cfg, state.gen)

            idx = (cand == chosen.unsqueeze(-1)).float().argmax(-1)  # position of the chosen token among candidates
            state.cache = keep(idx)
        except BaseException:  # the cache as it was before this step
            undo()
            raise
        rows = torch.arange(batch, device=logits.device)
        self.last_margins = margins[rows, idx]
        next_logits = model.unembed(normed[rows, idx].unsqueeze(1))
        self._next_logits = apply_softcap(next_logits, model.cfg.output_logits_soft_cap)[:, -1]
        return chosen

    @staticmethod
    def _run(model, tokens, cache, attention_mask, hooks=()) -> tuple[Tensor, Tensor]:
        """Final hidden states before the final norm's affine (SASA's hook) and after it, under ``hooks``."""
        captured: dict[str, Tensor] = {}

        def grab(act: Tensor, hook) -> Tensor:
            captured["x"] = act
            return act

        with model.hooks(fwd_hooks=[*hooks, (embedding_hook_name(model), grab)]), forward_positions(separate=True):
            resid = model(tokens, attention_mask=attention_mask, past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)
            normed = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
        return captured["x"], normed

    def _fork(self, model, cache, cand):
        """b*C single-token rows, each over its own copy of the row's cache; ``max_rows`` rows at a time."""
        batch, n_cand = cand.shape
        flat = cand.reshape(-1, 1)
        rows = torch.arange(batch, device=cand.device).repeat_interleave(n_cand)
        step = self.max_rows or flat.shape[0]
        hidden, normed, new_kv = [], [], []
        for s in range(0, flat.shape[0], step):
            forked = select_cache_rows(cache, rows[s:s + step])
            h, n = self._run(model, flat[s:s + step], forked, torch.ones_like(flat[s:s + step]))
            hidden.append(h[:, -1])
            normed.append(n[:, -1])
            new_kv.append([(e.past_keys[:, -1:].clone(), e.past_values[:, -1:].clone()) for e in forked.entries])

        def keep(idx: Tensor) -> TransformerLensKeyValueCache:
            sel = torch.arange(batch, device=idx.device) * n_cand + idx
            entries = []
            for e, parts in zip(cache.entries, zip(*new_kv)):
                k, v = (torch.cat(t).index_select(0, sel.to(t[0].device)) for t in zip(*parts))
                entries.append(TransformerLensKeyValueCacheEntry(torch.cat([e.past_keys, k], 1),
                                                                 torch.cat([e.past_values, v], 1)))
            prev = cache.previous_attention_mask
            mask = torch.cat([prev, torch.ones_like(cand[:, :1]).to(prev.device)], 1)
            return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask)

        shape = (batch, n_cand, -1)
        return torch.cat(hidden).view(shape), torch.cat(normed).view(shape), keep, lambda: None  # cache not touched

    def _shared(self, model, cache, cand):
        """The C candidates as C positions of one sequence per row over the uncopied cache (module docstring)."""
        batch, n_cand = cand.shape
        past = cache.entries[0].past_keys.shape[1]
        prev_mask = cache.previous_attention_mask
        # TL's positions are cumsum(mask) - 1: under [prefix, 1, 0, ..., 0] all C candidates get the next one
        same_pos = torch.cat([prev_mask, torch.ones_like(cand[:, :1]), torch.zeros_like(cand[:, 1:])], 1)
        others = ~torch.eye(n_cand, dtype=torch.bool, device=cand.device)
        unrotated: dict[str, Tensor] = {}

        def save(act: Tensor, hook) -> Tensor:
            unrotated[hook.name] = act
            return act

        def rerotate(attn, unrotated_name: str) -> Callable:
            def fn(act: Tensor, hook) -> Tensor:  # queries [B, C, ...] or all keys [B, past + C, ...]
                act[:, -n_cand:] = attn.apply_rotary(unrotated[unrotated_name], past, same_pos.to(act.device))
                return act
            return fn

        def isolate(attn) -> Callable:
            def fn(scores: Tensor, hook) -> Tensor:  # [B, head, C, past + C]
                scores[..., past:].masked_fill_(others.to(scores.device), float(attn.IGNORE))
                return scores
            return fn

        hooks: list[tuple[str, Callable]] = []
        positions = contextlib.nullcontext()
        rerotate_by_hooks = model.cfg.positional_embedding_type == "rotary"
        if model.cfg.positional_embedding_type in ("standard", "shortformer"):
            hooks.append(("hook_pos_embed", lambda act, hook: act[:, :1].expand_as(act)))
        elif rerotate_by_hooks and rotary_supports_position_mask(model):  # rotated at the right position at once
            positions, rerotate_by_hooks = rotary_position_mask(model, same_pos), False
        for i, block in enumerate(model.blocks):
            name = f"blocks.{i}.attn"
            if rerotate_by_hooks:
                hooks += [(f"{name}.hook_q", save), (f"{name}.hook_k", save),
                          (f"{name}.hook_rot_q", rerotate(block.attn, f"{name}.hook_q")),
                          (f"{name}.hook_rot_k", rerotate(block.attn, f"{name}.hook_k"))]
            hooks.append((f"{name}.hook_attn_scores", isolate(block.attn)))

        before = [(e.past_keys, e.past_values) for e in cache.entries], prev_mask

        def undo() -> None:
            """Put the cache back as it was before the candidates' forward (its old tensors are untouched)."""
            for e, (k, v) in zip(cache.entries, before[0]):
                e.past_keys, e.past_values = k, v
            cache.previous_attention_mask = before[1]

        try:
            with positions:
                hidden, normed = self._run(model, cand, cache, torch.ones_like(cand), hooks)
        except BaseException:
            undo()
            raise

        def keep(idx: Tensor) -> TransformerLensKeyValueCache:
            """Move the chosen candidate's key/value to position ``past`` and drop the other C - 1 (views)."""
            for e in cache.entries:
                for name in ("past_keys", "past_values"):
                    t = getattr(e, name)
                    rows, at = torch.arange(batch, device=t.device), past + idx.to(t.device)
                    t[:, past] = t[rows, at]
                    setattr(e, name, t[:, :past + 1])
            cache.previous_attention_mask = cache.previous_attention_mask[:, :past + 1]
            return cache

        return hidden, normed, keep, undo

    def advance(self, state: DecodeState, chosen: Int[Tensor, " batch"]) -> Float[Tensor, "batch vocab"]:
        if self._next_logits is None:
            return super().advance(state, chosen)
        out, self._next_logits = self._next_logits, None
        return out
