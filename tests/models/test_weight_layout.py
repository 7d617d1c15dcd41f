"""The weight layout (saesteer.models.weight_layout): "input_major" stores the gated MLP's W_gate / W_in and the
unembedding's W_U input by input, their products read them so (no copy); "onednn" packs the attention's, the gated
MLP's weights and W_U for oneDNN's product (packed again when a weight changes); both within rounding of upstream's, the fused
block and the lean path agreeing bit for bit; "upstream" gives stock TransformerLens' bits back."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import LLAMA_ARCH, FusedCount, tiny_arch_model
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

import saesteer.models.fused_block as fused_block
from saesteer.data.digests import module_digest
from saesteer.models import onednn, tl_fixes
from saesteer.models.kv_cache import PreallocatedKVCache
from saesteer.models.weight_layout import set_weight_layout, weight_layout

_LLAMA = dict(LLAMA_ARCH, d_model=48, d_mlp=160)
needs_onednn = pytest.mark.skipif(not onednn.available(), reason="this PyTorch has no oneDNN")
LAYOUTS = ["input_major", pytest.param("onednn", marks=needs_onednn)]


def _pair() -> tuple:
    stock = tiny_arch_model(_LLAMA, perturb=True).eval()
    return tl_fixes.apply_all_fixes(copy.deepcopy(stock)).eval(), stock


def _decode(model, cache, rows: int = 3, steps: int = 4) -> list[torch.Tensor]:
    """Logits of a left-padded prompt's forward and of ``steps`` one-token forwards of fixed tokens."""
    g = torch.Generator().manual_seed(rows)
    tokens = torch.randint(3, model.cfg.d_vocab, (rows, 7), generator=g)
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    nexts = torch.randint(3, model.cfg.d_vocab, (steps, rows, 1), generator=g)
    with torch.no_grad():
        out = [model(tokens, attention_mask=mask, past_kv_cache=cache)]
        out += [model(n, attention_mask=torch.ones_like(n), past_kv_cache=cache) for n in nexts]
    return out


def test_input_major_is_stored_input_by_input_and_read_as_stored(monkeypatch) -> None:
    """W_gate / W_in become [d_model, d_mlp]-contiguous and W_U [d_model, d_vocab]-contiguous (values unchanged,
    digest too); the operand each product gets is a view of that storage whose transpose is contiguous (no copy
    per call); W_out stays as upstream reads it."""
    fixed, _ = _pair()
    before = {n: p.detach().clone() for n, p in fixed.named_parameters()}
    digest = module_digest(fixed)
    assert weight_layout(fixed) == "upstream"
    assert set_weight_layout(fixed, "input_major") is fixed
    assert weight_layout(fixed) == "input_major"
    relaid = [(block.mlp, name) for block in fixed.blocks for name in ("W_gate", "W_in")] + [(fixed.unembed, "W_U")]
    for module, name in relaid:
        w = module._parameters[name]
        assert w.is_contiguous() and w.shape[0] == fixed.cfg.d_model
        operand = tl_fixes._operand(module, name)
        assert operand.data_ptr() == w.data_ptr() and operand.t().is_contiguous()
    for block in fixed.blocks:
        assert block.mlp.W_out.T.is_contiguous()
        assert tl_fixes._operand(block.mlp, "W_out").data_ptr() == block.mlp.W_out.data_ptr()
    assert all(torch.equal(p, before[n]) for n, p in fixed.named_parameters())
    assert module_digest(fixed) == digest
    tl_fixes.apply_layout_fixes(fixed)  # (re-run after replacing parameters) keeps the chosen layout
    assert fixed.blocks[0].mlp.W_gate.is_contiguous() and fixed.unembed.W_U.is_contiguous()
    assert weight_layout(fixed) == "input_major"
    for other in (copy.deepcopy(fixed), pickle.loads(pickle.dumps(fixed))):
        assert weight_layout(other) == "input_major" and other.blocks[1].mlp.W_in.is_contiguous()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_other_layouts_decode_fused_within_rounding_and_the_lean_path_agrees_bit_for_bit(
    attn, layout, monkeypatch
) -> None:
    """Every block runs fused under "input_major" and "onednn"; the logits are within float rounding of stock
    TransformerLens' (not its bits); a hook inside every MLP (the lean path, same stored or packed weights) gives the
    fused logits bit for bit (eager attention); "upstream" again gives its own bits before, and stock's under eager."""
    fixed, stock = _pair()
    fused_block.set_attn_implementation(fixed, attn)
    theirs = _decode(stock, TransformerLensKeyValueCache.init_cache(stock.cfg, "cpu", 3))
    upstream = _decode(fixed, PreallocatedKVCache.allocate(fixed.cfg, 3, 20))
    set_weight_layout(fixed, layout)
    count = FusedCount(monkeypatch)
    ours = _decode(fixed, PreallocatedKVCache.allocate(fixed.cfg, 3, 20))
    assert count.n == 5 * fixed.cfg.n_layers
    if layout == "onednn":  # (every packed weight was read packed)
        assert sum(map(len, _packed(fixed).values())) == 7 * fixed.cfg.n_layers + 1
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    seen = []

    def hook(x, hook):
        seen.append(hook.name)
        return x

    names = [f"blocks.{i}.mlp.hook_pre" for i in range(fixed.cfg.n_layers)]
    with fixed.hooks(fwd_hooks=[(name, hook) for name in names]):
        count.n = 0
        lean = _decode(fixed, PreallocatedKVCache.allocate(fixed.cfg, 3, 20))
    assert count.n == 0 and len(seen) == 5 * fixed.cfg.n_layers
    if attn == "eager":  # (a hooked block's lean path computes eager attention)
        assert all(torch.equal(a, b) for a, b in zip(lean, ours))
        if layout == "input_major":  # another summation, not the same one (oneDNN's can match MKL's at these sizes)
            assert any(not torch.equal(a, b) for a, b in zip(ours, theirs))
    set_weight_layout(fixed, "upstream")
    assert weight_layout(fixed) == "upstream" and fixed.blocks[0].mlp.W_gate.T.is_contiguous()
    back = _decode(fixed, PreallocatedKVCache.allocate(fixed.cfg, 3, 20))
    assert all(torch.equal(a, b) for a, b in zip(back, upstream))
    if attn == "eager":
        assert all(torch.equal(a, b) for a, b in zip(back, theirs))


def test_other_architectures_relay_their_unembedding_and_unfixed_models_are_refused(tmp_path) -> None:
    """A fixed GPT-2-style model (no gated MLP) re-lays its unembedding, within rounding; a model without saesteer's
    fixes is refused for "input_major" (nothing reads the layout) and left as it is for "upstream"."""
    from saesteer.models.loading import load_model

    fixed, stock = _pair()
    with pytest.raises(ValueError, match="use one of"):
        set_weight_layout(fixed, "column_major")
    with pytest.raises(ValueError, match="has none"):
        set_weight_layout(stock, "input_major")
    assert set_weight_layout(stock, "upstream") is stock and weight_layout(stock) == "upstream"
    gpt2 = tl_fixes.apply_all_fixes(
        tiny_arch_model(dict(positional_embedding_type="standard", normalization_type="LN", act_fn="gelu_new"))
    )
    tokens = torch.randint(3, gpt2.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        upstream = gpt2(tokens)
        set_weight_layout(gpt2, "input_major")
        assert weight_layout(gpt2) == "input_major" and gpt2.unembed.W_U.is_contiguous()
        torch.testing.assert_close(gpt2(tokens), upstream, atol=1e-5, rtol=1e-5)
        set_weight_layout(gpt2, "upstream")
        assert torch.equal(gpt2(tokens), upstream)
    with pytest.raises(ValueError, match="use one of"):  # before anything is loaded
        load_model(tmp_path / "missing", weight_layout="input-major")
    with pytest.raises(ValueError, match="fix_layout=True"):
        load_model(tmp_path / "missing", weight_layout="input_major", fix_layout=False)


def _packed(model) -> dict[str, set[str]]:
    """Module name -> the weights oneDNN holds packed for it now."""
    return {n: set(m._saesteer_packed._held) for n, m in model.named_modules() if "_saesteer_packed" in m.__dict__}


@needs_onednn
def test_onednn_packs_copies_leaves_the_weights_and_packs_again_when_a_weight_changes() -> None:
    """ "onednn" leaves every parameter's storage, values and digest as they were, and packs the gated MLP's three
    weights and W_U (nothing of the attention) on first use; after an in-place edit or load_state_dict the next
    forward uses the new weights (equal to upstream's forward of them within rounding; a stale packed copy would
    give the old logits); a deep copy or an unpickled model keeps the layout and gives the same bits; "upstream"
    drops the packed copies."""
    fixed, _ = _pair()
    storage = {n: (p.data_ptr(), p.stride()) for n, p in fixed.named_parameters()}
    digest = module_digest(fixed)
    tokens = torch.randint(3, fixed.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        upstream = fixed(tokens)
        set_weight_layout(fixed, "onednn")
        assert weight_layout(fixed) == "onednn" and len(_packed(fixed)) == 2 * fixed.cfg.n_layers + 1
        assert _packed(fixed) == dict.fromkeys(_packed(fixed), set())  # (packed on first use)
        ours = fixed(tokens)
        torch.testing.assert_close(ours, upstream, atol=1e-5, rtol=1e-5)
        mlp = {f"blocks.{i}.mlp": {"W_gate", "W_in", "W_out"} for i in range(fixed.cfg.n_layers)}
        attn = {f"blocks.{i}.attn": {"W_Q", "_W_K", "_W_V", "W_O"} for i in range(fixed.cfg.n_layers)}
        assert _packed(fixed) == {**attn, **mlp, "unembed": {"W_U"}}
        assert {n: (p.data_ptr(), p.stride()) for n, p in fixed.named_parameters()} == storage
        assert module_digest(fixed) == digest
        for other in (copy.deepcopy(fixed), pickle.loads(pickle.dumps(fixed))):
            assert weight_layout(other) == "onednn" and torch.equal(other(tokens), ours)

        reference = copy.deepcopy(fixed)
        set_weight_layout(reference, "upstream")
        assert weight_layout(reference) == "upstream" and _packed(reference) == {}
        for edit in (
            lambda m: m.blocks[1].mlp.W_in.mul_(3.0),
            lambda m: m.unembed.W_U.add_(0.5),
            lambda m: m.load_state_dict(
                {**m.state_dict(), "blocks.0.mlp.W_out": torch.zeros_like(m.blocks[0].mlp.W_out)}
            ),
        ):
            before = fixed(tokens)
            edit(fixed), edit(reference)
            after, want = fixed(tokens), reference(tokens)
            assert not torch.allclose(after, before, atol=1e-2)
            torch.testing.assert_close(after, want, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_onednn_falls_back_where_its_product_does_not_apply_and_refuses_what_it_cannot_pack(monkeypatch) -> None:
    """With autograd recording (a weight requiring grad), in float64, or packed names not asked for, the product is
    the BLAS' (stock bits, gradients flow); a float64 model or a PyTorch without oneDNN is refused with the fix."""
    fixed, stock = _pair()
    set_weight_layout(fixed, "onednn")
    tokens = torch.randint(3, fixed.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = stock(tokens)
    ours = fixed(tokens)  # grad mode, weights require grad: the BLAS' products
    assert torch.equal(ours.detach(), theirs) and _packed(fixed) == dict.fromkeys(_packed(fixed), set())
    ours.sum().backward()
    assert fixed.blocks[0].mlp.W_in.grad is not None
    x = torch.randn(4, fixed.cfg.d_model, dtype=torch.float64)
    operand = tl_fixes._operand(fixed.blocks[0].mlp, "W_in").double()
    with torch.no_grad():
        assert onednn.product(fixed.blocks[0].mlp, "W_in", x, operand, None) is None
        assert onednn.product(fixed.blocks[0].mlp, "b_in", x.float(), operand.float(), None) is None  # (not packed)

    wide = tl_fixes.apply_all_fixes(tiny_arch_model(_LLAMA).double())
    with pytest.raises(ValueError, match="packs float32 weights on the CPU"):
        set_weight_layout(wide, "onednn")
    monkeypatch.setattr(onednn, "available", lambda: False)
    with pytest.raises(ValueError, match="needs a PyTorch build with oneDNN"):
        set_weight_layout(copy.deepcopy(fixed), "onednn")
    with pytest.raises(ValueError, match="has none"):
        set_weight_layout(stock, "onednn")


@needs_onednn
@pytest.mark.parametrize("method", ["swap", "decoder"])
def test_sae_steering_on_a_onednn_model_encodes_with_the_packed_encoder(method) -> None:
    """On a model under "onednn" an SAE steerer (TopK SAE) is attached with its SAE's encoder packed for oneDNN and
    steers within float rounding of the same steerer on the upstream layout; on "upstream" its plain ``hook_fn``."""
    from helpers import tiny_sae

    from saesteer.steering.decoder import DecoderSteering
    from saesteer.steering.latent import LatentSteering

    fixed, _ = _pair()
    sae = tiny_sae("topk", d_in=fixed.cfg.d_model, k=6)
    scores = torch.rand(sae.cfg.d_sae, generator=torch.Generator().manual_seed(0))
    steer = (
        LatentSteering(sae, scores, mode="swap", sink_factor=None)
        if method == "swap"
        else DecoderSteering(sae, [0, 3, 5], alpha=2.0, sink_factor=None)
    )
    tokens = torch.randint(3, fixed.cfg.d_vocab, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean = fixed(tokens)
        [(_, hook)] = steer.fwd_hooks(fixed)
        assert hook == steer.hook_fn
        with steer.apply(fixed):
            upstream = fixed(tokens)
        set_weight_layout(fixed, "onednn")
        [(_, hook)] = steer.fwd_hooks(fixed)
        assert hook.func == steer.hook_fn and hook.keywords["packed"] is steer._encoder
        assert not steer._encoder._held
        with steer.apply(fixed):
            ours = fixed(tokens)
    assert set(steer._encoder._held) == {"W_enc"}
    assert (upstream - clean).abs().max() > 1e-2  # (it steers)
    torch.testing.assert_close(ours, upstream, atol=1e-4, rtol=1e-4)
