"""Confidence intervals and reference lines drawn on plotly figures."""

from __future__ import annotations

import pandas as pd

__all__ = ["error_bars", "vertical_line"]


def error_bars(rows: pd.DataFrame, metric: str) -> dict:
    """Plotly ``error_x`` / ``error_y`` for the asymmetric interval ``[<metric>_ci_low, <metric>_ci_high]``
    around each row's ``metric``: hidden where the columns are missing, a zero-length bar where a row has
    no interval."""
    if f"{metric}_ci_low" not in rows or f"{metric}_ci_high" not in rows:
        return dict(visible=False)
    est = pd.to_numeric(rows[metric], errors="coerce")
    low = pd.to_numeric(rows[f"{metric}_ci_low"], errors="coerce")
    high = pd.to_numeric(rows[f"{metric}_ci_high"], errors="coerce")
    return dict(
        type="data",
        symmetric=False,
        array=(high - est).clip(lower=0).fillna(0).tolist(),
        arrayminus=(est - low).clip(lower=0).fillna(0).tolist(),
        thickness=1,
        width=3,
    )


def vertical_line(x: float, y: tuple[float, float], name: str):
    """A dashed vertical line at data ``x`` from ``y[0]`` to ``y[1]``, as a legend-named trace.

    A trace, not ``fig.add_vline``: on a log axis plotly reads a shape's x as log10(x), so a vline at PPL 190
    stretches the axis to 1e190."""
    import plotly.graph_objects as go

    return go.Scatter(
        x=[x, x], y=list(y), mode="lines", name=name, line=dict(dash="dash", color="black", width=1), hoverinfo="name"
    )
