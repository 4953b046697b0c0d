"""Shared-scale uniform quantization's fused error feedback: the all-reduce exchange in kernels.

The op-by-op exchange (:class:`~commhooks.compressors.uniform.SharedScaleExchange` inside
error feedback) makes a fresh tensor per op: the compensated gradient, its absolute value, the
quotients, the rounded codes, their fp32 copy and the decoded values, twice. Here the kernels
read the gradient and the residual in place: one pass for the per-chunk maxima, one for the
codes, one for the new residual and one that decodes the summed codes straight into the
caller's buffer. The numbers are the op-by-op path's, bit for bit
(``tests/test_feedback_fused.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from commhooks.compressors.base import Compressor, Exchange, Message, ReduceOp
from commhooks.compressors.uniform import Uniform, chunk_absmax, decode_codes, shared_levels
from commhooks.feedback import (
    SAFE_ABS,
    FusedFeedbackExchange,
    KernelPath,
    register_fused,
    write_residual,
)
from commhooks.kernels import backend_for, backend_for_device

__all__ = ["FusedSharedScaleExchange"]


class FusedSharedScaleExchange(FusedFeedbackExchange):
    """Shared-scale codes of ``c = g + e`` in two all-reduce rounds (MAX of the per-chunk
    maxima, SUM of the codes), as :class:`~commhooks.compressors.uniform.SharedScaleExchange`
    sends them, with the residual ``e = decay * (c - float(code) * step)`` written when the
    result is first read (``g`` and ``e`` are read again then, so the caller leaves them
    alone until then) and the mean decoded into the caller's buffer.

    With host checks on, a tensor whose ``|c|`` reaches :data:`~commhooks.feedback.SAFE_ABS`
    or whose agreed steps are not finite keeps its residual unless every new value is finite
    (the torch formulas, as the op-by-op path refuses it); tensors the kernels do not take
    (small ones) run the same formulas as torch ops.

    Args:
        codec: the shared-scale :class:`~commhooks.compressors.uniform.Uniform`
            (deterministic rounding).
        tensors: the gradients (fp32).
        residuals: their stored residuals (fp32, updated in place).
        world_size: ranks summing the codes (sets the levels and the code width).
        decay: multiplies each new residual.
    """

    def __init__(
        self,
        codec: Uniform,
        tensors: Sequence[Tensor],
        residuals: Sequence[Tensor],
        world_size: int,
        decay: float,
    ) -> None:
        super().__init__(tensors, residuals, decay)
        self._codec = codec
        self._chunk = codec.config.chunk
        self._level, self._dtype = shared_levels(codec.config.bits, world_size)
        self._sizes = [g.numel() for g in self._grads]
        self._ops = [backend_for(g, e, op="symm") for g, e in zip(self._grads, self._residuals)]
        self._absmax: list[Tensor] | None = None  # this rank's, per tensor
        self._steps: list[Tensor] | None = None  # agreed, per tensor
        self._codes: Tensor | None = None  # this rank's, all tensors

    def message(self) -> Message | None:
        if self._reduced is not None or not self._grads:
            return None
        if self._steps is None:
            if self._absmax is None:
                self._absmax = [self._local_absmax(i) for i in range(len(self._grads))]
            return Message((torch.cat(self._absmax),), ReduceOp.MAX)
        assert self._codes is not None
        return Message((self._codes,), ReduceOp.SUM)

    def receive(self, reduced: Sequence[Tensor]) -> None:
        if self._reduced is not None:
            raise RuntimeError("exchange: receive() called after both rounds were done")
        (summed,) = reduced
        if self._steps is None:
            nchunks = [-(-n // self._chunk) for n in self._sizes]
            self._steps = [s / self._level for s in summed.split(nchunks)]
            device = self._grads[0].device
            self._codes = torch.empty(sum(self._sizes), dtype=self._dtype, device=device)
            for i, q in enumerate(self._codes.split(self._sizes)):
                self._encode(i, q)
        else:
            self._reduced = list(summed.split(self._sizes))

    def result(self) -> list[Tensor]:
        return [t.view(shape) for t, shape in zip(self._decoded(self._ready()), self._shapes)]

    def result_into(self, outs: Sequence[Tensor], divisor: float) -> None:
        """The mean decoded straight into ``outs`` (after the residuals, which read the
        inputs, are written)."""
        summed = self._ready()
        assert self._steps is not None
        for q, s, o, ops in zip(summed, self._steps, outs, self._ops):
            if ops is not None and o.dtype == torch.float32 and o.is_contiguous():
                ops.symm_decode(q, self._chunk, s, divisor, o.view(-1))
            else:
                mean = decode_codes(q, s, self._chunk, q.numel()).div_(divisor)
                o.copy_(mean.view(o.shape))

    def local(self) -> list[Tensor]:
        if self._codes is None:
            raise RuntimeError("exchange: local() called before the scale round was received")
        mine = self._decoded(list(self._codes.split(self._sizes)))
        return [t.view(shape) for t, shape in zip(mine, self._shapes)]

    def _local_absmax(self, i: int) -> Tensor:
        """Tensor ``i``'s per-chunk ``max |c|``, NaN sent as +inf (every MAX keeps an inf)."""
        g, e, ops = self._grads[i], self._residuals[i], self._ops[i]
        if ops is not None:
            return ops.symm_absmax(g, e, self._chunk)
        absmax = chunk_absmax(g + e, self._chunk).float()
        return absmax.masked_fill_(absmax.isnan(), float("inf"))

    def _encode(self, i: int, codes: Tensor) -> None:
        assert self._steps is not None
        g, e, ops, step = self._grads[i], self._residuals[i], self._ops[i], self._steps[i]
        if ops is not None:
            ops.symm_encode(g, e, self._chunk, step, self._level, codes)
        else:
            codes.copy_(self._codec.symmetric_codes(g + e, step, self._level, self._dtype))

    def _decoded(self, codes: Sequence[Tensor]) -> list[Tensor]:
        """Codes (one rank's or summed) times their steps, fp32, one flat tensor each."""
        assert self._steps is not None
        out = []
        for q, s, ops in zip(codes, self._steps, self._ops):
            if ops is not None:
                t = torch.empty(q.numel(), dtype=torch.float32, device=q.device)
                ops.symm_decode(q, self._chunk, s, 1.0, t)
            else:
                t = decode_codes(q, s, self._chunk, q.numel())
            out.append(t)
        return out

    def _safe(self, i: int) -> bool:
        """Whether the kernel may write tensor ``i``'s residual unchecked: its ``|c|`` stays
        below SAFE_ABS and the agreed steps are finite (then so is every new value), or the
        step is decided on the device (which undoes it where not)."""
        if not self.host_checks:
            return True
        assert self._absmax is not None and self._steps is not None
        absmax, step = self._absmax[i], self._steps[i]
        return bool(absmax.max() < SAFE_ABS) and bool(torch.isfinite(step).all())

    def _commit(self) -> None:
        assert self._codes is not None and self._steps is not None
        mine = self._codes.split(self._sizes)
        rows = zip(self._grads, self._residuals, self._steps, mine, self._ops)
        for i, (g, e, step, q, ops) in enumerate(rows):
            if ops is not None and self._safe(i):
                ops.symm_residual(g, e, self._chunk, step, q, self._decay)
            else:
                sent = decode_codes(q, step, self._chunk, q.numel())
                write_residual(g + e, sent, self._decay, keep="device", into=e)


class _UniformFeedback(KernelPath):
    """Uniform's fused error feedback: the kernels' encode (all-gather side), and in
    shared-scale mode with deterministic rounding the fused all-reduce exchange, where a
    backend has the symmetric-code kernels (the CPU's C kernels)."""

    def exchange(
        self,
        codec: Compressor[Any],
        tensors: Sequence[Tensor],
        residuals: Sequence[Tensor],
        keys: Sequence[str | None],
        world_size: int,
        decay: float,
    ) -> Exchange | None:
        assert isinstance(codec, Uniform)
        cfg = codec.config
        if not cfg.shared_scale or cfg.stochastic:
            return None
        fp32 = all(t.dtype == e.dtype == torch.float32 for t, e in zip(tensors, residuals))
        if not fp32 or backend_for_device(tensors[0].device, "symm") is None:
            return None
        return FusedSharedScaleExchange(codec, tensors, residuals, world_size, decay)


register_fused(Uniform, _UniformFeedback())
