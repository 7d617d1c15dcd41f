"""Language models: loading (offline SmolLM2, local folders, TransformerLens names), the TransformerLens
work-arounds in :mod:`~saesteer.models.tl_fixes`, and tokenising batches."""

from saesteer.models.loading import load_model

__all__ = ["load_model"]
