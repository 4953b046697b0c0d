"""Fused error-feedback paths, registered by (codec, device): compress and residual update in
fewer passes over memory than op by op, checked against it bit for bit."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from commhooks.compressors.base import (
    Compressor,
    Context,
    Exchange,
    Payload,
    check_group,
    check_tensor,
)

__all__ = [
    "DEVICES",
    "FusedFeedbackExchange",
    "FusedPath",
    "KernelPath",
    "fused_compress",
    "fused_exchange",
    "fused_path",
    "register_fused",
]


class FusedPath:
    """A fused error-feedback path for a family of codecs on one kind of device: the numbers
    of the op-by-op reference (:class:`ErrorFeedback` with ``fused=False``) in fewer passes
    over memory, checked against it bit for bit (``tests/test_feedback_fused.py``). A codec
    module registers one with :func:`register_fused`; the codec itself carries no
    error-feedback methods. Each method returns None where it has nothing fused for these
    tensors, and error feedback then goes op by op."""

    def in_place(self, codec: Compressor[Any]) -> bool:
        """Whether :meth:`compress` may update a residual in place (the step's journal then
        keeps a copy first): where a path fuses it at all."""
        return type(self).compress is not FusedPath.compress

    def compress(
        self, codec: Compressor[Any], g: Tensor, e: Tensor, key: str | None
    ) -> tuple[Payload, Any] | None:
        """All-gather side: the payload (and ``Context.extra``) of ``c = g + e`` for
        non-empty ``g`` and ``e`` of one shape, with ``e`` overwritten by ``c - decode``
        (before decay, which the caller applies); None, with ``e`` untouched, where there is
        no kernel for these tensors or ``c`` is not safely finite (:func:`refuses`)."""
        return None

    def exchange(
        self,
        codec: Compressor[Any],
        tensors: Sequence[Tensor],
        residuals: Sequence[Tensor],
        keys: Sequence[str | None],
        world_size: int,
        decay: float,
    ) -> Exchange | None:
        """All-reduce side: an :class:`Exchange` of ``c = tensor + residual`` that, when its
        result is first read, overwrites each residual with ``decay * (c - local)`` (left as
        it was where that is not finite, and untouched if the exchange is abandoned; one
        that cannot roll back an overflow of finite values in place says so and resets to
        zero). It may read ``tensors`` and ``residuals`` again then, so neither may change in
        between. Arguments are checked, with at least one tensor."""
        return None


class KernelPath(FusedPath):
    """Every codec with fused kernels attached (``codec.kernels``): their encode updates the
    residual in the same pass as the codes. A codec that also has a fused exchange registers
    a subclass that adds :meth:`exchange`."""

    def in_place(self, codec: Compressor[Any]) -> bool:
        return codec.kernels is not None

    def compress(
        self, codec: Compressor[Any], g: Tensor, e: Tensor, key: str | None
    ) -> tuple[Payload, Any] | None:
        payload = None if codec.kernels is None else codec.kernels.compress(g, e)
        return None if payload is None else (payload, None)


_FUSED: dict[tuple[type, str], FusedPath] = {}
#: the kinds of device a path serves unless told otherwise (the kernel dispatch picks C or
#: Triton per tensor within it)
DEVICES = ("cpu", "cuda")


def register_fused(codec: type, path: FusedPath, devices: Sequence[str] = DEVICES) -> None:
    """Serve error feedback for ``codec`` (and its subclasses without a path of their own) on
    ``devices`` with ``path``."""
    if not (isinstance(codec, type) and issubclass(codec, Compressor)):
        raise ValueError(f"codec: expected a Compressor subclass, got {codec!r}")
    if not isinstance(path, FusedPath):
        raise ValueError(f"path: expected a FusedPath, got {type(path).__name__}")
    for device in devices:
        _FUSED[(codec, device)] = path


def fused_path(codec: Compressor[Any], device: torch.device) -> FusedPath | None:
    """The path registered for the nearest class of ``codec`` on ``device``'s kind."""
    for cls in type(codec).__mro__:
        path = _FUSED.get((cls, device.type))
        if path is not None:
            return path
    return None


register_fused(Compressor, KernelPath())


def fused_compress(
    codec: Compressor[Any], tensor: Tensor, residual: Tensor, key: str | None = None
) -> tuple[Payload, Context] | None:
    """Error feedback's all-gather step in one go where a fused path serves: compress
    ``c = tensor + residual`` and overwrite ``residual`` with ``c - decompress(payload)``
    (before decay). None, with ``residual`` untouched, where none serves these tensors or
    ``c`` is not safely finite; the caller then goes op by op, which also handles
    non-finite input."""
    check_tensor(tensor)
    path = fused_path(codec, tensor.device)
    if path is None or tensor.numel() == 0 or residual.shape != tensor.shape:
        return None
    with codec.working_on(key):
        out = path.compress(codec, tensor.reshape(-1), residual.view(-1), key)
    if out is None:
        return None
    payload, extra = out
    return payload, Context(tensor.shape, tensor.dtype, tensor.device, extra)


def fused_exchange(
    codec: Compressor[Any],
    tensors: Sequence[Tensor],
    residuals: Sequence[Tensor],
    keys: Sequence[str | None],
    world_size: int,
    decay: float = 1.0,
) -> Exchange | None:
    """Error feedback's all-reduce exchange in fused kernels where a path serves (see
    :meth:`FusedPath.exchange`); None: compensate and update op by op around
    ``codec.exchange``."""
    keys = check_group(tensors, keys, world_size)
    if len(residuals) != len(tensors):
        raise ValueError(f"residuals: got {len(residuals)} for {len(tensors)} tensors")
    if not tensors:
        return None
    path = fused_path(codec, tensors[0].device)
    if path is None:
        return None
    return path.exchange(codec, tensors, residuals, keys, world_size, decay)


class FusedFeedbackExchange(Exchange):
    """Base of the exchanges :meth:`FusedPath.exchange` returns: it holds the flat gradients
    and residuals and commits the residuals (:meth:`_commit`) once, when the result is first
    read, and never after :meth:`abandon`. Subclasses set ``_reduced`` in :meth:`receive`."""

    def __init__(self, tensors: Sequence[Tensor], residuals: Sequence[Tensor], decay: float):
        self._grads = [t.reshape(-1) for t in tensors]
        self._residuals = [e.view(-1) for e in residuals]
        self._shapes = [t.shape for t in tensors]
        self._decay = decay
        self._reduced: list[Tensor] | None = None
        self._done = False

    @abstractmethod
    def _commit(self) -> None:
        """Write every new residual (in place, where finite)."""

    def _ready(self) -> list[Tensor]:
        """The reduced pieces, one per tensor, the residuals committed first (once)."""
        if self._reduced is None:
            if not self._grads:
                return []
            raise RuntimeError("exchange: result() called before its round was received")
        if not self._done:
            self._done = True
            self._commit()
        return self._reduced

    def abandon(self) -> None:
        self._done = True
