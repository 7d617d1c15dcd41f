"""A steering report for one generation: what steering did, token by token, next to the unsteered run.

:func:`steering_report` generates a continuation of one prompt twice with the same sampling settings
and seed: once steered (``steerers=`` hook steerers and/or ``decoder=`` e.g. a
:class:`~saesteer.steering.sasa.SASADecoder`) and once unsteered. Then, for each finished sequence, it
re-runs full forward passes (no change to the generation loop is needed) and reports per token:

- **SASA margin**: ``margin(x_t) = w . (x_t - m)`` of each subspace (positive = non-toxic), where x_t is
  the final hidden state after token t (after the final norm, as SASA embeds it). For a generated token
  this is exactly the margin SASA computed for it as a candidate at that step. In the steered run the
  forward carries the steerers (what SASA saw when composed with SAE steering); in the unsteered run it
  does not. During the steered generation the margins SASA itself computed for the chosen tokens
  (``SASADecoder.last_margins`` after each step) are recorded too, in ``recorded_margins``.
- **latents that steering changed** (for SAE steerers): at the SAE's hook, the latents of the hook's
  value in the steered forward (after every steerer at that hook ran) minus those in the unsteered
  forward, on the same tokens: f(steered) - f(unsteered). A latent is *changed* at a token when
  ``|delta| > atol``. This is computed on both runs' tokens, so the unsteered column shows what steering
  would have changed on the text the model wrote without it.

BOS is left out of every per-token view. Display with ``report.show()``, inline in Jupyter, or
``report.save_html(path)``; ``report.table()`` has the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor
from transformer_lens import HookedTransformer

from saesteer.checks import check_sae_fits, check_strength, sae_hook_name
from saesteer.generation import Decoder, DecodeState, SamplingConfig, generate
from saesteer.hooks import Steerer, steering
from saesteer.models.tokens import tokenize
from saesteer.sae import ops as sae_ops
from saesteer.steering.sasa_subspace import Subspace, apply_final_norm, embedding_hook_name
from saesteer.viz.dashboard import PlotlyView, _show_token, token_strings

__all__ = ["RunTrace", "SteeringReport", "steering_report", "MarginRecorder"]


class MarginRecorder(Decoder):
    """Wraps a decoder and keeps its ``last_margins`` after every step (SASA's margins of the chosen tokens)."""

    def __init__(self, inner: Decoder) -> None:
        self.inner = inner
        self.margins: list[Tensor | None] = []

    def choose(self, state: DecodeState, logits: Tensor) -> Tensor:
        if hasattr(self.inner, "last_margins"):
            self.inner.last_margins = None
        chosen = self.inner.choose(state, logits)
        m = getattr(self.inner, "last_margins", None)
        self.margins.append(None if m is None else m.detach().float().cpu().clone())
        return chosen

    def advance(self, state: DecodeState, chosen: Tensor) -> Tensor:
        return self.inner.advance(state, chosen)

    def stacked(self) -> Tensor | None:
        """[n_steps, n_attributes] margins of the chosen tokens of row 0, or None if none was recorded."""
        if not self.margins or any(m is None for m in self.margins):
            return None
        return torch.stack([m[0] for m in self.margins])


@dataclass
class RunTrace:
    """One generation, token by token (BOS excluded): prompt tokens first, then the generated ones."""

    label: str
    text: str
    """The generated continuation."""
    token_ids: list[int]
    tokens: list[str]
    n_prompt: int
    """How many of the tokens are the prompt's (the rest were generated)."""
    margins: Float[Tensor, "pos n_attr"] | None = None
    """Margin of each subspace at each token (None without a subspace)."""
    recorded_margins: Float[Tensor, "new n_attr"] | None = None
    """What the SASA decoder computed for each generated token while generating (steered SASA runs only)."""
    latent_delta: Float[Tensor, "pos d_sae"] | None = None
    """f(steered forward) - f(unsteered forward) at the SAE hook, on these tokens (None without an SAE)."""
    changed: list[list[int]] = field(default_factory=list)
    """Per token: the latents with |delta| > atol, largest |delta| first."""

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.n_prompt


@dataclass
class SteeringReport(PlotlyView):
    """The steered and unsteered runs of one prompt (see the module docstring)."""

    prompt: str
    steered: RunTrace
    unsteered: RunTrace
    description: str
    subspace_names: list[str]
    hook_name: str | None
    atol: float
    n_latents: int = 20

    def table(self) -> pd.DataFrame:
        """One row per run and token: run, position, token, generated, margin_<j>, n_changed, changed."""
        rows = []
        for run in (self.unsteered, self.steered):
            for p, tok in enumerate(run.tokens):
                row = dict(run=run.label, position=p, token=tok, generated=p >= run.n_prompt)
                if run.margins is not None:
                    for j, name in enumerate(self.subspace_names):
                        row[f"margin_{name}"] = float(run.margins[p, j])
                if run.latent_delta is not None:
                    row["n_changed"] = len(run.changed[p])
                    row["changed"] = run.changed[p]
                rows.append(row)
        return pd.DataFrame(rows)

    def shown_latents(self) -> list[int]:
        """The latents in the heatmaps: the ``n_latents`` with the largest total |delta| over both runs."""
        deltas = [r.latent_delta for r in (self.unsteered, self.steered) if r.latent_delta is not None]
        if not deltas:
            return []
        total = sum(d.abs().sum(0) for d in deltas)
        n = min(self.n_latents, int((total > 0).sum()))
        return sorted(torch.topk(total, n).indices.tolist()) if n else []

    def heatmap_z(self, run: RunTrace, latents: Sequence[int]) -> np.ndarray:
        """[latent, position] delta of ``latents`` in ``run``, NaN where the latent did not change."""
        z = np.full((len(latents), len(run.tokens)), np.nan)
        if run.latent_delta is None:
            return z
        for p, ch in enumerate(run.changed):
            chs = set(ch)
            for i, lat in enumerate(latents):
                if lat in chs:
                    z[i, p] = float(run.latent_delta[p, lat])
        return z

    def _margin_bars(self, run: RunTrace, x: list[int], labels: list[str]) -> list:
        """One bar trace per subspace: ``run``'s SASA margin at each token (grey in the prompt, then green > 0,
        red < 0); none where the run has no margins."""
        import plotly.graph_objects as go

        if run.margins is None:
            return []
        bars = []
        for j, name in enumerate(self.subspace_names):
            m = run.margins[:, j].numpy()
            colors = ["#bbbbbb" if p < run.n_prompt else ("#2ca02c" if v > 0 else "#d62728") for p, v in enumerate(m)]
            hover = "%{customdata}: margin %{y:.3f}<extra></extra>"
            bars.append(
                go.Bar(
                    x=x,
                    y=m,
                    name=f"margin {name} ({run.label})",
                    marker_color=colors,
                    customdata=labels,
                    hovertemplate=hover,
                )
            )
        return bars

    def figure(self):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        runs = (self.unsteered, self.steered)
        has_margin = any(r.margins is not None for r in runs)
        has_latents = any(r.latent_delta is not None for r in runs)
        n_rows = int(has_margin) + int(has_latents) or 1
        titles = []
        if has_margin:
            titles += [f"SASA margin per token, {r.label} (> 0: non-toxic side)" for r in runs]
        if has_latents:
            titles += [f"latents steering changed, {r.label} (Δ activation)" for r in runs]
        fig = make_subplots(
            rows=n_rows, cols=2, subplot_titles=titles or None, vertical_spacing=0.22, horizontal_spacing=0.08
        )
        latents = self.shown_latents()
        zmax = max(
            [np.nanmax(np.abs(z)) for r in runs if (z := self.heatmap_z(r, latents)).size and np.isfinite(z).any()]
            or [1.0]
        )
        for c, run in enumerate(runs, start=1):
            x = list(range(len(run.tokens)))
            labels = [_show_token(t) for t in run.tokens]
            panels = []  # the traces of each subplot row of this column, top to bottom
            if has_margin:
                panels.append(self._margin_bars(run, x, labels))
            if has_latents:
                n_changed = [len(ch) for ch in run.changed] if run.changed else [0] * len(x)
                hover = [[f"{lab} ({n} changed)" for lab, n in zip(labels, n_changed)]] * max(1, len(latents))
                heatmap = go.Heatmap(
                    z=self.heatmap_z(run, latents),
                    x=x,
                    y=[str(i) for i in latents],
                    zmid=0,
                    zmin=-zmax,
                    zmax=zmax,
                    colorscale="RdBu",
                    name=f"latent delta ({run.label})",
                    showscale=c == 2,
                    xgap=1,
                    ygap=1,
                    colorbar=dict(title="Δ", len=1.0 / n_rows, y=0.0, yanchor="bottom"),
                    customdata=np.array(hover, dtype=object),
                    hovertemplate="%{customdata}<br>latent %{y}: Δ %{z:.3f}<extra></extra>",
                )
                panels.append([heatmap])
            for row, traces in enumerate(panels, start=1):
                for trace in traces:
                    fig.add_trace(trace, row=row, col=c)
                fig.add_vline(x=run.n_prompt - 0.5, line_dash="dot", line_color="#555", row=row, col=c)
                fig.update_xaxes(tickmode="array", tickvals=x, ticktext=labels, tickangle=-60, row=row, col=c)
            if has_latents:
                fig.update_yaxes(type="category", title_text="latent" if c == 1 else None, row=len(panels), col=c)
        width = max(1100, 2 * (160 + 16 * max(len(r.tokens) for r in runs)))
        fig.update_layout(
            title=dict(
                text=(
                    f"steering report: {self.description}"
                    + (f" (latents of the SAE at {self.hook_name})" if self.hook_name else "")
                    + f"<br><sup>prompt: {_show_token(self.prompt[:160])}"
                    + f"<br>unsteered: {_show_token(self.unsteered.text[:160])}"
                    + f"<br>steered: {_show_token(self.steered.text[:160])}</sup>"
                )
            ),
            showlegend=False,
            height=240 + 330 * n_rows + 14 * len(latents),
            width=width,
            margin=dict(t=200),
        )
        return fig


def _sequence(out, eos: Sequence[int]) -> tuple[Tensor, int]:
    """Prompt (BOS kept, padding dropped) + generated tokens up to and including the first EOS (any of ``eos``);
    and the prompt length."""
    prompt = out.prompt_tokens[0][out.prompt_mask[0].bool()].cpu()
    new = out.tokens[0].cpu().tolist()
    end = next((j for j, t in enumerate(new) if t in eos), None)
    if end is not None:
        new = new[: end + 1]
    return torch.cat([prompt, torch.tensor(new, dtype=prompt.dtype)]), len(prompt)


@torch.no_grad()
def _forward(
    model: HookedTransformer, tokens: Int[Tensor, " pos"], steerers: Sequence[Steerer], hooks: Sequence[str]
) -> dict[str, Tensor]:
    """Values at ``hooks`` in a forward of ``tokens`` with ``steerers`` attached (captured after them)."""
    captured: dict[str, Tensor] = {}

    def grab(name: str):
        def fn(act: Tensor, hook) -> Tensor:
            captured[name] = act.detach()
            return act

        return fn

    with steering(model, steerers), model.hooks(fwd_hooks=[(h, grab(h)) for h in dict.fromkeys(hooks)]):
        model(tokens.unsqueeze(0).to(model.cfg.device), return_type=None)
    return captured


@torch.no_grad()
def steering_report(
    model: HookedTransformer,
    prompt: str,
    *,
    steerers: Sequence[Steerer] = (),
    decoder: Decoder | None = None,
    sae: SAE | None = None,
    subspaces: Sequence[Subspace] | Subspace | None = None,
    atol: float = 1e-6,
    n_latents: int = 20,
    description: str | None = None,
    sampling: SamplingConfig | None = None,
    **sampling_kwargs,
) -> SteeringReport:
    """Generate from ``prompt`` steered and unsteered (same settings and seed) and report per token.

    ``steerers``/``decoder`` as in :func:`saesteer.generate` (at least one must steer). ``sae``: the SAE
    whose latent changes are shown (default: the first steerer's ``sae``). ``subspaces``: the SASA
    subspaces whose margins are shown (default: those of a ``SASADecoder``). Sampling settings as in
    :func:`saesteer.generate` (``max_new_tokens``, ``do_sample`` (default False: greedy), ``seed``, ...).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be one non-empty string, got {prompt!r}.")
    steerers = list(steerers)
    if not steerers and decoder is None:
        raise ValueError("Nothing to report: pass steerers=[...] (SAE steering) and/or decoder=SASADecoder(...).")
    atol = check_strength("atol", atol)
    if sampling is not None and sampling_kwargs:
        raise ValueError("Pass either sampling=SamplingConfig(...) or sampling keyword arguments, not both.")
    cfg = sampling if sampling is not None else SamplingConfig.from_kwargs(**sampling_kwargs)
    if cfg.num_return_sequences != 1:
        raise ValueError(
            f"A steering report follows one generation; pass num_return_sequences=1, got {cfg.num_return_sequences}."
        )

    if subspaces is None:
        subspaces = [a.subspace for a in getattr(decoder, "attributes", [])]
    elif isinstance(subspaces, Subspace):
        subspaces = [subspaces]
    subspaces = list(subspaces)
    for s in subspaces:
        s.check_model(model)
    if sae is None:
        sae = next((s.sae for s in steerers if isinstance(getattr(s, "sae", None), SAE)), None)
    sae_hook = None
    if sae is not None:
        sae_hook = sae_hook_name(sae) or next((s.hook_name for s in steerers if getattr(s, "sae", None) is sae), None)
        if not sae_hook:
            raise ValueError("The SAE does not name its hook; pass an SAE with metadata.hook_name set.")
        check_sae_fits(model, sae, sae_hook)
        sae_ops.check_supported(sae)

    recorder = MarginRecorder(decoder) if decoder is not None else None
    out_s = generate(model, prompt, steerers=steerers, decoder=recorder, sampling=cfg)
    out_u = generate(model, prompt, sampling=cfg)
    _, _, n_bos = tokenize(model, [prompt])
    eos = cfg.stop_ids(model)

    hooks = ([embedding_hook_name(model)] if subspaces else []) + ([sae_hook] if sae_hook else [])
    names = [s.source if s.source != "memory" else f"subspace{j}" for j, s in enumerate(subspaces)]
    traces = []
    for label, out in (("steered", out_s), ("unsteered", out_u)):
        seq, n_prompt = _sequence(out, eos)
        trace = RunTrace(
            label=label,
            text=out.texts[0],
            token_ids=seq[n_bos:].tolist(),
            tokens=token_strings(model, seq[n_bos:].tolist()),
            n_prompt=n_prompt - n_bos,
        )
        plain = _forward(model, seq, [], hooks) if hooks else {}
        steered = _forward(model, seq, steerers, hooks) if hooks else {}
        if subspaces:
            own = steered if label == "steered" else plain
            x = apply_final_norm(model, own[embedding_hook_name(model)][0, n_bos:])
            trace.margins = torch.stack([s.margin(x) for s in subspaces], dim=-1).float().cpu()
        if sae_hook:
            f_s = sae_ops.encode(sae, steered[sae_hook][0, n_bos:].to(sae.W_dec.dtype)).acts
            f_u = sae_ops.encode(sae, plain[sae_hook][0, n_bos:].to(sae.W_dec.dtype)).acts
            delta = (f_s - f_u).float().cpu()
            trace.latent_delta = delta
            for row in delta:
                idx = torch.nonzero(row.abs() > atol).flatten()
                trace.changed.append(idx[torch.argsort(row[idx].abs(), descending=True, stable=True)].tolist())
        if label == "steered" and recorder is not None:
            trace.recorded_margins = recorder.stacked()
        traces.append(trace)

    if description is None:
        parts = [
            type(s).__name__
            + (f"({getattr(s, 'mode', getattr(s, 'tier', ''))})" if hasattr(s, "mode") or hasattr(s, "tier") else "")
            for s in steerers
        ]
        if decoder is not None:
            parts.append(type(decoder).__name__)
        description = " + ".join(parts)
    return SteeringReport(
        prompt=prompt,
        steered=traces[0],
        unsteered=traces[1],
        description=description,
        subspace_names=names,
        hook_name=sae_hook,
        atol=atol,
        n_latents=n_latents,
    )
