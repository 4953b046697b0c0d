"""The data a codec hands around: payloads, their local context, exchange messages and
reduce ops (a leaf module: codecs, kernels and transports import it, and it imports none of
them)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Context", "Kind", "Message", "Payload", "ReduceOp"]

#: a compressed tensor on the wire: the tensors the transport moves
Payload = tuple[Tensor, ...]


class Kind(str, enum.Enum):
    """What family a compressor belongs to; pipelines use it to refuse nonsense compositions."""

    SPARSE = "sparse"
    QUANTIZER = "quantizer"
    LOWRANK = "lowrank"
    CAST = "cast"
    PIPELINE = "pipeline"


class ReduceOp(str, enum.Enum):
    SUM = "sum"
    MAX = "max"


@dataclass(frozen=True)
class Context:
    """What stays on this rank to decode a payload. Never rank-private (see module docstring)."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    extra: Any = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Message:
    """One round of an exchange: these tensors are reduced across ranks with ``op``."""

    tensors: Payload
    op: ReduceOp
