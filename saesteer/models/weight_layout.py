"""How a gated MLP's gate and input projections are stored: as TransformerLens' products read them (bit for bit),
or input by input, the layout a one-row product streams fastest on the CPUs measured (issue 16).

TransformerLens' ``GatedMLP`` hands ``F.linear`` the weight ``W.T.contiguous()``, stored [d_mlp, d_model] (one row
per output, :func:`saesteer.models.tl_fixes.apply_layout_fixes` keeps it so): each output is a dot product over a
row of d_model numbers. Stored [d_model, d_mlp] instead (``"input_major"``, one row per input), the same product
y = x W = sum_i x_i W[i, :] streams the weight row by row. Measured on an AMD EPYC with MKL, one thread, SmolLM2-135M
(d_model 576, d_mlp 1536): a one-row product with a 576 x 1536 weight took 168 us against 296 us, and greedy
decoding ran 0.90x the time at batch 1 and ~1.00x at batch 8 (``experiments/bench_peers.py``, rows "input-major").
The other projections were left as upstream stores them: the output projection (d_mlp inputs) and the
unembedding were slower input by input at batch 8, the attention projections no faster. Another CPU or BLAS can
rank the layouts otherwise: measure before choosing.

It is a different summation order, so logits equal upstream's up to float rounding (~1e-7 relative), not bit for
bit; the lean path (a hook inside the block) and the fused block (:mod:`saesteer.models.fused_block`) read the
same stored weight, so they agree bit for bit with each other under either layout. Values, shapes, the
weights' digest and everything saved are unchanged.
"""

from __future__ import annotations

from torch import nn

from saesteer.models import tl_fixes

__all__ = ["WEIGHT_LAYOUTS", "check_weight_layout", "set_weight_layout", "weight_layout"]

WEIGHT_LAYOUTS = ("upstream", "input_major")
"""How a gated MLP's gate and input projections are stored (:func:`set_weight_layout`)."""

_PROJECTIONS = ("W_gate", "W_in")


def check_weight_layout(layout: str) -> str:
    """``layout`` if it is one of :data:`WEIGHT_LAYOUTS`, else ValueError naming them."""
    if layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout={layout!r}: use one of {WEIGHT_LAYOUTS}.")
    return layout


def _lean_mlps(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if tl_fixes._bound(m, "forward") is tl_fixes._gated_mlp_lean]


def set_weight_layout(model: nn.Module, layout: str = "upstream") -> nn.Module:
    """Store every gated MLP's ``W_gate`` and ``W_in`` of ``model`` in ``layout`` (in place); returns ``model``.

    - ``"upstream"`` (the default): as TransformerLens' forward reads them; every logit equals stock
      TransformerLens' (with ``attn_implementation="eager"``).
    - ``"input_major"``: one row per input feature, the products read them so (see the module docstring): faster
      one-row products on the CPUs measured, equal up to float rounding.

    Raises ValueError for another value, and for ``"input_major"`` on a model without gated MLPs prepared by
    :func:`saesteer.models.tl_fixes.apply_all_fixes` (``load_model(..., fix_layout=True)``).
    """
    check_weight_layout(layout)
    mlps = _lean_mlps(model)
    if layout == "input_major" and not mlps:
        raise ValueError(
            "weight_layout='input_major' re-lays gated MLPs prepared by saesteer's fixes, and this model has none "
            "(a gated MLP, loaded by saesteer.models.load_model with fix_layout=True). Keep 'upstream'."
        )
    inputs = layout == "input_major"
    for mlp in mlps:
        for name in _PROJECTIONS:
            tl_fixes._relayout(mlp._parameters[name], (0, 1) if inputs else (1, 0))
        mlp._saesteer_input_major = inputs
    return model


def weight_layout(model: nn.Module) -> str:
    """``model``'s layout as :func:`set_weight_layout` set it: ``"input_major"`` where a gated MLP is, else
    ``"upstream"``."""
    return "input_major" if any(m.__dict__.get("_saesteer_input_major") for m in _lean_mlps(model)) else "upstream"
