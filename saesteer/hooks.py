"""The one hook layer every steering method uses.

A *steerer* is anything with a ``hook_name`` (a TransformerLens hook point, by default
``blocks.L.hook_resid_post``) and a ``hook_fn(activation, hook) -> activation``. :func:`steering`
attaches any number of them to a ``HookedTransformer`` / ``HookedSAETransformer`` for the duration
of a ``with`` block and always removes them again, also when the block raises. Hooks see every
position of every forward pass, so under a KV cache they steer each generated token too.

Attention sinks. The first position (BOS, sometimes the token after it) of most models carries a
residual stream tens to hundreds of times larger than the others (SmolLM2-135M: ~25,000 vs ~170 at
layer 15). SAEs are trained without these positions, their latents fire absurdly there, and editing the
sink wrecks every later token. :func:`sink_mask` finds them (norm above ``factor`` x the median of their
row); the SAE steerers leave them untouched by default (``sink_factor=3.0``; ``None`` steers them too).
A single-position forward (a decoding step) has no sink. The median is taken over the row's real tokens
when the forward says which they are (:func:`forward_positions`, set by :mod:`saesteer.generation`), so
left padding does not move it and a prompt is steered the same in any batch; SASA's shared candidate
forward declares its positions separate decoding steps, so it steers exactly as one forward per candidate.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol, runtime_checkable

from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint


@runtime_checkable
class Steerer(Protocol):
    """A hook-based intervention: ``hook_fn`` receives the activation at ``hook_name`` and returns the new one."""

    hook_name: str

    def hook_fn(self, activation: Tensor, hook: HookPoint) -> Tensor: ...


def resid_post(layer: int) -> str:
    """Name of the residual stream after block ``layer``: ``blocks.{layer}.hook_resid_post``."""
    return f"blocks.{layer}.hook_resid_post"


def check_hook_name(model: HookedTransformer, hook_name: str) -> None:
    """Raise a ValueError naming the closest valid hook points if ``hook_name`` is not one of the model's."""
    if hook_name in model.hook_dict:
        return
    close = difflib.get_close_matches(hook_name, list(model.hook_dict), n=3)
    hint = f" Did you mean {close}?" if close else ""
    raise ValueError(
        f"Unknown hook name {hook_name!r} for this model ({model.cfg.n_layers} layers).{hint} "
        f"Residual-stream hooks are named like {resid_post(0)!r}."
    )


@contextmanager
def steering(model: HookedTransformer, steerers: Sequence[Steerer]) -> Iterator[HookedTransformer]:
    """Attach every steerer's hook for the ``with`` block; hooks are removed on exit, even after an error.

    Several steerers may share one hook point: they run in the order given.
    """
    for s in steerers:
        if not isinstance(s, Steerer):
            raise ValueError(
                f"{type(s).__name__} is not a steerer: it needs a `hook_name` and a `hook_fn(activation, hook)`."
            )
        check_hook_name(model, s.hook_name)
    with model.hooks(fwd_hooks=[(s.hook_name, s.hook_fn) for s in steerers], reset_hooks_end=True):
        yield model


_SEPARATE = "separate"
_POSITIONS: ContextVar[Tensor | str | None] = ContextVar("saesteer_forward_positions", default=None)


@contextmanager
def forward_positions(real: Bool[Tensor, "batch pos"] | None = None, *, separate: bool = False) -> Iterator[None]:
    """Describe the positions of the forwards run inside the block to :func:`sink_mask`: ``real`` marks
    the real tokens (False: padding), or ``separate=True`` says every position stands for its own
    single-token decoding step (none is a sink). Restored on exit."""
    token = _POSITIONS.set(_SEPARATE if separate else real)
    try:
        yield
    finally:
        _POSITIONS.reset(token)


def sink_mask(h: Float[Tensor, "batch pos d"], factor: float | None) -> Bool[Tensor, "batch pos"] | None:
    """Positions whose norm exceeds ``factor`` x the median norm of their row's real tokens (attention
    sinks), or None when there is nothing to skip (``factor`` None, one position, separate positions,
    no outlier). Which tokens are real comes from :func:`forward_positions`; without it, all are."""
    if factor is None or h.dim() < 3 or h.shape[-2] < 2:
        return None
    described = _POSITIONS.get()
    if isinstance(described, str):  # separate decoding steps
        return None
    norms = h.float().norm(dim=-1)
    if isinstance(described, Tensor) and tuple(described.shape) == tuple(norms.shape):
        real = described.to(norms.device).bool()
        median = norms.masked_fill(~real, float("nan")).nanmedian(dim=-1, keepdim=True).values
        mask = (norms > factor * median) & real
    else:
        mask = norms > factor * norms.median(dim=-1, keepdim=True).values
    return mask if bool(mask.any()) else None


def check_sink_factor(factor: float | None) -> float | None:
    if factor is not None and not (isinstance(factor, (int, float)) and factor > 1):
        raise ValueError(f"sink_factor must be a number > 1 (3.0 skips attention sinks) or None, got {factor!r}.")
    return None if factor is None else float(factor)


class HookSteerer:
    """Mixin for steerer dataclasses: ``with s.apply(model): ...`` steers ``model`` inside the block."""

    hook_name: str

    def hook_fn(self, activation: Tensor, hook: HookPoint) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, model: HookedTransformer):
        """Context manager attaching this steerer alone (see :func:`steering`)."""
        return steering(model, [self])
