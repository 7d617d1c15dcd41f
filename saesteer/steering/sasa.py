"""SASA decoding: re-weighting candidate next tokens by their toxicity margin at every step.

Ko et al., "Large Language Models can become Strong Self-Detoxifiers" (ICLR 2025). At each step the
candidates are the tokens that survive repetition penalty / temperature / top-k / top-p, capped at the
``max_candidates`` most likely. For each candidate v the context + v is embedded (final hidden state
after the final norm) in ONE batched forward of all candidates over the shared KV cache, and

    logits_v += sum_j beta_j * softmax_v(margin_j(context + v))     (``softmax``, the default)
    logits_v += sum_j beta_j * margin_j(context + v)                (``raw``)

with margin_j(x) = w_j . (x - m_j) > 0 on the non-toxic side of attribute j's subspace. ``softmax`` is the
released code's rule (AISteer360's SASA control, old loop and current), under which the paper sweeps beta up
to 500; ``raw`` is the closed-form solution of the per-step problem the paper describes (maximise the
expected margin while staying close in KL to the model's distribution: p(v) ~ p0(v) exp(beta margin(v))).
With ``softmax`` the bonus is at most beta and nearly flat when margins are close (SmolLM2: std ~0.37 over
50 candidates), so betas <= 20 move a logit by < 1; with ``raw`` a beta of s / std shifts it by s per std. The next token
is drawn from the adjusted candidate logits; the chosen candidate's keys/values and logits become the
next step's, so the prefix is never re-run. beta = 0 for every attribute is plain decoding.

Candidate forward. Embedding the C candidates of a row means C single-token forwards over the same
prefix. The ``"fork"`` path does exactly that: it copies the cache to b*C rows (``select_cache_rows``),
which costs O(b*C*L) memory traffic per layer and step. The ``"shared"`` path (default where exact)
never copies the cache: it feeds the C candidates as C query positions of ONE sequence per row, and
hooks (or, on prepared models, the shared mask) make each candidate behave exactly as the single next token would:

1. attention: candidate j attends to the prefix and itself only (the scores get the attention module's
   IGNORE value, -inf, at the other candidates' keys, so the softmax is unchanged): in the causal mask on
   models prepared by :func:`saesteer.models.tl_fixes.apply_mask_sharing`
   (:func:`saesteer.models.tl_fixes.isolated_positions`; their fused blocks then run the candidates too), else
   by a hook on ``hook_attn_scores``;
2. positions: every candidate gets the next token's position. Rotary: the candidates' queries and keys
   are re-rotated by the module's own ``apply_rotary`` under the mask ``[prefix, 1, 0, ..., 0]`` (TL
   reads positions off the mask's cumsum, so all C get the next position); on models prepared by
   :func:`saesteer.models.tl_fixes.apply_mask_sharing` (``load_model``) they are rotated under that mask in the
   first place (:func:`saesteer.models.tl_fixes.rotary_position_mask`), no re-rotation; absolute embeddings:
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
import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.components import Attention, GroupedQueryAttention

from saesteer.checks import check_positive_int, check_strength
from saesteer.data.datasets import LabelledTexts, load_jigsaw
from saesteer.data.digests import texts_digest
from saesteer.generation import Decoder, DecodeState, pick, unembed_last
from saesteer.hooks import forward_positions
from saesteer.models.kv_cache import PreallocatedKVCache
from saesteer.models.tl_fixes import (
    isolated_positions,
    rotary_position_mask,
    rotary_supports_position_mask,
    supports_isolated_positions,
)
from saesteer.steering.sasa_subspace import (
    Subspace,
    SubspaceMismatchError,
    _check_length,
    _check_model,
    _check_threshold,
    apply_final_norm,
    embedding_hook_name,
    learn_subspace,
)

MarginTransform = Literal["softmax", "raw"]
CandidateForward = Literal["auto", "shared", "fork"]

MIN_FORWARDED_CANDIDATES = 16
"""The candidate forward runs at least this many candidates per row (``max_candidates`` if fewer): where
top-p / top-k leave fewer, the extra ones are -inf, masked out like any cut candidate. Why: a candidate's
hidden state must not depend on how many candidates the OTHER rows of the batch have (the forward's shape
follows the row with the most). Measured on x86 with MKL: the attention products give a candidate other
bits at 1, at 2 to 4 and at 5 or more candidates per row, the same bits within each of those classes; so
with at least 16 a prompt's SASA continuations do not depend on its batch
(:func:`saesteer.evaluation.evaluate` batches prompts)."""


def select_cache_rows(cache: TransformerLensKeyValueCache, rows: Int[Tensor, " n"]) -> TransformerLensKeyValueCache:
    """A new KV cache holding ``rows`` of ``cache`` (repeat a row to fork it, pick rows to merge back)."""
    entries = [
        TransformerLensKeyValueCacheEntry(
            e.past_keys.index_select(0, rows.to(e.past_keys.device)),
            e.past_values.index_select(0, rows.to(e.past_values.device)),
        )
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


# ----------------------------------------------------------------------------------------------------------
# The argument dataclass
# ----------------------------------------------------------------------------------------------------------


def labelled_from_gen_wv_data(data: LabelledTexts | dict) -> LabelledTexts:
    """In-memory SASA data as :class:`LabelledTexts`.

    Accepts a ``LabelledTexts``, ``{'pos': [non-toxic texts], 'neg': [toxic texts]}`` (the reference's
    naming: 'pos' is the attribute we steer towards, so non-toxic → label 0, toxic → label 1), or
    ``{'texts': [...], 'labels': [...]}`` with labels in [0, 1].
    """
    if isinstance(data, LabelledTexts):
        return data
    if not isinstance(data, dict):
        raise ValueError(
            "gen_wv_data must be a LabelledTexts, {'pos': [non-toxic...], 'neg': [toxic...]} or "
            f"{{'texts': [...], 'labels': [...]}}; got {type(data).__name__}."
        )
    keys = set(data)
    if keys == {"pos", "neg"}:
        pos, neg = data["pos"], data["neg"]
        if isinstance(pos, str) or isinstance(neg, str):
            raise ValueError("gen_wv_data['pos'] and ['neg'] must be lists of texts, not single strings.")
        pos, neg = list(pos), list(neg)
        return LabelledTexts(pos + neg, np.r_[np.zeros(len(pos)), np.ones(len(neg))], source="memory")
    if keys == {"texts", "labels"}:
        texts = data["texts"]
        if isinstance(texts, str):
            raise ValueError("gen_wv_data['texts'] must be a list of texts, not a single string.")
        try:
            labels = np.asarray(data["labels"], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("gen_wv_data['labels'] must be numbers in [0, 1].") from None
        return LabelledTexts(list(texts), labels, source="memory")
    raise ValueError(
        f"gen_wv_data has keys {sorted(map(str, keys))}; use exactly {{'pos', 'neg'}} (non-toxic, toxic texts) "
        "or {'texts', 'labels'}."
    )


@dataclass
class SASA:
    """SASA's arguments (AISteer360 style; Ko et al., ICLR 2025). Validated on construction.

    ``beta`` (>= 0; 0 = original decoding) scales the logit bonus ``beta * softmax(margins)`` (or
    ``beta * margin`` with ``margin_transform='raw'``) added to at most ``max_candidates`` candidate tokens
    per step. The subspace comes from ``wv_path`` if that file exists; otherwise it is learned from
    ``gen_wv_data`` (in memory) or ``gen_wv_data_path`` (Jigsaw ``all_data.csv`` or its folder), using
    ``gen_wv_length`` texts (-1 = all, else a stratified sample) in batches of ``gen_wv_batch_size``, with
    toxic = label > ``toxic_threshold``, and saved to ``wv_path`` if given. The subspace does not depend on
    beta: changing beta never re-learns it.

    An existing ``wv_path`` is used only if it is what this SASA describes. Its model must be the one
    passed to :meth:`steer` (same weights, :meth:`Subspace.check_model`) and its ``toxic_threshold`` this
    one; when this SASA has training data (``gen_wv_data`` or ``gen_wv_data_path``) the file must also have
    been learned from the same texts and labels (sha256), with the same ``gen_wv_length``, seed (when
    sampled), max_length and BOS. A difference raises :class:`SubspaceMismatchError` naming both sides;
    ``recompute=True`` relearns from the data and overwrites the file (or delete it, or use another path).
    Files that record less (older saesteer files, reference files) are checked on what they record.

    This class is where SASA's arguments and their defaults are written once: :class:`SASADecoder` takes
    its ``max_candidates`` / ``margin_transform`` defaults from it, and the method registry reads the
    ``sasa`` spec keys (``beta``, ``max_candidates``, ``margin_transform``) from its fields. ``beta``
    defaults to 0 (plain decoding, as in the reference and AISteer360): give it to steer.
    """

    beta: float = 0.0
    wv_path: str | None = None
    gen_wv_data_path: str | None = None
    gen_wv_length: int = -1
    gen_wv_batch_size: int = 8
    toxic_threshold: float = 0.0
    max_candidates: int = 50
    margin_transform: MarginTransform = "softmax"
    gen_wv_data: LabelledTexts | dict | None = None
    gen_wv_max_length: int | None = 128
    """Tokens kept per training text (its first ones; at most n_ctx); None = n_ctx. Long comments would
    otherwise dominate the cost of learning (attention is quadratic in length)."""
    recompute: bool = False
    """Relearn from the training data even if ``wv_path`` exists, and overwrite it (needs data)."""

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Real):
            raise ValueError(f"beta must be a number >= 0 (0 = original decoding), got {self.beta!r}.")
        self.beta = check_strength("beta", self.beta)
        if self.wv_path is not None:
            if not isinstance(self.wv_path, (str, os.PathLike)) or not os.fspath(self.wv_path).endswith(".pt"):
                raise ValueError(f"wv_path must be a path ending in '.pt' (or None), got {self.wv_path!r}.")
            self.wv_path = os.fspath(self.wv_path)
        if self.gen_wv_data_path is not None:
            if not isinstance(self.gen_wv_data_path, (str, os.PathLike)):
                raise ValueError(
                    "gen_wv_data_path must be a path to Jigsaw's all_data.csv or its folder, "
                    f"got {self.gen_wv_data_path!r}."
                )
            self.gen_wv_data_path = os.fspath(self.gen_wv_data_path)
        self.gen_wv_length = _check_length(self.gen_wv_length)
        check_positive_int("gen_wv_batch_size", self.gen_wv_batch_size)
        if self.gen_wv_max_length is not None:
            check_positive_int("gen_wv_max_length", self.gen_wv_max_length)
        self.toxic_threshold = _check_threshold(self.toxic_threshold)
        check_positive_int("max_candidates", self.max_candidates)
        if self.margin_transform not in ("softmax", "raw"):
            raise ValueError(
                f"margin_transform must be 'softmax' (the released code's rule: beta * softmax(margins)) or 'raw' "
                f"(beta * margin), got {self.margin_transform!r}."
            )
        if not isinstance(self.recompute, bool):
            raise ValueError(f"recompute must be True or False, got {self.recompute!r}.")
        if self.gen_wv_data is not None:
            if self.gen_wv_data_path is not None:
                raise ValueError("Give gen_wv_data or gen_wv_data_path, not both.")
            labelled_from_gen_wv_data(self.gen_wv_data)  # validate now, fail early

    def training_data(self) -> LabelledTexts:
        """The labelled texts to learn from: ``gen_wv_data``, else Jigsaw at ``gen_wv_data_path``."""
        if self.gen_wv_data is not None:
            return labelled_from_gen_wv_data(self.gen_wv_data)
        if self.gen_wv_data_path is None:
            where = f"wv_path={self.wv_path!r} does not exist and " if self.wv_path else ""
            raise ValueError(
                f"SASA has no subspace: {where}no data to learn one. Give wv_path (an existing .pt file), "
                "gen_wv_data_path (Jigsaw all_data.csv or its folder) or gen_wv_data."
            )
        if not os.path.exists(self.gen_wv_data_path):
            raise ValueError(
                f"gen_wv_data_path {self.gen_wv_data_path!r} does not exist. Download Jigsaw's all_data.csv "
                "(Kaggle: jigsaw-unintended-bias-in-toxicity-classification) and pass the file or its folder."
            )
        return load_jigsaw(self.gen_wv_data_path)

    def steer(
        self, model: HookedTransformer, *, seed: int = 0, progress: bool = True, recompute: bool | None = None
    ) -> Subspace:
        """The subspace for ``model``: loaded from ``wv_path`` if it exists and matches this SASA and the model
        (see the class docstring), else learned (``seed`` picks the stratified sample) and saved to ``wv_path``
        if given. ``recompute`` (default: the ``recompute`` field) relearns and overwrites ``wv_path``.

        Raises:
            SubspaceMismatchError: ``wv_path`` was learned on other weights, from other data or with other
                parameters (the message names both sides and the fix).
            SubspaceFileError: ``wv_path`` is not a readable subspace file.
        """
        _check_model(model)
        recompute = self.recompute if recompute is None else bool(recompute)
        has_data = self.gen_wv_data is not None or self.gen_wv_data_path is not None
        if recompute and not has_data:
            raise ValueError(
                "recompute=True needs training data to relearn the subspace from: give gen_wv_data or gen_wv_data_path."
            )
        max_length = None if self.gen_wv_max_length is None else min(self.gen_wv_max_length, model.cfg.n_ctx)
        if self.wv_path is not None and os.path.exists(self.wv_path) and not recompute:
            sub = Subspace.load(self.wv_path, model)
            self._check_file(sub, model, seed, max_length)
            return sub
        data = self.training_data()
        sub = learn_subspace(
            model,
            data,
            toxic_threshold=self.toxic_threshold,
            length=self.gen_wv_length,
            batch_size=self.gen_wv_batch_size,
            max_length=max_length,
            seed=seed,
            progress=progress,
        )
        if self.wv_path is not None:
            sub.save(self.wv_path)
        return sub

    def _check_file(self, sub: Subspace, model: HookedTransformer, seed: int, max_length: int | None) -> None:
        """Refuse a loaded ``wv_path`` subspace that is not what this SASA would learn (what it records)."""
        if sub.extra.get("reference_file"):  # the reference's {'wv', 'mu_mu'}: nothing recorded to compare
            return
        diffs = []
        if sub.toxic_threshold != self.toxic_threshold:
            diffs.append(f"toxic_threshold={sub.toxic_threshold!r} in the file vs {self.toxic_threshold!r} here")
        if self.gen_wv_data is not None or self.gen_wv_data_path is not None:
            extra = sub.extra
            length = extra.get("gen_wv_length")
            if length is not None and int(length) != self.gen_wv_length:
                diffs.append(f"gen_wv_length={length} in the file vs {self.gen_wv_length} here")
            if self.gen_wv_length != -1 and extra.get("seed") is not None and int(extra["seed"]) != int(seed):
                diffs.append(f"sample seed={extra['seed']} in the file vs {seed} here")
            want_len = model.cfg.n_ctx if max_length is None else max_length
            if extra.get("max_length") is not None and int(extra["max_length"]) != want_len:
                diffs.append(f"max_length={extra['max_length']} in the file vs {want_len} here")
            bos = model.cfg.default_prepend_bos
            if extra.get("prepend_bos") is not None and bool(extra["prepend_bos"]) != bos:
                diffs.append(f"prepend_bos={extra['prepend_bos']} in the file vs {bos} here")
            if not diffs:  # the data digest last: it needs the data (a Jigsaw file is read for it)
                data = self.training_data()
                digest = texts_digest(data.texts, data.labels)
                if sub.data_digest is None:
                    warnings.warn(
                        f"{self.wv_path} records no training-data digest (written by an older saesteer), so it "
                        "cannot be checked against this SASA's data; pass recompute=True to relearn it.",
                        UserWarning,
                        stacklevel=3,
                    )
                elif sub.data_digest != digest:
                    diffs.append(
                        f"training data sha256 {sub.data_digest[:16]}... ({sub.source!r}, {sub.n_nontoxic} non-toxic "
                        f"+ {sub.n_toxic} toxic used) in the file vs {digest[:16]}... ({data.source!r}, {len(data)} "
                        "texts) here"
                    )
        if diffs:
            raise SubspaceMismatchError(
                f"{self.wv_path} holds a subspace learned otherwise than this SASA asks: {'; '.join(diffs)}. "
                "Pass recompute=True (SASA(..., recompute=True) or .steer(model, recompute=True)) to relearn it "
                "from the data and overwrite the file, give another wv_path, or delete the file."
            )

    def decoder(self, subspace: Subspace) -> SASADecoder:
        """The :class:`SASADecoder` steering away from ``subspace`` with this ``beta``, ``max_candidates``
        and ``margin_transform`` (``subspace`` from :meth:`steer`)."""
        return SASADecoder(
            [Attribute(subspace, self.beta)], max_candidates=self.max_candidates, margin_transform=self.margin_transform
        )


# ----------------------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------------------


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
        max_candidates: int = SASA.max_candidates,
        margin_transform: MarginTransform = SASA.margin_transform,
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

    @classmethod
    def combine(cls, decoders: Sequence[SASADecoder]) -> SASADecoder:
        """One decoder steering away from the attributes of all ``decoders`` at once (their bonuses add up,
        as several attributes of one decoder do). They must agree on everything but their attributes."""
        decoders = list(decoders)
        odd = [type(d).__name__ for d in decoders if not isinstance(d, SASADecoder)]
        if odd or not decoders:
            raise ValueError(f"SASADecoder.combine takes SASA decoders only; got {odd or 'none'}.")
        settings = {(d.max_candidates, d.margin_transform, d.candidate_forward, d.max_rows) for d in decoders}
        if len(settings) > 1:
            raise ValueError(
                "SASA controls that act in one generation must share max_candidates and margin_transform "
                f"(and candidate_forward, max_rows); got (max_candidates, margin_transform, candidate_forward, "
                f"max_rows) = {sorted(settings, key=str)}. Give them the same values."
            )
        first = decoders[0]
        return cls(
            [a for d in decoders for a in d.attributes],
            max_candidates=first.max_candidates,
            margin_transform=first.margin_transform,
            candidate_forward=first.candidate_forward,
            max_rows=first.max_rows,
        )

    @property
    def active(self) -> bool:
        return any(a.beta > 0 for a in self.attributes)

    def invariant_steps(self) -> bool:
        """Each decoding step forwards rows x (>= 16) candidates (all at once: no ``max_rows`` chunks)."""
        return self.active and self.max_rows is None and self.max_candidates >= MIN_FORWARDED_CANDIDATES

    def cache_headroom(self, model: HookedTransformer) -> int:
        """The shared candidate forward appends up to ``max_candidates`` positions to the KV cache."""
        return self.max_candidates if self.active and self.forward_mode(model) == "shared" else 0

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
            raise ValueError(
                f"candidate_forward='shared' cannot be exact on this model ({reason}); use 'auto' or 'fork'."
            )
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
        n_cand = min(self.max_candidates, max(n_valid, MIN_FORWARDED_CANDIDATES), logits.shape[-1])
        cand_logits, cand = logits.topk(n_cand, dim=-1)  # [B, C]
        valid = torch.isfinite(cand_logits)

        # shared appends to the cache, and gives the C candidates C positions first (the last of them must
        # exist: near n_ctx, fork)
        shared = (
            self.forward_mode(model) == "shared"
            and not state.cache.frozen
            and getattr(state.cache, "room", lambda: n_cand)() >= n_cand  # a preallocated cache's positions left
            and int(state.cache.previous_attention_mask.sum(-1).max()) + n_cand <= model.cfg.n_ctx  # (a host sync)
        )
        forward = self._shared if shared else self._fork
        hidden, normed, keep, undo = forward(model, state.cache, cand)  # [B, C, d] each
        try:
            margins = torch.stack(
                [a.subspace.margin(apply_final_norm(model, hidden)) for a in self.attributes], dim=-1
            ).float()
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
        self._next_logits = unembed_last(model, normed[rows, idx], state.unembed_rows)
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
            forked = select_cache_rows(cache, rows[s : s + step])
            h, n = self._run(model, flat[s : s + step], forked, torch.ones_like(flat[s : s + step]))
            hidden.append(h[:, -1])
            normed.append(n[:, -1])
            new_kv.append([(e.past_keys[:, -1:].clone(), e.past_values[:, -1:].clone()) for e in forked.entries])

        def keep(idx: Tensor) -> TransformerLensKeyValueCache:
            sel = torch.arange(batch, device=idx.device) * n_cand + idx
            if isinstance(cache, PreallocatedKVCache):  # written in place, after the prefix
                for e, parts in zip(cache.entries, zip(*new_kv)):
                    e.append(*(torch.cat(t).index_select(0, sel.to(t[0].device)) for t in zip(*parts)))
                cache.append_attention_mask(torch.ones_like(cand[:, :1]))
                return cache
            entries = []
            for e, parts in zip(cache.entries, zip(*new_kv)):
                k, v = (torch.cat(t).index_select(0, sel.to(t[0].device)) for t in zip(*parts))
                entries.append(
                    TransformerLensKeyValueCacheEntry(torch.cat([e.past_keys, k], 1), torch.cat([e.past_values, v], 1))
                )
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
        contexts: list[contextlib.AbstractContextManager] = []  # entered around the forward
        rerotate_by_hooks = model.cfg.positional_embedding_type == "rotary"
        if model.cfg.positional_embedding_type in ("standard", "shortformer"):
            hooks.append(("hook_pos_embed", lambda act, hook: act[:, :1].expand_as(act)))
        elif rerotate_by_hooks and rotary_supports_position_mask(model):  # rotated at the right position at once
            contexts.append(rotary_position_mask(model, same_pos))
            rerotate_by_hooks = False
        isolate_by_hooks = not supports_isolated_positions(model)
        if not isolate_by_hooks:  # the shared causal mask keeps the candidates apart (and the blocks may run fused)
            contexts.append(isolated_positions(model, n_cand))
        for i, block in enumerate(model.blocks):
            name = f"blocks.{i}.attn"
            if rerotate_by_hooks:
                hooks += [
                    (f"{name}.hook_q", save),
                    (f"{name}.hook_k", save),
                    (f"{name}.hook_rot_q", rerotate(block.attn, f"{name}.hook_q")),
                    (f"{name}.hook_rot_k", rerotate(block.attn, f"{name}.hook_k")),
                ]
            if isolate_by_hooks:
                hooks.append((f"{name}.hook_attn_scores", isolate(block.attn)))

        before = [(e.past_keys, e.past_values) for e in cache.entries], prev_mask

        def undo() -> None:
            """Put the cache back as it was before the candidates' forward (its old tensors are untouched)."""
            for e, (k, v) in zip(cache.entries, before[0]):
                e.past_keys, e.past_values = k, v
            cache.previous_attention_mask = before[1]

        try:
            with contextlib.ExitStack() as stack:
                for context in contexts:
                    stack.enter_context(context)
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
                    setattr(e, name, t[:, : past + 1])
            cache.previous_attention_mask = cache.previous_attention_mask[:, : past + 1]
            return cache

        return hidden, normed, keep, undo

    def advance(self, state: DecodeState, chosen: Int[Tensor, " batch"]) -> Float[Tensor, "batch vocab"]:
        if self._next_logits is None:
            return super().advance(state, chosen)
        out, self._next_logits = self._next_logits, None
        return out
