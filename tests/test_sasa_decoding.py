import pytest
import torch
from tiny import tiny_model, tiny_sae

from saesteer.decoder_steering import DecoderSteering
from saesteer.generation import generate
from saesteer.hooks import steering
from saesteer.sasa_decoding import Attribute, SASADecoder
from saesteer.sasa_subspace import Subspace, final_hidden_states
from saesteer.tokens import tokenize
from saesteer.word_filter import WordFilter

PROMPTS = ["the cat sat on the mat and", "hello you"]


def _subspace(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    wv = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    return Subspace(wv=wv, mu_mu=torch.randn(32, generator=g) * 0.1, model_name=model.cfg.model_name, d_model=32)


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
    plain = generate(model, PROMPTS * 3, max_new_tokens=8, seed=0)
    dec = SASADecoder([Attribute(sub, 50.0)], max_candidates=20, margin_transform="raw")
    steered = generate(model, PROMPTS * 3, decoder=dec, max_new_tokens=8, seed=0)
    assert not torch.equal(plain.tokens, steered.tokens)

    def mean_margin(out):
        toks = torch.cat([out.prompt_tokens, out.tokens], dim=1)
        mask = torch.cat([out.prompt_mask, torch.ones_like(out.tokens)], dim=1)
        return sub.margin(final_hidden_states(model, toks, mask)).mean()

    assert mean_margin(steered) > mean_margin(plain)


def test_beta_zero_is_plain_decoding():
    model = tiny_model()
    sub = _subspace(model)
    kw = dict(max_new_tokens=10, seed=4, temperature=0.9, top_k=8)
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
    plain = generate(model, PROMPTS * 4, max_new_tokens=12, seed=1, temperature=2.0)
    words = {model.tokenizer.decode([t]) for t in plain.tokens.flatten().tolist()}
    banned = sorted(words)[:3]
    filt = WordFilter(model, banned)
    out = generate(model, PROMPTS * 4, logits_processors=[filt], max_new_tokens=12, seed=1, temperature=2.0)
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
    with pytest.raises(ValueError, match="KV cache"):
        generate(model, "the cat", decoder=SASADecoder([Attribute(sub, 1.0)]), use_cache=False)
