"""The one hook layer every steering method uses.

A *steerer* is anything with a ``hook_name`` (a TransformerLens hook point, by default
``blocks.L.hook_resid_post``) and a ``hook_fn(activation, hook) -> activation``. :func:`steering`
attaches any number of them to a ``HookedTransformer`` / ``HookedSAETransformer`` for the duration
of a ``with`` block and always removes them again, also when the block raises. Hooks see every
position of every forward pass, so under a KV cache they steer each generated token too.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

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


class HookSteerer:
    """Mixin for steerer dataclasses: ``with s.apply(model): ...`` steers ``model`` inside the block."""

    hook_name: str

    def hook_fn(self, activation: Tensor, hook: HookPoint) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, model: HookedTransformer):
        """Context manager attaching this steerer alone (see :func:`steering`)."""
        return steering(model, [self])
