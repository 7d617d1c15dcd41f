"""Small models, tokenizers and SAEs that the tests build (random weights, fixed seeds, no hub)."""

from __future__ import annotations

import io
import tarfile
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from saesteer.models.blas import batched_products_exact
from saesteer.steering.sasa_subspace import Subspace

WORDS = (
    "the a cat dog sat on mat and ran to park is was very good bad kind nice idiot stupid hate love you i "
    "we they he she it friend day night sun rain happy sad hello world today tomorrow big small red blue "
    "green tree house car road food water fire book read write go come see look think know"
).split()
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def assert_same_bits(
    a: torch.Tensor, b: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5, exact: bool = True
) -> None:
    """``a`` equals ``b`` bit for bit where this machine's batched products are place-independent
    (:func:`saesteer.models.blas.batched_products_exact`: Intel MKL) and ``exact`` (what else the results rest on
    holds too), else within float32 rounding (AMD EPYC). For results that regroup batched products: grouped-query
    attention against stock TransformerLens' repeated heads, a row batched with others against the row alone."""
    if exact and batched_products_exact():
        assert torch.equal(a, b), f"not bit for bit: max |diff| {(a.double() - b.double()).abs().max().item():.3g}"
    else:
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    # TransformerLens re-loads tokenizers by name_or_path, so give it a folder to load from
    folder = Path(tempfile.mkdtemp(prefix="saesteer-tok-"))
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def tiny_model(
    *,
    seed: int = 0,
    gated: bool = False,
    rotary: bool = False,
    n_layers: int = 2,
    d_model: int = 32,
    normalization_type: str | None = "LN",
    eos_prob_low: bool = True,
    sharpen: bool = True,
    **cfg: Any,
) -> HookedTransformer:
    """A random model (2 layers by default) with a word-level tokenizer, in eval mode. ``sharpen``: logits x8 (so
    greedy choices are not near-ties); ``eos_prob_low``: EOS logit pushed down (so generations run long); ``cfg``:
    further :class:`HookedTransformerConfig` fields, over the ones the other arguments set."""
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    settings = dict(
        n_layers=n_layers,
        d_model=d_model,
        n_ctx=128,
        d_head=8,
        n_heads=d_model // 8,
        d_mlp=4 * d_model,
        d_vocab=len(tok),
        act_fn="silu" if gated else "gelu",
        gated_mlp=gated,
        positional_embedding_type="rotary" if rotary else "standard",
        rotary_dim=8 if rotary else None,
        normalization_type=normalization_type,
        seed=seed,
        default_prepend_bos=True,
        init_weights=True,
    )
    model = HookedTransformer(HookedTransformerConfig(**{**settings, **cfg}), tokenizer=tok)
    with torch.no_grad():
        if sharpen:
            model.unembed.W_U.mul_(8.0)
        if eos_prob_low:
            model.unembed.b_U[tok.eos_token_id] = -1e4
    model.eval()
    return model


LLAMA_ARCH = dict(gated_mlp=True, positional_embedding_type="rotary", normalization_type="RMS", n_key_value_heads=2,
                  act_fn="silu", rotary_dim=8)  # fmt: skip
"""A tiny Llama-family architecture (:func:`tiny_arch_model`): every block of it runs the fused forward."""


class FusedCount:
    """Counts the blocks that :func:`saesteer.models.fused_block.fused_forward` ran (not None) while ``monkeypatch``
    holds; ``n`` may be reset between runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import saesteer.models.fused_block as fused_block

        self.n = 0
        inner = fused_block.fused_forward

        def counting(*args):
            out = inner(*args)
            self.n += out is not None
            return out

        monkeypatch.setattr(fused_block, "fused_forward", counting)


def tiny_arch_model(arch: Mapping[str, Any], *, perturb: bool = False) -> HookedTransformer:
    """A 3-layer random model of the architecture ``arch`` (:class:`HookedTransformerConfig` fields) with
    TransformerLens' own initialisation and logits, in eval mode; ``perturb``: biases and norm gains moved off 0
    and 1 (seeded), so that a test sees them."""
    model = tiny_model(**{"n_layers": 3, "n_ctx": 64, "d_mlp": 64, "sharpen": False, "eos_prob_low": False, **arch})
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.split(".")[-1].startswith(("b_", "w")):
                    p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_sae(
    kind: str = "standard",
    *,
    d_in: int = 32,
    d_sae: int = 64,
    layer: int = 1,
    seed: int = 1,
    normalize: str = "none",
    k: int = 8,
) -> SAE:
    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post", model_name="tiny")
    common = dict(d_in=d_in, d_sae=d_sae, metadata=meta, normalize_activations=normalize)
    if kind == "standard":
        sae = StandardSAE(StandardSAEConfig(**common))
    elif kind == "topk":
        sae = TopKSAE(TopKSAEConfig(k=k, **common))
    elif kind == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if kind == "jumprelu":
            sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.3)
        sae.b_enc.add_(0.2)  # so that a good share of latents fire on random inputs
    return sae.eval().requires_grad_(False)


class PositionsProbe:
    """A steerer that changes nothing and records, per forward, (positions, what the forward told
    ``saesteer.hooks.sink_mask`` about them)."""

    def __init__(self, hook_name: str = "blocks.0.hook_resid_post") -> None:
        self.hook_name = hook_name
        self.seen: list[tuple[int, object]] = []

    def hook_fn(self, activation, hook):
        from saesteer.hooks import _POSITIONS

        self.seen.append((activation.shape[1], _POSITIONS.get()))
        return activation


def tiny_subspace(model: HookedTransformer, generator: torch.Generator) -> Subspace:
    """A SASA subspace for ``model``: a random unit normal drawn from ``generator`` (which the caller may go on
    drawing from) and zero class means."""
    d = model.cfg.d_model
    wv = torch.nn.functional.normalize(torch.randn(d, generator=generator), dim=0)
    return Subspace(wv=wv, mu_mu=torch.zeros(d), model_name=model.cfg.model_name, d_model=d)


def temporary_cache(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    """Point ``SAESTEER_HOME`` (the saesteer cache) at ``root`` for this test (``monkeypatch`` restores it);
    returns ``root``."""
    monkeypatch.setenv("SAESTEER_HOME", str(root))
    return root


def write_tar_gz(path: Path, files: Mapping[str, bytes], top: str, extra: Sequence[tarfile.TarInfo] = ()) -> Path:
    """A gzipped tarball at ``path`` (an sdist, an npm package) holding ``files`` (name -> bytes) under the
    folder ``top``, then the ``extra`` entries as they are (links, folders); returns ``path``."""
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for info in extra:
            t.addfile(info)
    return path


class WordScorer:
    """A fast, deterministic toxicity scorer: 0.5 per insult word ("idiot", "stupid", "hate") in a text, at most 1."""

    name = "words"

    def score(self, texts):
        return np.array([min(1.0, sum(w in t.split() for w in ("idiot", "stupid", "hate")) / 2) for t in texts])


T = TypeVar("T")


def fetched_or_skip(fetch: Callable[[], T], what: str) -> T:
    """``fetch()`` (an ``ensure_*`` of :mod:`saesteer.data.assets`), or skip the test where ``what``'s assets
    cannot be fetched: an AssetError (no registry, no disk) is the only reason to skip."""
    from saesteer.data.assets import AssetError

    try:
        return fetch()
    except AssetError as exc:
        pytest.skip(f"{what} assets not fetchable: {exc}")


def load_model_quietly(name: str) -> HookedTransformer:
    """``saesteer.models.loading.load_model(name)`` with the warnings of loading silenced."""
    from saesteer.models.loading import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(name)


class FirstTokenSink:
    """Makes the first real token an attention sink (its residual at ``hook`` x ``scale``) in the rows whose
    first real token is one of ``words``, in any batch: the row is recognised by its embedding at position 1.
    Distinct words give the sinks distinct activations (no ties between sink rows)."""

    def __init__(self, model, words, scale=100.0, hook="blocks.1.hook_resid_post"):
        self.model, self.scale, self.hook = model, scale, hook
        self.emb = model.W_E[[model.tokenizer.convert_tokens_to_ids(w) for w in words]]  # [n_words, d]
        self.rows = None

    def _embed(self, act, hook):
        self.rows = (act[:, 1, None, :] == self.emb[None]).all(-1).any(-1) if act.shape[1] > 1 else None
        return act

    def _resid(self, act, hook):
        if self.rows is None or not bool(self.rows.any()):
            return act
        act = act.clone()
        act[self.rows, 1] *= self.scale
        return act

    def active(self):
        return self.model.hooks(fwd_hooks=[("hook_embed", self._embed), (self.hook, self._resid)])
