"""SAE latent steering at a residual hook: ``swap``, ``clamp`` and ``weight``.

After IBM, "Enabling Layer-Level Steering in LLMs using Sparse Autoencoders". The hook encodes the
residual stream h with the SAE (latents f, pre-activations p), rewrites the latents to f', and writes
back

    h' = h + D(f' - f)          (use_error_term=True, default: keeps the SAE error h - D(f))
    h' = decode(f')             (use_error_term=False, the paper's setting)

where D is the SAE's (affine) decoder without bias. With strength s the edit is interpolated,
f' = f + s (f_target - f), so s = 0 is exactly the unsteered model when the error term is kept.

Modes, with per-latent scores c (e.g. :func:`saesteer.sae.alignment.score_latents`):

- ``swap`` (the paper's method): rank latents by p * c; the top k decide WHICH latents are active;
  they keep their ORIGINAL pre-activation values (passed through ReLU), all others are 0. k is the
  SAE's k for TopK SAEs, else the number of latents active at that token before the swap (or a
  fixed ``k`` given by the user).
- ``clamp``: f'_i = f_i + s for the ``top_n`` highest-scoring latents (s is the constant added).
- ``weight``: f_target = f * c, i.e. every latent scaled by its score.

Arguments. :class:`LatentArgs` is the one place the tunable arguments of the three modes and their
defaults are written, and it validates them (AISteer360 style); :class:`LatentSteering` takes its
defaults from it and checks through it. The method registry (:mod:`saesteer.steering.registry`) reads
the ``swap`` / ``clamp`` / ``weight`` spec keys from it (each mode the ones it uses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from saesteer.checks import check_positive_int, check_strength, sae_hook_name
from saesteer.hooks import (
    HookFn,
    HookSite,
    HookSteerer,
    check_sink_factor,
    check_steerable,
    sae_hook_fn,
    sink_mask,
)
from saesteer.models.onednn import PackedWeights
from saesteer.sae import ops as sae_ops
from saesteer.sae.alignment import LatentScores

Mode = Literal["swap", "clamp", "weight"]


def swap_latents(
    pre: Float[Tensor, "... d_sae"], scores: Float[Tensor, " d_sae"], k: int | Tensor
) -> Float[Tensor, "... d_sae"]:
    """Keep the k latents with the largest pre * score at their original ReLU(pre); zero the rest.

    ``k`` is an int or a per-token tensor of counts (broadcast against ``pre[..., 0]``).
    """
    k_max = int(k) if not isinstance(k, Tensor) else int(k.max().item()) if k.numel() else 0
    if k_max == 0:
        return torch.zeros_like(pre)
    idx = torch.topk(pre * scores, k_max, dim=-1).indices
    vals = pre.gather(-1, idx).relu()
    if isinstance(k, Tensor):
        rank = torch.arange(k_max, device=pre.device)
        vals = vals * (rank < k.unsqueeze(-1)).to(vals.dtype)
    return torch.zeros_like(pre).scatter(-1, idx, vals)


@dataclass(frozen=True)
class LatentArgs:
    """The arguments of SAE latent steering with their defaults, validated on construction.

    ``strength`` (>= 0; 0 = no steering): the interpolation s of the module docstring (for ``clamp``, the
    constant added). ``top_n``: latents ``clamp`` raises (the highest-scoring). ``k``: latents ``swap``
    keeps active (None: the SAE's own count). ``use_error_term``: keep the SAE's error term (True) or
    decode the rewritten latents alone (False, the paper's setting). Bounds that depend on the SAE (``k``,
    ``top_n`` <= d_sae) are checked by :class:`LatentSteering`.
    """

    strength: float = 1.0
    top_n: int = 10
    k: int | None = None
    use_error_term: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "strength", check_strength("strength", self.strength))
        check_positive_int("top_n", self.top_n)
        if self.k is not None:
            check_positive_int("k", self.k)
        if not isinstance(self.use_error_term, bool):
            raise ValueError(
                f"use_error_term must be True (keep the SAE error term) or False (decode the latents alone), "
                f"got {self.use_error_term!r}."
            )


@dataclass(eq=False)
class LatentSteering(HookSteerer):
    """Rewrite SAE latents at ``hook_name`` by ``mode`` (see module docstring for the math).

    Example::

        steer = LatentSteering(sae, scores, mode="swap", strength=1.0)
        with steer.apply(model):
            logits = model(tokens)

    On a ``HookedSAETransformer`` with an SAE attached at H by ``add_sae`` (see :mod:`saesteer.hooks`):
    ``hook_name=H`` steers the residual stream that flows on from H (``H.hook_sae_output``), as on the
    plain model when the SAE is attached with its error term; ``hook_name=H + ".hook_sae_acts_post"`` edits the attached SAE's own latents, f -> f + s (f_target
    - f) with the pre-activations the SAE computed, and the SAE decodes them (with its error term when
    attached with ``use_error_term=True``, which must equal this steerer's ``use_error_term``). There
    ``sae`` must be the attached SAE, and attention-sink positions (by the norm of the SAE's input) keep
    their latents.

    The SAE's decoder (its directions and norms) is read when the steerer is built, not at every step:
    build a new steerer after changing the SAE's weights.
    """

    sae: SAE
    scores: LatentScores | Tensor
    mode: Mode = "swap"
    strength: float = LatentArgs.strength
    top_n: int = LatentArgs.top_n
    k: int | None = LatentArgs.k
    use_error_term: bool = LatentArgs.use_error_term
    hook_name: str = field(default="")
    sink_factor: float | None = 3.0

    def __post_init__(self) -> None:
        self.sink_factor = check_sink_factor(self.sink_factor)
        if self.mode not in ("swap", "clamp", "weight"):
            raise ValueError(f"mode must be 'swap', 'clamp' or 'weight', got {self.mode!r}.")
        sae_ops.check_supported(self.sae)
        args = LatentArgs(strength=self.strength, top_n=self.top_n, k=self.k, use_error_term=self.use_error_term)
        self.strength = args.strength
        d_sae = self.sae.cfg.d_sae
        c = self.scores.for_steering() if isinstance(self.scores, LatentScores) else self.scores
        c = torch.as_tensor(c, dtype=self.sae.W_dec.dtype, device=self.sae.W_dec.device).flatten()
        if c.numel() != d_sae:
            raise ValueError(
                f"scores has {c.numel()} entries but the SAE has d_sae={d_sae} latents; "
                "score the latents of this SAE (saesteer.score_latents) or pass one score per latent."
            )
        if not torch.isfinite(c).all():
            raise ValueError(
                "scores contain NaN/inf; latents with no score must be given an explicit value "
                "(LatentScores.for_steering(dead_value=0.0) does this)."
            )
        self._c = c
        if self.k is not None:
            check_positive_int("k", self.k, upper=d_sae, what="the SAE width d_sae")
        check_positive_int("top_n", self.top_n, upper=d_sae, what="the SAE width d_sae")
        self._clamp_idx = torch.topk(c, self.top_n).indices
        # the decoder, read once when built (not at every step: its norms cost ~7% of a step)
        self._norms = sae_ops.decoder_norms(self.sae)
        self._w_dec = sae_ops.decoder_matrix(self.sae, self._norms)
        self._encoder = sae_ops.packed_encoder(self.sae)  # used on models under weight_layout="onednn"
        if not self.hook_name:
            self.hook_name = sae_hook_name(self.sae) or ""
            if not self.hook_name:
                raise ValueError("The SAE does not name its hook; pass hook_name='blocks.L.hook_resid_post'.")

    @property
    def clamp_latents(self) -> Tensor:
        """The ``top_n`` highest-scoring latents, highest first: the ones ``mode="clamp"`` raises (a copy;
        computed in every mode)."""
        return self._clamp_idx.clone()

    def target_latents(self, enc: sae_ops.Encoded) -> Float[Tensor, "... d_sae"]:
        """f_target of the chosen mode, before interpolation with the strength."""
        f = enc.acts
        if self.mode == "swap":
            k = self.k if self.k is not None else sae_ops.active_count(self.sae, f)
            return swap_latents(enc.pre, self._c, k)
        if self.mode == "weight":
            return f * self._c
        out = f.clone()
        out[..., self._clamp_idx] += 1.0  # clamp: +1 per unit strength
        return out

    def check_model(self, model: HookedTransformer) -> HookSite:
        """Where this steerer acts on ``model``: checked by :func:`saesteer.hooks.check_steerable`, latent
        editing allowed at an attached SAE's ``hook_sae_acts_post``."""
        site = check_steerable(model, self.hook_name, sae=self.sae, edits_latents=True, what="LatentSteering")
        if site.latents and site.use_error_term != self.use_error_term:
            keeps = "keeps" if site.use_error_term else "drops"
            raise ValueError(
                f"The SAE attached at {site.sae_site!r} {keeps} its error term (add_sae(use_error_term="
                f"{site.use_error_term})), and it decodes the latents this steerer edits there, but "
                f"use_error_term={self.use_error_term} here. Pass use_error_term={site.use_error_term}, or "
                f"attach the SAE with add_sae(sae, use_error_term={self.use_error_term})."
            )
        return site

    def fwd_hooks(self, model: HookedTransformer) -> list[tuple[str, HookFn]]:
        """The hooks that attach this steerer to ``model`` (checked first, :meth:`check_model`).

        At a residual hook: :meth:`hook_fn` there (with the SAE's encoder packed for oneDNN on a model under
        ``weight_layout="onednn"``, :func:`saesteer.hooks.sae_hook_fn`). At an attached SAE's
        ``hook_sae_acts_post``: three hooks of that SAE, one forward's state kept between them: its input (for the
        sink positions), its pre-activations (for ``swap``) and its latents, which are edited
        (:meth:`edit_latents`)."""
        site = self.check_model(model)
        if not site.latents:
            return [(site.name, sae_hook_fn(self, model))]
        seen: dict[str, Tensor] = {}

        def grab(name: str) -> HookFn:
            def fn(activation: Tensor, hook: HookPoint) -> Tensor:
                seen[name] = activation
                return activation

            return fn

        def edit(acts: Tensor, hook: HookPoint) -> Tensor:
            return self.edit_latents(acts, seen.pop("pre"), seen.pop("input", None))

        root = site.sae_site
        return [
            (f"{root}.hook_sae_input", grab("input")),
            (f"{root}.hook_sae_acts_pre", grab("pre")),
            (site.name, edit),
        ]

    def edit_latents(
        self,
        acts: Float[Tensor, "... d_sae"],
        pre: Float[Tensor, "... d_sae"],
        sae_input: Float[Tensor, "... d_in"] | None = None,
    ) -> Float[Tensor, "... d_sae"]:
        """f + s (f_target - f) for latents ``acts`` with the pre-activations ``pre`` as the SAE's
        ``hook_sae_acts_pre`` saw them; positions that are attention sinks of ``sae_input`` keep ``acts``."""
        enc = sae_ops.Encoded(acts=acts, pre=sae_ops.ranking_pre(self.sae, pre, self._norms), scale=None, shift=None)
        new = acts + self.strength * (self.target_latents(enc) - acts)
        sinks = None if sae_input is None else sink_mask(sae_input, self.sink_factor)
        return new if sinks is None else torch.where(sinks.unsqueeze(-1), acts, new)

    def hook_fn(
        self, activation: Float[Tensor, "batch pos d_model"], hook: HookPoint, *, packed: PackedWeights | None = None
    ) -> Tensor:
        """The steered residual stream (module docstring); ``packed``: the SAE's encoder packed for oneDNN
        (:func:`saesteer.sae.ops.encode`)."""
        enc = sae_ops.encode(self.sae, activation, self._norms, packed)
        f = enc.acts
        f_new = f + self.strength * (self.target_latents(enc) - f)
        if self.use_error_term:
            out = activation + sae_ops.decode_delta(self.sae, f_new - f, enc, self._w_dec).to(activation.dtype)
        else:
            out = sae_ops.decode(self.sae, f_new, enc, self._w_dec).to(activation.dtype)
        sinks = sink_mask(activation, self.sink_factor)  # attention sinks stay as they are (saesteer.hooks)
        return out if sinks is None else torch.where(sinks.unsqueeze(-1), activation, out)
