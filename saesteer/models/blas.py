"""What this machine's batched matrix product does that saesteer's bit-for-bit claims rest on.

:mod:`saesteer.models.tl_fixes` multiplies grouped-query attention without repeating the keys and values
(cause 4): the same matrices as stock TransformerLens, handed to ``torch.bmm`` in other batches. And
:func:`saesteer.evaluation.evaluate` batches several prompts' samples, so a row's matrices sit elsewhere in a
batch than they would alone. Both give the same bits only where the BLAS computes each matrix of a batch as it
would alone, whatever its place. Measured: Intel CPUs with MKL do (every such result equals stock
TransformerLens' and the unbatched one, bit for bit); AMD EPYC with the same MKL does not for small matrices (the
place of a matrix in its group of four picks the kernel), so there the same results are equal up to float32
rounding (~1e-7 relative in the attention scores, up to ~1e-5 in SmolLM2's logits), not bit for bit.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["batched_products_exact"]

# (m, k, n) products that show the place-dependence where it exists (AMD EPYC, MKL 2024.2): attention-sized
# small matrices, several query rows and one
_PROBES = ((9, 16, 9), (5, 128, 5), (7, 64, 7), (2, 64, 13), (1, 64, 9))


@functools.cache
def batched_products_exact() -> bool:
    """True where ``torch.bmm`` (float32, CPU) gives each matrix of a batch the bits it gets alone, whatever its
    place in the batch (see the module docstring): then saesteer's fixed models equal stock TransformerLens bit for
    bit and evaluate's results do not change with ``prompt_batch``; else both hold up to float32 rounding. Probed
    once per process (~1 ms) at the current thread count."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m, k, n in _PROBES:
            a, b = torch.randn(8, m, k, generator=gen), torch.randn(8, k, n, generator=gen)
            together = torch.bmm(a, b)
            if any(not torch.equal(torch.bmm(a[i : i + 1], b[i : i + 1]), together[i : i + 1]) for i in range(8)):
                return False
    return True
