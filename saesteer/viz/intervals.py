"""Confidence intervals drawn on plotly figures."""

from __future__ import annotations

import pandas as pd

__all__ = ["error_bars"]


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
