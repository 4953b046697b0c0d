"""A compressor's fused kernels, attached to it by composition.

A quantizer that has fused kernels sets ``self.kernels`` to a :class:`FusedCodec`. The
compressor base class asks it first, in :meth:`~commhooks.compressors.base.Compressor.compress`,
``decompress`` and ``aggregate`` (error feedback's fused path asks it too), and runs the torch
reference code where it answers None. The codec holds only the algorithm (statistics, scales,
which kernel): the backend that runs it comes from :func:`commhooks.kernels.dispatch.backend_for`,
so one codec serves CPU (C kernels) and GPU (Triton kernels) alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from commhooks.kernels.backend import Backend
from commhooks.kernels.dispatch import backend_for
from commhooks.payload import Context, Payload

__all__ = ["FusedCodec"]

_MASK64 = (1 << 64) - 1


class FusedCodec(ABC):
    """Base of the fused codecs. Subclasses say which backend operation they need
    (:attr:`op`), whether the config allows them (:meth:`enabled`), and implement
    :meth:`encode`, :meth:`sized` and :meth:`decode` against a :class:`Backend`.

    Args:
        owner: the compressor (its config, private generator and per-key state).
    """

    #: the backend operation family this codec runs on (see ``Backend.provides``)
    op: ClassVar[str] = ""
    #: payload tensors the kernels decode
    arity: ClassVar[int] = 2

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    # -- what subclasses provide --------------------------------------------------------------

    def enabled(self) -> bool:
        """Whether the config is one the kernels implement (e.g. not entropy coded)."""
        return True

    @abstractmethod
    def encode(self, ops: Backend, g: Tensor, e: Tensor | None) -> Payload | None:
        """The payload of ``c = g + e`` (flat fp32), ``e`` updated to the residual in place
        when given; None, with nothing written, unless ``c`` is safely finite."""

    @abstractmethod
    def sized(self, payload: Payload, n: int) -> bool:
        """Whether ``payload`` has the sizes the kernels expect for ``n`` elements (they
        trust them)."""

    @abstractmethod
    def decode(self, ops: Backend, payload: Payload, n: int, out: Tensor | None) -> Tensor:
        """The ``n`` decoded fp32 values, added into ``out`` when given."""

    # -- what the compressor calls ------------------------------------------------------------

    def backend(self, *tensors: Tensor, numel: int | None = None) -> Backend | None:
        """The backend that serves these tensors, or None (take the torch path)."""
        if not self.enabled():
            return None
        return backend_for(*tensors, op=self.op, numel=numel)

    def compress(self, tensor: Tensor, residual: Tensor | None = None) -> Payload | None:
        """The kernels' payload for ``tensor`` (plus ``residual``, updated in place), or None."""
        both = (tensor,) if residual is None else (tensor, residual)
        ops = self.backend(*both)
        if ops is None:
            return None
        return self.encode(ops, tensor.reshape(-1), None if residual is None else residual.view(-1))

    def decodes(self, payload: Payload, ctx: Context) -> Backend | None:
        """The backend that decodes this payload, or None (a size or dtype it does not take)."""
        if len(payload) != self.arity or ctx.dtype != torch.float32:
            return None
        if not self.sized(payload, ctx.numel):
            return None
        return self.backend(*payload, numel=ctx.numel)

    def decompress(self, payload: Payload, ctx: Context) -> Tensor | None:
        ops = self.decodes(payload, ctx)
        return None if ops is None else self.decode(ops, payload, ctx.numel, None)

    def aggregate(
        self, payloads: Sequence[Payload], ctx: Context, out: Tensor | None = None
    ) -> Tensor | None:
        """The sum of decoded payloads: the first decoded into fresh memory (no zero fill),
        or added into ``out`` zeroed, each other added straight into it; None unless the
        kernels decode every one (see :meth:`Compressor.aggregate`)."""
        if not payloads:
            return None
        backends = [self.decodes(p, ctx) for p in payloads]
        ops = backends[0]
        if ops is None or any(b is not ops for b in backends):
            return None
        if out is not None:
            acc = self.decode(ops, payloads[0], ctx.numel, out.view(-1).zero_())
        else:
            acc = self.decode(ops, payloads[0], ctx.numel, None)
        for p in payloads[1:]:
            self.decode(ops, p, ctx.numel, acc)
        return acc.view(ctx.shape)

    def seed(self) -> int:
        """A 64-bit seed for the kernels' counter-based rounding noise, drawn from the
        compressor's private generator's seed (so a resumed run draws the same). The
        generator is a CPU one whatever the data's device: a seed drawn on a GPU would need
        a host read."""
        gen = self.owner.generator(torch.device("cpu"))
        # The generator's own seed, mixed (splitmix64's finalizer): no tensor is drawn, so
        # nothing is read back.
        z = gen.initial_seed() & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return (z ^ (z >> 31)) >> 2
