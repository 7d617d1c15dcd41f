"""How the weights of a decoding step's widest one-row products are stored: as TransformerLens' products read
them (bit for bit), or input by input, the layout a one-row product streams fastest on the CPUs measured (issue 16).

TransformerLens' ``GatedMLP`` and ``Unembed`` hand ``F.linear`` the weight ``W.T.contiguous()``, stored [d_out,
d_model] (one row per output; :func:`saesteer.models.tl_fixes.apply_layout_fixes` keeps it so): each output is a
dot product over a row of d_model numbers. Stored [d_model, d_out] instead (``"input_major"``, one row per input),
the same product y = x W = sum_i x_i W[i, :] streams the weight row by row. Measured on an AMD EPYC with MKL, one
thread, SmolLM2-135M (d_model 576; ``experiments/bench_layout.py``, ``figures/bench_layout.json``): one row's
products with the gated MLP's 576 x 1536 weights took 0.65x the time input by input, with the 576 x 49,152
unembedding 0.48x. ``"input_major"`` re-lays those (the gated MLP's
``W_gate`` and ``W_in``, the unembedding's ``W_U``); the MLP's output projection (d_mlp inputs) was faster as
upstream stores it, the attention's key/value projections slower input by input at batch 1 and its query/output
ones 6-11% faster (not re-laid yet). At batch 8 the re-laid products were no faster (the unembedding slower): it is
the layout for batch-1 decoding. Another CPU or BLAS can rank the layouts otherwise: measure
(``experiments/bench_layout.py`` per weight, ``experiments/bench_peers.py`` rows "input-major" end to end) before
choosing.

It is a different summation order, so logits equal upstream's up to float rounding (~1e-7 relative), not bit for
bit; the module-by-module path (a hook inside a block) and the fused block (:mod:`saesteer.models.fused_block`)
read the same stored weights, so they agree bit for bit with each other under either layout. Values, shapes, the
weights' digest and everything saved are unchanged.
"""

from __future__ import annotations

from torch import nn

from saesteer.models import tl_fixes

__all__ = ["WEIGHT_LAYOUTS", "check_weight_layout", "set_weight_layout", "weight_layout"]

WEIGHT_LAYOUTS = ("upstream", "input_major")
"""How a decoding step's widest one-row products read their weights (:func:`set_weight_layout`)."""

_REPLACED = {tl_fixes._gated_mlp_lean: ("W_gate", "W_in"), tl_fixes._unembed_lean: ("W_U",)}
"""The forward that reads a module's weights through ``tl_fixes._operand`` -> the weights input_major re-lays."""


def check_weight_layout(layout: str) -> str:
    """``layout`` if it is one of :data:`WEIGHT_LAYOUTS`, else ValueError naming them."""
    if layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout={layout!r}: use one of {WEIGHT_LAYOUTS}.")
    return layout


def _relayable(model: nn.Module) -> list[tuple[nn.Module, tuple[str, ...]]]:
    """(module, the names of the weights input_major re-lays) for every module of ``model`` whose forward reads
    them through ``tl_fixes._operand`` (saesteer's fixes bound it)."""
    out = []
    for module in model.modules():
        names = _REPLACED.get(tl_fixes._bound(module, "forward"))
        if names is not None:
            out.append((module, names))
    return out


def set_weight_layout(model: nn.Module, layout: str = "upstream") -> nn.Module:
    """Store ``model``'s gated MLP gate and input weights and its unembedding in ``layout`` (in place); returns
    ``model``.

    - ``"upstream"`` (the default): as TransformerLens' forward reads them; every logit equals stock
      TransformerLens' (with ``attn_implementation="eager"``).
    - ``"input_major"``: one row per input feature, the products read them so (see the module docstring): faster
      batch-1 products on the CPUs measured, equal up to float rounding.

    Raises ValueError for another value, and for ``"input_major"`` on a model without saesteer's fixes
    (:func:`saesteer.models.tl_fixes.apply_all_fixes`, ``load_model(..., fix_layout=True)``).
    """
    check_weight_layout(layout)
    modules = _relayable(model)
    if layout == "input_major" and not modules:
        raise ValueError(
            "weight_layout='input_major' re-lays weights that saesteer's fixes read, and this model has none "
            "(load it with saesteer.models.load_model, fix_layout=True, or apply tl_fixes.apply_all_fixes). Keep "
            "'upstream'."
        )
    inputs = layout == "input_major"
    for module, names in modules:
        for name in names:
            tl_fixes._relayout(module._parameters[name], (0, 1) if inputs else (1, 0))
        module._saesteer_input_major = names if inputs else ()
    return model


def weight_layout(model: nn.Module) -> str:
    """``model``'s layout as :func:`set_weight_layout` set it: ``"input_major"`` where any weight is stored so,
    else ``"upstream"``."""
    return "input_major" if any(m.__dict__.get("_saesteer_input_major") for m, _ in _relayable(model)) else "upstream"
