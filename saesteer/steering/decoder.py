"""SAE decoder-vector steering in three tiers (after "Breaking Bad Tokens: Detoxification of LLMs
Using Sparse Autoencoders", arXiv 2505.14536; the three formulas below are our reading of its tiers).

For chosen latents i (e.g. from :func:`saesteer.sae.contrast.toxicity_latents`) with decoder vectors d_i
(rows of W_dec as the SAE applies them, times the SAE's output scale), strength alpha >= 0, at every
position of h = the residual stream at ``hook_name``:

- ``conditional`` (gentlest):   h - alpha * sum_i [f_i(h) > threshold] f_i(h) d_i
  Removes alpha of each latent's own contribution, only where it fires above ``threshold``.
  With threshold = 0 it equals ``proportional``; raise the threshold to spare weak activations.
- ``proportional``:             h - alpha * sum_i f_i(h) d_i
  Removes alpha of each latent's contribution wherever it fires (f_i = 0 where it does not).
- ``constant`` (most aggressive): h - alpha * ||h|| * sum_i d_i / ||d_i||
  Pushes every position away from each latent's direction by a fixed share of its norm, whether or
  not the latent fires.

alpha = 0 is exactly the identity. f_i(h) is the SAE's own encoding (TopK/JumpReLU rules included).
Attention-sink positions (norm above ``sink_factor`` x their row's median, see :mod:`saesteer.hooks`)
are left as they are.

Arguments. :class:`DecoderArgs` is the one place the method's tunable arguments and their defaults are
written, and it validates them (AISteer360 style): ``tier``, ``alpha`` and ``threshold`` (which
:class:`DecoderSteering` takes its defaults from and checks through it) and ``n_latents`` / ``max_density``
(which rows of a :func:`~saesteer.sae.contrast.toxicity_latents` table are steered,
:func:`~saesteer.sae.contrast.select_latents`). The method registry (:mod:`saesteer.steering.registry`)
reads the ``decoder`` spec keys from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from saesteer.checks import check_positive_int, check_strength, sae_hook_name
from saesteer.hooks import HookSteerer, check_sink_factor, sink_mask
from saesteer.models.onednn import PackedWeights
from saesteer.sae import ops as sae_ops

Tier = Literal["conditional", "proportional", "constant"]
TIERS: tuple[Tier, ...] = ("conditional", "proportional", "constant")


@dataclass(frozen=True)
class DecoderArgs:
    """The arguments of decoder-vector steering with their defaults, validated on construction.

    ``tier``, ``alpha``, ``threshold``: as :class:`DecoderSteering` (module docstring). ``n_latents``,
    ``max_density``: the latents steered are the first ``n_latents`` rows of a contrast table
    (:func:`saesteer.toxicity_latents`, sorted by ``diff``) that fire on at most ``max_density`` of the
    non-toxic tokens (:func:`saesteer.sae.contrast.select_latents`).
    """

    tier: Tier = "proportional"
    alpha: float = 1.0
    n_latents: int = 10
    max_density: float = 0.05
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {self.tier!r}.")
        object.__setattr__(self, "alpha", check_strength("alpha", self.alpha))
        object.__setattr__(self, "threshold", check_strength("threshold", self.threshold))
        check_positive_int("n_latents", self.n_latents)
        if isinstance(self.max_density, bool) or not isinstance(self.max_density, (int, float)):
            raise ValueError(f"max_density must be a number in (0, 1], got {self.max_density!r}.")
        if not 0 < self.max_density <= 1:
            raise ValueError(
                f"max_density must lie in (0, 1] (the share of non-toxic tokens a steered latent may fire on), "
                f"got {self.max_density!r}."
            )
        object.__setattr__(self, "max_density", float(self.max_density))


@dataclass(eq=False)
class DecoderSteering(HookSteerer):
    """Subtract scaled decoder vectors of ``latents`` at ``hook_name`` (tiers in the module docstring).

    Example::

        table = toxicity_latents(model, sae, toxic, non_toxic, top_n=10)
        with DecoderSteering(sae, table, tier="proportional", alpha=1.0).apply(model):
            out = generate(model, prompts)

    It steers the residual stream: on a ``HookedSAETransformer`` with an SAE attached at ``hook_name`` by
    ``add_sae`` it acts on that SAE's output (``hook_name + ".hook_sae_output"``, :mod:`saesteer.hooks`); an
    attached SAE's latent hooks are refused.

    The SAE's decoder (its directions and norms) is read when the steerer is built, not at every step:
    build a new steerer after changing the SAE's weights.
    """

    sae: SAE
    latents: Sequence[int] | pd.DataFrame | Tensor
    tier: Tier = DecoderArgs.tier
    alpha: float = DecoderArgs.alpha
    threshold: float = DecoderArgs.threshold
    hook_name: str = field(default="")
    sink_factor: float | None = 3.0

    def __post_init__(self) -> None:
        args = DecoderArgs(tier=self.tier, alpha=self.alpha, threshold=self.threshold)  # the one validation
        sae_ops.check_supported(self.sae)
        self.alpha, self.threshold = args.alpha, args.threshold
        self.sink_factor = check_sink_factor(self.sink_factor)
        lat = self.latents["latent"].tolist() if isinstance(self.latents, pd.DataFrame) else self.latents
        idx = torch.as_tensor(list(lat) if not isinstance(lat, Tensor) else lat, dtype=torch.long).flatten()
        d_sae = self.sae.cfg.d_sae
        if idx.numel() == 0:
            raise ValueError("latents is empty; pass at least one latent index (e.g. toxicity_latents(...)).")
        if (idx < 0).any() or (idx >= d_sae).any():
            raise ValueError(
                f"latent indices must lie in [0, {d_sae}); got {idx[(idx < 0) | (idx >= d_sae)].tolist()}."
            )
        self._idx = idx.to(self.sae.W_dec.device)
        self._norms = sae_ops.decoder_norms(self.sae)  # once, not per step (the decoder is read when built)
        self._dirs = sae_ops.decoder_matrix(self.sae, self._norms)[self._idx]  # [n, d_in]
        self._units = torch.nn.functional.normalize(self._dirs, dim=-1).sum(0)  # sum_i d_i / ||d_i||
        self._encoder = sae_ops.packed_encoder(self.sae)  # used on models under weight_layout="onednn"
        if not self.hook_name:
            self.hook_name = sae_hook_name(self.sae) or ""
            if not self.hook_name:
                raise ValueError("The SAE does not name its hook; pass hook_name='blocks.L.hook_resid_post'.")

    def delta(self, h: Float[Tensor, "... d_in"], packed: PackedWeights | None = None) -> Float[Tensor, "... d_in"]:
        """The change added to h (already multiplied by -alpha); ``packed``: the SAE's encoder packed for oneDNN
        (:func:`saesteer.sae.ops.encode`)."""
        if self.tier == "constant":
            return -self.alpha * h.norm(dim=-1, keepdim=True) * self._units.to(h.dtype)
        enc = sae_ops.encode(self.sae, h.to(self.sae.W_dec.dtype), self._norms, packed)
        f = enc.acts[..., self._idx]
        if self.tier == "conditional":
            f = f * (f > self.threshold).to(f.dtype)
        out = (f @ self._dirs) if enc.scale is None else (f @ self._dirs) * enc.scale
        return (-self.alpha * out).to(h.dtype)

    def hook_fn(
        self, activation: Float[Tensor, "batch pos d_model"], hook: HookPoint, *, packed: PackedWeights | None = None
    ) -> Tensor:
        """h + delta(h) where h is not an attention sink (module docstring); attached with the SAE's encoder packed
        for oneDNN on a model under ``weight_layout="onednn"`` (:func:`saesteer.hooks.sae_hook_fn`)."""
        delta = self.delta(activation, packed)
        sinks = sink_mask(activation, self.sink_factor)
        if sinks is not None:
            delta = delta.masked_fill(sinks.unsqueeze(-1), 0.0)
        return activation + delta
