"""SASA's toxicity subspace: the model's own final hidden states, a closed-form linear classifier on them,
and the ``.pt`` file that holds it.

SASA (Ko et al., "Large Language Models can become Strong Self-Detoxifiers", ICLR 2025, §3) embeds a text
as the final hidden state (after the final layer norm) at its last token and separates toxic from non-toxic
texts with the Bayes-optimal linear classifier under a shared covariance (LDA):

    w = pinv(Sigma) (mu_1 - mu_2) / 2,  w <- w / |w|,   m = (mu_1 + mu_2) / 2,   margin(x) = w . (x - m)

with mu_1 the non-toxic mean, mu_2 the toxic mean and Sigma the pooled within-class covariance. A positive
margin means non-toxic. The subspace does not depend on SASA's ``beta``: learn it once, decode with any beta.

Data conventions (the reference implementation's, as in AISteer360): non-toxic = label == 0,
toxic = label > ``toxic_threshold`` (default 0.0, i.e. ``toxicity > 0``); texts with
0 < label <= threshold are left out. In the in-memory dict form, ``'pos'`` holds the NON-toxic texts (the
attribute we steer towards) and ``'neg'`` the toxic ones, as in the reference.

Identity. A learned subspace records what produced it: ``model_digest`` (sha256 of the model's weights,
:func:`saesteer.data.digests.module_digest`), ``data_digest`` (sha256 of the training texts and labels,
:func:`saesteer.data.digests.texts_digest`), the threshold and, in ``extra``, sample size, seed, max_length and
BOS. :meth:`Subspace.check_model` refuses a model whose weights differ from the recorded ones, whatever its
name; the file also stores the sha256 of its two tensors, so a file whose numbers changed is refused. Files
written before these digests existed (and the reference's ``{'wv', 'mu_mu'}`` files) still load: what they
do not record is not checked (the model's name and width are, as before).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from saesteer.checks import check_positive_int
from saesteer.data.atomic import atomic_write
from saesteer.data.datasets import LabelledTexts
from saesteer.data.digests import module_digest, texts_digest
from saesteer.models.tokens import pad_id, pad_sequences

HOOK_NAME = "ln_final.hook_normalized"
"""The hook SASA reads: the final layer norm's normalised output (gain and bias applied by us, see below)."""

SINGULAR_VALUE_CUTOFF = 1e-6
"""Absolute cutoff on Sigma's singular values in the pseudo-inverse (the reference's ``D > 1e-6``)."""

FILE_FORMAT = "saesteer.sasa_subspace"  # the format name, kept across the move to saesteer.steering
FILE_VERSION = 1

_FOLDED = ("LNPre", "RMSPre")
_UNFOLDED = ("LN", "RMS")


class SubspaceFileError(ValueError):
    """A file that is not a readable saesteer / SASA subspace."""


class SubspaceMismatchError(ValueError):
    """A subspace learned on another model (other weights, name, width or hook) than the one it is used with,
    or from other data or parameters than a :class:`saesteer.SASA` asks for."""


# ----------------------------------------------------------------------------------------------------------
# Embedding: the HF-equivalent final hidden state at the last real token
# ----------------------------------------------------------------------------------------------------------


def _check_model(model: Any) -> HookedTransformer:
    if not isinstance(model, HookedTransformer):
        raise ValueError(
            f"SASA needs a transformer_lens.HookedTransformer, got {type(model).__name__}; "
            "load the model with saesteer.load_model."
        )
    return model


def embedding_hook_name(model: HookedTransformer) -> str:
    """The hook whose value (after :func:`apply_final_norm`) is SASA's embedding.

    ``ln_final.hook_normalized`` for every model with a final norm; a model without one
    (``normalization_type=None``) has its final hidden state in the last block's ``hook_resid_post``.
    """
    if model.cfg.normalization_type is None:
        return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    return HOOK_NAME


def final_norm_affine(
    model: HookedTransformer,
) -> tuple[Float[Tensor, " d_model"] | None, Float[Tensor, " d_model"] | None]:
    """Gain w and bias b (None if absent) that turn ``ln_final.hook_normalized`` into the HF hidden state.

    In TransformerLens 3.9 ``hook_normalized`` is the normalised residual BEFORE the gain in every case:
    unfolded norms ("LN"/"RMS") apply ``ln_final.w``/``ln_final.b`` after the hook; folded ones
    ("LNPre"/"RMSPre") have no parameters left, so we use the copy ``saesteer.load_model`` keeps in
    ``model.saesteer_final_norm`` before folding.
    """
    norm = model.cfg.normalization_type
    if norm is None:
        return None, None
    if norm in _UNFOLDED:
        w = model.ln_final.w.detach()
        b = getattr(model.ln_final, "b", None)
        return w, (b.detach() if b is not None else None)
    if norm in _FOLDED:
        saved = getattr(model, "saesteer_final_norm", None)
        if saved is None:
            raise ValueError(
                f"This model's layer norms are folded (normalization_type={norm!r}), so "
                "ln_final.hook_normalized lacks the final norm's gain and bias and is not the model's hidden "
                "state. Load the model with saesteer.load_model (it keeps the final norm's parameters), or "
                "with fold_ln=False."
            )
        if not isinstance(saved, dict) or "w" not in saved:
            raise ValueError(
                "model.saesteer_final_norm must be a dict {'w': gain, 'b': bias (optional)}; reload the model "
                "with saesteer.load_model."
            )
        w = torch.as_tensor(saved["w"])
        if w.shape != (model.cfg.d_model,):
            raise ValueError(
                f"model.saesteer_final_norm['w'] has shape {tuple(w.shape)}, expected ({model.cfg.d_model},); "
                "reload the model with saesteer.load_model."
            )
        b = saved.get("b")
        return w, (torch.as_tensor(b) if b is not None else None)
    raise ValueError(f"Unsupported normalization_type {norm!r}; SASA supports LN, LNPre, RMS, RMSPre or None.")


def apply_final_norm(
    model: HookedTransformer, normalized: Float[Tensor, "... d_model"]
) -> Float[Tensor, "... d_model"]:
    """HF-equivalent final hidden state from the hook value: ``normalized * w + b`` (float32 or wider).

    Use it on ``ln_final.hook_normalized`` captured in any forward pass (e.g. under a KV cache while
    decoding) to get exactly the embedding :func:`learn_subspace` learned on.
    """
    dtype = torch.promote_types(normalized.dtype, torch.float32)
    out = normalized.to(dtype)
    w, b = final_norm_affine(model)
    if w is not None:
        out = out * w.to(out.device, dtype)
    if b is not None:
        out = out + b.to(out.device, dtype)
    return out


def last_token_index(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """Index of each row's last attended position (works for left and right padding)."""
    mask = attention_mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("Every row of attention_mask needs at least one 1 (a real token); drop empty rows.")
    n = mask.shape[1]
    return n - 1 - mask.flip(1).int().argmax(dim=1)


@torch.no_grad()
def final_hidden_states(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch d_model"]:
    """SASA's embedding: the final hidden state after the final layer norm at each row's last real token.

    Equals HF's ``hidden_states[-1][i, last]`` (Ko et al. 2025, §3). Read from ``ln_final.hook_normalized``
    with ``return_type=None``, so the unembedding never runs; the folded gain/bias is re-applied by
    :func:`apply_final_norm`. Padding may be on either side; ``attention_mask=None`` means no padding.
    """
    _check_model(model)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}; add a batch dimension.")
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    if attention_mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match tokens {tuple(tokens.shape)}."
        )
    device = model.cfg.device
    tokens = tokens.to(device)
    attention_mask = attention_mask.to(device)
    last = last_token_index(attention_mask)
    rows = torch.arange(tokens.shape[0], device=device)
    captured: dict[str, Tensor] = {}

    def grab(act: Tensor, hook) -> Tensor:
        captured["x"] = act[rows, last.to(act.device)]
        return act

    name = embedding_hook_name(model)
    final_norm_affine(model)  # fail before the forward pass if the folding trap applies
    model.run_with_hooks(tokens, attention_mask=attention_mask, return_type=None, fwd_hooks=[(name, grab)])
    return apply_final_norm(model, captured["x"])


# ----------------------------------------------------------------------------------------------------------
# The classifier: streaming class moments and the closed-form LDA
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ClassMoments:
    """Running count, mean and scatter matrix sum_i (x_i - mean)(x_i - mean)^T of one class, in float64.

    Memory is O(d^2) whatever the number of texts. Batches are merged with Chan et al.'s pairwise update
    (exact, and free of the cancellation that sum-of-outer-products minus n mu mu^T suffers in long runs).
    """

    count: int
    mean: Float[Tensor, " d"]
    scatter: Float[Tensor, "d d"]

    @classmethod
    def empty(cls, d: int) -> ClassMoments:
        return cls(0, torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64))

    def update(self, x: Float[Tensor, "n d"]) -> None:
        """Add the rows of ``x``: n_ab = n_a + n_b, M_ab = M_a + M_b + (n_a n_b / n_ab) delta delta^T."""
        x = torch.as_tensor(x).detach().to("cpu", torch.float64)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"Expected embeddings of shape [n, {self.mean.shape[0]}], got {tuple(x.shape)}.")
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(0)
        xc = x - mb
        mb_scatter = xc.T @ xc
        na = self.count
        n = na + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.scatter = self.scatter + mb_scatter + torch.outer(delta, delta) * (na * nb / n)
        self.count = n


def _check_both_classes(n1: int, n2: int) -> None:
    if n1 == 0 or n2 == 0:
        which = "non-toxic (label == 0)" if n1 == 0 else "toxic (label > toxic_threshold)"
        raise ValueError(
            f"SASA needs texts of both classes; there are no {which} texts ({n1} non-toxic, {n2} toxic). "
            "Add texts of the missing class, or change toxic_threshold / gen_wv_length."
        )


def fit_lda(
    nontoxic: ClassMoments, toxic: ClassMoments, *, cutoff: float = SINGULAR_VALUE_CUTOFF
) -> tuple[Float[Tensor, " d"], Float[Tensor, " d"]]:
    """Unit ``wv`` and midpoint ``mu_mu`` of the Bayes-optimal linear classifier (Ko et al. 2025, §3).

    Sigma = (M_1 + M_2) / (n_1 + n_2 - 2) (pooled unbiased covariance, as the reference);
    wv = pinv(Sigma)(mu_1 - mu_2)/2 normalised, with pinv keeping singular values > ``cutoff`` (absolute,
    as the reference). Sigma is symmetric PSD, so its SVD is its eigendecomposition (``eigh``). float64.
    """
    n1, n2 = nontoxic.count, toxic.count
    _check_both_classes(n1, n2)
    if n1 + n2 < 3:
        raise ValueError(
            f"SASA's pooled covariance needs at least 3 texts (n1 + n2 - 2 > 0); got {n1 + n2}. Add more texts."
        )
    mu1, mu2 = nontoxic.mean.double(), toxic.mean.double()
    sigma = (nontoxic.scatter + toxic.scatter).double() / (n1 + n2 - 2)
    sigma = (sigma + sigma.T) / 2
    evals, evecs = torch.linalg.eigh(sigma)
    keep = evals > cutoff
    if not bool(keep.any()):
        raise ValueError(
            f"All singular values of the within-class covariance are <= {cutoff}: the embeddings do not vary "
            "within a class. Use more (and more varied) texts."
        )
    f = evecs[:, keep]
    w = f @ ((f.T @ ((mu1 - mu2) / 2)) / evals[keep])
    norm = torch.linalg.vector_norm(w)
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        raise ValueError(
            "The toxic and non-toxic means coincide in the covariance's support, so no direction separates "
            "them. Check the labels, or use more texts."
        )
    return w / norm, (mu1 + mu2) / 2


def fit_subspace_from_embeddings(
    x_nontoxic: Float[Tensor, "n1 d"], x_toxic: Float[Tensor, "n2 d"]
) -> tuple[Float[Tensor, " d"], Float[Tensor, " d"]]:
    """:func:`fit_lda` on two in-memory embedding matrices (non-toxic rows, toxic rows); float64 results."""
    x1, x2 = torch.as_tensor(x_nontoxic), torch.as_tensor(x_toxic)
    if x1.ndim != 2 or x2.ndim != 2 or x1.shape[1] != x2.shape[1]:
        raise ValueError(
            f"Expected two [n, d] matrices of the same width, got {tuple(x1.shape)} and {tuple(x2.shape)}."
        )
    a, b = ClassMoments.empty(x1.shape[1]), ClassMoments.empty(x1.shape[1])
    a.update(x1)
    b.update(x2)
    return fit_lda(a, b)


# ----------------------------------------------------------------------------------------------------------
# Data selection
# ----------------------------------------------------------------------------------------------------------


def _check_threshold(toxic_threshold: float) -> float:
    try:
        t = float(toxic_threshold)
    except (TypeError, ValueError):
        raise ValueError(f"toxic_threshold must be a number in [0, 1), got {toxic_threshold!r}.") from None
    if isinstance(toxic_threshold, bool) or math.isnan(t) or not 0.0 <= t < 1.0:
        raise ValueError(
            f"toxic_threshold must lie in [0, 1) (toxic = label > threshold; the reference uses 0.0), "
            f"got {toxic_threshold!r}."
        )
    return t


def _check_length(length: int) -> int:
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or (length != -1 and length < 1):
        raise ValueError(
            f"gen_wv_length must be -1 (use every text) or an integer >= 1 (a stratified sample of that "
            f"many texts), got {length!r}."
        )
    return int(length)


def class_indices(labels: np.ndarray, toxic_threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the non-toxic (label == 0) and toxic (label > threshold) texts; the rest are left out."""
    labels = np.asarray(labels, dtype=np.float64)
    t = _check_threshold(toxic_threshold)
    return np.flatnonzero(labels == 0), np.flatnonzero(labels > t)


def stratified_sample(
    nontoxic: np.ndarray, toxic: np.ndarray, length: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random sample of ``length`` texts with the classes in their original proportion.

    ``length == -1`` or ``length >= total`` keeps everything. Otherwise each class gets
    round(length * n_class / total) texts, at least one each when ``length >= 2`` (so both classes stay
    present). Indices come back sorted. The reference took the first rows instead; a random sample does
    not depend on the file's order.
    """
    length = _check_length(length)
    n1, n2 = len(nontoxic), len(toxic)
    total = n1 + n2
    if length == -1 or length >= total:
        return np.sort(nontoxic), np.sort(toxic)
    k1 = int(round(length * n1 / total))
    if length >= 2 and n1 > 0 and n2 > 0:
        k1 = min(max(k1, 1), length - 1)
    k1 = min(k1, n1)
    k2 = min(length - k1, n2)
    rng = np.random.default_rng(seed)
    s1 = rng.choice(nontoxic, size=k1, replace=False) if k1 else np.empty(0, dtype=np.int64)
    s2 = rng.choice(toxic, size=k2, replace=False) if k2 else np.empty(0, dtype=np.int64)
    return np.sort(s1), np.sort(s2)


# ----------------------------------------------------------------------------------------------------------
# The subspace and its file
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Subspace:
    """A learned SASA subspace: unit normal ``wv`` and midpoint ``mu_mu``, with where it came from.

    ``margin(x) = wv . (x - mu_mu)``; positive = non-toxic (Ko et al. 2025, §3). ``x`` is the HF-equivalent
    final hidden state (:func:`final_hidden_states`, or :func:`apply_final_norm` of the hook value).
    """

    wv: Float[Tensor, " d_model"]
    mu_mu: Float[Tensor, " d_model"]
    model_name: str | None
    d_model: int
    hook_name: str = HOOK_NAME
    source: str = "memory"
    n_nontoxic: int = 0
    n_toxic: int = 0
    toxic_threshold: float = 0.0
    extra: dict = field(default_factory=dict)
    """Other plain-python facts (prepend_bos, max_length, sample size and seed, texts dropped ...)."""
    model_digest: str | None = None
    """sha256 of the weights it was learned on (:func:`saesteer.data.digests.module_digest`); None: unknown
    (a file from before the digests, or a reference file)."""
    data_digest: str | None = None
    """sha256 of the training texts and labels (:func:`saesteer.data.digests.texts_digest`); None: unknown."""

    def __post_init__(self) -> None:
        wv, mu = torch.as_tensor(self.wv), torch.as_tensor(self.mu_mu)
        if wv.ndim != 1 or mu.shape != wv.shape or wv.shape[0] != self.d_model:
            raise ValueError(
                f"wv and mu_mu must both have shape ({self.d_model},); got {tuple(wv.shape)} and {tuple(mu.shape)}."
            )
        if not (torch.isfinite(wv).all() and torch.isfinite(mu).all()):
            raise ValueError("wv and mu_mu must be finite; relearn the subspace.")
        object.__setattr__(self, "wv", wv)
        object.__setattr__(self, "mu_mu", mu)

    def margin(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, ...]:
        """wv . (x - mu_mu) over the last axis (batched); positive = non-toxic."""
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"Embeddings have width {x.shape[-1]}, but this subspace has d_model={self.d_model}; "
                "use a subspace learned on this model."
            )
        dtype = torch.promote_types(x.dtype, torch.float32)
        wv = self.wv.to(x.device, dtype)
        mu = self.mu_mu.to(x.device, dtype)
        return (x.to(dtype) - mu) @ wv

    def to(self, device: torch.device | str) -> Subspace:
        """A copy with ``wv`` and ``mu_mu`` on ``device`` (avoids a copy per decoding step)."""
        return replace(self, wv=self.wv.to(device), mu_mu=self.mu_mu.to(device))

    def check_model(self, model: HookedTransformer) -> None:
        """Raise :class:`SubspaceMismatchError` unless the subspace was learned on this model.

        With a recorded ``model_digest`` the model's weights must have that digest (its name does not
        matter: the same weights under another name pass, other weights under the same name do not).
        Without one (older files), the model's name must match as before. Width and hook always must.
        """
        _check_model(model)
        name, d = model.cfg.model_name, model.cfg.d_model
        if self.d_model != d:
            raise SubspaceMismatchError(
                f"This subspace was learned on {self.model_name!r} with d_model={self.d_model}, but the model is "
                f"{name!r} with d_model={d}. Learn a new subspace for this model (give gen_wv_data_path and a "
                "new wv_path)."
            )
        if self.model_digest is not None:
            digest = module_digest(model)
            if digest != self.model_digest:
                how = self.extra.get("model_processing")
                mine = getattr(model, "saesteer_processing", None)
                flags = f" (processing {how} then, {mine} now)" if how is not None and how != mine else ""
                raise SubspaceMismatchError(
                    f"This subspace was learned on model {self.model_name!r} with weights sha256 "
                    f"{self.model_digest[:16]}..., but the model passed ({name!r}) has other weights: sha256 "
                    f"{digest[:16]}...{flags}. Its margins mean nothing on other weights (a fine-tune, another "
                    "checkpoint, other processing flags, or weights changed in place). Learn it on this model: "
                    "SASA(wv_path=..., gen_wv_data=... or gen_wv_data_path=..., recompute=True).steer(model), or "
                    "delete the file and learn it again."
                )
        elif self.model_name is not None and self.model_name != name:
            raise SubspaceMismatchError(
                f"This subspace was learned on model {self.model_name!r}, but the model is {name!r}. Learn a new "
                "subspace for this model (give gen_wv_data_path and a new wv_path)."
            )
        hook = embedding_hook_name(model)
        if self.hook_name != hook:
            raise SubspaceMismatchError(
                f"This subspace was learned at hook {self.hook_name!r}, but this model's embedding hook is "
                f"{hook!r}. Learn a new subspace for this model."
            )

    def metadata(self) -> dict:
        """The ``'saesteer_meta'`` dict stored in the file (plain python types only)."""
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "model_name": self.model_name,
            "d_model": int(self.d_model),
            "hook_name": self.hook_name,
            "source": self.source,
            "n_nontoxic": int(self.n_nontoxic),
            "n_toxic": int(self.n_toxic),
            "toxic_threshold": float(self.toxic_threshold),
            "extra": dict(self.extra),
            "model_digest": self.model_digest,
            "data_digest": self.data_digest,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``{'wv', 'mu_mu', 'saesteer_meta'}`` to ``path`` (must end in ``.pt``) atomically.

        ``wv``/``mu_mu`` are float32 CPU tensors, so the reference implementation can read the file too.
        The file appears complete or not at all (:func:`saesteer.data.atomic.atomic_write`). The metadata
        holds the digests of what produced it and the sha256 of the two tensors (checked by :meth:`load`).
        """
        path = _check_pt_path(path)
        wv = self.wv.detach().to("cpu", torch.float32).contiguous().clone()
        mu = self.mu_mu.detach().to("cpu", torch.float32).contiguous().clone()
        payload = {"wv": wv, "mu_mu": mu, "saesteer_meta": {**self.metadata(), "tensor_sha256": _tensor_sha256(wv, mu)}}
        with atomic_write(path, "wb", permissions=0o644) as f:  # 0644: a saved subspace is meant to be shared
            torch.save(payload, f)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: HookedTransformer | None = None) -> Subspace:
        """Read a subspace file (``weights_only=True``) and, given ``model``, check it was learned on it.

        Files from the reference implementation (``{'wv', 'mu_mu'}`` only) load too, with unknown model name
        (only d_model is checked then), and so do files of older saesteer versions (without digests: the
        model's name is checked instead of its weights). A recorded tensor checksum must match.

        Raises:
            SubspaceFileError: not a subspace file, unreadable (truncated) or its tensors changed.
            SubspaceMismatchError: ``model`` is not the model it was learned on (the message names both).
        """
        path = _check_pt_path(path)
        if not path.is_file():
            raise SubspaceFileError(
                f"No subspace file at {str(path)!r}; learn one first (SASA(gen_wv_data_path=..., wv_path=...))."
            )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any failure to read a user's file: unpickling, truncation, random bytes
            raise SubspaceFileError(
                f"{str(path)!r} is not a saesteer/SASA subspace file (it holds something other than "
                f"{{'wv', 'mu_mu'}} tensors: {type(e).__name__}). Learn the subspace again and save it with "
                "Subspace.save."
            ) from None
        tensors = isinstance(obj, dict) and all(isinstance(obj.get(k), Tensor) for k in ("wv", "mu_mu"))
        if not tensors:
            raise SubspaceFileError(
                f"{str(path)!r} is not a saesteer/SASA subspace file: it needs a dict with tensors 'wv' and "
                "'mu_mu'. Learn the subspace again and save it with Subspace.save."
            )
        wv, mu = obj["wv"], obj["mu_mu"]
        if wv.ndim != 1 or mu.shape != wv.shape:
            raise SubspaceFileError(
                f"{str(path)!r} holds wv {tuple(wv.shape)} and mu_mu {tuple(mu.shape)}; both must be 1-d of the "
                "same length. Learn the subspace again."
            )
        meta = obj.get("saesteer_meta")
        if meta is None:
            warnings.warn(
                f"{str(path)!r} has no saesteer metadata (a reference-implementation file?); only its width "
                "can be checked against the model.",
                stacklevel=2,
            )
            sub = cls(
                wv=wv,
                mu_mu=mu,
                model_name=None,
                d_model=wv.shape[0],
                source=f"file:{path.name}",
                extra={"reference_file": True},
            )
        else:
            if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT:
                raise SubspaceFileError(
                    f"{str(path)!r} has a 'saesteer_meta' entry that is not a SASA subspace's metadata."
                )
            if int(meta.get("version", 0)) > FILE_VERSION:
                raise SubspaceFileError(
                    f"{str(path)!r} was written by a newer saesteer (format version {meta['version']}); upgrade "
                    "saesteer."
                )
            try:
                sub = cls(
                    wv=wv,
                    mu_mu=mu,
                    model_name=meta["model_name"],
                    d_model=int(meta["d_model"]),
                    hook_name=meta["hook_name"],
                    source=meta["source"],
                    n_nontoxic=int(meta["n_nontoxic"]),
                    n_toxic=int(meta["n_toxic"]),
                    toxic_threshold=float(meta["toxic_threshold"]),
                    extra=dict(meta.get("extra", {})),
                    model_digest=_optional_str(meta.get("model_digest")),
                    data_digest=_optional_str(meta.get("data_digest")),
                )
            except (KeyError, TypeError, ValueError) as e:
                raise SubspaceFileError(f"{str(path)!r} has incomplete or invalid metadata ({e}).") from None
            recorded = meta.get("tensor_sha256")
            if recorded is not None and recorded != _tensor_sha256(wv, mu):
                raise SubspaceFileError(
                    f"{str(path)!r} is damaged: the sha256 of its wv and mu_mu differs from the one recorded when it "
                    "was saved. Delete it and learn the subspace again (SASA(..., recompute=True))."
                )
        if model is not None:
            try:
                sub.check_model(model)
            except SubspaceMismatchError as e:
                raise SubspaceMismatchError(f"{path}: {e}") from None
        return sub


def _tensor_sha256(wv: Tensor, mu_mu: Tensor) -> str:
    """sha256 over the float32 values of ``wv`` then ``mu_mu`` (as saved)."""
    h = hashlib.sha256()
    for t in (wv, mu_mu):
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _optional_str(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"a digest must be a hex string, got {type(value).__name__}")
    return value


def _check_pt_path(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"A subspace path must be a str or path ending in '.pt', got {type(path).__name__}.")
    p = Path(path)
    if p.suffix != ".pt":
        raise ValueError(f"A subspace file must end in '.pt' (the reference format), got {str(path)!r}.")
    return p


# ----------------------------------------------------------------------------------------------------------
# Learning from texts
# ----------------------------------------------------------------------------------------------------------


def _token_ids(model: HookedTransformer, text: str, prepend_bos: bool, max_length: int) -> Tensor:
    """One text's token ids as ``model.to_tokens`` makes them (TransformerLens' BOS handling), truncated."""
    return model.to_tokens(text, prepend_bos=prepend_bos, truncate=False, move_to_device=False)[0, :max_length]


@torch.no_grad()
def learn_subspace(
    model: HookedTransformer,
    data: LabelledTexts,
    *,
    toxic_threshold: float = 0.0,
    length: int = -1,
    batch_size: int = 8,
    seed: int = 0,
    max_length: int | None = None,
    prepend_bos: bool | None = None,
    progress: bool = True,
) -> Subspace:
    """Learn SASA's subspace from labelled texts (Ko et al. 2025, §3), streaming: memory O(d^2 + batch).

    Non-toxic = label == 0, toxic = label > ``toxic_threshold`` (reference: ``toxicity > 0``); ``length``
    (gen_wv_length) -1 = all texts, else a seeded stratified sample of that size. Texts are tokenised like
    ``model.to_tokens`` (BOS per ``prepend_bos``, default the model's), cut to their first ``max_length``
    tokens (default ``n_ctx``), embedded longest-first in batches of ``batch_size`` (less padding), and only
    per-class count, mean and scatter are kept. Texts with no tokens or a non-finite embedding are dropped
    and counted (``extra['n_dropped']``). The result records ``model_digest`` (the model's weights) and
    ``data_digest`` (all of ``data``'s texts and labels; the sample is fixed by them, ``length`` and ``seed``).
    """
    _check_model(model)
    if not isinstance(data, LabelledTexts):
        raise ValueError(
            f"data must be a saesteer.data.datasets.LabelledTexts, got {type(data).__name__}; build one with "
            "LabelledTexts(texts, labels) or load_jigsaw(path)."
        )
    threshold = _check_threshold(toxic_threshold)
    length = _check_length(length)
    check_positive_int("batch_size", batch_size)
    if model.tokenizer is None:
        raise ValueError(
            "The model has no tokenizer; call model.set_tokenizer(...) or load it with saesteer.load_model."
        )
    n_ctx = model.cfg.n_ctx
    max_length = n_ctx if max_length is None else check_positive_int("max_length", max_length, n_ctx, "n_ctx")
    bos = model.cfg.default_prepend_bos if prepend_bos is None else bool(prepend_bos)

    non, tox = class_indices(data.labels, threshold)
    non, tox = stratified_sample(non, tox, length, seed)
    _check_both_classes(len(non), len(tox))
    idx = np.concatenate([non, tox])
    is_toxic = np.concatenate([np.zeros(len(non), bool), np.ones(len(tox), bool)])

    # token lengths only (O(N) ints); texts are re-tokenised per batch so no token lists pile up
    texts = tqdm((data.texts[i] for i in idx), total=len(idx), desc="SASA tokens", unit="text", disable=not progress)
    lengths = np.fromiter((len(_token_ids(model, t, bos, max_length)) for t in texts), dtype=np.int64, count=len(idx))
    order = np.argsort(-lengths, kind="stable")
    order = order[lengths[order] > 0]
    n_dropped = len(idx) - len(order)

    d = model.cfg.d_model
    moments = (ClassMoments.empty(d), ClassMoments.empty(d))
    pad = pad_id(model)
    with tqdm(total=len(order), desc="SASA embeddings", unit="text", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            sel = order[start : start + batch_size]
            seqs = [_token_ids(model, data.texts[i], bos, max_length) for i in idx[sel]]
            tokens, mask = pad_sequences(seqs, pad, side="right", device=model.cfg.device)
            emb = final_hidden_states(model, tokens, mask).to("cpu", torch.float64)
            finite = torch.isfinite(emb).all(dim=1)
            n_dropped += int((~finite).sum())
            tox_rows = torch.from_numpy(is_toxic[sel])
            moments[0].update(emb[finite & ~tox_rows])
            moments[1].update(emb[finite & tox_rows])
            bar.update(len(sel))

    if n_dropped:
        warnings.warn(
            f"SASA: {n_dropped} texts had no tokens or a non-finite embedding and were left out.", stacklevel=2
        )
    wv, mu_mu = fit_lda(moments[0], moments[1])
    processing = getattr(model, "saesteer_processing", None)
    return Subspace(
        wv=wv.float(),
        mu_mu=mu_mu.float(),
        model_name=model.cfg.model_name,
        d_model=d,
        hook_name=embedding_hook_name(model),
        source=data.source,
        n_nontoxic=moments[0].count,
        n_toxic=moments[1].count,
        toxic_threshold=threshold,
        extra={
            "prepend_bos": bos,
            "max_length": int(max_length),
            "gen_wv_length": int(length),
            "seed": int(seed),
            "n_dropped": int(n_dropped),
            **({"model_processing": dict(processing)} if isinstance(processing, dict) else {}),
        },
        model_digest=module_digest(model),
        data_digest=texts_digest(data.texts, data.labels),
    )
