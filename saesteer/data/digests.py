"""Content digests: what a cached or resumed artifact is trusted by, never a name alone.

``tensor_digest`` hashes a tensor's dtype, shape and bytes; ``state_dict_digest`` hashes every tensor of a
module's state dict in name order (a stable identity of a model's or an SAE's weights: two models with
the same config but other weights get different digests).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor


def _update(h: hashlib._Hash, t: Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
        t = t.view(torch.int16)
    h.update(t.numpy().tobytes())


def tensor_digest(t: Tensor) -> str:
    """sha256 hex digest of a tensor's dtype, shape and values."""
    h = hashlib.sha256()
    _update(h, t)
    return h.hexdigest()


def state_dict_digest(state: torch.nn.Module | Mapping[str, Tensor]) -> str:
    """sha256 hex digest over every (name, tensor) of a state dict, sorted by name."""
    sd = state.state_dict() if isinstance(state, torch.nn.Module) else state
    h = hashlib.sha256()
    for name in sorted(sd):
        value = sd[name]
        if isinstance(value, Tensor):
            h.update(name.encode() + b"\0")
            _update(h, value)
    return h.hexdigest()
