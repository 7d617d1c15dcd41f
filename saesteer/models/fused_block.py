"""A transformer block's cached forward as one function: the batch-1 decoding step without TransformerLens'
per-module Python (issue 16).

At batch 1 a decoding step on the CPU is bound by Python, not by arithmetic: SmolLM2-135M's structure with tiny
widths took ~17 ms a step through TransformerLens' modules (with :mod:`saesteer.models.tl_fixes`) against
~11 ms through Hugging Face's, ~0.2 ms more per layer, nearly all of the gap to HF ``generate``. Per layer the
TransformerLens path makes ~450 Python calls: 5 module calls, ~20 hook-point calls (each checking for hooks),
~50 ``nn.Module.__getattr__`` lookups, and per-layer re-checks of what is the same for every layer of a forward
(rotary tables, mask, the cache entry's layout). Fused: ~12 ms; SmolLM2-135M's one-token forward went from
1.155x to 1.068x HF's at batch 1 (``experiments/bench_step.py``). What remained is TransformerLens' attention:
per key/value head products, a mask and a softmax, ~12 operations per layer where HF calls one fused kernel,
which does not give TransformerLens' bits. :func:`set_attn_implementation` offers both: ``"eager"`` (the default,
bit for bit) and ``"sdpa"`` (that one kernel; equal up to float rounding).

:func:`fused_forward` runs the same tensor operations, on the same tensors, in the same order as the lean path
of ``tl_fixes`` (so the outputs are the same bits: the tests compare every logit against stock TransformerLens),
from one function per block: the block's modules and hook points are checked once per call (still in place,
nothing attached), the per-forward tensors (rotary cos/sin, causal mask) are shared through the model's mask
memo, and the hook points between ``hook_resid_pre`` and ``hook_resid_post`` are not called (nothing is attached
to them, so upstream's would return their input). ``hook_resid_pre`` and ``hook_resid_post`` are called as
upstream, so steering there takes this path, and so does SASA's candidate forward (its positions and isolation
set through ``tl_fixes.rotary_position_mask`` and ``isolated_positions``, not hooks). Anything else runs the lean
path: a hook or a replaced module inside the block, gradients, ``torch.compile``, no preallocated cache entry,
devices other than the CPU or dtypes other than float32/float64 (the grouped products' bits are measured there
only).

It covers pre-norm blocks with RMS norms, grouped-query rotary attention (NeoX layout, global, without soft
caps, QK norms or extra scalings) and a gated MLP: the Llama family (SmolLM, Llama, Mistral, Qwen).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from saesteer.models import onednn, tl_fixes
from saesteer.models.kv_cache import PreallocatedKVCacheEntry, entry_holding

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "apply_fused_blocks",
    "attn_implementation",
    "check_attn_implementation",
    "fused_forward",
    "set_attn_implementation",
]

_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)

# the hook points of a block that the fused forward does not call, per submodule ("" the block itself)
_SKIPPED = {
    "": ("hook_attn_out", "hook_resid_mid", "hook_mlp_out"),
    "ln1": ("hook_scale", "hook_normalized"),
    "ln2": ("hook_scale", "hook_normalized"),
    "attn": ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern", "hook_z"),
    "mlp": ("hook_pre", "hook_pre_linear", "hook_post"),
}
# what must still be bound where apply_fused_blocks found it: the block's own forward and the tl_fixes the fused
# forward reproduces (submodule, method, function; None: the class's own method, not overridden on the instance)
_BINDINGS = (
    ("", "forward", "_block_forward_fused"),
    ("attn", "forward", "_attention_forward_lean"),
    ("attn", "calculate_qkv_matrices", "_qkv_lean"),
    ("attn", "calculate_attention_scores", "_gqa_scores"),
    ("attn", "calculate_z_scores", "_gqa_z"),
    ("attn", "apply_rotary", "_apply_rotary_shared"),
    ("attn", "apply_causal_mask", "_apply_causal_mask_shared"),
    ("mlp", "forward", "_gated_mlp_lean"),
    ("ln1", "forward", "_norm_forward_once"),
    ("ln2", "forward", None),
)


class _Plan(NamedTuple):
    """What a block's fused forward reads, fixed when :func:`apply_fused_blocks` ran, and what must still hold."""

    ln1: nn.Module
    attn: nn.Module
    ln2: nn.Module
    mlp: nn.Module
    slots: tuple[tuple[nn.Module, str, nn.Module], ...]
    """(parent, name, module) for the four submodules and every skipped hook point, which the fused forward does
    not call: still in place, without a forward hook?"""
    bindings: tuple[tuple[nn.Module, str, object], ...]
    """(module, method, the bound partial): still bound?"""
    weighted_norms: tuple[bool, bool]
    """``RMSNorm`` (times its weight ``w``) rather than ``RMSNormPre``, for ln1 and ln2."""


def _eligible(block: nn.Module) -> bool:
    """True for a block whose every step :func:`fused_forward` reproduces (see the module docstring). The run-time
    switches for more hook points are read at every call; the lean attention forward is required by _BINDINGS."""
    from transformer_lens.components import GroupedQueryAttention, RMSNorm, RMSNormPre
    from transformer_lens.components.mlps.gated_mlp import GatedMLP
    from transformer_lens.utilities.activation_functions import softcap_enabled

    cfg = block.cfg
    attn, mlp = block._modules.get("attn"), block._modules.get("mlp")
    norms = (block._modules.get("ln1"), block._modules.get("ln2"))
    return bool(
        block.__dict__.get("_saesteer_plain", False)
        and type(attn) is GroupedQueryAttention
        and type(mlp) is GatedMLP
        and all(type(n) in (RMSNorm, RMSNormPre) for n in norms)
        and not cfg.attn_only
        and not cfg.parallel_attn_mlp
        and not cfg.use_normalization_before_and_after
        and not cfg.use_qk_norm
        and not cfg.is_layer_norm_activation()
        and cfg.positional_embedding_type == "rotary"
        and not cfg.rotary_adjacent_pairs
        and not cfg.use_dynamic_ntk_rope
        and not softcap_enabled(cfg.attn_scores_soft_cap)
        and attn.attn_type == "global"
        and cfg.n_heads % cfg.n_key_value_heads == 0
    )


def _plan(block: nn.Module) -> _Plan | None:
    if not _eligible(block):
        return None
    from transformer_lens.components import RMSNorm

    parts = {name: block._modules[name] if name else block for name in _SKIPPED}
    slots = [(block, name, parts[name]) for name in ("ln1", "attn", "ln2", "mlp")]
    slots += [(parts[p], h, parts[p]._modules.get(h)) for p, hooks in _SKIPPED.items() for h in hooks]
    if any(not isinstance(m, tl_fixes.QuietHookPoint) for _, _, m in slots[4:]):
        return None
    bindings = []
    for part, method, name in _BINDINGS:
        patched = parts[part].__dict__.get(method)
        fn = None if name is None else getattr(tl_fixes, name, None) or globals()[name]
        if (patched if fn is None else tl_fixes._bound(parts[part], method)) is not fn:
            return None
        bindings.append((parts[part], method, patched))
    return _Plan(
        parts["ln1"],
        parts["attn"],
        parts["ln2"],
        parts["mlp"],
        tuple(slots),
        tuple(bindings),
        (type(parts["ln1"]) is RMSNorm, type(parts["ln2"]) is RMSNorm),
    )


def _holds(plan: _Plan) -> bool:
    """The plan's modules are in place and bound as planned, and none of those the fused forward skips has a
    forward hook (or the global registries one): else the lean path runs, calling every module and hook point."""
    for parent, name, module in plan.slots:
        if parent._modules.get(name) is not module or module._forward_hooks or module._forward_pre_hooks:
            return False
    for module, method, patched in plan.bindings:
        if module.__dict__.get(method) is not patched:
            return False
    return not tl_fixes._global_hooks()


def _norm(x: Tensor, norm: nn.Module, weighted: bool) -> Tensor:
    """``RMSNormPre`` / ``RMSNorm`` forward in float32/float64: ``x / sqrt(mean(x^2) + eps)`` (times ``w``)."""
    scale = (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    out = x / scale
    return out * norm._parameters["w"] if weighted else out


def _product(module: nn.Module, name: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` for a contiguous ``x`` [rows, pos, in] and ``weight`` read from
    ``module.<name>``, as the product it runs, on ``x``'s [rows * pos, in] view: ``x @ weight.t()`` (``mm``, or
    ``addmm`` with a bias), the same operands and kernel, without ``linear``'s and ``matmul``'s dispatch and
    reshapes; oneDNN's product where ``weight_layout`` packed the weight, as the lean path's. [rows * pos, out]."""
    x = x.view(-1, x.shape[-1])
    y = onednn.product(module, name, x, weight, bias)
    if y is not None:
        return y
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


class _Forward(NamedTuple):
    """What every fused layer of one forward shares (positions ``start`` to ``start + n`` of the mask)."""

    cos: Tensor
    signed_sin: Tensor
    final_mask: Tensor
    every_row_attends: bool
    attends_all: bool
    """Every query attends every key (a decoding step without padding): the mask changes nothing."""


def _shared(attn: nn.Module, resid: Tensor, start: int, n: int, attention_mask: Tensor) -> _Forward | None:
    """This forward's rotary tables and causal mask (those the lean path's helpers compute and share, under
    ``tl_fixes.rotary_position_mask`` at the positions it sets, with ``isolated_positions``' mask), looked up once
    per layer; None where the lean path would not rotate through ``tl_fixes``' shared tables."""
    override = attn._saesteer_memo.rotary_mask
    positions = attention_mask if override is None else override

    def compute() -> _Forward | None:
        if positions.shape != attention_mask.shape or not tl_fixes._rotates_here(attn, resid, start, positions):
            return None  # (the lean path says what does not fit)
        key_len = start + n
        final_mask = tl_fixes._final_mask(attn, n, key_len, start, attention_mask)
        return _Forward(
            *tl_fixes._shared_tables(attn, start, n, positions.to(attention_mask.device)),
            final_mask,
            tl_fixes._every_row_attends(attn, n, key_len, start, attention_mask),
            bool(final_mask.all()),  # (a host sync, once per forward)
        )

    key, refs = tl_fixes._tables_key(attn, "fused", start, n)
    key = (*key, attn._saesteer_memo.isolated)
    if override is not None:  # (held by the entry, so its id is not reused while cached)
        key, refs = (*key, id(override), override._version), (*refs, override)
    return attn._saesteer_memo.get(key, refs, attention_mask, compute)


def fused_forward(
    block: nn.Module,
    resid_pre: Float[Tensor, "batch pos d_model"],
    entry: PreallocatedKVCacheEntry | None,
    attention_mask: Int[Tensor, "batch key_pos"] | None,
) -> Float[Tensor, "batch pos d_model"] | None:
    """The block's forward with a preallocated cache entry, as one function (see the module docstring); None
    where it does not apply (the caller runs the lean path). Same operations, same bits as the lean path (under
    ``"sdpa"`` the attention is one kernel instead: :func:`set_attn_implementation`)."""
    plan: _Plan | None = block.__dict__.get("_saesteer_fused")
    if (
        plan is None
        or type(entry) is not PreallocatedKVCacheEntry
        or attention_mask is None
        or torch.is_grad_enabled()
        or resid_pre.dim() != 3
        or resid_pre.device.type != "cpu"
        or resid_pre.dtype not in (torch.float32, torch.float64)
        or resid_pre.dtype != block.cfg.dtype
        or tl_fixes._extra_hook_points(block.cfg)
        or tl_fixes._compiling()
        or not _holds(plan)
    ):
        return None
    attn, mlp = plan.attn, plan.mlp
    params = attn._parameters
    batch, n, _ = resid_pre.shape
    start = entry._filled[0]
    if params["W_Q"].device != resid_pre.device or start + n > entry.capacity:
        return None
    shared = _shared(attn, resid_pre, start, n, attention_mask)
    if shared is None:
        return None
    resid_pre = block.hook_resid_pre(resid_pre)
    normed = _norm(resid_pre, plan.ln1, plan.weighted_norms[0])

    # q, k, v (_qkv_lean): the product with the "(h d_head) d_model" view of each weight
    names = attn._saesteer_qkv
    qkv = []
    for w_name, b_name in zip(names[:3], names[3:]):
        w, b = params[w_name], params[b_name]
        bias = None if tl_fixes._zero(attn, b) else b.reshape(-1)
        y = _product(attn, w_name, normed, w.permute(0, 2, 1).reshape(-1, w.shape[1]), bias)
        qkv.append(y.view(batch, n, b.shape[0], b.shape[1]))
    q, k, v = qkv
    k, v = entry.append(k, v)
    if entry_holding(k) is not entry:  # (a buffer that is itself a view: the lean path rotates every key)
        entry = None

    # rotary (_apply_rotary_shared): the queries and the new keys at positions start..start+n, the kept ones as kept
    rd = attn.cfg.rotary_dim
    q = tl_fixes._rotate(q, shared.cos, shared.signed_sin, rd)
    tables = attn._buffers["rotary_cos"], attn._buffers["rotary_sin"]
    attention, key_order = _ATTENTION[block.__dict__.get("_saesteer_attn", "eager")]
    rotated = None
    if entry is not None and attn._saesteer_memo.rotary_mask is None:  # (an override's positions were not kept)
        rotated = entry.rotated_keys(
            k,
            attention_mask,
            functools.partial(_rotate_keys, attn, attention_mask, start, shared),
            stamp=(id(tables[0]), id(tables[1]), tables[0]._version, tables[1]._version),
            order=key_order,
        )
    k = rotated if rotated is not None else tl_fixes._rotate_shared(attn, k, 0, attention_mask)
    z = attention(attn, q, k, v, shared)

    # the output projection
    w_o = params["W_O"]
    w_o = w_o.permute(2, 0, 1).reshape(w_o.shape[2], -1).contiguous()
    b_o = params["b_O"]
    attn_out = _product(attn, "W_O", z, w_o, None if tl_fixes._zero(attn, b_o) else b_o).view(resid_pre.shape)

    # the MLP (_gated_mlp_lean) and the residual stream
    resid_mid = resid_pre + attn_out
    normed = _norm(resid_mid, plan.ln2, plan.weighted_norms[1])
    weights = mlp._parameters
    pre_act = _product(mlp, "W_gate", normed, tl_fixes._operand(mlp, "W_gate"), None)
    pre_linear = _product(mlp, "W_in", normed, tl_fixes._operand(mlp, "W_in"), None)
    post = mlp.act_fn(pre_act) * pre_linear
    b_in, b_out = weights["b_in"], weights["b_out"]
    if not tl_fixes._zero(mlp, b_in):
        post = post + b_in
    mlp_out = _product(
        mlp, "W_out", post, tl_fixes._operand(mlp, "W_out"), None if tl_fixes._zero(mlp, b_out) else b_out
    )
    return block.hook_resid_post(resid_mid + mlp_out.view(resid_pre.shape))


def _eager(
    attn: nn.Module,
    q: Float[Tensor, "batch pos head d_head"],
    k: Float[Tensor, "batch key_pos kv_head d_head"],
    v: Float[Tensor, "batch key_pos kv_head d_head"],
    shared: _Forward,
) -> Float[Tensor, "batch pos d_attn"]:
    """TransformerLens' attention, bit for bit: ``softmax(where(mask, q k^T / attn_scale, IGNORE)) v`` through the
    lean path's grouped products (_gqa_scores, _apply_causal_mask_shared, _attention_forward_lean, _gqa_z); the
    ``where`` left out where the mask keeps every key (it would return the scores unchanged)."""
    batch, n, heads, _ = q.shape
    key_len = k.shape[1]
    products = tl_fixes._grouped_bmm(q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), min(batch, key_len, heads) > 1)
    scores = q.new_empty(batch, heads, n, key_len)
    torch.div(products, attn.attn_scale, out=scores.view(products.shape))
    if not shared.attends_all:
        scores = torch.where(shared.final_mask, scores, attn._buffers["IGNORE"])
    pattern = torch.nn.functional.softmax(scores, dim=-1)
    if not shared.every_row_attends:
        pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
    products = tl_fixes._grouped_bmm(pattern, v.permute(0, 2, 1, 3), min(batch, key_len, heads) > 1)
    z = products.contiguous().view(batch, heads, n, v.shape[-1]).permute(0, 2, 1, 3)
    return z.reshape(batch, n, heads * v.shape[-1])


def _sdpa(
    attn: nn.Module,
    q: Float[Tensor, "batch pos head d_head"],
    k: Float[Tensor, "batch key_pos kv_head d_head"],
    v: Float[Tensor, "batch key_pos kv_head d_head"],
    shared: _Forward,
) -> Float[Tensor, "batch pos d_attn"]:
    """The same function in one ``scaled_dot_product_attention`` call (each query head reading its group's
    key/value head, ``enable_gqa``), as Hugging Face's default attention: equal up to float rounding, not bit for
    bit (see :func:`set_attn_implementation`). A query that attends nothing gets 0, as upstream's NaN clean-up."""
    batch, n, heads, _ = q.shape
    z = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=None if shared.attends_all else shared.final_mask,
        scale=1.0 / float(attn.attn_scale),
        enable_gqa=True,
    )
    if not shared.every_row_attends:
        z = torch.nan_to_num(z, nan=0.0)
    return z.transpose(1, 2).reshape(batch, n, heads * v.shape[-1])


def _rotate_keys(
    attn: nn.Module, attention_mask: Tensor, start: int, shared: _Forward, keys: Tensor, offset: int
) -> Tensor:
    """The rotation :meth:`PreallocatedKVCacheEntry.rotated_keys` asks for: this forward's new positions with the
    tables already gathered for the queries, other positions through ``tl_fixes._rotate_shared``."""
    if offset == start and keys.size(1) == shared.cos.size(1):
        return tl_fixes._rotate(keys, shared.cos, shared.signed_sin, attn.cfg.rotary_dim)
    return tl_fixes._rotate_shared(attn, keys, offset, attention_mask)


def _block_forward_fused(self, resid_pre, shortformer_pos_embed=None, past_kv_cache_entry=None, attention_mask=None):
    """The block's forward (bound per block by :func:`apply_fused_blocks`): :func:`fused_forward` where it applies,
    else ``tl_fixes``' lean path."""
    if shortformer_pos_embed is None:
        out = fused_forward(self, resid_pre, past_kv_cache_entry, attention_mask)
        if out is not None:
            return out
    return tl_fixes._block_forward_norm_once(
        self, resid_pre, shortformer_pos_embed, past_kv_cache_entry, attention_mask
    )


_ATTENTION = {"eager": (_eager, (0, 2, 3, 1)), "sdpa": (_sdpa, (0, 2, 1, 3))}
"""Each attention implementation and the layout of the kept rotated keys it reads (``rotated_keys``' ``order``:
positions contiguous for eager's products, d_head contiguous for scaled_dot_product_attention)."""

ATTN_IMPLEMENTATIONS = tuple(_ATTENTION)
"""How a fused block computes attention (:func:`set_attn_implementation`)."""


def check_attn_implementation(attn_implementation: str) -> str:
    """``attn_implementation`` if it is one of :data:`ATTN_IMPLEMENTATIONS`, else ValueError naming them."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={attn_implementation!r}: use one of {ATTN_IMPLEMENTATIONS}.")
    return attn_implementation


def set_attn_implementation(model: nn.Module, attn_implementation: str = "eager") -> nn.Module:
    """Choose how ``model``'s fused blocks compute attention; returns ``model``.

    - ``"eager"`` (the default): TransformerLens' arithmetic, bit for bit (every logit equals stock
      TransformerLens').
    - ``"sdpa"``: ``softmax(q k^T / attn_scale + mask) v`` in one ``torch.nn.functional.scaled_dot_product_attention``
      call, Hugging Face's default: the same function up to float rounding (~1e-7 relative in the attention output,
      so a near-tie can decode another token), one fused kernel where eager dispatches ~12 operations per layer.

    Either way only where :func:`fused_forward` runs: a hook inside a block (``hook_pattern``,
    ``hook_attn_scores``, ...), gradients, a stock cache or a GPU send that block to the lean path, which is
    eager. Raises ValueError for another value, and for ``"sdpa"`` on a model without fused blocks (the Llama family,
    loaded by :func:`saesteer.models.load_model` with ``fix_layout=True``) or with torch < 2.5 (no ``enable_gqa``).
    """
    check_attn_implementation(attn_implementation)
    blocks = [m for m in model.modules() if m.__dict__.get("_saesteer_fused") is not None]
    if attn_implementation == "sdpa":
        if not blocks:
            raise ValueError(
                "attn_implementation='sdpa' runs in fused blocks only, and this model has none (they cover the "
                "Llama family: RMS norms, grouped rotary attention, gated MLP, loaded by saesteer.models.load_model "
                "with fix_layout=True). Keep 'eager'."
            )
        if not _SDPA_GQA:
            raise ValueError(
                f"attn_implementation='sdpa' needs torch >= 2.5 (scaled_dot_product_attention's enable_gqa); this is "
                f"torch {torch.__version__}. Upgrade torch or keep 'eager'."
            )
    for block in blocks:
        block._saesteer_attn = attn_implementation
    return model


def attn_implementation(model: nn.Module) -> str:
    """``model``'s attention implementation as :func:`set_attn_implementation` set it: ``"sdpa"`` where a fused
    block computes attention so, else ``"eager"``."""
    fused = (m for m in model.modules() if m.__dict__.get("_saesteer_fused") is not None)
    return "sdpa" if any(m.__dict__.get("_saesteer_attn") == "sdpa" for m in fused) else "eager"


def apply_fused_blocks(model: nn.Module) -> nn.Module:
    """Give every block of ``model`` that :func:`fused_forward` covers a forward that takes it (after the
    ``tl_fixes`` it reproduces; :func:`saesteer.models.tl_fixes.apply_all_fixes` applies both). Same outputs bit
    for bit; idempotent; survives ``copy.deepcopy`` and pickling. Returns ``model``."""
    from transformer_lens.components import TransformerBlock

    for block in model.modules():
        if not isinstance(block, TransformerBlock) or tl_fixes._bound(block, "forward") is None:
            continue
        tl_fixes._bind(block, "forward", _block_forward_fused)
        block._saesteer_fused = _plan(block)
    return model
