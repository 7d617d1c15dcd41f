"""Streaming SAE latents of texts, batch by batch, running the model only as far as the hook.

Every batch also says which real tokens are attention sinks (residual norm above ``sink_factor`` x the
median norm of their row's tokens, BOS included, padding not; :func:`saesteer.hooks.sink_mask`, the rule
the steerers use), so statistics over latents can leave them out the same way (``LatentBatch.keep``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from sae_lens import SAE
from torch import Tensor
from tqdm import tqdm
from transformer_lens import HookedTransformer

from saesteer.checks import check_positive_int, check_sae_fits
from saesteer.hooks import check_sink_factor, forward_positions, sink_mask
from saesteer.models.tokens import check_texts, tokenize
from saesteer.sae import ops as sae_ops


@dataclass
class LatentBatch:
    """SAE latents of one batch of texts; ``mask`` marks real tokens (no padding, no BOS), ``sinks`` the
    real tokens that are attention sinks (all False when ``iter_latents`` ran with ``sink_factor=None``)."""

    start: int
    acts: Float[Tensor, "batch pos d_sae"]
    resid: Float[Tensor, "batch pos d_in"]
    mask: Bool[Tensor, "batch pos"]
    sinks: Bool[Tensor, "batch pos"] | None = None

    def __post_init__(self) -> None:
        if self.sinks is None:
            self.sinks = torch.zeros_like(self.mask)

    @property
    def keep(self) -> Bool[Tensor, "batch pos"]:
        """Real tokens that are not attention sinks: the positions latent statistics count."""
        return self.mask & ~self.sinks


def sink_positions(
    resid: Float[Tensor, "batch pos d"], attention_mask: Tensor, factor: float | None
) -> Bool[Tensor, "batch pos"]:
    """Attention sinks of a forward's residual stream by the steerers' rule (:func:`saesteer.hooks.sink_mask`
    with the medians over each row's real tokens, BOS included, padding not); all False for ``factor=None``."""
    with forward_positions(attention_mask.bool()):
        sinks = sink_mask(resid, factor)
    return torch.zeros(resid.shape[:2], dtype=torch.bool, device=resid.device) if sinks is None else sinks


def hook_layer(hook_name: str) -> int | None:
    """The block index of ``blocks.L.*`` hooks (None for hooks outside the blocks)."""
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) if m else None


@torch.no_grad()
def run_to_hook(
    model: HookedTransformer, tokens: Tensor, attention_mask: Tensor, hook_name: str
) -> Float[Tensor, "batch pos d"]:
    """The activation at ``hook_name``, stopping the forward pass after the hook's block."""
    layer = hook_layer(hook_name)
    stop = layer + 1 if layer is not None and layer + 1 < model.cfg.n_layers else None
    captured: dict[str, Tensor] = {}

    def grab(act: Tensor, hook) -> Tensor:
        captured["act"] = act
        return act

    with model.hooks(fwd_hooks=[(hook_name, grab)]):
        model(tokens, attention_mask=attention_mask, stop_at_layer=stop, return_type=None)
    return captured["act"]


def iter_latents(
    model: HookedTransformer,
    sae: SAE,
    texts: Sequence[str],
    hook_name: str,
    *,
    batch_size: int = 8,
    max_length: int | None = 128,
    progress: bool | str = False,
    sink_factor: float | None = 3.0,
) -> Iterator[LatentBatch]:
    """Yield the SAE latents of ``texts`` in batches (right padding; BOS and padding masked out of ``mask``,
    attention sinks above ``sink_factor`` x their row's median norm flagged in ``sinks``; None flags none)."""
    texts = check_texts(texts, "texts")
    check_positive_int("batch_size", batch_size)
    sink_factor = check_sink_factor(sink_factor)
    check_sae_fits(model, sae, hook_name)
    starts = range(0, len(texts), batch_size)
    desc = progress if isinstance(progress, str) else "SAE latents"
    for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        tokens, mask, n_bos = tokenize(model, texts[start : start + batch_size], side="right", max_length=max_length)
        resid = run_to_hook(model, tokens, mask, hook_name)
        acts = sae_ops.encode(sae, resid.to(sae.W_dec.dtype)).acts
        real = mask.bool().clone()
        real[:, :n_bos] = False
        sinks = sink_positions(resid, mask, sink_factor).to(real.device) & real
        yield LatentBatch(start=start, acts=acts, resid=resid, mask=real, sinks=sinks)
