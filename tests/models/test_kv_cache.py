"""The preallocated KV cache (saesteer.models.kv_cache): bit for bit what TransformerLens' own cache gives,
written in place, and clear errors for what does not fit."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_same_bits, tiny_arch_model, tiny_sae, tiny_subspace
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

import saesteer.generation as generation
from saesteer.generation import Decoder, generate
from saesteer.models.kv_cache import PreallocatedKVCache
from saesteer.models.tl_fixes import apply_all_fixes
from saesteer.steering.decoder import DecoderSteering
from saesteer.steering.sasa import Attribute, SASADecoder

_GQA = dict(
    gated_mlp=True,
    positional_embedding_type="rotary",
    normalization_type="RMS",
    n_key_value_heads=2,
    act_fn="silu",
    rotary_dim=8,
)
_LOCAL = dict(use_local_attn=True, attn_types=["global", "local", "global"], window_size=4)
HOSTED = {  # as tests/models/test_loading.py: the architecture families load_model hosts
    "llama": _GQA,
    "gpt2": dict(positional_embedding_type="standard", normalization_type="LN", act_fn="gelu_new"),
    "neox": dict(positional_embedding_type="rotary", rotary_dim=4, normalization_type="LN", act_fn="gelu",
                 parallel_attn_mlp=True),
    "gemma2": dict(_GQA, act_fn="gelu_pytorch_tanh", use_normalization_before_and_after=True, attn_scores_soft_cap=50.0,
                   output_logits_soft_cap=30.0, **_LOCAL),
    "gemma3": dict(_GQA, act_fn="gelu_pytorch_tanh", use_normalization_before_and_after=True, use_qk_norm=True,
                   rotary_base=1_000_000, rotary_base_local=10_000, **_LOCAL),
    "qwen3": dict(_GQA, use_qk_norm=True),
}  # fmt: skip


def _model(arch: str) -> HookedTransformer:
    """A random model of ``arch`` (biases and norm gains too), prepared as load_model prepares models."""
    model = tiny_arch_model(HOSTED[arch], perturb=True)
    apply_all_fixes(model)
    return model.eval()


def _upstream_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make generate use TransformerLens' own (torch.cat) cache, as before the preallocated one."""

    def init(cfg, rows, capacity, device=None):
        return TransformerLensKeyValueCache.init_cache(cfg, device, rows)

    monkeypatch.setattr(generation.PreallocatedKVCache, "allocate", staticmethod(init))


def _padded_batch(model):
    tokens = torch.randint(3, model.cfg.d_vocab, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return tokens, mask


def _runs(model):
    sub = tiny_subspace(model, torch.Generator().manual_seed(1))
    steer = DecoderSteering(tiny_sae(d_in=32, layer=1), [1, 2, 3], tier="proportional", alpha=2.0)
    sampled = dict(do_sample=True, top_p=0.9, seed=3)
    return {
        "greedy": dict(do_sample=False),
        "sampled, steered": dict(steerers=[steer], **sampled),
        "sasa shared": dict(decoder=SASADecoder([Attribute(sub, 5.0)], max_candidates=5, candidate_forward="auto")),
        "sasa fork": dict(
            decoder=SASADecoder([Attribute(sub, 5.0)], max_candidates=5, candidate_forward="fork"), **sampled
        ),
    }


@pytest.mark.parametrize("arch", list(HOSTED))
def test_preallocated_cache_is_bit_exact(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every logit and token of a padded batch, plain, steered, SASA (shared and fork), equals what upstream's
    cache gives, on each architecture family load_model hosts (GPT-2, Llama with GQA, NeoX, Gemma 2 and 3, Qwen 3)."""
    model = _model(arch)
    tokens, mask = _padded_batch(model)
    kw = dict(attention_mask=mask, max_new_tokens=8, stop_at_eos=False, output_scores=True)
    ours = {name: generate(model, tokens, **kw, **extra) for name, extra in _runs(model).items()}
    _upstream_cache(monkeypatch)
    for name, extra in _runs(model).items():
        theirs = generate(model, tokens, **kw, **extra)
        assert torch.equal(ours[name].tokens, theirs.tokens), name
        assert all(torch.equal(a, b) for a, b in zip(ours[name].scores, theirs.scores)), name


class CacheProbe(Decoder):
    """Plain decoding that records, at every step, where the cache's first layer keeps its keys."""

    def __init__(self) -> None:
        self.seen: list[tuple[type, int, int]] = []

    def choose(self, state, logits):
        e = state.cache.entries[0]
        self.seen.append((type(state.cache), e.past_keys.data_ptr(), e.past_keys.shape[1]))
        return super().choose(state, logits)


def test_generate_writes_the_cache_in_place() -> None:
    model = _model("llama")
    tokens, mask = _padded_batch(model)
    probe = CacheProbe()
    generate(model, tokens, attention_mask=mask, decoder=probe, max_new_tokens=6, stop_at_eos=False)
    kinds, pointers, lengths = zip(*probe.seen)
    assert set(kinds) == {PreallocatedKVCache} and len(set(pointers)) == 1  # one buffer, never re-allocated
    assert list(lengths) == [9, 10, 11, 12, 13, 14]


def test_errors_name_what_does_not_fit() -> None:
    model = _model("gpt2")
    with pytest.raises(ValueError, match=r"65 positions is beyond the model's context \(n_ctx=64\)"):
        PreallocatedKVCache.allocate(model.cfg, 2, 65)
    cache = PreallocatedKVCache.allocate(model.cfg, 2, 12)
    tokens = torch.randint(3, model.cfg.d_vocab, (3, 4))
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"3 rows x 4 new positions does not fit this KV cache \(2 rows"):
            model(tokens, attention_mask=torch.ones_like(tokens), past_kv_cache=cache)
        model(tokens[:2], attention_mask=torch.ones_like(tokens[:2]), past_kv_cache=cache)
        assert cache.length == 4 and all(e.length == 4 for e in cache.entries)
        long = torch.randint(3, model.cfg.d_vocab, (2, 9))
        with pytest.raises(ValueError, match=r"2 rows x 9 new positions .* 4 of 12 positions filled"):
            model(long, attention_mask=torch.ones_like(long), past_kv_cache=cache)
        assert cache.length == 4  # nothing written
    # generate refuses what cannot fit n_ctx before generating
    with pytest.raises(ValueError, match="more than the model's context"):
        generate(model, tokens, max_new_tokens=62)


def test_entries_take_prefix_views_and_copies() -> None:
    """Assigning past_keys (as SASA's candidate forward does to keep or undo positions): a prefix view of the
    buffer sets the length, another tensor is copied in; the frozen cache writes without extending."""
    model = _model("llama")
    cache = PreallocatedKVCache.allocate(model.cfg, 2, 10)
    e = cache.entries[0]
    k = torch.randn(2, 3, 2, 8)
    keys, values = e.append(k, k + 1)
    assert e.length == 3 and torch.equal(keys, k) and torch.equal(e.past_values, k + 1)
    e.past_keys, e.past_values = e.past_keys[:, :2], e.past_values[:, :2]
    assert e.length == 2 and e.past_values.shape[1] == 2
    e.past_keys, e.past_values = torch.zeros(2, 5, 2, 8), torch.ones(2, 5, 2, 8)
    assert e.length == 5 and torch.equal(e.past_keys, torch.zeros(2, 5, 2, 8))
    e.past_values = e.past_values[:, :4]
    with pytest.raises(ValueError, match="holds 5 keys but 4 values"):
        e.append(k, k)
    e.past_values = torch.ones(2, 5, 2, 8)
    with pytest.raises(ValueError, match="does not fit this KV cache entry"):
        e.past_keys = torch.zeros(3, 1, 2, 8)
    cache.freeze()
    keys, _ = e.append(k[:, :1], k[:, :1])
    assert keys.shape[1] == 6 and e.length == 5
    mask = cache.append_attention_mask(torch.ones(2, 4, dtype=torch.long))
    assert mask.shape == (2, 4) and cache.length == 0


@pytest.mark.parametrize("arch", list(HOSTED))
def test_fixed_model_and_cache_equal_stock_transformer_lens(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fix together (load_model's TransformerLens fixes, the preallocated cache, its kept rotated keys)
    against stock TransformerLens with its own cache: every logit of 12 greedy and 12 sampled steps of a padded
    batch, bit for bit (where batched products are place-independent, else within rounding: helpers)."""
    stock = tiny_arch_model(HOSTED[arch], perturb=True).eval()
    fixed = apply_all_fixes(copy.deepcopy(stock)).eval()
    tokens, mask = _padded_batch(stock)
    runs = [dict(do_sample=False), dict(do_sample=True, top_p=0.9, seed=3)]
    kw = dict(attention_mask=mask, max_new_tokens=12, stop_at_eos=False, output_scores=True)
    ours = [generate(fixed, tokens, **kw, **extra) for extra in runs]
    _upstream_cache(monkeypatch)
    for extra, mine in zip(runs, ours):
        theirs = generate(stock, tokens, **kw, **extra)
        assert torch.equal(mine.tokens, theirs.tokens)
        for a, b in zip(mine.scores, theirs.scores):
            assert_same_bits(a, b)  # (the grouped-query products: exact where batched products are)


def _decode(model, cache, tokens, mask, steps: int) -> list[torch.Tensor]:
    """Logits of a prompt forward and ``steps`` one-token forwards (the argmax fed back) over ``cache``."""
    out = []
    with torch.no_grad():
        logits = model(tokens, attention_mask=mask, past_kv_cache=cache)[:, -1]
        for _ in range(steps):
            out.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            logits = model(nxt, attention_mask=torch.ones_like(nxt), past_kv_cache=cache)[:, -1]
    return out


def test_rotated_keys_are_kept_and_dropped_when_their_inputs_change() -> None:
    """Each cached key is rotated once and kept; a write to the keys outside ``append``, to the attention mask, or
    to the rotary tables makes every position rotate again, and the logits stay those of TransformerLens' own
    cache (which rotates all keys at every step)."""
    model = _model("llama")
    tokens, mask = _padded_batch(model)
    one = torch.ones(3, 1, dtype=torch.long)
    reference = _decode(model, TransformerLensKeyValueCache.init_cache(model.cfg, "cpu", 3), tokens, mask, 4)
    cache = PreallocatedKVCache.allocate(model.cfg, 3, 20)
    assert [torch.equal(a, b) for a, b in zip(_decode(model, cache, tokens, mask, 4), reference)] == [True] * 4
    entry, attn = cache.entries[1], model.blocks[1].attn
    assert entry._rot_valid == entry.length == 13
    for edit in ("keys", "mask", "table"):
        if edit == "keys":
            entry.past_keys[1, 0] += 1.0
        elif edit == "mask":
            cache.previous_attention_mask[0, 3] = 0
        else:
            with torch.no_grad():
                attn.rotary_sin[2] += 0.5
        fresh = _fresh_reference(model, cache)
        entry._rot[:, : entry.length] = 0.0  # had a kept position been read, the logits would differ
        with torch.no_grad():
            got = model(torch.tensor([[5], [6], [7]]), attention_mask=one, past_kv_cache=cache)
        assert torch.equal(got, fresh), edit
    assert entry._rot_valid == entry.length == 16
    fresh = _fresh_reference(model, cache)
    entry._rot[:, :16] = 0.0  # nothing edited: the kept positions are read
    with torch.no_grad():
        got = model(torch.tensor([[5], [6], [7]]), attention_mask=one, past_kv_cache=cache)
    assert not torch.allclose(got, fresh)


def _fresh_reference(model, cache: PreallocatedKVCache) -> torch.Tensor:
    """The next forward's logits over a TransformerLens cache holding a copy of ``cache``'s keys, values, mask."""
    entries = [TransformerLensKeyValueCacheEntry(e.past_keys.clone(), e.past_values.clone()) for e in cache.entries]
    upstream = TransformerLensKeyValueCache(
        entries=entries, previous_attention_mask=cache.previous_attention_mask.clone()
    )
    with torch.no_grad():
        return model(
            torch.tensor([[5], [6], [7]]), attention_mask=torch.ones(3, 1, dtype=torch.long), past_kv_cache=upstream
        )


def test_a_hook_editing_rotated_keys_in_place_edits_one_forward() -> None:
    """A hook on ``hook_rot_k`` that edits its input in place changes that forward alone, as with upstream's
    cache (it gets its own copy of the kept rotated keys)."""
    model = _model("llama")
    tokens, mask = _padded_batch(model)
    caches = [
        PreallocatedKVCache.allocate(model.cfg, 3, 20),
        TransformerLensKeyValueCache.init_cache(model.cfg, "cpu", 3),
    ]
    results = []
    for cache in caches:
        with torch.no_grad():
            model(tokens, attention_mask=mask, past_kv_cache=cache)
            one = torch.ones(3, 1, dtype=torch.long)
            with model.hooks(fwd_hooks=[("blocks.0.attn.hook_rot_k", lambda act, hook: act.mul_(2.0))]):
                hooked = model(torch.tensor([[5], [6], [7]]), attention_mask=one, past_kv_cache=cache)
            after = model(torch.tensor([[8], [9], [4]]), attention_mask=one, past_kv_cache=cache)
        results.append((hooked, after))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
