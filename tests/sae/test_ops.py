import pytest
import torch
from helpers import tiny_sae

from saesteer.models import onednn
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


def _sparse_rows(rows: int, d_sae: int, nonzero: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    f = torch.zeros(rows, d_sae)
    for r in range(rows):
        f[r, torch.randperm(d_sae, generator=g)[:nonzero]] = torch.randn(nonzero, generator=g)
    return f


def test_latent_product_sums_the_nonzero_rows_and_each_row_alone() -> None:
    """Sparse rows (a steering edit of a few latents): the decoder rows of the nonzero latents summed, within float
    rounding of the dense product (float64 reference), each row's bits those it gets alone or in another order;
    all-zero rows give exact zeros; leading dimensions kept."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 24, generator=g)
    f = _sparse_rows(6, 256, 12).view(2, 3, 256)
    f[1, 2] = 0.0
    with torch.no_grad():
        out = sae_ops.latent_product(f, w)
        assert out.shape == (2, 3, 24)
        torch.testing.assert_close(out, (f.double() @ w.double()).float(), atol=1e-5, rtol=1e-5)
        assert torch.equal(out[1, 2], torch.zeros(24))
        flat = f.view(6, 256)
        together = out.view(6, 24)
        assert torch.equal(sae_ops.latent_product(flat.flip(0), w).flip(0), together)
        assert all(torch.equal(sae_ops.latent_product(flat[r : r + 1], w)[0], together[r]) for r in range(6))
        assert torch.equal(sae_ops.latent_product(torch.zeros(4, 256), w), torch.zeros(4, 24))


def test_latent_product_is_the_dense_product_where_dense_or_differentiated() -> None:
    """Above SPARSE_DENSITY nonzero, or with autograd recording, it is ``f @ w`` itself (its bits; gradients flow)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 16, generator=g)
    dense = torch.randn(5, 64, generator=g)
    with torch.no_grad():
        assert torch.equal(sae_ops.latent_product(dense, w), dense @ w)
        at_most = _sparse_rows(5, 64, int(64 * sae_ops.SPARSE_DENSITY) + 1)
        assert torch.equal(sae_ops.latent_product(at_most, w), at_most @ w)
    sparse = _sparse_rows(5, 64, 2).requires_grad_(True)
    out = sae_ops.latent_product(sparse, w)
    assert torch.equal(out, sparse @ w)
    out.sum().backward()
    torch.testing.assert_close(sparse.grad, w.sum(-1).expand(5, 64))


@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_decode_and_decode_delta_of_sparse_latents_match_saelens(normalize) -> None:
    """A TopK SAE's latents (8 of 64 nonzero, the sparse product): decode equals SAELens' within float rounding."""
    sae = tiny_sae("topk", normalize=normalize, k=4)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        enc = sae_ops.encode(sae, x)
        torch.testing.assert_close(sae_ops.decode(sae, enc.acts, enc), sae.decode(sae.encode(x)), atol=1e-5, rtol=1e-5)
        delta = _sparse_rows(15, 64, 3).view(3, 5, 64)
        diff = sae_ops.decode(sae, enc.acts + delta, enc) - sae_ops.decode(sae, enc.acts, enc)
        torch.testing.assert_close(sae_ops.decode_delta(sae, delta, enc), diff, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not onednn.available(), reason="this PyTorch has no oneDNN")
@pytest.mark.parametrize("rescale", [False, True])
def test_packed_encoder_encodes_within_rounding_and_packs_again_after_an_edit(rescale) -> None:
    """A TopK SAE's encoder packed for oneDNN: pre-activations within float rounding of SAELens', the same latents
    chosen; after an in-place edit of W_enc the next encode reads the edited weights; other SAEs get no holder."""
    sae = tiny_sae("topk", k=6)
    sae.cfg.rescale_acts_by_decoder_norm = rescale
    norms = sae_ops.decoder_norms(sae)
    packed = sae_ops.packed_encoder(sae)
    assert packed is not None and sae_ops.packed_encoder(tiny_sae("standard")) is None
    x = torch.randn(4, 3, 32)
    with torch.no_grad():
        one = sae_ops.encode(sae, x[:1, :1], norms, packed)  # (one row: SAELens' product, faster there)
        assert not packed._held and torch.equal(one.pre, sae_ops.encode(sae, x[:1, :1], norms).pre)
        for _ in range(2):
            ours, theirs = sae_ops.encode(sae, x, norms, packed), sae_ops.encode(sae, x, norms)
            torch.testing.assert_close(ours.pre, theirs.pre, atol=1e-5, rtol=1e-5)
            assert torch.equal(ours.acts != 0, theirs.acts != 0)
            torch.testing.assert_close(ours.acts, sae.encode(x), atol=1e-5, rtol=1e-5)
            assert "W_enc" in packed._held
            sae.W_enc.mul_(-1.5)
