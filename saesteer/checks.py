"""Argument checks shared by the steering dataclasses; each error says how to fix the call."""

from __future__ import annotations

import math

from sae_lens import SAE
from transformer_lens import HookedTransformer

from saesteer.hooks import check_steerable


def check_strength(name: str, value: float) -> float:
    """A steering strength must be a finite number >= 0 (0 = no steering)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}.") from None
    if math.isnan(v) or math.isinf(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0 = no steering), got {value!r}.")
    return v


def check_positive_int(
    name: str, value: int, upper: int | None = None, what: str = "", *, label: str = "an integer >= 1"
) -> int:
    """An integer in [1, upper]; ``label`` is how the error names such a value (e.g. "a positive integer")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be {label}, got {value!r}.")
    if upper is not None and value > upper:
        raise ValueError(f"{name}={value} is larger than {what or 'its maximum'} ({upper}); pass at most {upper}.")
    return value


def sae_hook_name(sae: SAE) -> str | None:
    """The hook an SAE was trained on, from its SAELens metadata (None if the SAE does not say)."""
    meta = getattr(sae.cfg, "metadata", None)
    return getattr(meta, "hook_name", None) if meta is not None else None


def check_sae_fits(model: HookedTransformer, sae: SAE, hook_name: str) -> None:
    """The hook must exist and the SAE's d_in must equal the width of the activation at that hook.

    The width check of :func:`saesteer.hooks.check_steerable` (the one steering runs), with ``hook_name``
    taken literally: the callers (``load_sae(model=)``, dashboards, activation readers) read activations there.
    """
    check_steerable(model, hook_name, sae=sae, what="SAE", resolve=False, check_device=False)
