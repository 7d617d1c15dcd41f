"""Stateless encode/decode arithmetic for any SAELens residual-stream SAE.

SAELens SAEs keep input-normalisation state between ``encode`` and ``decode`` (``layer_norm`` stores
``ln_mu``/``ln_std`` and deletes them in ``decode``), so a hook that needs one encode and several
decodes cannot call ``sae.decode`` twice. Every SAELens decoder is affine given that state:

    decode(f) = scale * (f @ W_dec_eff + b_dec) + shift

with ``W_dec_eff = W_dec`` (or ``W_dec / ||W_dec||`` for TopK SAEs with
``rescale_acts_by_decoder_norm``) and per-token ``scale``/``shift`` from the input normalisation.
:func:`encode` returns that state with the latents, so a steering edit Δf maps to the residual stream
as ``scale * (Δf @ W_dec_eff)`` exactly. ``tests/test_sae_ops.py`` checks the reconstruction against
``sae.decode(sae.encode(x))`` for every architecture and normalisation we accept.

Speed (issue 16). A steering edit changes a few latents, so Δf @ W_dec_eff is summed over the changed latents'
decoder rows (:func:`latent_product`) rather than multiplied through the whole decoder; and a TopK SAE's encoder
can be packed once for oneDNN (:func:`packed_encoder`), which steerers do on a model under
``weight_layout="onednn"``. ``experiments/bench_sae_products.py`` times both against the plain products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from sae_lens import SAE, TopKSAE
from torch import Tensor

from saesteer.models import onednn

SUPPORTED_NORMALIZATIONS = ("none", "expected_average_only_in", "layer_norm", "constant_norm_rescale")

SPARSE_DENSITY = 1 / 8
"""Up to this share of nonzero latents, :func:`latent_product` sums the decoder rows of the nonzero latents instead
of multiplying the whole matrix. Measured (``experiments/bench_sae_products.py``, one CPU thread, a 4,608 x 576
decoder; ``figures/bench_sae_products.json``), sparse / dense time at 1/8 nonzero: 0.36 (1 row), 0.44 (8 rows),
0.73 (64 rows); at 1/4: 0.49, 0.64, 1.39."""

PACKED_MIN_ROWS = 2
"""The fewest rows :func:`encode` multiplies by a packed encoder (measured, a 576 x 4,608 encoder, one CPU thread:
oneDNN's packed product took 1.13x [0.94, 1.37] SAELens' ``sae_in @ W_enc`` for 1 row, 0.63x for 2, 0.36x for 4,
0.47x for 8;
``figures/bench_sae_products.json``)."""


@dataclass
class Encoded:
    """Latents of one encode, with what is needed to decode edits of them without the SAE's state."""

    acts: Float[Tensor, "... d_sae"]
    pre: Float[Tensor, "... d_sae"]
    scale: Float[Tensor, "... 1"] | None
    shift: Float[Tensor, "... 1"] | None


def check_supported(sae: SAE) -> None:
    """Raise a ValueError if ``sae`` is not an SAE whose decoder saesteer can edit exactly."""
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm not in SUPPORTED_NORMALIZATIONS:
        raise ValueError(
            f"SAE normalize_activations={norm!r} is not supported for steering; supported: "
            f"{SUPPORTED_NORMALIZATIONS}. Fold the normalisation into the weights first."
        )
    if getattr(sae.cfg, "reshape_activations", "none") != "none":
        raise ValueError(
            "saesteer steers residual-stream SAEs; this SAE reshapes its input (hook_z). "
            "Use an SAE trained on a resid hook such as blocks.L.hook_resid_post."
        )


def decoder_norms(sae: SAE) -> Float[Tensor, " d_sae"] | None:
    """||W_dec[i]|| per latent where the SAE rescales by them (TopK ``rescale_acts_by_decoder_norm``), else None.

    A steerer computes this (and :func:`decoder_matrix`) once when it is built and passes it to
    :func:`encode` / :func:`decode_delta` / :func:`decode`: recomputed at every decoding step, the norm of a
    4,608 x 576 decoder cost ~7% of a SmolLM2-135M step on one CPU thread."""
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        return sae.W_dec.norm(dim=-1)
    return None


def decoder_matrix(sae: SAE, norms: Float[Tensor, " d_sae"] | None = None) -> Float[Tensor, "d_sae d_in"]:
    """W_dec as the decoder applies it (divided by row norms when ``rescale_acts_by_decoder_norm``);
    ``norms``: :func:`decoder_norms` computed before."""
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        return sae.W_dec / (decoder_norms(sae) if norms is None else norms).unsqueeze(-1)
    return sae.W_dec


class _Capture(torch.nn.Module):
    """Stands in for an SAE hook point during :func:`encode`: passes its input on and keeps it."""

    def __init__(self) -> None:
        super().__init__()
        self.value: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.value = x
        return x


def ranking_pre(
    sae: SAE, pre: Float[Tensor, "... d_sae"], norms: Float[Tensor, " d_sae"] | None = None
) -> Float[Tensor, "... d_sae"]:
    """The pre-activations as the SAE ranks them, from the value its ``hook_sae_acts_pre`` sees (TopK SAEs
    with ``rescale_acts_by_decoder_norm`` scale them by the decoder norms after that hook); ``norms``:
    :func:`decoder_norms` computed before."""
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        return pre * (decoder_norms(sae) if norms is None else norms)
    return pre


def _topk_encode(
    sae: TopKSAE,
    x: Float[Tensor, "... d_in"],
    norms: Float[Tensor, " d_sae"] | None,
    packed: onednn.PackedWeights | None = None,
) -> tuple[Float[Tensor, "... d_sae"], Float[Tensor, "... d_sae"]]:
    """``TopKSAE.encode`` line for line, with the decoder row norms ``norms`` computed once by the caller:
    f = TopK((process(x) @ W_enc + b_enc) * ||W_dec||). SAELens (6.x) recomputes ||W_dec|| at every call,
    which doubled the encode's time in a decoding step (it reads the whole decoder); the bits are the same.
    With ``packed`` (holding ``"W_enc"``), the product of :data:`PACKED_MIN_ROWS` rows or more is oneDNN's on the
    packed encoder where it applies (:meth:`saesteer.models.onednn.PackedWeights.product`): equal up to float
    rounding, not bit for bit.
    Returns (acts, the pre-activations as ranked). Delete once SAELens caches the norms."""
    sae_in = sae.process_sae_in(x)
    y = None
    if packed is not None and sae_in.numel() >= PACKED_MIN_ROWS * sae_in.shape[-1]:
        y = packed.product("W_enc", sae.W_enc, sae_in, sae.W_enc.T, sae.b_enc)
    pre = ranking_pre(sae, sae.hook_sae_acts_pre(sae_in @ sae.W_enc + sae.b_enc if y is None else y), norms)
    return sae.hook_sae_acts_post(sae.activation_fn(pre)), pre


def encode(
    sae: SAE,
    x: Float[Tensor, "... d_in"],
    norms: Float[Tensor, " d_sae"] | None = None,
    packed: onednn.PackedWeights | None = None,
) -> Encoded:
    """Run ``sae.encode(x)`` and capture its pre-activations and the normalisation state.

    The SAE's own hook points are bypassed for the call (hooks attached to them do not fire), so a steerer
    may encode with an SAE that is attached to the model it steers (SAELens ``add_sae``) from inside one of
    that SAE's hooks without re-entering them. ``norms``: :func:`decoder_norms` computed before. ``packed``:
    a TopK SAE's encoder packed for oneDNN (:func:`packed_encoder`; steerers pass it on models under
    ``weight_layout="onednn"``), else the product is SAELens'.
    """
    names = list(sae.hook_dict)
    saved = {name: getattr(sae, name) for name in names}
    capture = _Capture()
    try:
        for name in names:
            setattr(sae, name, capture if name == "hook_sae_acts_pre" else torch.nn.Identity())
        if (norms is not None or packed is not None) and type(sae).encode is TopKSAE.encode:
            acts, pre = _topk_encode(sae, x, norms, packed)
        else:
            acts, pre = sae.encode(x), None
    finally:
        for name, hook in saved.items():
            setattr(sae, name, hook)
    if pre is None:
        if capture.value is None:
            raise ValueError(
                f"{type(sae).__name__}.encode did not pass its pre-activations through hook_sae_acts_pre; "
                "saesteer steers SAELens SAEs that do (standard, TopK, JumpReLU, gated)."
            )
        pre = ranking_pre(sae, capture.value, norms)
    norm = getattr(sae.cfg, "normalize_activations", "none")
    scale = shift = None
    if norm == "layer_norm":
        scale, shift = sae.ln_std, sae.ln_mu
        del sae.ln_std, sae.ln_mu
    elif norm == "constant_norm_rescale":
        scale = 1.0 / sae.x_norm_coeff
        del sae.x_norm_coeff
    return Encoded(acts=acts, pre=pre, scale=scale, shift=shift)


def packed_encoder(sae: SAE) -> onednn.PackedWeights | None:
    """A holder that packs ``sae``'s encoder for oneDNN on first use (:func:`encode`'s ``packed``), where the
    SAE's encode is saesteer's (TopK) and this PyTorch has oneDNN; else None. Measured (one thread, 8 rows, a
    576 x 4,608 encoder; ``experiments/bench_sae_products.py``): 0.47x the time of SAELens' ``sae_in @ W_enc``."""
    if type(sae).encode is not TopKSAE.encode or not onednn.available():
        return None
    return onednn.PackedWeights(("W_enc",))


def latent_product(f: Float[Tensor, "... d_sae"], w: Float[Tensor, "d_sae d_in"]) -> Float[Tensor, "... d_in"]:
    """f @ w; on the CPU, where at most :data:`SPARSE_DENSITY` of ``f`` is nonzero (an SAE's latents, a steering
    edit of a few of them), as sum_{i: f_i != 0} f_i w_i per row (``embedding_bag``): each row summed on its own
    in latent order, so a row's bits do not depend on the other rows. Equal to the dense product up to float
    rounding."""
    if (
        f.device.type != "cpu"
        or f.dtype != w.dtype
        or f.shape[-1] == 0
        or f.numel() == 0
        or (torch.is_grad_enabled() and (f.requires_grad or w.requires_grad))
    ):
        return f @ w
    flat = f.reshape(-1)
    idx = flat.nonzero().squeeze(1)
    if idx.numel() > flat.numel() * SPARSE_DENSITY:
        return f @ w
    d_sae = f.shape[-1]
    rows = idx // d_sae
    offsets = torch.searchsorted(rows, torch.arange(flat.numel() // d_sae, device=f.device))
    out = torch.nn.functional.embedding_bag(idx - rows * d_sae, w, offsets, mode="sum", per_sample_weights=flat[idx])
    return out.view(*f.shape[:-1], w.shape[-1])


def decode_delta(
    sae: SAE, delta: Float[Tensor, "... d_sae"], enc: Encoded, w_dec: Float[Tensor, "d_sae d_in"] | None = None
) -> Float[Tensor, "... d_in"]:
    """Residual-stream change caused by changing the latents by ``delta``: scale * (Δf @ W_dec_eff)
    (:func:`latent_product`: a steering edit changes a few latents); ``w_dec``: :func:`decoder_matrix` computed
    before."""
    out = latent_product(delta, decoder_matrix(sae) if w_dec is None else w_dec)
    return out if enc.scale is None else out * enc.scale


def decode(
    sae: SAE, acts: Float[Tensor, "... d_sae"], enc: Encoded, w_dec: Float[Tensor, "d_sae d_in"] | None = None
) -> Float[Tensor, "... d_in"]:
    """decode(f) = scale * (f @ W_dec_eff + b_dec) + shift, with the state captured by :func:`encode`;
    ``w_dec``: :func:`decoder_matrix` computed before."""
    out = latent_product(acts, decoder_matrix(sae) if w_dec is None else w_dec) + sae.b_dec
    if enc.scale is not None:
        out = out * enc.scale
    if enc.shift is not None:
        out = out + enc.shift
    return out


def active_count(sae: SAE, acts: Float[Tensor, "... d_sae"]) -> int | Tensor:
    """How many latents are active: the SAE's k for TopK SAEs, else the per-token count of nonzero acts."""
    k = getattr(sae.cfg, "k", None)
    if k is not None:
        return int(k)
    return (acts > 0).sum(dim=-1)


@torch.no_grad()
def explained_variance(sae: SAE, x: Float[Tensor, "n d_in"]) -> float:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the rows of ``x``."""
    enc = encode(sae, x)
    recon = decode(sae, enc.acts, enc).to(x.dtype)
    resid = (x - recon).pow(2).sum()
    total = (x - x.mean(0, keepdim=True)).pow(2).sum()
    return float(1.0 - resid / total.clamp_min(1e-12))
