"""The probe behind the bit-for-bit claims (saesteer.models.blas): it tells a place-dependent batched product from a
place-independent one."""

from __future__ import annotations

import pytest
import torch

from saesteer.models import blas


def test_probe_tells_place_dependent_products_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.bmm

    def by_place(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # every matrix after the first: one ulp more
        out = real(a, b)
        out[1:] = torch.nextafter(out[1:], torch.full_like(out[1:], float("inf")))
        return out

    def alone(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # each matrix as it is alone
        return torch.cat([real(a[i : i + 1], b[i : i + 1]) for i in range(a.shape[0])])

    try:
        for bmm, exact in ((by_place, False), (alone, True)):
            monkeypatch.setattr(torch, "bmm", bmm)
            blas.batched_products_exact.cache_clear()
            assert blas.batched_products_exact() is exact
    finally:
        monkeypatch.undo()
        blas.batched_products_exact.cache_clear()
    assert isinstance(blas.batched_products_exact(), bool)
