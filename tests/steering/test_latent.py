import pytest
import torch
from helpers import tiny_model, tiny_sae

from saesteer.sae import ops as sae_ops
from saesteer.steering.latent import LatentSteering, swap_latents

HOOK = "blocks.1.hook_resid_post"


def _scores(d_sae=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(d_sae, generator=g)


def _resid(model, text="the cat sat on the mat"):
    _, cache = model.run_with_cache(model.to_tokens(text))
    return cache[HOOK]


@pytest.mark.parametrize("mode", ["swap", "clamp", "weight"])
@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu"])
def test_strength_zero_is_identity(mode, kind):
    model, sae = tiny_model(), tiny_sae(kind)
    tokens = model.to_tokens("the cat sat on the mat and the dog ran")
    clean = model(tokens)
    with LatentSteering(sae, _scores(), mode=mode, strength=0.0).apply(model):
        steered = model(tokens)
    assert (steered - clean).abs().max() < 1e-5


def test_swap_by_hand():
    sae = tiny_sae("standard")
    h = torch.randn(1, 2, 32)
    c = _scores()
    enc = sae_ops.encode(sae, h)
    # independent computation, one token at a time with python loops
    expected = torch.zeros_like(enc.acts)
    for t in range(2):
        pre = enc.pre[0, t]
        k = int((enc.acts[0, t] > 0).sum())
        order = sorted(range(64), key=lambda i: -(pre[i] * c[i]).item())[:k]
        for i in order:
            expected[0, t, i] = max(pre[i].item(), 0.0)
    got = swap_latents(enc.pre, c, sae_ops.active_count(sae, enc.acts))
    assert torch.allclose(got, expected)
    steer = LatentSteering(sae, c, mode="swap", strength=1.0, hook_name=HOOK)
    out = steer.hook_fn(h, None)
    assert torch.allclose(out, h + (expected - enc.acts) @ sae.W_dec, atol=1e-5)
    # paper setting: no error term -> decode of the swapped latents
    out2 = LatentSteering(sae, c, mode="swap", use_error_term=False, hook_name=HOOK).hook_fn(h, None)
    assert torch.allclose(out2, expected @ sae.W_dec + sae.b_dec, atol=1e-5)


def test_swap_topk_uses_sae_k():
    sae = tiny_sae("topk", k=5)
    h = torch.randn(3, 32)
    enc = sae_ops.encode(sae, h)
    got = swap_latents(enc.pre, _scores(), sae_ops.active_count(sae, enc.acts))
    assert ((got > 0).sum(-1) <= 5).all()
    # all-ones scores: swap picks the SAE's own top-k, i.e. reproduces its encoding
    assert torch.allclose(swap_latents(enc.pre, torch.ones(64), 5), enc.acts)


def test_clamp_and_weight_by_hand():
    sae = tiny_sae("standard")
    h = torch.randn(2, 32)
    c = _scores()
    enc = sae_ops.encode(sae, h)
    top = torch.topk(c, 3).indices
    clamp = LatentSteering(sae, c, mode="clamp", strength=2.5, top_n=3, hook_name=HOOK).hook_fn(h, None)
    assert torch.allclose(clamp, h + 2.5 * sae.W_dec[top].sum(0), atol=1e-5)
    weight = LatentSteering(sae, c, mode="weight", strength=0.5, hook_name=HOOK).hook_fn(h, None)
    f_new = enc.acts + 0.5 * (enc.acts * c - enc.acts)
    assert torch.allclose(weight, h + (f_new - enc.acts) @ sae.W_dec, atol=1e-5)


def test_steering_changes_the_output():
    model, sae = tiny_model(), tiny_sae("standard")
    tokens = model.to_tokens("the cat sat on the mat")
    clean = model(tokens)
    with LatentSteering(sae, _scores(), mode="clamp", strength=5.0).apply(model):
        assert (model(tokens) - clean).abs().max() > 1e-2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(strength=-1.0), "strength"),
        (dict(strength=float("nan")), "strength"),
        (dict(k=65), "larger than the SAE width"),
        (dict(top_n=100, mode="clamp"), "larger than the SAE width"),
        (dict(mode="boost"), "mode"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatentSteering(tiny_sae(), _scores(), **kwargs)


def test_scores_length_must_match():
    with pytest.raises(ValueError, match="d_sae=64"):
        LatentSteering(tiny_sae(), torch.rand(10))
    with pytest.raises(ValueError, match="NaN"):
        LatentSteering(tiny_sae(), torch.full((64,), float("nan")))
