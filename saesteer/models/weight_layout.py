"""How the weights of a decoding step's widest products are stored: as TransformerLens' products read them (bit for
bit), input by input, or packed for oneDNN's kernel; the layout that multiplies fastest depends on the CPU, its BLAS
and the batch size (issue 16).

TransformerLens' ``GatedMLP`` and ``Unembed`` hand ``F.linear`` the weight ``W.T.contiguous()``, stored [d_out,
d_model] (one row per output; :func:`saesteer.models.tl_fixes.apply_layout_fixes` keeps it so): each output is a
dot product over a row of d_model numbers.

- ``"input_major"``: stored [d_model, d_out] instead (one row per input), the same product y = x W = sum_i x_i
  W[i, :] streams the weight row by row. Measured on an AMD EPYC with MKL, one thread, SmolLM2-135M (d_model 576;
  ``experiments/bench_layout.py``, ``figures/bench_layout.json``): one row's products with the gated MLP's 576 x
  1536 weights took 0.64-0.65x the time input by input, with the 576 x 49,152 unembedding 0.53x. It re-lays those
  (the gated MLP's ``W_gate`` and ``W_in``, the unembedding's ``W_U``); the MLP's output projection (d_mlp inputs)
  was faster as upstream stores it, the attention's key/value projections slower input by input at batch 1 and its
  query/output ones 12-13% faster (not re-laid yet). At batch 8 the re-laid products were no faster (the
  unembedding slower): it is the layout for batch-1 decoding.
- ``"onednn"``: the stored weights as upstream's, and a copy of the attention's four projections, the gated MLP's
  three weights and the unembedding packed once for oneDNN's product (:mod:`saesteer.models.onednn`), which does
  not repack the weight at every call as the BLAS does: the layout for batched decoding on the CPU measured (at
  batch 8 every one of those products was faster, 0.42x to 0.86x; at batch 1 the MLP's input products and the
  unembedding 0.70x-0.83x, the attention's key/value ones 1.16x), at the cost of a second copy of those weights in
  memory (0.54 GB for SmolLM2-135M in float32).

Another CPU or BLAS can rank the layouts otherwise: measure (``experiments/bench_layout.py`` per weight,
``experiments/bench_peers.py`` rows "input-major" and "onednn" end to end) before choosing.

Both are other summation orders, so logits equal upstream's up to float rounding (~1e-7 relative), not bit for
bit; the module-by-module path (a hook inside a block) and the fused block (:mod:`saesteer.models.fused_block`)
read the same stored (or packed) weights, so they agree bit for bit with each other under every layout. Values,
shapes, the weights' digest and everything saved are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from saesteer.models import onednn, tl_fixes

__all__ = ["WEIGHT_LAYOUTS", "check_weight_layout", "set_weight_layout", "weight_layout"]

WEIGHT_LAYOUTS = ("upstream", "input_major", "onednn")
"""How a decoding step's widest products read their weights (:func:`set_weight_layout`)."""

_REPLACED = {
    tl_fixes._gated_mlp_lean: {"input_major": ("W_gate", "W_in"), "onednn": ("W_gate", "W_in", "W_out")},
    tl_fixes._unembed_lean: {"input_major": ("W_U",), "onednn": ("W_U",)},
}
"""The forward that reads a module's weights through ``tl_fixes._operand`` -> layout -> the weights it changes."""


def check_weight_layout(layout: str) -> str:
    """``layout`` if it is one of :data:`WEIGHT_LAYOUTS`, else ValueError naming them."""
    if layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout={layout!r}: use one of {WEIGHT_LAYOUTS}.")
    return layout


def _relayable(model: nn.Module) -> list[tuple[nn.Module, dict[str, tuple[str, ...]]]]:
    """(module, layout -> the names of the weights it changes) for every module of ``model`` whose forward
    saesteer's fixes bound (the lean forwards and the fused block read the layout: ``tl_fixes._operand``,
    ``saesteer.models.onednn.product``)."""
    out = []
    for module in model.modules():
        forward = tl_fixes._bound(module, "forward")
        names = _REPLACED.get(forward)
        if forward is tl_fixes._attention_forward_lean:  # (q, k, v as _qkv_lean names them, and the output)
            names = {"input_major": (), "onednn": (*module._saesteer_qkv[:3], "W_O")}
        if names is not None:
            out.append((module, names))
    return out


def set_weight_layout(model: nn.Module, layout: str = "upstream") -> nn.Module:
    """Store (or pack) ``model``'s widest products' weights in ``layout`` (in place); returns ``model``.

    - ``"upstream"`` (the default): as TransformerLens' forward reads them; every logit equals stock
      TransformerLens' (with ``attn_implementation="eager"``).
    - ``"input_major"``: the MLP's gate and input weights and the unembedding one row per input feature, the
      products read them so (see the module docstring): faster batch-1 products on the CPUs measured.
    - ``"onednn"``: the attention's projections, the gated MLP's weights and the unembedding packed for oneDNN's
      product besides (a second copy): faster batched products on the CPUs measured; float32 models on the CPU.

    The last two equal upstream up to float rounding. Raises ValueError for another value, for a layout other than
    ``"upstream"`` on a model without saesteer's fixes (:func:`saesteer.models.tl_fixes.apply_all_fixes`,
    ``load_model(..., fix_layout=True)``), and for ``"onednn"`` where this PyTorch has no oneDNN or the model is not
    float32 on the CPU.
    """
    check_weight_layout(layout)
    modules = _relayable(model)
    if layout != "upstream" and not modules:
        raise ValueError(
            f"weight_layout={layout!r} changes weights that saesteer's fixes read, and this model has none "
            "(load it with saesteer.models.load_model, fix_layout=True, or apply tl_fixes.apply_all_fixes). Keep "
            "'upstream'."
        )
    if layout == "onednn":
        if not onednn.available():
            raise ValueError(
                "weight_layout='onednn' needs a PyTorch build with oneDNN (torch.backends.mkldnn.is_available(): "
                "x86 builds have it); use 'upstream' or 'input_major'."
            )
        placed = {(p.device.type, p.dtype) for m, _ in modules for p in m.parameters(recurse=False)}
        if placed != {("cpu", torch.float32)}:
            raise ValueError(
                f"weight_layout='onednn' packs float32 weights on the CPU; this model's are {sorted(map(str, placed))}. "
                "Load it on the CPU in float32 (or move it there first), or keep 'upstream'."
            )
    for module, names in modules:
        relaid = names["input_major"] if layout == "input_major" else ()
        for name in names["input_major"]:
            tl_fixes._relayout(module._parameters[name], (0, 1) if name in relaid else (1, 0))
        module._saesteer_input_major = relaid
        if layout == "onednn":
            module._saesteer_packed = onednn.PackedWeights(names["onednn"])
        else:
            module.__dict__.pop("_saesteer_packed", None)
    return model


def weight_layout(model: nn.Module) -> str:
    """``model``'s layout as :func:`set_weight_layout` set it: ``"input_major"`` where any weight is stored so,
    ``"onednn"`` where any is packed, else ``"upstream"``."""
    modules = [m for m, _ in _relayable(model)]
    if any(m.__dict__.get("_saesteer_input_major") for m in modules):
        return "input_major"
    return "onednn" if any("_saesteer_packed" in m.__dict__ for m in modules) else "upstream"
