"""The fused block forward (saesteer.models.fused_block): taken where it applies, the same bits as the lean path
and stock TransformerLens, and out of the way of every hook, replaced module, gradient and override."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import LLAMA_ARCH, FusedCount, tiny_arch_model
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.hook_points import HookPoint

import saesteer.models.fused_block as fused_block
from saesteer.models.kv_cache import PreallocatedKVCache
from saesteer.models.tl_fixes import apply_all_fixes, isolated_positions, rotary_position_mask

_LLAMA = LLAMA_ARCH
VARIANTS = {
    "llama": _LLAMA,
    "pre-norm folded (RMSPre)": dict(_LLAMA, normalization_type="RMSPre"),
    "partial rotary": dict(_LLAMA, rotary_dim=4),
    "one key/value head": dict(_LLAMA, n_key_value_heads=1),
    "float64": dict(_LLAMA, dtype=torch.float64),
}


def _pair(arch: dict) -> tuple:
    stock = tiny_arch_model(arch, perturb=True).eval()
    return apply_all_fixes(copy.deepcopy(stock)).eval(), stock


def _batch(model, rows: int):
    tokens = torch.randint(3, model.cfg.d_vocab, (rows, 7), generator=torch.Generator().manual_seed(rows))
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0  # left padding: the prompt's pad rows attend to nothing (the softmax clean-up runs)
    return tokens, mask


def _decode(model, cache, tokens, mask, steps: int = 5) -> list[torch.Tensor]:
    """Logits of the prompt's forward and of ``steps`` one-token forwards (argmax fed back) over ``cache``."""
    out = []
    with torch.no_grad():
        logits = model(tokens, attention_mask=mask, past_kv_cache=cache)
        for _ in range(steps):
            out.append(logits)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits = model(nxt, attention_mask=torch.ones_like(nxt), past_kv_cache=cache)
    return out


def _preallocated(model, rows: int) -> PreallocatedKVCache:
    return PreallocatedKVCache.allocate(model.cfg, rows, 20)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_forward_is_taken_and_equals_the_lean_path_and_stock(
    variant: str, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every block of every forward (a padded prompt, then one token at a time) runs fused, and every logit is
    the lean path's (the plans removed) and stock TransformerLens' with its own cache, bit for bit."""
    fixed, stock = _pair(VARIANTS[variant])
    assert all(block._saesteer_fused is not None for block in fixed.blocks)
    tokens, mask = _batch(fixed, rows)
    count = FusedCount(monkeypatch)
    fused = _decode(fixed, _preallocated(fixed, rows), tokens, mask)
    assert count.n == 6 * fixed.cfg.n_layers
    lean_model = copy.deepcopy(fixed)
    for block in lean_model.blocks:
        block._saesteer_fused = None
    lean = _decode(lean_model, _preallocated(lean_model, rows), tokens, mask)
    theirs = _decode(stock, TransformerLensKeyValueCache.init_cache(stock.cfg, "cpu", rows), tokens, mask)
    assert count.n == 6 * fixed.cfg.n_layers  # (the copy without plans ran none)
    for a, b, c in zip(fused, lean, theirs):
        assert torch.equal(a, b) and torch.equal(a, c)


def _double(x, hook):
    return x * 2.0


def _fused_blocks(model, monkeypatch, run) -> tuple[int, list[torch.Tensor]]:
    count = FusedCount(monkeypatch)
    out = run()
    return count.n, out


@pytest.mark.parametrize(
    "hook_name, fused_per_forward",
    [
        ("blocks.1.attn.hook_z", 2),  # inside block 1: it runs the lean path (the hook sees z), the others fused
        ("blocks.1.ln2.hook_normalized", 2),
        ("blocks.1.hook_resid_post", 3),  # called by the fused forward as upstream calls it
        ("blocks.1.hook_resid_pre", 3),
    ],
)
def test_hooks_are_honoured(hook_name: str, fused_per_forward: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook inside a block sends that block to the lean path, which calls it; hooks on the residual stream keep
    the fused path; the logits equal stock TransformerLens' with the same hook, and nothing stays after."""
    fixed, stock = _pair(_LLAMA)
    tokens, mask = _batch(fixed, 2)
    seen = []

    def hook(x, hook):
        seen.append(hook.name)
        return x * 2.0

    with fixed.hooks(fwd_hooks=[(hook_name, hook)]):
        n, ours = _fused_blocks(fixed, monkeypatch, lambda: _decode(fixed, _preallocated(fixed, 2), tokens, mask))
    assert n == 6 * fused_per_forward and seen == [hook_name] * 6
    with stock.hooks(fwd_hooks=[(hook_name, _double)]):
        theirs = _decode(stock, TransformerLensKeyValueCache.init_cache(stock.cfg, "cpu", 2), tokens, mask)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    n, _ = _fused_blocks(fixed, monkeypatch, lambda: _decode(fixed, _preallocated(fixed, 2), tokens, mask, 1))
    assert n == 2 * 3  # the hook removed: every block fused again


def test_replaced_modules_global_hooks_gradients_and_overrides_take_the_lean_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hook point replaced in a block (as SAELens' HookedSAETransformer splices an SAE in), a global module
    hook, gradients and a stock cache entry each keep the fused path out."""
    fixed, _ = _pair(_LLAMA)
    tokens, mask = _batch(fixed, 2)

    def run(steps: int = 1):
        return lambda: _decode(fixed, _preallocated(fixed, 2), tokens, mask, steps)

    fixed.blocks[0].mlp.hook_post = HookPoint()
    assert _fused_blocks(fixed, monkeypatch, run())[0] == 2 * 2
    fixed.blocks[0].mlp.hook_post = fixed.blocks[1].mlp.hook_post.__class__()
    assert _fused_blocks(fixed, monkeypatch, run())[0] == 2 * 2  # a new module, even of the same class
    fixed, _ = _pair(_LLAMA)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        assert _fused_blocks(fixed, monkeypatch, run())[0] == 0
    finally:
        handle.remove()
    count = FusedCount(monkeypatch)
    fixed(tokens, attention_mask=mask, past_kv_cache=_preallocated(fixed, 2))  # gradients on
    with torch.no_grad():
        fixed(tokens, attention_mask=mask, past_kv_cache=TransformerLensKeyValueCache.init_cache(fixed.cfg, "cpu", 2))
    assert count.n == 0
    assert _fused_blocks(fixed, monkeypatch, run())[0] == 2 * 3


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_fuse_their_own_modules(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copied or unpickled model's plans name its own modules: it runs fused, with the original's logits, and
    a hook on the copy does not reach the original."""
    fixed, _ = _pair(_LLAMA)
    other = copy.deepcopy(fixed) if how == "deepcopy" else pickle.loads(pickle.dumps(fixed))
    assert other.blocks[0]._saesteer_fused.attn is other.blocks[0].attn
    tokens, mask = _batch(fixed, 2)
    mine = _decode(fixed, _preallocated(fixed, 2), tokens, mask)
    n, theirs = _fused_blocks(other, monkeypatch, lambda: _decode(other, _preallocated(other, 2), tokens, mask))
    assert n == 6 * 3 and all(torch.equal(a, b) for a, b in zip(mine, theirs))
    other.blocks[1].attn.hook_z.add_hook(_double)
    assert _fused_blocks(fixed, monkeypatch, lambda: _decode(fixed, _preallocated(fixed, 2), tokens, mask, 1))[0] == 6


@pytest.mark.parametrize(
    "arch",
    [
        dict(positional_embedding_type="standard", normalization_type="LN", act_fn="gelu_new"),  # GPT-2
        dict(_LLAMA, attn_scores_soft_cap=50.0),
        dict(_LLAMA, use_qk_norm=True),
        dict(_LLAMA, gated_mlp=False),
        dict(_LLAMA, n_key_value_heads=None),  # plain multi-head attention (other products upstream)
    ],
)
def test_blocks_it_does_not_reproduce_get_no_plan(arch: dict) -> None:
    fixed, _ = _pair(arch)
    assert all(block._saesteer_fused is None for block in fixed.blocks)


def test_position_and_isolation_overrides_run_fused_with_the_lean_paths_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """SASA's candidate forward shape (C new positions given one position by rotary_position_mask, kept apart by
    isolated_positions) runs in every fused block, with the lean path's logits bit for bit (the plans removed); the
    overrides change the logits, and the next plain step (kept rotated keys) is the lean path's again."""
    fixed, _ = _pair(_LLAMA)
    lean = copy.deepcopy(fixed)
    for block in lean.blocks:
        block._saesteer_fused = None
    tokens, mask = _batch(fixed, 3)
    cand = torch.randint(3, fixed.cfg.d_vocab, (3, 4), generator=torch.Generator().manual_seed(1))
    same_pos = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype), torch.zeros(3, 3, dtype=mask.dtype)], 1)

    def run(model):
        cache = _preallocated(model, 3)
        with torch.no_grad():
            model(tokens, attention_mask=mask, past_kv_cache=cache)
            with rotary_position_mask(model, same_pos), isolated_positions(model, 4):
                out = model(cand, attention_mask=torch.ones_like(cand), past_kv_cache=cache)
            for e in cache.entries:  # keep the first candidate, as SASA keeps the chosen one
                e.past_keys, e.past_values = e.past_keys[:, :8], e.past_values[:, :8]
            cache.previous_attention_mask = cache.previous_attention_mask[:, :8]
            after = model(cand[:, :1], attention_mask=torch.ones_like(cand[:, :1]), past_kv_cache=cache)
        return out, after

    count = FusedCount(monkeypatch)
    fused = run(fixed)
    assert count.n == 3 * fixed.cfg.n_layers
    plain = run(lean)
    assert count.n == 3 * fixed.cfg.n_layers
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])
    with torch.no_grad():  # each candidate as the single next token: the first one here, positions and all
        alone = fixed(torch.cat([tokens, cand[:, :1]], 1), attention_mask=torch.cat([mask, mask[:, -1:]], 1))
    torch.testing.assert_close(fused[0][:, 0], alone[:, -1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fused[0][:, 1], alone[:, -1], atol=1e-3)  # (the others are other tokens)


def test_sasa_decoding_runs_its_candidate_forwards_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    """SASA on a fused model: the prompt and every step's candidate forward run fused (no hook in any block), with
    the tokens and scores of the lean path bit for bit."""
    from helpers import tiny_subspace

    from saesteer.generation import generate
    from saesteer.steering.sasa import Attribute, SASADecoder

    fixed, _ = _pair(_LLAMA)
    lean = copy.deepcopy(fixed)
    for block in lean.blocks:
        block._saesteer_fused = None
    tokens, mask = _batch(fixed, 3)
    sub = tiny_subspace(fixed, torch.Generator().manual_seed(1))

    def run(model):
        decoder = SASADecoder([Attribute(sub, 5.0)], max_candidates=6)
        kw = dict(attention_mask=mask, max_new_tokens=5, stop_at_eos=False, output_scores=True)
        return generate(model, tokens, decoder=decoder, **kw)

    count = FusedCount(monkeypatch)
    ours = run(fixed)
    assert count.n == (1 + 5) * fixed.cfg.n_layers  # the prompt, then one candidate forward per step
    theirs = run(lean)
    assert torch.equal(ours.tokens, theirs.tokens)
    assert all(torch.equal(a, b) for a, b in zip(ours.scores, theirs.scores))


def test_isolated_positions_bad_input() -> None:
    fixed, stock = _pair(_LLAMA)
    with pytest.raises(ValueError, match="apply_mask_sharing"), isolated_positions(stock, 2):
        pass
    with pytest.raises(ValueError, match=">= 0"), isolated_positions(fixed, -1):
        pass
    tokens, mask = _batch(fixed, 1)
    with pytest.raises(ValueError, match="isolate at most"), torch.no_grad(), isolated_positions(fixed, 8):
        fixed(tokens, attention_mask=mask, past_kv_cache=_preallocated(fixed, 1))
    assert all(block.attn._saesteer_memo.isolated == 0 for block in fixed.blocks)  # restored after the error


# --- attn_implementation="sdpa": one scaled_dot_product_attention call, equal up to rounding ---------------------


def _forced(model, cache, tokens, mask, nexts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of the prompt's forward and of one-token forwards of ``nexts`` (given: a near-tie decoded otherwise
    by one implementation cannot make the two runs part)."""
    with torch.no_grad():
        out = [model(tokens, attention_mask=mask, past_kv_cache=cache)]
        out += [model(n, attention_mask=torch.ones_like(n), past_kv_cache=cache) for n in nexts]
    return out


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sdpa_is_taken_and_equals_eager_up_to_rounding(variant: str, rows: int, monkeypatch) -> None:
    """Under "sdpa" every block of every forward runs fused (a padded prompt: its pad rows attend nothing, then
    one token at a time), every logit within float rounding of eager's (which stays stock's, bit for bit), and
    none is NaN; setting "eager" back gives eager's bits again."""
    fixed, _ = _pair(VARIANTS[variant])
    tokens, mask = _batch(fixed, rows)
    eager = _decode(fixed, _preallocated(fixed, rows), tokens, mask)
    nexts = [logits[:, -1].argmax(-1, keepdim=True) for logits in eager[:-1]]
    eager = _forced(fixed, _preallocated(fixed, rows), tokens, mask, nexts)
    assert fused_block.set_attn_implementation(fixed, "sdpa") is fixed
    assert fused_block.attn_implementation(fixed) == "sdpa"
    count = FusedCount(monkeypatch)
    sdpa = _forced(fixed, _preallocated(fixed, rows), tokens, mask, nexts)
    assert count.n == len(nexts + [tokens]) * fixed.cfg.n_layers
    tol = dict(atol=1e-5, rtol=1e-5) if fixed.cfg.dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    for a, b in zip(sdpa, eager):
        assert not a.isnan().any()
        torch.testing.assert_close(a, b, **tol)
    assert any(not torch.equal(a, b) for a, b in zip(sdpa, eager))  # another computation, not the same one
    fused_block.set_attn_implementation(fixed, "eager")
    again = _forced(fixed, _preallocated(fixed, rows), tokens, mask, nexts)
    assert all(torch.equal(a, b) for a, b in zip(again, eager))


def test_sdpa_leaves_hooked_blocks_to_eager(monkeypatch) -> None:
    """A hook on the attention pattern sees TransformerLens' pattern: its block runs the lean path (eager, as
    stock with the same hook, bit for bit where every block is hooked), the others sdpa."""
    fixed, stock = _pair(_LLAMA)
    fused_block.set_attn_implementation(fixed, "sdpa")
    tokens, mask = _batch(fixed, 2)
    seen = []

    def hook(x, hook):
        seen.append(x.shape)
        return x

    names = [f"blocks.{i}.attn.hook_pattern" for i in range(fixed.cfg.n_layers)]
    with fixed.hooks(fwd_hooks=[(name, hook) for name in names]):
        n, ours = _fused_blocks(fixed, monkeypatch, lambda: _decode(fixed, _preallocated(fixed, 2), tokens, mask))
    assert n == 0 and len(seen) == 6 * fixed.cfg.n_layers
    theirs = _decode(stock, TransformerLensKeyValueCache.init_cache(stock.cfg, "cpu", 2), tokens, mask)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    with fixed.hooks(fwd_hooks=[(names[1], hook)]):
        assert _fused_blocks(fixed, monkeypatch, lambda: _decode(fixed, _preallocated(fixed, 2), tokens, mask))[0] == 12


def test_sdpa_survives_copies_and_switching_mid_generation() -> None:
    """The choice travels with deepcopy and pickle; switching between decoding steps re-lays the kept rotated keys
    (several rows: eager's products and sdpa read them in other layouts) and stays within rounding of eager."""
    fixed, _ = _pair(_LLAMA)
    fused_block.set_attn_implementation(fixed, "sdpa")
    for other in (copy.deepcopy(fixed), pickle.loads(pickle.dumps(fixed))):
        assert fused_block.attn_implementation(other) == "sdpa"
    tokens, mask = _batch(fixed, 3)
    fused_block.set_attn_implementation(fixed, "eager")
    eager = _decode(fixed, _preallocated(fixed, 3), tokens, mask, 4)
    nexts = [logits[:, -1].argmax(-1, keepdim=True) for logits in eager[:-1]]
    cache = _preallocated(fixed, 3)
    with torch.no_grad():
        mixed = [fixed(tokens, attention_mask=mask, past_kv_cache=cache)]
        for i, n in enumerate(nexts):
            fused_block.set_attn_implementation(fixed, ("sdpa", "eager")[i % 2])
            mixed.append(fixed(n, attention_mask=torch.ones_like(n), past_kv_cache=cache))
            rot = cache.entries[0]._rot
            assert rot.permute(0, 2, 1, 3).is_contiguous() if i % 2 == 0 else rot.permute(0, 2, 3, 1).is_contiguous()
    for a, b in zip(mixed, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attn_implementation_bad_input(tmp_path) -> None:
    from saesteer.models.loading import load_model

    fixed, _ = _pair(_LLAMA)
    with pytest.raises(ValueError, match="use one of"):
        fused_block.set_attn_implementation(fixed, "flash")
    gpt2, _ = _pair(dict(positional_embedding_type="standard", normalization_type="LN", act_fn="gelu_new"))
    with pytest.raises(ValueError, match="has none"):
        fused_block.set_attn_implementation(gpt2, "sdpa")
    fused_block.set_attn_implementation(gpt2, "eager")  # (what every model does)
    assert fused_block.attn_implementation(gpt2) == "eager"
    with pytest.raises(ValueError, match="use one of"):  # before anything is loaded
        load_model(tmp_path / "missing", attn_implementation="SDPA")
    with pytest.raises(ValueError, match="fix_layout=True"):
        load_model(tmp_path / "missing", attn_implementation="sdpa", fix_layout=False)
