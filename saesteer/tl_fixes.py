"""Work-arounds for TransformerLens 3.9 performance problems. Delete each one when TransformerLens fixes it.

Issue 7 (upstream cause): TransformerLens 3.9 builds the weight matrix that ``F.linear`` wants from the
stored parameter on every forward call, and that is a full copy of the weight when the stored layout
does not match:

- ``GatedMLP.forward`` calls ``F.linear(x, W_gate.T.contiguous())``, likewise ``W_in`` and ``W_out``
  (``transformer_lens/components/mlps/gated_mlp.py``);
- ``Unembed.forward`` calls ``F.linear(residual, W_U.T.contiguous(), b_U)``
  (``transformer_lens/components/unembed.py``);
- ``simple_attn_linear`` reshapes ``rearrange(W_Q, "h d_model d_head -> (h d_head) d_model")``, a
  copy for a ``[h, d_model, d_head]``-contiguous tensor; likewise ``W_K``, ``W_V`` and, for grouped-query
  attention, ``_W_K``, ``_W_V`` (``transformer_lens/utilities/attention.py``);
- ``AbstractAttention.forward`` does ``rearrange(W_O, "h d_head d_model -> d_model (h d_head)").contiguous()``
  (``transformer_lens/components/abstract_attention.py``).

Profiled on SmolLM2-135M with a KV cache (torch.profiler, one new token): those copies took about
80% of the CPU time of a decoding step. The fix stores each of these parameters with strides such that
the view the forward builds is already contiguous, so ``.contiguous()`` / ``reshape`` return views.
Values, shapes and every result are unchanged (the same contiguous matrix reaches ``F.linear``), only
the memory layout differs; ``Module.to`` keeps the layout. Note that ``safetensors`` refuses
non-contiguous tensors: call ``.contiguous()`` on a state dict before saving it with safetensors.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["apply_layout_fixes", "fixed_parameters"]


def _relayout(param: nn.Parameter, permutation: tuple[int, ...]) -> bool:
    """Store ``param`` so that ``param.permute(*permutation)`` is contiguous; values and shape unchanged.

    Returns True if the storage changed, False if it already had that layout.
    """
    if param.permute(*permutation).is_contiguous():
        return False
    inverse = tuple(sorted(range(len(permutation)), key=permutation.__getitem__))
    with torch.no_grad():
        param.data = param.data.permute(*permutation).contiguous().permute(*inverse)
    return True


def fixed_parameters(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name every parameter of ``model`` the TransformerLens 3.9 forward re-lays, with the permutation
    under which the forward reads it (that permuted view should be contiguous).

    Covers ``GatedMLP`` (``W_gate``, ``W_in``, ``W_out``), ``Unembed`` (``W_U``), and attention
    (``W_Q``, ``W_K``/``_W_K``, ``W_V``/``_W_V``, ``W_O``) when it uses the plain input path; the
    standard ``MLP`` needs nothing (``torch.addmm`` reads ``W_in``/``W_out`` in place).
    """
    from transformer_lens.components import AbstractAttention, Unembed
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    wanted: dict[str, tuple[int, ...]] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, GatedMLP):
            for name in ("W_gate", "W_in", "W_out"):
                wanted[prefix + name] = (1, 0)
        elif isinstance(module, Unembed):
            wanted[prefix + "W_U"] = (1, 0)
        elif isinstance(module, AbstractAttention):
            cfg = module.cfg
            if getattr(cfg, "load_in_4bit", False):
                continue
            if not (cfg.use_split_qkv_input or cfg.use_attn_in):  # simple_attn_linear
                for name in ("W_Q", "W_K", "W_V", "_W_K", "_W_V"):
                    if isinstance(module._parameters.get(name), nn.Parameter):
                        wanted[prefix + name] = (0, 2, 1)
            if not cfg.use_attn_result and isinstance(module._parameters.get("W_O"), nn.Parameter):
                wanted[prefix + "W_O"] = (2, 0, 1)
    return wanted


def apply_layout_fixes(model: nn.Module) -> nn.Module:
    """Re-lay, in place and once, the parameters that TransformerLens 3.9 copies on every forward
    (see the module docstring), so decoding stops copying every weight matrix at every token.

    Outputs are bit-for-bit the same. Idempotent; call it again after replacing parameters. Returns
    ``model``; ``model.saesteer_layout_fixed`` holds the names of the re-laid parameters.
    """
    params = dict(model.named_parameters())
    changed = []
    for name, permutation in fixed_parameters(model).items():
        param = params.get(name)
        if param is not None and param.dim() == len(permutation) and _relayout(param, permutation):
            changed.append(name)
    model.saesteer_layout_fixed = sorted(set(getattr(model, "saesteer_layout_fixed", [])) | set(changed))
    return model
