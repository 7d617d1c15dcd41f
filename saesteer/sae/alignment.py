"""Scoring SAE latents against a steering target with alignment and reference prompts.

After IBM, "Enabling Layer-Level Steering in LLMs using Sparse Autoencoders". Each reference prompt i
gets a distance d_i = min_j ||e(ref_i) - e(align_j)|| to the alignment set, and a latent profile
a_{i,f} (latents averaged over the prompt's tokens, BOS excluded, normalised to sum to 1). Then

    s_f = sum_i d_i^2 a_{i,f} / sum_i a_{i,f}

is min-max normalised over the latents that fire and flipped, so a latent that fires on prompts close
to the target scores near 1. A latent that fires on no reference prompt has no score: it is marked
dead (``alive == False``, score NaN) instead of being turned into 0 — the reference code divides
0/0 and lets the NaN zero every score through min/max.

The default embedding e() is the prompt's mean SAE latent vector, L2-normalised (so distances are
chordal cosine distances and no extra model is needed); pass ``embed=`` for a sentence-embedding model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from sae_lens import SAE
from torch import Tensor
from transformer_lens import HookedTransformer

from saesteer.checks import sae_hook_name
from saesteer.data.package_files import storage_path
from saesteer.models.tokens import check_texts
from saesteer.sae import ops as sae_ops
from saesteer.sae.activations import iter_latents

Embedder = Callable[[list[str]], Tensor]

TARGETS = {
    "non-toxic": ("non_toxic_alignment.csv", "reference.csv"),
    "medical": ("medical_alignment.csv", "reference.csv"),
}
"""Targets shipped in ``saesteer.storage/prompts``: (alignment CSV, reference CSV)."""


def read_prompts(path: str | Path, column: str = "prompt") -> list[str]:
    """The non-empty strings of ``column`` in a CSV file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Prompt file {path} does not exist; pass a CSV with a {column!r} column.")
    df = pd.read_csv(path)
    if column not in df.columns:
        raise ValueError(f"{path} has no {column!r} column (columns: {list(df.columns)}); rename the prompt column.")
    prompts = [str(p).strip() for p in df[column].dropna()]
    return check_texts([p for p in prompts if p], f"prompts in {path}")


def target_prompts(target: str) -> tuple[list[str], list[str]]:
    """(alignment, reference) prompts of a target shipped with the package (``saesteer.storage/prompts``)."""
    if target not in TARGETS:
        raise ValueError(f"Unknown target {target!r}; shipped targets: {sorted(TARGETS)} (or pass prompt lists).")
    align, ref = TARGETS[target]
    return read_prompts(storage_path("prompts", align)), read_prompts(storage_path("prompts", ref))


@dataclass
class LatentScores:
    """Per-latent steering scores in [0, 1] (NaN where ``alive`` is False) and the uncertainty report."""

    scores: Float[Tensor, " d_sae"]
    alive: Bool[Tensor, " d_sae"]
    raw: Float[Tensor, " d_sae"]
    distances: Float[Tensor, " n_ref"]
    explained_variance: float
    hook_name: str

    @property
    def coverage(self) -> float:
        """Share of latents that fire on at least one reference prompt."""
        return float(self.alive.float().mean())

    def for_steering(self, dead_value: float = 0.0) -> Float[Tensor, " d_sae"]:
        """Scores with the dead latents set explicitly to ``dead_value`` (0: never promoted)."""
        return torch.where(self.alive, self.scores, torch.full_like(self.scores, dead_value))

    def top(self, n: int = 20) -> pd.DataFrame:
        """The n best-scoring live latents as a table."""
        s = self.scores.masked_fill(~self.alive, -1.0)
        idx = torch.topk(s, min(n, int(self.alive.sum()))).indices
        return pd.DataFrame({"latent": idx.tolist(), "score": self.scores[idx].tolist(), "raw": self.raw[idx].tolist()})

    def report(self) -> str:
        """One paragraph on how far the SAE can represent the target."""
        return (
            f"coverage {self.coverage:.1%} of latents fire on the reference prompts; "
            f"explained variance on the alignment prompts {self.explained_variance:.3f}"
            + (
                " (low: this SAE reconstructs the target poorly, treat the scores with care)"
                if self.explained_variance < 0.5
                else ""
            )
        )


def _profile_batches(model, sae, texts, hook_name, batch_size, max_length, progress):
    """Yield (mean latent vector per text, resid rows of real tokens) batch by batch."""
    for b in iter_latents(
        model, sae, texts, hook_name, batch_size=batch_size, max_length=max_length, progress=progress
    ):
        m = b.mask.to(b.acts.dtype).unsqueeze(-1)
        n = m.sum(1)
        if (n == 0).any():
            empty = [texts[b.start + i] for i in torch.nonzero(n[:, 0] == 0).flatten().tolist()]
            raise ValueError(f"Prompts with no tokens besides BOS: {empty[:3]}; remove them.")
        yield (b.acts * m).sum(1) / n, b.resid[b.mask]


@torch.no_grad()
def score_latents(
    model: HookedTransformer,
    sae: SAE,
    alignment: Sequence[str],
    reference: Sequence[str],
    *,
    hook_name: str | None = None,
    embed: Embedder | None = None,
    batch_size: int = 8,
    max_length: int | None = 128,
    progress: bool = False,
) -> LatentScores:
    """Score every latent of ``sae`` by how close the reference prompts it fires on are to ``alignment``.

    Streams over the reference prompts: memory is O(d_sae + n_ref), whatever their number.
    """
    alignment = check_texts(alignment, "alignment prompts")
    reference = check_texts(reference, "reference prompts")
    hook_name = hook_name or sae_hook_name(sae)
    if not hook_name:
        raise ValueError("The SAE does not name its hook; pass hook_name='blocks.L.hook_resid_post'.")
    sae_ops.check_supported(sae)

    def embed_batch(profiles: Tensor, texts: list[str]) -> Tensor:
        e = embed(texts) if embed is not None else profiles
        return torch.nn.functional.normalize(torch.as_tensor(e, dtype=torch.float32), dim=-1)

    align_emb, align_resid = [], []
    for i, (prof, resid) in enumerate(
        _profile_batches(model, sae, alignment, hook_name, batch_size, max_length, False)
    ):
        align_emb.append(embed_batch(prof.float(), alignment[i * batch_size : (i + 1) * batch_size]))
        align_resid.append(resid.float())
    align_emb_t = torch.cat(align_emb)
    ev = sae_ops.explained_variance(sae, torch.cat(align_resid).to(sae.W_dec.dtype))

    d_sae = sae.cfg.d_sae
    num = torch.zeros(d_sae, dtype=torch.float64)
    den = torch.zeros(d_sae, dtype=torch.float64)
    distances = []
    batches = _profile_batches(model, sae, reference, hook_name, batch_size, max_length, progress and "scoring latents")
    for i, (prof, _) in enumerate(batches):
        prof = prof.double().cpu()
        e = embed_batch(prof.float(), reference[i * batch_size : (i + 1) * batch_size])
        d = torch.cdist(e, align_emb_t.to(e.device)).min(dim=1).values.double().cpu()
        distances.append(d)
        a = prof / prof.sum(-1, keepdim=True).clamp_min(1e-12)  # a_{i,f}; all-zero rows stay zero
        num += (d.pow(2).unsqueeze(-1) * a).sum(0)
        den += a.sum(0)
    alive = den > 0
    raw = torch.full((d_sae,), float("nan"), dtype=torch.float64)
    raw[alive] = num[alive] / den[alive]
    scores = torch.full_like(raw, float("nan"))
    if alive.any():
        lo, hi = raw[alive].min(), raw[alive].max()
        scores[alive] = 1.0 - (raw[alive] - lo) / (hi - lo) if hi > lo else torch.ones_like(raw[alive])
    return LatentScores(
        scores=scores.float(),
        alive=alive,
        raw=raw.float(),
        distances=torch.cat(distances).float(),
        explained_variance=ev,
        hook_name=hook_name,
    )


def scores_to_frame(scores: LatentScores) -> pd.DataFrame:
    """All latents as a table: latent, alive, score, raw (NaN for dead latents)."""
    return pd.DataFrame(
        {
            "latent": np.arange(len(scores.scores)),
            "alive": scores.alive.numpy(),
            "score": scores.scores.numpy(),
            "raw": scores.raw.numpy(),
        }
    )
