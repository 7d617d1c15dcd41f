"""Feature dashboards for SAE latents, and a prompt-centric view of which latents fire on each token.

A :class:`FeatureDashboard` for latent i of any loaded SAE shows, in one plotly figure:

- **top-activating contexts** from a text corpus, streamed (a top-N min-heap per latent while
  :func:`saesteer.sae.activations.iter_latents` runs over the corpus, so memory does not grow with the
  corpus). Each text contributes at most one context: a window around its maximum-activation token,
  which is highlighted (bold, red; other tokens shaded by their activation);
- the **activation histogram** of the latent's non-zero activations over every real token of the
  corpus (BOS and padding excluded) and its **firing density** (share of tokens with f_i > 0). The
  histogram is exact and streamed: equal-width bins from 0 whose width doubles (merging bin pairs)
  whenever an activation beyond the last edge arrives;
- **attention sinks** are left out of the contexts, the histogram and the density: tokens whose residual
  norm exceeds ``sink_factor`` (3) x the median norm of their row (:func:`saesteer.hooks.sink_mask`, the
  steerers' rule; in SmolLM2 the first real token is such a sink in ~5% of rows, its latents firing absurdly
  high). The number left out is reported (``LatentStats.n_sinks``, in the figure); ``sink_factor=None``
  keeps them;
- the **logit lens** of its decoder vector: the tokens that ``d_i @ W_U`` promotes (largest) and
  suppresses (smallest), where d_i is the row of W_dec as the SAE applies it
  (:func:`saesteer.sae.ops.decoder_matrix`) and W_U the model's unembedding (the direct path, no
  final norm; models loaded with folded layer norms carry the norm's gain in W_U);
- its **steering scores** when given: the alignment score from :class:`~saesteer.sae.alignment.LatentScores`
  and its row of the :func:`~saesteer.sae.contrast.toxicity_latents` table.

Every view is a small dataclass holding the numbers, with ``figure()`` (a ``plotly`` Figure),
``show()``, ``_repr_mimebundle_()`` (inline in Jupyter), ``save_html(path)`` (standalone HTML, plotly.js
embedded so it opens offline) and ``save_png(path)`` (``pip install 'saesteer[png]'``).

:func:`prompt_latents` is the prompt-centric view: for one prompt, the top few latents on each token,
as a heatmap (latents x tokens) and as a table.
"""

from __future__ import annotations

import heapq
import html
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor
from tqdm import tqdm
from transformer_lens import HookedTransformer

from saesteer.checks import check_positive_int, check_sae_fits, sae_hook_name
from saesteer.hooks import check_sink_factor
from saesteer.models.tokens import tokenize
from saesteer.sae import ops as sae_ops
from saesteer.sae.activations import iter_latents, run_to_hook
from saesteer.sae.alignment import LatentScores
from saesteer.viz.export import write_html, write_png

__all__ = [
    "Corpus",
    "PlotlyView",
    "TopContext",
    "LatentStats",
    "LogitLens",
    "FeatureDashboard",
    "PromptLatents",
    "check_latent",
    "collect_latent_stats",
    "feature_dashboard",
    "feature_dashboards",
    "logit_lens",
    "prompt_latents",
    "token_strings",
]

Corpus = Sequence[str] | Iterable[str] | str | os.PathLike | None
"""Texts (a list or any iterable, e.g. :func:`saesteer.data.datasets.english_corpus`), a ``.txt`` file or
folder (one text a line), or None for the default English corpus."""


# ---------------------------------------------------------------------------------------------------
# Shared: display of plotly views, token strings, argument checks
# ---------------------------------------------------------------------------------------------------


class PlotlyView:
    """Mixin: anything with ``figure()`` shows inline in Jupyter and saves as HTML or PNG."""

    def figure(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def show(self, **kwargs) -> None:
        """``figure().show()`` (inline in Jupyter, a browser tab elsewhere)."""
        self.figure().show(**kwargs)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, object]:
        """Jupyter's display of the view, its ONLY ``_repr_*_`` hook (with a ``_repr_html_`` too, IPython
        builds and draws the figure twice). One bundle: the plotly JSON (``application/vnd.plotly.v1+json``,
        drawn by JupyterLab, VS Code, nteract), a ``text/html`` fallback loading plotly.js from its CDN for
        frontends without the plotly mime renderer, and a one-line ``text/plain``. Built without plotly's
        notebook renderer, which publishes the whole 4.8 MB plotly.js into the notebook on every display."""
        fig = self.figure()
        title = fig.layout.title.text or type(self).__name__
        bundle = {
            "application/vnd.plotly.v1+json": json.loads(fig.to_json()),
            "text/html": fig.to_html(full_html=False, include_plotlyjs="cdn"),
            "text/plain": f"<{type(self).__name__}: {title}>",
        }
        return {k: v for k, v in bundle.items() if (not include or k in include) and k not in (exclude or ())}

    def save_html(self, path: str | os.PathLike, *, include_plotlyjs: bool | str = True) -> Path:
        """Write a standalone HTML file (plotly.js embedded: opens offline; ``"directory"`` shares one
        ``plotly.min.js`` beside the pages; ``"cdn"`` for a small file that needs the internet)."""
        return write_html(self.figure(), path, include_plotlyjs=include_plotlyjs)

    def save_png(self, path: str | os.PathLike, *, scale: float = 1.0) -> Path:
        """Write a PNG (``pip install 'saesteer[png]'``); raises RuntimeError, saying what to install, without it."""
        return write_png(self.figure(), path, scale=scale)


def token_strings(model: HookedTransformer, ids: Iterable[int]) -> list[str]:
    """Each token id decoded on its own (``" the"`` for byte-level BPE), as displayed in the views."""
    tok = model.tokenizer
    if tok is None:
        return [str(int(i)) for i in ids]
    return [tok.decode([int(i)]) for i in ids]


def _show_token(s: str) -> str:
    """A token string safe for plotly's pseudo-HTML (escaped; newlines and tabs made visible)."""
    return html.escape(s.replace("\n", "↵").replace("\t", "⇥"), quote=False)


def check_latent(sae: SAE, latent) -> int:
    """``latent`` as an int in [0, d_sae), or a ValueError naming the valid range."""
    d_sae = int(sae.cfg.d_sae)
    if isinstance(latent, Tensor) and latent.numel() == 1 and not latent.is_floating_point():
        latent = int(latent.item())
    if isinstance(latent, bool) or not isinstance(latent, (int, np.integer)):
        raise ValueError(f"latent must be an integer index in [0, {d_sae - 1}], got {latent!r}.")
    i = int(latent)
    if not 0 <= i < d_sae:
        raise ValueError(f"latent {i} is outside this SAE (d_sae={d_sae}); pass an index in [0, {d_sae - 1}].")
    return i


def _hook(sae: SAE, hook_name: str | None) -> str:
    hook_name = hook_name or sae_hook_name(sae)
    if not hook_name:
        raise ValueError("The SAE does not name its hook; pass hook_name='blocks.L.hook_resid_post'.")
    return hook_name


def _texts(corpus: Corpus) -> Iterator[str]:
    """The corpus as a stream of strings, checked before the first text is read."""
    if corpus is None:
        from saesteer.data.datasets import english_corpus

        return english_corpus()
    if isinstance(corpus, (str, os.PathLike)):
        path = Path(corpus).expanduser()
        if not path.exists():
            raise ValueError(
                f"corpus path {path} does not exist; pass an existing .txt file or folder of .txt files "
                "(one text a line), or a list of texts."
            )
        from saesteer.data.datasets import english_corpus

        return english_corpus(path)
    if not isinstance(corpus, Iterable):
        raise ValueError(
            f"corpus must be a list or iterable of texts, a .txt file or folder, or None; got {type(corpus).__name__}."
        )
    return iter(corpus)


# ---------------------------------------------------------------------------------------------------
# Streaming statistics of latents over a corpus
# ---------------------------------------------------------------------------------------------------


@dataclass
class TopContext:
    """One top-activating context: a window of a corpus text around its max-activation token."""

    activation: float
    text_index: int
    position: int
    """Index of the max-activation token in the text's tokens (BOS included)."""
    token_ids: list[int]
    acts: list[float]
    highlight: int
    """Index of the max-activation token inside the window (``token_ids[highlight]``)."""
    tokens: list[str] = field(default_factory=list)


class StreamingHistogram:
    """Exact equal-width histogram of non-negative values over [0, n_bins * width), width doubling on overflow."""

    def __init__(self, n_bins: int = 40) -> None:
        if n_bins < 2 or n_bins % 2:
            raise ValueError(f"n_bins must be an even integer >= 2, got {n_bins!r}.")
        self.n_bins = n_bins
        self.width: float | None = None
        self.counts = np.zeros(n_bins, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return
        top = float(values.max())
        if self.width is None:
            self.width = top / self.n_bins * 1.0001 if top > 0 else 1e-6
        while top >= self.width * self.n_bins:
            self.counts = self.counts.reshape(-1, 2).sum(1)
            self.counts = np.concatenate([self.counts, np.zeros(self.n_bins // 2, dtype=np.int64)])
            self.width *= 2
        idx = np.minimum((values / self.width).astype(np.int64), self.n_bins - 1)
        self.counts += np.bincount(idx, minlength=self.n_bins)

    @property
    def edges(self) -> np.ndarray:
        return np.arange(self.n_bins + 1) * (self.width or 0.0)


@dataclass
class LatentStats:
    """What streaming a corpus taught about one latent."""

    latent: int
    n_tokens: int
    n_fired: int
    max_activation: float
    sum_activation: float
    hist_edges: np.ndarray
    """Bin edges of the histogram of the NON-ZERO activations (``len(hist_counts) + 1``)."""
    hist_counts: np.ndarray
    top_contexts: list[TopContext]
    n_texts: int
    n_sinks: int = 0
    """Real tokens left out as attention sinks (norm above ``sink_factor`` x their row's median); not in
    ``n_tokens``, the histogram or the contexts."""
    sink_factor: float | None = None
    """The factor those sinks were found with (None: none were left out)."""

    @property
    def density(self) -> float:
        """Firing density: the share of tokens with activation > 0."""
        return self.n_fired / self.n_tokens if self.n_tokens else 0.0

    @property
    def n_zero(self) -> int:
        """Tokens where the latent does not fire (``hist_counts.sum() + n_zero == n_tokens``)."""
        return self.n_tokens - self.n_fired

    @property
    def mean_when_firing(self) -> float:
        return self.sum_activation / self.n_fired if self.n_fired else 0.0


class _LatentAccumulator:
    def __init__(self, latent: int, n_top: int, n_bins: int) -> None:
        self.latent = latent
        self.n_top = n_top
        self.heap: list[tuple[float, int, TopContext]] = []
        self.hist = StreamingHistogram(n_bins)
        self.n_fired = 0
        self.sum = 0.0
        self.max = 0.0

    def threshold(self) -> float:
        return self.heap[0][0] if len(self.heap) >= self.n_top else 0.0

    def push(self, ctx: TopContext, order: int) -> None:
        item = (ctx.activation, -order, ctx)  # ties: the earlier text wins
        if len(self.heap) < self.n_top:
            heapq.heappush(self.heap, item)
        elif item[:2] > self.heap[0][:2]:
            heapq.heapreplace(self.heap, item)


def _chunks(texts: Iterator[str], size: int, limit: int | None) -> Iterator[list[str]]:
    stream = itertools.islice(texts, limit) if limit is not None else texts
    while True:
        chunk = list(itertools.islice(stream, size))
        if not chunk:
            return
        bad = [t for t in chunk if not isinstance(t, str)]
        if bad:
            raise ValueError(f"corpus entries must be str; got {type(bad[0]).__name__}. Pass texts, one per entry.")
        yield chunk


@torch.no_grad()
def collect_latent_stats(
    model: HookedTransformer,
    sae: SAE,
    corpus: Corpus,
    latents: Sequence[int],
    *,
    n_top: int = 10,
    context: tuple[int, int] = (12, 4),
    max_texts: int | None = 1000,
    n_bins: int = 40,
    hook_name: str | None = None,
    batch_size: int = 8,
    max_length: int | None = 128,
    progress: bool = False,
    sink_factor: float | None = 3.0,
) -> dict[int, LatentStats]:
    """Stream ``corpus`` once and collect top contexts, histogram and density for each of ``latents``.

    Memory is O(len(latents) * (n_top * window + n_bins)) plus one batch, whatever the corpus size;
    ``max_texts`` caps how many texts are read (None: all). ``context=(left, right)`` is the number of
    tokens shown either side of a context's max-activation token. Tokens whose residual norm exceeds
    ``sink_factor`` x the median norm of their row (attention sinks, :func:`saesteer.hooks.sink_mask`) are
    left out of all of it and counted in ``n_sinks``; ``sink_factor=None`` keeps them.

    Raises:
        ValueError: a latent outside the SAE, a corpus path that does not exist, an empty corpus or one
            with no tokens besides BOS, an SAE that does not fit the model.
    """
    hook_name = _hook(sae, hook_name)
    check_sae_fits(model, sae, hook_name)
    idx = [check_latent(sae, i) for i in latents]
    if not idx:
        raise ValueError("latents is empty; pass at least one latent index.")
    check_positive_int("n_top", n_top)
    check_positive_int("batch_size", batch_size)
    sink_factor = check_sink_factor(sink_factor)
    if max_texts is not None:
        check_positive_int("max_texts", max_texts)
    left, right = (int(c) for c in context)
    if left < 0 or right < 0:
        raise ValueError(f"context must be two numbers of tokens >= 0 (left, right), got {context!r}.")
    acc = {i: _LatentAccumulator(i, n_top, n_bins) for i in dict.fromkeys(idx)}
    sel = torch.tensor(list(acc), dtype=torch.long)
    n_texts = n_tokens = n_sinks = 0
    bar = tqdm(total=max_texts, desc="dashboard corpus", unit="text", disable=not progress)
    for chunk in _chunks(_texts(corpus), batch_size, max_texts):
        # one batch per chunk: iter_latents yields exactly one LatentBatch here
        for b in iter_latents(
            model, sae, chunk, hook_name, batch_size=batch_size, max_length=max_length, sink_factor=sink_factor
        ):
            acts = b.acts[..., sel.to(b.acts.device)].float().cpu()  # [B, P, L]
            mask = b.keep.cpu()  # real tokens that are not attention sinks
            acts = acts.masked_fill(~mask.unsqueeze(-1), 0.0)
            n_tokens += int(mask.sum())
            n_sinks += int(b.sinks.sum())
            real_rows = b.mask.cpu()
            tokens = None  # token ids, only tokenised again if a context is kept
            real = acts[mask]  # [n_real, L]
            for j, a in enumerate(acc.values()):
                col = real[:, j]
                pos = col[col > 0].double().numpy()
                a.n_fired += len(pos)
                a.sum += float(pos.sum())
                a.max = max(a.max, float(pos.max()) if len(pos) else 0.0)
                a.hist.add(pos)
                best, where = acts[:, :, j].max(dim=1)  # per text
                for r in torch.nonzero(best > a.threshold()).flatten().tolist():
                    p = int(where[r])
                    if tokens is None:
                        tokens = tokenize(model, chunk, side="right", max_length=max_length)[0].cpu()
                    first = int(torch.nonzero(real_rows[r]).min())  # windows may show a sink, never BOS
                    last = int(torch.nonzero(real_rows[r]).max())
                    lo, hi = max(first, p - left), min(last, p + right) + 1
                    ctx = TopContext(
                        activation=float(best[r]),
                        text_index=n_texts + r,
                        position=p,
                        token_ids=tokens[r, lo:hi].tolist(),
                        acts=acts[r, lo:hi, j].tolist(),
                        highlight=p - lo,
                    )
                    a.push(ctx, n_texts + r)
        n_texts += len(chunk)
        bar.update(len(chunk))
    bar.close()
    if n_texts == 0:
        raise ValueError("The corpus is empty; pass at least one text (or a .txt file with non-blank lines).")
    if n_tokens == 0:
        if n_sinks:
            raise ValueError(
                f"Every token of the corpus besides BOS ({n_sinks}) is an attention sink at "
                f"sink_factor={sink_factor}; pass longer texts or sink_factor=None."
            )
        raise ValueError("The corpus has no tokens besides BOS; pass non-empty texts.")
    out = {}
    for i, a in acc.items():
        top = [c for _, _, c in sorted(a.heap, key=lambda t: t[:2], reverse=True)]
        for c in top:
            c.tokens = token_strings(model, c.token_ids)
        out[i] = LatentStats(
            latent=i,
            n_tokens=n_tokens,
            n_fired=a.n_fired,
            max_activation=a.max,
            sum_activation=a.sum,
            hist_edges=a.hist.edges,
            hist_counts=a.hist.counts.copy(),
            top_contexts=top,
            n_texts=n_texts,
            n_sinks=n_sinks,
            sink_factor=sink_factor,
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Logit lens of a decoder vector
# ---------------------------------------------------------------------------------------------------


@dataclass
class LogitLens:
    """Tokens the decoder vector d_i promotes (largest d_i @ W_U) and suppresses (smallest)."""

    latent: int
    top_ids: list[int]
    top_values: list[float]
    top_tokens: list[str]
    bottom_ids: list[int]
    bottom_values: list[float]
    bottom_tokens: list[str]


@torch.no_grad()
def decoder_logits(model: HookedTransformer, sae: SAE, latent: int) -> Float[Tensor, " d_vocab"]:
    """``d_i @ W_U``: the direct effect of latent i's decoder vector on every token's logit."""
    i = check_latent(sae, latent)
    d = sae_ops.decoder_matrix(sae)[i]
    w_u = model.W_U
    if d.shape[0] != w_u.shape[0]:
        raise ValueError(
            f"SAE d_in={d.shape[0]} does not match the model's d_model={w_u.shape[0]}; load the SAE of this model."
        )
    return d.to(w_u.device, w_u.dtype) @ w_u


def logit_lens(model: HookedTransformer, sae: SAE, latent: int, k: int = 10) -> LogitLens:
    """The ``k`` tokens latent ``latent`` promotes most and suppresses most through the unembedding."""
    check_positive_int("k", k, upper=model.cfg.d_vocab, what="the vocabulary size")
    logits = decoder_logits(model, sae, latent).float().cpu()
    top = torch.topk(logits, k)
    bot = torch.topk(-logits, k)
    return LogitLens(
        latent=int(latent),
        top_ids=top.indices.tolist(),
        top_values=top.values.tolist(),
        top_tokens=token_strings(model, top.indices),
        bottom_ids=bot.indices.tolist(),
        bottom_values=(-bot.values).tolist(),
        bottom_tokens=token_strings(model, bot.indices),
    )


# ---------------------------------------------------------------------------------------------------
# The dashboard
# ---------------------------------------------------------------------------------------------------


def _context_html(ctx: TopContext, peak: float, line_chars: int = 100) -> str:
    """Tokens of a context; the max token bold red, the others shaded from grey to orange by activation.

    Lines are broken by hand (``<br>`` every ~``line_chars`` visible characters, and always at least one):
    plotly tables otherwise wrap cell text at spaces, including the spaces inside ``<span style=...>``.
    """
    lines: list[str] = []
    line, width = "", 0
    for j, (tok, a) in enumerate(zip(ctx.tokens, ctx.acts)):
        s = _show_token(tok)
        if j == ctx.highlight:
            part = f'<b><span style="color:#d62728">{s}</span></b>'
        elif a > 0:
            t = min(1.0, a / peak) if peak > 0 else 0.0
            r, g, b = (int(136 + t * (230 - 136)), int(136 + t * (126 - 136)), int(136 + t * (34 - 136)))
            part = f'<span style="color:rgb({r},{g},{b})">{s}</span>'
        else:
            part = f'<span style="color:#888888">{s}</span>'
        if width and width + len(tok) > line_chars:
            lines.append(line)
            line, width = "", 0
        line, width = line + part, width + len(tok)
    lines.append(line)
    return "<br>".join(lines) + ("<br>" if len(lines) == 1 else "")


@dataclass
class FeatureDashboard(PlotlyView):
    """Everything shown about one latent; ``figure()`` draws it (see the module docstring)."""

    latent: int
    hook_name: str
    stats: LatentStats
    lens: LogitLens
    score: dict | None = None
    """``{'score', 'alive', 'raw'}`` from LatentScores, or None."""
    contrast: dict | None = None
    """This latent's row of the toxicity_latents table (``{}`` if the table does not list it), or None."""
    title: str | None = None

    def scores_table(self) -> pd.DataFrame:
        """The latent's numbers as a two-column table (what the figure's table shows)."""
        s = self.stats
        rows: list[tuple[str, str]] = [
            ("hook", self.hook_name),
            ("tokens streamed", f"{s.n_tokens:,} in {s.n_texts:,} texts"),
            ("sinks left out", _sinks_text(s)),
            ("firing density", f"{s.density:.3%}"),
            ("max activation", f"{s.max_activation:.4g}"),
            ("mean when firing", f"{s.mean_when_firing:.4g}"),
        ]
        if self.score is not None:
            if self.score["alive"]:
                rows.append(("alignment score", f"{self.score['score']:.4f} (raw {self.score['raw']:.4g})"))
            else:
                rows.append(("alignment score", "none: fires on no reference prompt (dead)"))
        if self.contrast is not None:
            if not self.contrast:
                rows.append(("toxicity contrast", "not in the table (outside its top_n)"))
            for k, v in self.contrast.items():
                if k == "latent":
                    continue
                rows.append((f"contrast {k}", f"{v:.4g}" if isinstance(v, float) else str(v)))
        return pd.DataFrame(rows, columns=["quantity", "value"])

    def contexts_table(self) -> pd.DataFrame:
        """Top contexts as plain text (the max token in [[ ]])."""
        rows = []
        for c in self.stats.top_contexts:
            text = "".join(f"[[{t}]]" if j == c.highlight else t for j, t in enumerate(c.tokens))
            rows.append(dict(activation=c.activation, text_index=c.text_index, position=c.position, context=text))
        return pd.DataFrame(rows, columns=["activation", "text_index", "position", "context"])

    def figure(self):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        s, lens = self.stats, self.lens
        n_ctx = max(1, len(s.top_contexts))
        table = self.scores_table()
        # pixel heights of the three rows (plot area = height - plotly's 180 px of margins, 2 x 7% gaps);
        # the bottom row grows by a table row for each score row beyond the 11 the default layout holds
        height0 = 900 + 30 * n_ctx
        weights = np.array([0.25 + 0.03 * n_ctx, 0.35, 0.4])
        rows_px = (height0 - 180) * 0.86 * weights / weights.sum()
        extra_px = 24.0 * max(0, len(table) - 11)
        rows_px[2] += extra_px
        fig = make_subplots(
            rows=3,
            cols=2,
            specs=[
                [{"type": "table", "colspan": 2}, None],
                [{"type": "xy"}, {"type": "xy"}],
                [{"type": "table"}, {"type": "xy"}],
            ],
            row_heights=(rows_px / rows_px.sum()).tolist(),
            vertical_spacing=0.07,
            horizontal_spacing=0.12,
            subplot_titles=(
                f"top {len(s.top_contexts)} contexts (max-activation token in bold red)",
                f"non-zero activations ({s.n_fired:,} of {s.n_tokens:,} tokens; density {s.density:.3%})<br>"
                + (
                    f"{s.n_sinks:,} attention-sink tokens left out"
                    if s.sink_factor is not None
                    else "attention sinks kept (sink_factor=None)"
                ),
                "logit lens: tokens promoted by the decoder vector",
                "steering scores and statistics",
                "logit lens: tokens suppressed",
            ),
        )
        peak = s.max_activation
        fig.add_trace(
            go.Table(
                name="top contexts",
                columnwidth=[1, 8],
                header=dict(values=["<b>activation</b>", "<b>context</b>"], align="left"),
                cells=dict(
                    values=[
                        [f"{c.activation:.3f}" for c in s.top_contexts] or ["-"],
                        [_context_html(c, peak) for c in s.top_contexts] or ["this latent never fired"],
                    ],
                    align="left",
                    height=26,
                ),
            ),
            row=1,
            col=1,
        )
        centers = (s.hist_edges[:-1] + s.hist_edges[1:]) / 2
        widths = np.diff(s.hist_edges)
        fig.add_trace(
            go.Bar(
                name="histogram",
                x=centers,
                y=s.hist_counts,
                width=widths,
                marker_color="#1f77b4",
                customdata=np.stack([s.hist_edges[:-1], s.hist_edges[1:]], -1),
                hovertemplate="[%{customdata[0]:.3g}, %{customdata[1]:.3g}): %{y} tokens<extra></extra>",
            ),
            row=2,
            col=1,
        )
        fig.update_xaxes(title_text="activation", row=2, col=1)
        fig.update_yaxes(title_text="tokens", row=2, col=1)
        lens_bars = (  # (row, name, values, tokens, color): the logit lens's two ends, largest first
            (2, "promoted", lens.top_values, lens.top_tokens, "#2ca02c"),
            (3, "suppressed", lens.bottom_values, lens.bottom_tokens, "#d62728"),
        )
        for r, name, values, tokens, color in lens_bars:
            y = [_show_token(t) for t in tokens][::-1]
            hover = "%{y}: %{x:.3f}<extra></extra>"
            bar = go.Bar(name=name, x=values[::-1], y=y, orientation="h", marker_color=color, hovertemplate=hover)
            fig.add_trace(bar, row=r, col=2)
            fig.update_yaxes(type="category", row=r, col=2)
            fig.update_xaxes(title_text="d_i · W_U", row=r, col=2)
        fig.add_trace(
            go.Table(
                name="scores",
                header=dict(values=["<b>quantity</b>", "<b>value</b>"], align="left"),
                cells=dict(values=[table["quantity"].tolist(), table["value"].tolist()], align="left"),
            ),
            row=3,
            col=1,
        )
        fig.update_layout(
            title=self.title or f"latent {self.latent} at {self.hook_name}",
            showlegend=False,
            height=round(height0 + extra_px / 0.86),
            width=1200,
            bargap=0.05,
        )
        return fig


def _sinks_text(s: LatentStats) -> str:
    if s.sink_factor is None:
        return "none (sink_factor=None)"
    return f"{s.n_sinks:,} (norm above {s.sink_factor:g}x row median)"


def _score_info(scores: LatentScores | None, sae: SAE, latent: int) -> dict | None:
    if scores is None:
        return None
    if not isinstance(scores, LatentScores):
        raise ValueError(f"scores must be a LatentScores (saesteer.score_latents), got {type(scores).__name__}.")
    if len(scores.scores) != sae.cfg.d_sae:
        raise ValueError(
            f"scores has {len(scores.scores)} latents but the SAE has d_sae={sae.cfg.d_sae}; "
            "pass the scores of this SAE."
        )
    return dict(score=float(scores.scores[latent]), alive=bool(scores.alive[latent]), raw=float(scores.raw[latent]))


def _contrast_info(contrast: pd.DataFrame | None, latent: int) -> dict | None:
    if contrast is None:
        return None
    if not isinstance(contrast, pd.DataFrame) or "latent" not in contrast.columns:
        raise ValueError("contrast must be the DataFrame from saesteer.toxicity_latents (with a 'latent' column).")
    rows = contrast[contrast["latent"] == latent]
    if rows.empty:
        return {}
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in rows.iloc[0].to_dict().items()}


def feature_dashboards(
    model: HookedTransformer,
    sae: SAE,
    latents: Sequence[int],
    corpus: Corpus = None,
    *,
    scores: LatentScores | None = None,
    contrast: pd.DataFrame | None = None,
    k_tokens: int = 10,
    hook_name: str | None = None,
    **stats_options: Any,
) -> list[FeatureDashboard]:
    """Dashboards for several latents from ONE streamed pass over ``corpus`` (see :func:`feature_dashboard`).

    ``k_tokens``: tokens at each end of the logit lens; ``stats_options``: the options of
    :func:`collect_latent_stats` (``n_top``, ``context``, ``max_texts``, ``batch_size``, ``max_length``,
    ``progress``, ``sink_factor``, ...), with its defaults.
    """
    hook_name = _hook(sae, hook_name)
    idx = [check_latent(sae, i) for i in latents]
    stats = collect_latent_stats(model, sae, corpus, idx, hook_name=hook_name, **stats_options)
    return [
        FeatureDashboard(
            latent=i,
            hook_name=hook_name,
            stats=stats[i],
            lens=logit_lens(model, sae, i, k_tokens),
            score=_score_info(scores, sae, i),
            contrast=_contrast_info(contrast, i),
        )
        for i in idx
    ]


def feature_dashboard(
    model: HookedTransformer,
    sae: SAE,
    latent: int,
    corpus: Corpus = None,
    **kwargs,
) -> FeatureDashboard:
    """The dashboard of one latent: top contexts from ``corpus`` (streamed), histogram and density,
    logit lens, and the steering scores given as ``scores=`` (LatentScores) and ``contrast=``
    (the ``toxicity_latents`` table).

    ``corpus``: a list/iterable of texts, a ``.txt`` file or folder (one text a line), or None for the
    default English corpus (:func:`saesteer.data.datasets.english_corpus`); ``max_texts`` (1000) caps it.
    Other keywords as in :func:`feature_dashboards`. Display with ``dash.show()`` or by leaving ``dash``
    last in a Jupyter cell; ``dash.save_html("latent.html")`` writes a standalone page.
    """
    return feature_dashboards(model, sae, [latent], corpus, **kwargs)[0]


# ---------------------------------------------------------------------------------------------------
# Prompt-centric view
# ---------------------------------------------------------------------------------------------------


@dataclass
class PromptLatents(PlotlyView):
    """The top latents on each token of one prompt (BOS excluded)."""

    prompt: str
    hook_name: str
    tokens: list[str]
    top_latents: Tensor
    """[n_tokens, top_k] latent indices, by activation (descending)."""
    top_acts: Tensor
    """[n_tokens, top_k] their activations (0 where fewer than top_k latents fire)."""
    n_active: Tensor
    """[n_tokens] number of latents with activation > 0 at each token."""

    def table(self) -> pd.DataFrame:
        """One row per (token, rank) with an activation > 0: position, token, rank, latent, activation."""
        rows = []
        for p, tok in enumerate(self.tokens):
            for r in range(self.top_latents.shape[1]):
                a = float(self.top_acts[p, r])
                if a > 0:
                    rows.append(dict(position=p, token=tok, rank=r, latent=int(self.top_latents[p, r]), activation=a))
        return pd.DataFrame(rows, columns=["position", "token", "rank", "latent", "activation"])

    def heatmap_data(self) -> tuple[list[int], np.ndarray]:
        """(latents shown, z[latent, position]): every latent in some token's top k, its activation per token."""
        fired = self.top_acts > 0
        shown = sorted(set(self.top_latents[fired].tolist()))
        z = np.zeros((len(shown), len(self.tokens)))
        row = {lat: i for i, lat in enumerate(shown)}
        for p in range(len(self.tokens)):
            for r in range(self.top_latents.shape[1]):
                if fired[p, r]:
                    z[row[int(self.top_latents[p, r])], p] = float(self.top_acts[p, r])
        return shown, z

    def figure(self):
        import plotly.graph_objects as go

        shown, z = self.heatmap_data()
        labels = [_show_token(t) for t in self.tokens]
        fig = go.Figure(
            go.Heatmap(
                z=np.where(z > 0, z, np.nan),
                x=list(range(len(self.tokens))),
                y=[str(i) for i in shown],
                colorscale="Reds",
                zmin=0,
                zmax=float(z.max()) if z.size else 1.0,
                colorbar=dict(title="activation"),
                xgap=1,
                ygap=1,
                customdata=np.array([labels] * max(1, len(shown)), dtype=object),
                hovertemplate="token %{x} %{customdata!r}<br>latent %{y}: %{z:.3f}<extra></extra>",
            )
        )
        fig.update_xaxes(
            tickmode="array", tickvals=list(range(len(labels))), ticktext=labels, tickangle=-45, title_text="token"
        )
        fig.update_yaxes(type="category", title_text="latent")
        k = self.top_latents.shape[1]
        fig.update_layout(
            title=f"top {k} latents per token at {self.hook_name}",
            height=max(350, 120 + 18 * len(shown)),
            width=max(700, 120 + 45 * len(labels)),
        )
        return fig


@torch.no_grad()
def prompt_latents(
    model: HookedTransformer,
    sae: SAE,
    prompt: str,
    *,
    top_k: int = 5,
    hook_name: str | None = None,
    max_length: int | None = None,
) -> PromptLatents:
    """Which latents fire on each token of ``prompt``: the ``top_k`` by activation per token (BOS excluded)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}.")
    hook_name = _hook(sae, hook_name)
    check_sae_fits(model, sae, hook_name)
    check_positive_int("top_k", top_k, upper=sae.cfg.d_sae, what="the SAE width d_sae")
    tokens, mask, n_bos = tokenize(model, [prompt], side="right", max_length=max_length)
    resid = run_to_hook(model, tokens, mask, hook_name)
    acts = sae_ops.encode(sae, resid.to(sae.W_dec.dtype)).acts[0, n_bos:].float().cpu()
    if acts.shape[0] == 0:
        raise ValueError(f"prompt {prompt!r} has no tokens besides BOS; pass some text.")
    top = torch.topk(acts, top_k, dim=-1)
    return PromptLatents(
        prompt=prompt,
        hook_name=hook_name,
        tokens=token_strings(model, tokens[0, n_bos:].tolist()),
        top_latents=top.indices,
        top_acts=top.values,
        n_active=(acts > 0).sum(-1),
    )
