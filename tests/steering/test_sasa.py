import pytest
import torch
from helpers import tiny_model, tiny_sae

from saesteer.generation import generate
from saesteer.hooks import steering
from saesteer.models.tokens import tokenize
from saesteer.steering.decoder import DecoderSteering
from saesteer.steering.sasa import Attribute, SASADecoder
from saesteer.steering.sasa_subspace import Subspace, embedding_hook_name, final_hidden_states
from saesteer.steering.word_filter import WordFilter

PROMPTS = ["the cat sat on the mat and", "hello you"]


def _subspace(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    wv = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    return Subspace(
        wv=wv,
        mu_mu=torch.randn(32, generator=g) * 0.1,
        model_name=model.cfg.model_name,
        d_model=32,
        hook_name=embedding_hook_name(model),
    )


def _reference_sasa(model, prompt, attrs, n_cand, steps, transform="softmax", steerers=()):
    """SASA as the reference implements it, without a KV cache: full re-forward for every candidate."""
    seq = model.to_tokens(prompt)[0]
    out = []
    with steering(model, steerers):
        for _ in range(steps):
            logits = model(seq[None])[0, -1]
            cand_logits, cand = logits.topk(n_cand)
            seqs = torch.stack([torch.cat([seq, c.view(1)]) for c in cand])
            hidden = final_hidden_states(model, seqs)
            bonus = torch.zeros(n_cand)
            for sub, beta in attrs:
                m = sub.margin(hidden)
                bonus += beta * (m.softmax(0) if transform == "softmax" else m)
            tok = cand[(cand_logits + bonus).argmax()]
            out.append(int(tok))
            seq = torch.cat([seq, tok.view(1)])
    return out


@pytest.mark.parametrize("transform", ["softmax", "raw"])
def test_matches_reference_loop_greedy(transform):
    model = tiny_model(rotary=True, gated=True)
    sub = _subspace(model)
    dec = SASADecoder([Attribute(sub, 5.0)], max_candidates=6, margin_transform=transform)
    out = generate(model, PROMPTS, decoder=dec, max_new_tokens=6, do_sample=False)
    for i, p in enumerate(PROMPTS):
        assert out.tokens[i].tolist() == _reference_sasa(model, p, [(sub, 5.0)], 6, 6, transform)


def test_steering_changes_tokens_and_raises_margins():
    model = tiny_model()
    sub = _subspace(model)
    plain = generate(model, PROMPTS * 3, max_new_tokens=8, do_sample=True, seed=0)
    dec = SASADecoder([Attribute(sub, 50.0)], max_candidates=20, margin_transform="raw")
    steered = generate(model, PROMPTS * 3, decoder=dec, max_new_tokens=8, do_sample=True, seed=0)
    assert not torch.equal(plain.tokens, steered.tokens)

    def mean_margin(out):
        toks = torch.cat([out.prompt_tokens, out.tokens], dim=1)
        mask = torch.cat([out.prompt_mask, torch.ones_like(out.tokens)], dim=1)
        return sub.margin(final_hidden_states(model, toks, mask)).mean()

    assert mean_margin(steered) > mean_margin(plain)


def test_beta_zero_is_plain_decoding():
    model = tiny_model()
    sub = _subspace(model)
    kw = dict(max_new_tokens=10, do_sample=True, seed=4, temperature=0.9, top_k=8)
    plain = generate(model, PROMPTS, **kw)
    zero = generate(model, PROMPTS, decoder=SASADecoder([Attribute(sub, 0.0)]), **kw)
    assert torch.equal(plain.tokens, zero.tokens)
    # the candidate path itself (fork, batched forward, merge) with a negligible beta
    tiny = generate(model, PROMPTS, decoder=SASADecoder([Attribute(sub, 1e-12)], max_candidates=8), **kw)
    assert torch.equal(plain.tokens, tiny.tokens)


def test_several_attributes_add_up():
    model = tiny_model()
    a, b = _subspace(model, 1), _subspace(model, 2)
    dec = SASADecoder([Attribute(a, 3.0), Attribute(b, 7.0)], max_candidates=5)
    out = generate(model, PROMPTS[:1], decoder=dec, max_new_tokens=5, do_sample=False)
    assert out.tokens[0].tolist() == _reference_sasa(model, PROMPTS[0], [(a, 3.0), (b, 7.0)], 5, 5)


def test_composes_with_sae_steering():
    model = tiny_model()
    sub = _subspace(model)
    steer = DecoderSteering(tiny_sae(), [1, 2, 3], tier="constant", alpha=0.3)
    dec = SASADecoder([Attribute(sub, 4.0)], max_candidates=6)
    out = generate(model, PROMPTS[:1], steerers=[steer], decoder=dec, max_new_tokens=5, do_sample=False)
    assert out.tokens[0].tolist() == _reference_sasa(model, PROMPTS[0], [(sub, 4.0)], 6, 5, steerers=[steer])


def test_word_filter_masks_banned_words():
    model = tiny_model()
    plain = generate(model, PROMPTS * 4, max_new_tokens=12, do_sample=True, seed=1, temperature=2.0)
    words = {model.tokenizer.decode([t]) for t in plain.tokens.flatten().tolist()}
    banned = sorted(words)[:3]
    filt = WordFilter(model, banned)
    out = generate(
        model, PROMPTS * 4, logits_processors=[filt], max_new_tokens=12, do_sample=True, seed=1, temperature=2.0
    )
    produced = {model.tokenizer.decode([t]) for t in out.tokens.flatten().tolist()}
    assert not produced & set(banned)
    with pytest.raises(ValueError, match="non-empty"):
        WordFilter(model, ["", "  "])


def test_bad_arguments():
    model = tiny_model()
    sub = _subspace(model)
    with pytest.raises(ValueError, match="beta"):
        Attribute(sub, -1.0)
    with pytest.raises(ValueError, match="beta"):
        Attribute(sub, float("nan"))
    with pytest.raises(ValueError, match="max_candidates"):
        SASADecoder([Attribute(sub, 1.0)], max_candidates=0)
    with pytest.raises(ValueError, match="margin_transform"):
        SASADecoder([Attribute(sub, 1.0)], margin_transform="sigmoid")
    with pytest.raises(ValueError, match="candidate_forward"):
        SASADecoder([Attribute(sub, 1.0)], candidate_forward="copy")
    with pytest.raises(ValueError, match="max_rows"):
        SASADecoder([Attribute(sub, 1.0)], max_rows=0)
    with pytest.raises(ValueError, match="KV cache"):
        generate(model, "the cat", decoder=SASADecoder([Attribute(sub, 1.0)]), use_cache=False)


# --- shared-prefix candidate forward == forked single-token forward ---------------------------------

PROMPTS3 = ["the cat sat on the mat and ran to the park", "hello you", "we love big red"]  # left-padded


def _variant(kind: str, seed: int = 0, n_ctx: int = 128):
    """Tiny variants: Llama-like (rotary, GQA, RMS, gated), rotary with partial rotation and no final norm,
    GPT-2-like (absolute positions), shortformer, and ALiBi (unsupported by the shared path)."""
    pos, kw = {
        "llama": (
            "rotary",
            dict(n_key_value_heads=2, rotary_dim=8, normalization_type="RMS", gated_mlp=True, act_fn="silu"),
        ),
        "rotary_nonorm": ("rotary", dict(rotary_dim=4, normalization_type=None, act_fn="gelu")),
        "gpt2": ("standard", dict(normalization_type="LN", act_fn="gelu")),
        "shortformer": ("shortformer", dict(normalization_type="LN", act_fn="gelu")),
        "alibi": ("alibi", dict(normalization_type="LN", act_fn="gelu")),
    }[kind]
    return tiny_model(seed=seed, n_ctx=n_ctx, d_mlp=64, positional_embedding_type=pos, **kw)


class _Recorder(SASADecoder):
    """Records every candidate margin, the cache and the next logits after every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.margins, self.caches, self.next_logits = [], [], []

    def bonus(self, margins, valid):
        self.margins.append(margins.clone())
        return super().bonus(margins, valid)

    def choose(self, state, logits):
        out = super().choose(state, logits)
        c = state.cache
        self.caches.append(
            ([(e.past_keys.clone(), e.past_values.clone()) for e in c.entries], c.previous_attention_mask.clone())
        )
        self.next_logits.append(self._next_logits.clone())
        return out


def _run_modes(model, modes, steerers=(), n_cand=6, steps=10, **kw):
    sub = _subspace(model)
    outs, decs = [], []
    for mode, max_rows in modes:
        dec = _Recorder([Attribute(sub, 5.0)], max_candidates=n_cand, candidate_forward=mode, max_rows=max_rows)
        outs.append(
            generate(model, PROMPTS3, steerers=steerers, decoder=dec, max_new_tokens=steps, stop_at_eos=False, **kw)
        )
        decs.append(dec)
    return outs, decs


def _assert_same(a, b, atol=1e-5):
    (out_a, dec_a), (out_b, dec_b) = a, b
    assert torch.equal(out_a.tokens, out_b.tokens)
    assert len(dec_a.margins) == len(dec_b.margins) == out_a.tokens.shape[1]
    for ma, mb in zip(dec_a.margins, dec_b.margins):
        torch.testing.assert_close(ma, mb, atol=atol, rtol=0)
    for la, lb in zip(dec_a.next_logits, dec_b.next_logits):
        torch.testing.assert_close(la, lb, atol=atol, rtol=1e-5)  # logits are O(10): float32 relative error
    for (kv_a, mask_a), (kv_b, mask_b) in zip(dec_a.caches, dec_b.caches):
        assert torch.equal(mask_a, mask_b) and mask_a.dtype == mask_b.dtype
        for (ka, va), (kb, vb) in zip(kv_a, kv_b):
            assert ka.shape == kb.shape and va.shape == vb.shape
            torch.testing.assert_close(ka, kb, atol=atol, rtol=0)
            torch.testing.assert_close(va, vb, atol=atol, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "rotary_nonorm", "gpt2", "shortformer"])
def test_shared_forward_equals_fork_greedy(kind):
    model = _variant(kind)
    assert SASADecoder([Attribute(_subspace(model), 1.0)]).forward_mode(model) == "shared"  # what "auto" picks
    outs, decs = _run_modes(model, [("shared", None), ("fork", None), ("fork", 4)], do_sample=False)
    _assert_same((outs[0], decs[0]), (outs[1], decs[1]))
    _assert_same((outs[2], decs[2]), (outs[1], decs[1]))  # chunked fork == fork
    assert len(set(outs[0].tokens[:, -1].tolist())) > 1  # the rows really decode differently


@pytest.mark.parametrize("kind", ["llama", "rotary_nonorm"])
def test_shared_forward_under_mask_sharing(kind, monkeypatch):
    from saesteer.models.tl_fixes import apply_mask_sharing
    from saesteer.steering import sasa as sasa_decoding

    model = _variant(kind)
    outs, decs = _run_modes(model, [("shared", None)], do_sample=False)
    apply_mask_sharing(model)  # what load_model applies: cos/sin and causal mask built once per forward
    used = []  # the candidates are rotated at their position in the first place, not re-rotated by hooks
    real = sasa_decoding.rotary_position_mask
    monkeypatch.setattr(sasa_decoding, "rotary_position_mask", lambda *a: used.append(1) or real(*a))
    fixed_outs, fixed_decs = _run_modes(model, [("shared", None), ("fork", None)], do_sample=False)
    assert len(used) == fixed_outs[0].tokens.shape[1]
    _assert_same((fixed_outs[0], fixed_decs[0]), (outs[0], decs[0]), atol=0)  # bit for bit
    _assert_same((fixed_outs[0], fixed_decs[0]), (fixed_outs[1], fixed_decs[1]))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shared_forward_equals_fork_sampled(kind):
    model = _variant(kind, seed=1)
    outs, decs = _run_modes(
        model, [("shared", None), ("fork", None)], n_cand=8, do_sample=True, seed=3, temperature=1.5, top_k=12
    )
    _assert_same((outs[0], decs[0]), (outs[1], decs[1]))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shared_forward_composes_with_sae_steering(kind):
    from saesteer.steering.latent import LatentSteering

    model = _variant(kind)
    sae = tiny_sae()
    steerers = [
        DecoderSteering(sae, [1, 2, 3], tier="constant", alpha=0.3),
        LatentSteering(sae, torch.linspace(-1, 1, 64), mode="clamp", strength=2.0, top_n=3),
    ]
    outs, decs = _run_modes(model, [("shared", None), ("fork", None)], steerers=steerers, do_sample=False)
    _assert_same((outs[0], decs[0]), (outs[1], decs[1]))
    plain, _ = _run_modes(model, [("shared", None)], do_sample=False)
    assert not torch.equal(plain[0].tokens, outs[0].tokens)  # the steerers act during the candidate forward


def test_shared_forward_cleans_up_after_an_exception():
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    from saesteer.generation import DecodeState, SamplingConfig, last_logits

    model = _variant("llama")
    dec = SASADecoder([Attribute(_subspace(model), 5.0)], max_candidates=5, candidate_forward="shared")
    before = generate(model, PROMPTS3, decoder=dec, max_new_tokens=4, do_sample=False)
    tokens, mask, _ = tokenize(model, PROMPTS3, side="left")
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(PROMPTS3))
    logits = last_logits(model, tokens, mask, cache)
    keys, cache_mask = [e.past_keys for e in cache.entries], cache.previous_attention_mask
    state = DecodeState(model, SamplingConfig(do_sample=False), cache, tokens, mask, None)

    class Boom:
        hook_name = "blocks.1.hook_mlp_out"

        def hook_fn(self, act, hook):
            raise RuntimeError("boom")

    with steering(model, [Boom()]), pytest.raises(RuntimeError, match="boom"):
        dec.choose(state, logits)
    assert [n for n, hp in model.hook_dict.items() if hp.fwd_hooks] == []
    assert model.context_level == 0
    assert state.cache is cache and cache.previous_attention_mask is cache_mask
    assert all(e.past_keys is k for e, k in zip(cache.entries, keys))

    class Failing(SASADecoder):  # an error after the candidates' forward, before the chosen row is kept
        def bonus(self, margins, valid):
            raise KeyboardInterrupt

    failing = Failing([Attribute(_subspace(model), 5.0)], max_candidates=5, candidate_forward="shared")
    with pytest.raises(KeyboardInterrupt):
        failing.choose(state, logits)
    assert state.cache is cache and cache.previous_attention_mask is cache_mask
    assert all(e.past_keys is k for e, k in zip(cache.entries, keys))
    after = generate(model, PROMPTS3, decoder=dec, max_new_tokens=4, do_sample=False)
    assert torch.equal(before.tokens, after.tokens)


def test_unsupported_architectures_fall_back_to_fork():
    from saesteer.steering.sasa import shared_forward_unsupported

    model = _variant("alibi")
    sub = _subspace(model)
    assert "alibi" in shared_forward_unsupported(model)
    assert SASADecoder([Attribute(sub, 1.0)]).forward_mode(model) == "fork"
    with pytest.raises(ValueError, match="cannot be exact"):
        SASADecoder([Attribute(sub, 1.0)], candidate_forward="shared").forward_mode(model)
    auto, fork = (
        generate(
            model,
            PROMPTS3,
            decoder=SASADecoder([Attribute(sub, 5.0)], max_candidates=5, candidate_forward=mode),
            max_new_tokens=4,
            do_sample=False,
        )
        for mode in ("auto", "fork")
    )
    assert torch.equal(auto.tokens, fork.tokens)
    llama = _variant("llama")
    assert shared_forward_unsupported(llama) is None
    llama.cfg.use_dynamic_ntk_rope = True
    assert shared_forward_unsupported(llama) == "dynamic NTK rope"


def test_candidate_forwards_are_separate_decoding_steps_for_steerers():
    """Sink detection must not compare candidates with each other: the shared forward declares its
    positions separate single-token steps, as the fork path's one-position forwards are."""
    from helpers import PositionsProbe

    model = _variant("llama")
    probe = PositionsProbe("blocks.1.hook_resid_post")
    dec = SASADecoder([Attribute(_subspace(model), 5.0)], max_candidates=6, candidate_forward="shared")
    generate(model, PROMPTS3, steerers=[probe], decoder=dec, max_new_tokens=3, do_sample=False, stop_at_eos=False)
    candidate_calls = [d for w, d in probe.seen[1:]]
    assert len(candidate_calls) == 3 and all(d == "separate" for d in candidate_calls)
    assert probe.seen[0][0] > 1 and not isinstance(probe.seen[0][1], str)  # the prompt: real-token mask


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_shared_forward_near_the_context_end_falls_back_to_fork(kind):
    """C candidates as C positions would index positions past n_ctx near the end of the context; those steps
    run the fork path (one position per candidate) instead of failing."""
    model = _variant(kind, n_ctx=20)  # longest prompt: 12 tokens with BOS; 8 new tokens reach position 19
    # row 0 fits 6 candidates as positions for 3 steps (12 + 6 <= 20 ... 14 + 6), then forks
    outs, decs = _run_modes(model, [("shared", None), ("fork", None)], n_cand=6, steps=8, do_sample=False)
    _assert_same((outs[0], decs[0]), (outs[1], decs[1]))
