import pandas as pd
import pytest
import torch
from helpers import tiny_model, tiny_sae

from saesteer.steering.decoder import DecoderSteering

HOOK = "blocks.1.hook_resid_post"
LATENTS = [3, 10, 42]


def _by_hand(sae, h, tier, alpha, threshold=0.0):
    """Independent loop over positions and latents."""
    out = h.clone()
    acts = sae.encode(h)
    for pos in range(h.shape[0]):
        for i in LATENTS:
            d = sae.W_dec[i]
            f = acts[pos, i].item()
            if tier == "constant":
                out[pos] -= alpha * h[pos].norm() * d / d.norm()
            elif tier == "proportional" or (tier == "conditional" and f > threshold):
                out[pos] -= alpha * f * d
    return out


@pytest.mark.parametrize("tier", ["conditional", "proportional", "constant"])
def test_tiers_by_hand(tier):
    sae = tiny_sae("standard")
    h = torch.randn(6, 32)
    steer = DecoderSteering(sae, LATENTS, tier=tier, alpha=0.7, threshold=0.3)
    assert torch.allclose(steer.hook_fn(h, None), _by_hand(sae, h, tier, 0.7, 0.3), atol=1e-5)


def test_conditional_threshold_spares_weak_activations():
    sae = tiny_sae("standard")
    h = torch.randn(20, 32)
    high = DecoderSteering(sae, LATENTS, tier="conditional", alpha=1.0, threshold=1e9).hook_fn(h, None)
    assert torch.equal(high, h)
    low = DecoderSteering(sae, LATENTS, tier="conditional", alpha=1.0, threshold=0.0).hook_fn(h, None)
    prop = DecoderSteering(sae, LATENTS, tier="proportional", alpha=1.0).hook_fn(h, None)
    assert torch.allclose(low, prop)


@pytest.mark.parametrize("tier", ["conditional", "proportional", "constant"])
def test_alpha_zero_is_identity(tier):
    model, sae = tiny_model(), tiny_sae("topk")
    tokens = model.to_tokens("the cat sat on the mat and the dog ran")
    clean = model(tokens)
    with DecoderSteering(sae, LATENTS, tier=tier, alpha=0.0).apply(model):
        assert (model(tokens) - clean).abs().max() < 1e-5


def test_layer_norm_sae_scales_decoder_vectors():
    sae = tiny_sae("standard", normalize="layer_norm")
    h = torch.randn(4, 32) * 3
    steer = DecoderSteering(sae, LATENTS, tier="proportional", alpha=1.0)
    acts = sae.encode(h)
    std = (h - h.mean(-1, keepdim=True)).std(-1, keepdim=True)
    expected = h - (acts[:, LATENTS] @ sae.W_dec[LATENTS]) * std
    assert torch.allclose(steer.hook_fn(h, None), expected, atol=1e-4)


def test_accepts_contrast_table():
    table = pd.DataFrame({"latent": LATENTS, "diff": [3.0, 2.0, 1.0]})
    assert DecoderSteering(tiny_sae(), table)._idx.tolist() == LATENTS


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(latents=[64]), r"\[0, 64\)"),
        (dict(latents=[]), "empty"),
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(tier="harsh"), "tier"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(latents=LATENTS) | kwargs
    with pytest.raises(ValueError, match=match):
        DecoderSteering(tiny_sae(), **args)


@pytest.mark.parametrize("kind", ["decoder", "clamp", "clamp-no-error"])
def test_attention_sinks_are_left_alone(kind):
    """A position whose norm is far above its row's median (BOS, an attention sink) is not steered by default."""
    from saesteer.steering.latent import LatentSteering

    sae = tiny_sae("standard")
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, 32, generator=g)
    h[0, 0] *= 50.0  # the sink of row 0; row 1 has none
    scores = torch.rand(sae.cfg.d_sae, generator=g)

    def make(**kw):
        if kind == "decoder":
            return DecoderSteering(sae, LATENTS, tier="constant", alpha=0.5, hook_name=HOOK, **kw)
        return LatentSteering(
            sae, scores, mode="clamp", strength=4.0, hook_name=HOOK, use_error_term=kind == "clamp", **kw
        )

    out = make().hook_fn(h.clone(), None)
    assert torch.equal(out[0, 0], h[0, 0])
    assert not torch.allclose(out[0, 1:], h[0, 1:]) and not torch.allclose(out[1], h[1])
    everywhere = make(sink_factor=None).hook_fn(h.clone(), None)
    assert not torch.allclose(everywhere[0, 0], h[0, 0])
    torch.testing.assert_close(everywhere[:, 1:], out[:, 1:])  # the other positions are steered the same way
    # a single position (a decoding step under the KV cache) is always steered
    one = make().hook_fn(h[:, :1].clone(), None)
    torch.testing.assert_close(one, everywhere[:, :1])
    with pytest.raises(ValueError, match="sink_factor"):
        make(sink_factor=0.5)
