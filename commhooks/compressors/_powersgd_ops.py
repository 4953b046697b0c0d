"""PowerSGD's matrix kernels: the matrix view of a tensor, batched products, orthonormalization.

Shared by the compressor (:mod:`commhooks.compressors.powersgd`) and its all-reduce exchanges
(:mod:`commhooks.compressors._powersgd_exchange`); they depend on torch alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["GRAM_SCHMIDT_MAX_RANK", "as_matrix", "mq", "mtp", "orthogonalize", "stack_matrices"]

# "auto" on accelerators uses Gram-Schmidt up to this rank and Householder QR above it, the
# switch torch's own PowerSGD hook makes: there Gram-Schmidt is r rounds of a few tiny batched
# kernels (rank 1 is a single normalization) while batched QR pays cuSOLVER's per-call launch and
# workspace costs, which only pay off as r grows, and Gram-Schmidt's cost and loss of
# orthogonality both grow with r. On CPU, LAPACK's QR measured as fast or faster at every rank
# (2 cores, batches of 1-64 matrices of 64-4096 rows: ~10-45 us at rank 1, 2-10x faster than
# Gram-Schmidt from rank 2), so "auto" is QR there.
GRAM_SCHMIDT_MAX_RANK = 2


def as_matrix(shape: torch.Size | Sequence[int]) -> tuple[int, int]:
    """The ``(rows, cols)`` a tensor of ``shape`` is viewed as: ``shape[0]`` by the rest."""
    numel = 1
    for s in shape:
        numel *= s
    if len(shape) == 0 or numel == 0:
        return (numel, 1) if numel else (0, 0)
    return shape[0], numel // shape[0]


def mtp(mats: Tensor | Sequence[Tensor], p: Tensor) -> Tensor:
    """``M^T P`` for a ``(batch, n, m)`` stack, as ``(P^T M)^T``: BLAS reads M row-major
    then, 5.5x faster on this CPU at 4096 x 4096, rank 4, than a bmm of the transposed view.
    A sequence of stacks stands for their sum ``M``, which is never formed."""
    srcs = [mats] if isinstance(mats, Tensor) else list(mats)
    pt = p.transpose(1, 2)
    out = torch.bmm(pt, srcs[0])
    for src in srcs[1:]:
        out.baddbmm_(pt, src)
    return out.transpose(1, 2)


def mq(mats: Sequence[Tensor], q: Tensor) -> Tensor:
    """``M Q`` for the sum ``M`` of ``(batch, n, m)`` stacks, one product per stack."""
    out = torch.bmm(mats[0], q)
    for src in mats[1:]:
        out.baddbmm_(src, q)
    return out


def orthogonalize(p: Tensor, method: str = "auto") -> Tensor:
    """Orthonormalize the columns of each matrix of a ``(batch, n, r)`` stack (a new tensor).

    A zero P (a zero gradient is legal) yields a zero approximation, never NaN, while NaN or
    Inf in a matrix spreads to its result, so a non-finite gradient stays visible.
    """
    if method == "auto":
        small = p.shape[-1] <= GRAM_SCHMIDT_MAX_RANK
        method = "gram_schmidt" if small and p.device.type != "cpu" else "qr"
    if method == "qr":
        # Householder QR: orthonormal columns even for a rank-deficient P, and a zero P gives
        # unit columns, whose Q = M^T P is then zero.
        return torch.linalg.qr(p, mode="reduced").Q
    return _gram_schmidt(p)


def _gram_schmidt(p: Tensor) -> Tensor:
    # Classical Gram-Schmidt, applied twice ("twice is enough"): one pass leaves a column that
    # is nearly in the span of the previous ones (P rank-deficient, e.g. M of rank < r) far from
    # orthogonal to them; the second pass restores orthogonality to rounding level.
    tiny = torch.finfo(p.dtype).tiny
    out = torch.empty_like(p)
    for k in range(p.shape[-1]):
        v = p[..., k : k + 1]
        if k:
            basis = out[..., :k]
            for _ in range(2):
                v = v - basis @ (basis.transpose(-2, -1) @ v)
        # clamp_min keeps an all-zero column zero and passes NaN through.
        norm = torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(tiny)
        torch.div(v, norm, out=out[..., k : k + 1])
    return out


def stack_matrices(mats: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``(B, n, m)`` in ``dtype``: a view for a single matrix already in it (whose data starts
    on 16 bytes, on the CPU), else one copy.

    MKL's matrix-vector products (rank 1) round differently when the data starts elsewhere,
    and DDP puts a gradient wherever its bucket layout does, which changes when it rebuilds
    its buckets or resumes from a checkpoint: the copy keeps ``M Q`` independent of where
    the gradient lies. Measured here: 16-byte aligned views round as new memory does, at
    every offset, rank and shape tried; the others differ at rank 1.
    """
    m = mats[0]
    if len(mats) == 1 and (m.dtype != dtype or m.device.type != "cpu" or m.data_ptr() % 16 == 0):
        return m.unsqueeze(0).to(dtype)
    out = torch.empty((len(mats), *mats[0].shape), dtype=dtype, device=mats[0].device)
    for j, mat in enumerate(mats):
        out[j].copy_(mat)  # converts while copying: no half-precision intermediate stack
    return out
