import pytest
import torch
from helpers import tiny_sae

from saesteer.sae import ops as sae_ops


@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("normalize", ["none", "layer_norm", "constant_norm_rescale"])
def test_decode_matches_saelens(kind, normalize):
    sae = tiny_sae(kind, normalize=normalize)
    x = torch.randn(3, 5, 32)
    expected = sae.decode(sae.encode(x))
    enc = sae_ops.encode(sae, x)
    assert torch.allclose(sae_ops.decode(sae, enc.acts, enc), expected, atol=1e-5)
    # the SAE object is left clean: its own encode/decode still works afterwards
    assert torch.allclose(sae.decode(sae.encode(x)), expected, atol=1e-6)


@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_decode_delta_is_difference_of_decodes(normalize):
    sae = tiny_sae("standard", normalize=normalize)
    x = torch.randn(4, 32)
    enc = sae_ops.encode(sae, x)
    delta = torch.randn_like(enc.acts)
    diff = sae_ops.decode(sae, enc.acts + delta, enc) - sae_ops.decode(sae, enc.acts, enc)
    assert torch.allclose(sae_ops.decode_delta(sae, delta, enc), diff, atol=1e-4)


def test_pre_activations_and_active_count():
    sae = tiny_sae("standard")
    x = torch.randn(2, 32)
    enc = sae_ops.encode(sae, x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert torch.allclose(enc.pre, pre, atol=1e-5)
    assert torch.equal(sae_ops.active_count(sae, enc.acts), (pre > 0).sum(-1))
    assert sae_ops.active_count(tiny_sae("topk", k=5), enc.acts) == 5


@pytest.mark.parametrize("kind", ["standard", "topk", "topk-rescaled", "jumprelu"])
def test_pre_activations_are_what_the_activation_function_sees(kind):
    """``enc.pre`` is the SAE's hidden pre-activation as its activation function receives it: for TopK SAEs
    with ``rescale_acts_by_decoder_norm`` that is after the scaling by the decoder row norms."""
    sae = tiny_sae(kind.split("-")[0])
    if kind == "topk-rescaled":
        sae.cfg.rescale_acts_by_decoder_norm = True
        assert not torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(sae.cfg.d_sae))  # rows of other norms
    x = torch.randn(6, 32)
    enc = sae_ops.encode(sae, x)
    acts = sae.activation_fn(enc.pre)
    if kind == "jumprelu":
        acts = acts * (enc.pre > sae.threshold)
    assert torch.allclose(acts, enc.acts, atol=1e-6)
    assert torch.allclose(sae_ops.decode(sae, enc.acts, enc), sae.decode(sae.encode(x)), atol=1e-5)


def test_explained_variance_matches_formula():
    sae = tiny_sae("standard")
    x = torch.randn(50, 32)
    recon = sae.decode(sae.encode(x))
    ev = 1 - ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert sae_ops.explained_variance(sae, x) == pytest.approx(float(ev), rel=1e-5)


def test_unsupported_normalisation_is_rejected():
    sae = tiny_sae("standard")
    sae.cfg.normalize_activations = "covariance_whitening"
    with pytest.raises(ValueError, match="not supported"):
        sae_ops.check_supported(sae)


@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_topk_encode_with_norms_given_reads_no_decoder_norm_and_keeps_the_bits(normalize):
    """With the decoder norms computed once (as steerers do), a TopK SAE with ``rescale_acts_by_decoder_norm``
    encodes without SAELens' per-call ||W_dec|| (it read the whole decoder at every decoding step), to the bit."""
    sae = tiny_sae("topk", normalize=normalize)
    sae.cfg.rescale_acts_by_decoder_norm = True
    x = torch.randn(3, 4, 32)
    norms = sae_ops.decoder_norms(sae)
    with torch.autograd.profiler.profile() as prof:
        fast = sae_ops.encode(sae, x, norms)
    assert not [e for e in prof.function_events if "norm" in e.name and "vector" in e.name]
    slow = sae_ops.encode(sae, x)
    assert torch.equal(fast.acts, slow.acts) and torch.equal(fast.pre, slow.pre)
    assert torch.equal(fast.acts, sae.encode(x))
    if normalize == "layer_norm":
        assert torch.equal(fast.scale, slow.scale) and torch.equal(fast.shift, slow.shift)
    assert torch.allclose(sae_ops.decode(sae, fast.acts, fast), sae.decode(sae.encode(x)), atol=1e-5)
    # the SAE's own hooks are back and fire again
    seen = []
    sae.hook_sae_acts_pre.add_hook(lambda act, hook: seen.append(act.shape))
    sae.encode(x)
    assert seen == [(3, 4, 64)]
