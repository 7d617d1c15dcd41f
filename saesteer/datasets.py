"""Text data sets in one labelled form, and loaders for the public formats.

Every labelled set becomes a :class:`LabelledTexts`: ``texts[i]`` with a toxicity ``labels[i]`` in
[0, 1] (Jigsaw's convention; binary sets use 0 and 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with a toxicity label in [0, 1] each, and where they came from."""

    texts: list[str]
    labels: np.ndarray
    source: str = "memory"

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.float64)
        object.__setattr__(self, "labels", labels)
        if labels.ndim != 1 or len(labels) != len(self.texts):
            raise ValueError(
                f"LabelledTexts needs one label per text; got {len(self.texts)} texts and labels of shape "
                f"{labels.shape}."
            )
        if not all(isinstance(t, str) for t in self.texts):
            raise ValueError("LabelledTexts.texts must all be str; convert or drop the other entries first.")
        if np.isnan(labels).any() or (labels < 0).any() or (labels > 1).any():
            raise ValueError("LabelledTexts.labels must lie in [0, 1] with no NaN; clean the label column first.")

    def __len__(self) -> int:
        return len(self.texts)
