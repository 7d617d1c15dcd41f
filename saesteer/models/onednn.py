"""Weights packed once in oneDNN's blocked layout, multiplied by oneDNN's kernel instead of the BLAS (issue 16).

``F.linear`` on the CPU hands the product to the BLAS (MKL), which repacks the weight into its kernel's panels at
every call; a decoding step's products have a few rows, so that repacking is paid for a handful of rows. oneDNN can
take the weight packed once (``torch.ops.mkldnn._reorder_linear_weight``, what ``torch.compile``'s CPU freezing
uses) and compute y = x W^T + b from it (``torch.ops.mkldnn._linear_pointwise``). Measured on an AMD EPYC, one
thread (``experiments/bench_layout.py``, ``figures/bench_layout.json``): at batch 8 the gated MLP's products took
0.60-0.67x, the attention's 0.73-0.86x and the 576 x 49,152 unembedding 0.42x their ``F.linear`` time; at batch 1
the gain is smaller and a small product (the attention's key/value projections, 1.16x) is slower, oneDNN's fixed
cost per call (~15 us) outweighing it.

A different kernel: results equal ``F.linear``'s up to float rounding, not bit for bit. Whether a row's result
depends on the other rows of the product (their number, its place among them) is probed once per process
(:func:`rows_independent`; on the AMD EPYC measured it does not, unlike MKL's, whose kernel changes with the row
count); the packing's shape is fixed (:data:`PREPACK_ROWS`) whatever the batch.

The packed copy is a second copy of the weight (oneDNN's opaque tensor: not a parameter, not saved, not copied).
It is packed on first use and packed again when the parameter changes: trusted by the parameter's storage and
version counter (an in-place edit, ``load_state_dict``, a new tensor), never by its name alone; an edit through
``param.data`` bypasses the version counter (call ``set_weight_layout`` again after one).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

__all__ = ["PREPACK_ROWS", "PackedWeights", "available", "linear", "pack", "product", "rows_independent"]

PREPACK_ROWS = 8
"""The row count oneDNN packs for (measured: packed for 8 rows, batch-1 and batch-8 products were both faster than
packed for 1; for 64, no faster than for 8)."""


def available() -> bool:
    """True where this PyTorch build has oneDNN's packed linear product (x86 builds with oneDNN)."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack(operand: Tensor) -> Tensor:
    """``operand`` (an [out, in] weight as ``F.linear`` takes it) packed for :func:`linear` (oneDNN's opaque tensor,
    packed for :data:`PREPACK_ROWS` rows)."""
    return torch.ops.mkldnn._reorder_linear_weight(operand.detach(), PREPACK_ROWS)


def linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x W^T + b by oneDNN's kernel, W :func:`pack` ed."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedWeights:
    """The oneDNN-packed copies of some of a module's weights (``names``), each packed on first use and again when
    its parameter changes. A copy or an unpickled holder names the same weights and packs them again on first use
    (oneDNN's tensors cannot be pickled)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self._held: dict[str, tuple[tuple, Tensor]] = {}

    def __reduce__(self):
        return (PackedWeights, (self.names,))

    def weight(self, param: Tensor, name: str, operand: Tensor) -> Tensor:
        """``operand`` (the [out, in] weight ``F.linear`` gets, a view of ``param``) packed; the held copy while
        ``param``'s storage, version and the operand's shape are those it was packed from."""
        stamp = (param.data_ptr(), param._version, operand.shape, operand.stride())
        held = self._held.get(name)
        if held is None or held[0] != stamp:
            held = (stamp, pack(operand))
            self._held[name] = held
        return held[1]

    def product(
        self, name: str, param: Tensor | None, x: Tensor, operand: Tensor, bias: Tensor | None
    ) -> Tensor | None:
        """``F.linear(x, operand, bias)`` through oneDNN with ``operand`` (a view of ``param``) packed as ``name``,
        where ``name`` is one of :attr:`names` and the product allows (float32 on the CPU, nothing for autograd to
        record, not while ``torch.compile`` traces); None otherwise."""
        if (
            param is None
            or name not in self.names
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or operand.dtype != torch.float32
            or (torch.is_grad_enabled() and (x.requires_grad or operand.requires_grad))
            or torch.compiler.is_compiling()
        ):
            return None
        return linear(x, self.weight(param, name, operand), bias)


def product(module: nn.Module, name: str, x: Tensor, operand: Tensor, bias: Tensor | None) -> Tensor | None:
    """``F.linear(x, operand, bias)`` through oneDNN with ``module.<name>`` packed, where ``set_weight_layout(model,
    "onednn")`` packed it and the product allows (:meth:`PackedWeights.product`); None otherwise (the caller
    multiplies as before)."""
    packed = module.__dict__.get("_saesteer_packed")
    return None if packed is None else packed.product(name, module._parameters.get(name), x, operand, bias)


@functools.cache
def rows_independent() -> bool:
    """True where oneDNN's packed product gives each row the bits it gets alone, whatever the number of rows and
    the row's place among them (float32, this thread count); False where it does not or oneDNN is missing. Probed
    once per process on decoding-sized products."""
    if not available():
        return False
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n_out, n_in in ((160, 48), (48, 160), (1536, 576)):
            w = pack(torch.randn(n_out, n_in, generator=gen))
            x = torch.randn(16, n_in, generator=gen)
            together = linear(x, w)
            if not torch.equal(linear(x.flip(0), w).flip(0), together):
                return False
            if any(not torch.equal(linear(x[r], w), together[r]) for r in (slice(0, 1), slice(3, 6), slice(5, 13))):
                return False
    return True
