"""Streaming SAE latents of texts, batch by batch, running the model only as far as the hook."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from saesteer.checks import check_positive_int, check_sae_fits
from saesteer.models.tokens import check_texts, tokenize
from saesteer.sae import ops as sae_ops


@dataclass
class LatentBatch:
    """SAE latents of one batch of texts; ``mask`` marks real tokens (no padding, no BOS)."""

    start: int
    acts: Float[Tensor, "batch pos d_sae"]
    resid: Float[Tensor, "batch pos d_in"]
    mask: Bool[Tensor, "batch pos"]


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
) -> Iterator[LatentBatch]:
    """Yield the SAE latents of ``texts`` in batches (right padding; BOS and padding masked out)."""
    texts = check_texts(texts, "texts")
    check_positive_int("batch_size", batch_size)
    check_sae_fits(model, sae, hook_name)
    starts = range(0, len(texts), batch_size)
    desc = progress if isinstance(progress, str) else "SAE latents"
    for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        tokens, mask, n_bos = tokenize(model, texts[start : start + batch_size], side="right", max_length=max_length)
        resid = run_to_hook(model, tokens, mask, hook_name)
        acts = sae_ops.encode(sae, resid.to(sae.W_dec.dtype)).acts
        real = mask.bool().clone()
        real[:, :n_bos] = False
        yield LatentBatch(start=start, acts=acts, resid=resid, mask=real)
